package sqlitestore

import (
	"context"
	"database/sql"
	"fmt"
)

// schemaVersion is stored in PRAGMA user_version. A database with a higher
// version was written by a newer sendonce and is refused rather than
// misread.
const schemaVersion = 6

// The ledger is one table: the dedup ledger (UNIQUE (tenant, idem_key)), the
// outbox (the due and lease indexes the dispatcher claims from) and the
// audit trail at once. id is AUTOINCREMENT so an id is never reused after a
// sweeper deletes rows: List cursors stay meaningful.
const schemaV1 = `
CREATE TABLE IF NOT EXISTS emails (
	id           INTEGER PRIMARY KEY AUTOINCREMENT,
	tenant       TEXT    NOT NULL,
	idem_key     TEXT    NOT NULL,
	fingerprint  TEXT    NOT NULL,
	message_id   TEXT    NOT NULL,
	mail_from    TEXT    NOT NULL,
	rcpt_to      TEXT    NOT NULL, -- JSON array
	subject      TEXT    NOT NULL,
	tags         TEXT    NOT NULL, -- JSON object
	source       TEXT    NOT NULL,
	state        TEXT    NOT NULL,
	attempts     INTEGER NOT NULL DEFAULT 0,
	duplicates   INTEGER NOT NULL DEFAULT 0,
	last_error   TEXT    NOT NULL DEFAULT '',
	reply        TEXT    NOT NULL DEFAULT '',
	fence        INTEGER NOT NULL DEFAULT 0,
	lease_owner  TEXT    NOT NULL DEFAULT '',
	lease_expiry INTEGER NOT NULL DEFAULT 0,
	committing   INTEGER NOT NULL DEFAULT 0,
	next_attempt INTEGER NOT NULL,
	created_at   INTEGER NOT NULL,
	updated_at   INTEGER NOT NULL,
	sent_at      INTEGER NOT NULL DEFAULT 0,
	resolved_by  TEXT    NOT NULL DEFAULT '',
	data         BLOB    NOT NULL, -- moved to email_bodies by schemaV6
	UNIQUE (tenant, idem_key)
);
-- Due queued records, oldest due first.
CREATE INDEX IF NOT EXISTS emails_due ON emails (state, next_attempt);
-- Sending records by lease expiry: reclaim and in_doubt sweeps.
CREATE INDEX IF NOT EXISTS emails_lease ON emails (lease_expiry) WHERE state = 'sending';
-- List newest first, with and without a state filter, and Counts.
CREATE INDEX IF NOT EXISTS emails_tenant_id ON emails (tenant, id);
CREATE INDEX IF NOT EXISTS emails_tenant_state ON emails (tenant, state, id);
`

// schemaV2 serves the retention sweeper.
const schemaV2 = `
CREATE INDEX IF NOT EXISTS emails_created ON emails (created_at) WHERE state IN ('sent', 'failed');
`

// schemaV3 adds the fires of schedules (store.FireStore): one row per
// (schedule, instant), whose primary key makes each fire exist once.
const schemaV3 = `
CREATE TABLE IF NOT EXISTS fires (
	fire_key     TEXT    PRIMARY KEY,
	schedule     TEXT    NOT NULL,
	scheduled_at INTEGER NOT NULL,
	state        TEXT    NOT NULL,
	fence        INTEGER NOT NULL,
	owner        TEXT    NOT NULL DEFAULT '',
	lease_expiry INTEGER NOT NULL DEFAULT 0,
	cursor       TEXT    NOT NULL DEFAULT '',
	admitted     INTEGER NOT NULL DEFAULT 0,
	duplicates   INTEGER NOT NULL DEFAULT 0,
	rejected     INTEGER NOT NULL DEFAULT 0,
	attempts     INTEGER NOT NULL DEFAULT 0,
	last_error   TEXT    NOT NULL DEFAULT '',
	next_attempt INTEGER NOT NULL DEFAULT 0,
	manual       INTEGER NOT NULL DEFAULT 0,
	created_at   INTEGER NOT NULL,
	updated_at   INTEGER NOT NULL,
	finished_at  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS fires_schedule ON fires (schedule, scheduled_at);
`

// schemaV4 serves the operator's views across tenants: the metrics' oldest
// queued and in-doubt email, and the in-doubt rules, list one state of every
// tenant in ID order.
const schemaV4 = `
CREATE INDEX IF NOT EXISTS emails_state_id ON emails (state, id);
`

// schemaV5 is the timeline of every record: triggers write an event in the
// transaction of every change an operator cares about, so no write path can
// forget one. A record's events go with it when the sweeper deletes it.
// Claim and Resolve advance the fence and Complete never does, which tells
// an attempt and a resolution from a plain change of state.
const schemaV5 = `
CREATE TABLE IF NOT EXISTS email_events (
	id       INTEGER PRIMARY KEY, -- a new row's id is above every existing one: order holds
	email_id INTEGER NOT NULL,
	at       INTEGER NOT NULL,
	kind     TEXT    NOT NULL,
	state    TEXT    NOT NULL,
	attempt  INTEGER NOT NULL,
	fence    INTEGER NOT NULL,
	detail   TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS email_events_email ON email_events (email_id, id);

-- Deleted with their record (the sweeper). A trigger rather than a foreign
-- key: the key's check would cost every event insert a lookup.
CREATE TRIGGER IF NOT EXISTS emails_events_delete AFTER DELETE ON emails BEGIN
	DELETE FROM email_events WHERE email_id = OLD.id;
END;
CREATE TRIGGER IF NOT EXISTS emails_event_accepted AFTER INSERT ON emails BEGIN
	INSERT INTO email_events (email_id, at, kind, state, attempt, fence, detail)
	VALUES (NEW.id, NEW.created_at, 'accepted', NEW.state, NEW.attempts, NEW.fence, NEW.source);
END;
-- A duplicate changes no time of the record: the database's clock dates it.
CREATE TRIGGER IF NOT EXISTS emails_event_duplicate AFTER UPDATE ON emails WHEN NEW.duplicates > OLD.duplicates BEGIN
	INSERT INTO email_events (email_id, at, kind, state, attempt, fence, detail)
	VALUES (NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) * 1000000, 'duplicate',
		NEW.state, NEW.attempts, NEW.fence, CAST(NEW.duplicates AS TEXT));
END;
CREATE TRIGGER IF NOT EXISTS emails_event_attempt AFTER UPDATE ON emails WHEN NEW.state = 'sending' AND NEW.fence != OLD.fence BEGIN
	INSERT INTO email_events (email_id, at, kind, state, attempt, fence, detail)
	VALUES (NEW.id, NEW.updated_at, 'attempt', NEW.state, NEW.attempts, NEW.fence, NEW.lease_owner);
END;
CREATE TRIGGER IF NOT EXISTS emails_event_committing AFTER UPDATE ON emails WHEN NEW.committing = 1 AND OLD.committing = 0 BEGIN
	INSERT INTO email_events (email_id, at, kind, state, attempt, fence, detail)
	VALUES (NEW.id, NEW.updated_at, 'committing', NEW.state, NEW.attempts, NEW.fence, '');
END;
CREATE TRIGGER IF NOT EXISTS emails_event_state AFTER UPDATE ON emails
WHEN NEW.state != OLD.state AND NEW.state != 'sending' AND NEW.fence = OLD.fence BEGIN
	INSERT INTO email_events (email_id, at, kind, state, attempt, fence, detail)
	VALUES (NEW.id, NEW.updated_at, CASE NEW.state WHEN 'queued' THEN 'retry' ELSE NEW.state END,
		NEW.state, NEW.attempts, NEW.fence, CASE NEW.state WHEN 'sent' THEN NEW.reply ELSE NEW.last_error END);
END;
CREATE TRIGGER IF NOT EXISTS emails_event_resolved AFTER UPDATE ON emails
WHEN OLD.state = 'in_doubt' AND NEW.state != 'in_doubt' AND NEW.fence != OLD.fence BEGIN
	INSERT INTO email_events (email_id, at, kind, state, attempt, fence, detail)
	VALUES (NEW.id, NEW.updated_at, 'resolved', NEW.state, NEW.attempts, NEW.fence, NEW.resolved_by);
END;
`

// schemaV6 moves the stored message out of the record into a table of its
// own. SQLite writes a whole row on every UPDATE: with the message in the
// record, each claim, commit marker and completion rewrote its kilobytes
// and their overflow pages. The record is now small and changes; the
// message is written once at admission and deleted when purged or swept.
// A ledger migrated from an older schema is rewritten once (DROP COLUMN).
const schemaV6 = `
CREATE TABLE IF NOT EXISTS email_bodies (
	id   INTEGER PRIMARY KEY, -- the record's id
	data BLOB    NOT NULL
);
INSERT INTO email_bodies (id, data) SELECT id, data FROM emails WHERE length(data) > 0;
ALTER TABLE emails DROP COLUMN data;
CREATE TRIGGER IF NOT EXISTS emails_body_delete AFTER DELETE ON emails BEGIN
	DELETE FROM email_bodies WHERE id = OLD.id;
END;
`

func migrate(ctx context.Context, db *sql.DB, path string) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("sqlitestore: open %s: %w", path, err)
	}
	defer tx.Rollback()
	var v int
	if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return fmt.Errorf("sqlitestore: open %s: read schema version: %w", path, err)
	}
	if v > schemaVersion {
		return fmt.Errorf("sqlitestore: database %s has schema version %d, but this sendonce supports at most %d; run a newer sendonce, or use another --data directory", path, v, schemaVersion)
	}
	if v == schemaVersion {
		return nil
	}
	for i, ddl := range []string{schemaV1, schemaV2, schemaV3, schemaV4, schemaV5, schemaV6}[v:] {
		if _, err := tx.ExecContext(ctx, ddl); err != nil {
			return fmt.Errorf("sqlitestore: open %s: migrate to schema %d: %w", path, v+i+1, err)
		}
	}
	if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", schemaVersion)); err != nil {
		return fmt.Errorf("sqlitestore: open %s: set schema version: %w", path, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("sqlitestore: open %s: commit schema: %w", path, err)
	}
	return nil
}
