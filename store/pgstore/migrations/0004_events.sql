-- 0003: the timeline of every record. A trigger writes an event in the
-- transaction of every change an operator cares about, so no write path
-- (Admit, AdmitTx in a caller's transaction, Claim, Complete, Resolve) can
-- forget one; a record's events go with it when the sweeper deletes it.
-- Claim and Resolve advance the fence and Complete never does, which tells
-- an attempt and a resolution from a plain change of state. A duplicate
-- changes no time of the record, so the database's clock dates it.
CREATE TABLE sendonce_email_events (
	id       bigserial PRIMARY KEY,
	email_id bigint  NOT NULL REFERENCES sendonce_emails (id) ON DELETE CASCADE,
	at       bigint  NOT NULL,
	kind     text    NOT NULL,
	state    text    NOT NULL,
	attempt  integer NOT NULL,
	fence    bigint  NOT NULL,
	detail   text    NOT NULL
);
CREATE INDEX sendonce_email_events_email ON sendonce_email_events (email_id, id);

-- SET search_path FROM CURRENT pins the schema the migration runs in, so
-- the trigger finds its table whatever search_path the writing connection
-- has (AdmitTx runs in the application's own connection).
CREATE FUNCTION sendonce_email_event() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
	IF TG_OP = 'INSERT' THEN
		INSERT INTO sendonce_email_events (email_id, at, kind, state, attempt, fence, detail)
		VALUES (NEW.id, NEW.created_at, 'accepted', NEW.state, NEW.attempts, NEW.fence, NEW.source);
		RETURN NULL;
	END IF;
	IF NEW.duplicates > OLD.duplicates THEN
		INSERT INTO sendonce_email_events (email_id, at, kind, state, attempt, fence, detail)
		VALUES (NEW.id, (extract(epoch FROM clock_timestamp()) * 1000)::bigint * 1000000, 'duplicate',
			NEW.state, NEW.attempts, NEW.fence, NEW.duplicates::text);
	END IF;
	IF NEW.state = 'sending' AND NEW.fence <> OLD.fence THEN
		INSERT INTO sendonce_email_events (email_id, at, kind, state, attempt, fence, detail)
		VALUES (NEW.id, NEW.updated_at, 'attempt', NEW.state, NEW.attempts, NEW.fence, NEW.lease_owner);
	END IF;
	IF NEW.committing AND NOT OLD.committing THEN
		INSERT INTO sendonce_email_events (email_id, at, kind, state, attempt, fence, detail)
		VALUES (NEW.id, NEW.updated_at, 'committing', NEW.state, NEW.attempts, NEW.fence, '');
	END IF;
	IF NEW.state <> OLD.state AND NEW.state <> 'sending' AND NEW.fence = OLD.fence THEN
		INSERT INTO sendonce_email_events (email_id, at, kind, state, attempt, fence, detail)
		VALUES (NEW.id, NEW.updated_at, CASE NEW.state WHEN 'queued' THEN 'retry' ELSE NEW.state END,
			NEW.state, NEW.attempts, NEW.fence, CASE NEW.state WHEN 'sent' THEN NEW.reply ELSE NEW.last_error END);
	END IF;
	IF OLD.state = 'in_doubt' AND NEW.state <> 'in_doubt' AND NEW.fence <> OLD.fence THEN
		INSERT INTO sendonce_email_events (email_id, at, kind, state, attempt, fence, detail)
		VALUES (NEW.id, NEW.updated_at, 'resolved', NEW.state, NEW.attempts, NEW.fence, NEW.resolved_by);
	END IF;
	RETURN NULL;
END
$$;

CREATE TRIGGER sendonce_emails_events AFTER INSERT OR UPDATE ON sendonce_emails
	FOR EACH ROW EXECUTE FUNCTION sendonce_email_event();
