-- 0002: the fires of schedules (store.FireStore). One row per (schedule,
-- scheduled instant): the primary key on the fire key makes each fire exist
-- once however many nodes run the scheduler; the lease and fence let one
-- node at a time run it, and the cursor lets another node resume it.
-- Times are bigint unix nanoseconds (UTC), as in 0001.
CREATE TABLE sendonce_fires (
	fire_key     text    PRIMARY KEY, -- "NAME@RFC3339-UTC"
	schedule     text    NOT NULL,
	scheduled_at bigint  NOT NULL,
	state        text    NOT NULL,
	fence        bigint  NOT NULL,
	owner        text    NOT NULL DEFAULT '',
	lease_expiry bigint  NOT NULL DEFAULT 0,
	cursor       text    NOT NULL DEFAULT '',
	admitted     bigint  NOT NULL DEFAULT 0,
	duplicates   bigint  NOT NULL DEFAULT 0,
	rejected     bigint  NOT NULL DEFAULT 0,
	attempts     integer NOT NULL DEFAULT 0,
	last_error   text    NOT NULL DEFAULT '',
	next_attempt bigint  NOT NULL DEFAULT 0,
	manual       boolean NOT NULL DEFAULT false,
	created_at   bigint  NOT NULL,
	updated_at   bigint  NOT NULL,
	finished_at  bigint  NOT NULL DEFAULT 0,
	CONSTRAINT sendonce_fires_state CHECK (state IN ('running', 'waiting', 'done'))
);

-- The scheduler's reads: a schedule's fires, latest first.
CREATE INDEX sendonce_fires_schedule ON sendonce_fires (schedule, scheduled_at);
