package sqlitestore

import (
	"context"
	"database/sql"
	"fmt"
)

// schemaVersion is stored in PRAGMA user_version. A database with a higher
// version was written by a newer sendonce and is refused rather than
// misread.
const schemaVersion = 3

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
	data         BLOB    NOT NULL,
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

// schemaV3 serves the operator's views across tenants: the metrics' oldest
// queued and in-doubt email, and the in-doubt rules, list one state of every
// tenant in ID order.
const schemaV3 = `
CREATE INDEX IF NOT EXISTS emails_state_id ON emails (state, id);
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
	for i, ddl := range []string{schemaV1, schemaV2, schemaV3}[v:] {
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
