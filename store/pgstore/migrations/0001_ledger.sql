-- 0001: the ledger. One table is at once the dedup ledger (the unique
-- constraint on tenant and key), the outbox the dispatcher claims from (the
-- due index) and the audit trail of every attempt.
--
-- Times are bigint unix nanoseconds (UTC), the zero time as 0: the store
-- promises exact round trips of the caller's time.Time, and timestamptz keeps
-- only microseconds. For a human: to_timestamp(created_at / 1e9).
--
-- Tables are prefixed sendonce_ because they may live in an application's
-- own database (the transactional outbox: AdmitTx in the caller's
-- transaction).
CREATE TABLE sendonce_emails (
	id           bigserial PRIMARY KEY, -- never reused, so List cursors stay meaningful after a sweep
	tenant       text    NOT NULL,
	idem_key     text    NOT NULL,
	fingerprint  text    NOT NULL,
	message_id   text    NOT NULL,
	mail_from    text    NOT NULL,
	rcpt_to      jsonb   NOT NULL, -- JSON array of addresses
	subject      text    NOT NULL,
	tags         jsonb   NOT NULL, -- JSON object
	source       text    NOT NULL,
	state        text    NOT NULL,
	attempts     integer NOT NULL DEFAULT 0,
	duplicates   bigint  NOT NULL DEFAULT 0,
	last_error   text    NOT NULL DEFAULT '',
	reply        text    NOT NULL DEFAULT '',
	fence        bigint  NOT NULL DEFAULT 0,
	lease_owner  text    NOT NULL DEFAULT '',
	lease_expiry bigint  NOT NULL DEFAULT 0,
	committing   boolean NOT NULL DEFAULT false,
	next_attempt bigint  NOT NULL,
	created_at   bigint  NOT NULL,
	updated_at   bigint  NOT NULL,
	sent_at      bigint  NOT NULL DEFAULT 0,
	resolved_by  text    NOT NULL DEFAULT '',
	data         bytea   NOT NULL,
	-- When the record can be claimed: a queued record at next_attempt, a
	-- sending record without the commit marker when its lease expires (its
	-- worker died before the irreversible step); never otherwise. One column
	-- for both lets Claim take the oldest due records of both kinds with one
	-- ordered index range scan that locks exactly the rows it returns (FOR
	-- UPDATE SKIP LOCKED ... LIMIT n), instead of a union of two scans that
	-- would lock more rows than it takes, or a sort of every due row.
	due          bigint GENERATED ALWAYS AS (
		CASE
			WHEN state = 'queued' THEN next_attempt
			WHEN state = 'sending' AND NOT committing THEN lease_expiry
		END) STORED,
	CONSTRAINT sendonce_emails_tenant_key UNIQUE (tenant, idem_key),
	CONSTRAINT sendonce_emails_state CHECK (state IN ('queued', 'sending', 'sent', 'failed', 'in_doubt'))
);

-- Claim: claimable records, oldest due first. Only claimable rows are in it.
CREATE INDEX sendonce_emails_due ON sendonce_emails (due, id) WHERE due IS NOT NULL;
-- Claim: marked sending records whose lease expired move to in_doubt.
CREATE INDEX sendonce_emails_marked ON sendonce_emails (lease_expiry) WHERE state = 'sending' AND committing;
-- List newest first, with and without a state filter, and Counts.
CREATE INDEX sendonce_emails_tenant_id ON sendonce_emails (tenant, id);
CREATE INDEX sendonce_emails_tenant_state ON sendonce_emails (tenant, state, id);
-- The retention sweeper: final records, oldest first.
CREATE INDEX sendonce_emails_final ON sendonce_emails (created_at, id) WHERE state IN ('sent', 'failed');
