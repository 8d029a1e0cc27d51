package pgstore

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Migrations are numbered SQL files, NNNN_name.sql, applied in order from
// 0001, each in its own transaction. A released migration is never edited:
// a change is a new file.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrationsTable records the migrations applied, one row each.
const migrationsTable = "sendonce_schema_migrations"

// migrateLockClass is the first key of the advisory lock that serialises
// migrators; the second is a hash of the schema name, so migrations of
// different schemas (parallel tests) do not wait for each other.
const migrateLockClass = 0x5e0d

type migration struct {
	version int
	name    string
	sql     string
}

// loadMigrations reads the embedded migrations and checks that they are
// numbered 1, 2, 3... without a gap: a gap would be skipped silently.
func loadMigrations() ([]migration, error) {
	entries, err := fs.ReadDir(migrationFiles, "migrations")
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, e := range entries {
		num, name, ok := strings.Cut(strings.TrimSuffix(e.Name(), ".sql"), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 {
			return nil, fmt.Errorf("pgstore: migration file %q is not named NNNN_name.sql", e.Name())
		}
		b, err := migrationFiles.ReadFile(path.Join("migrations", e.Name()))
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: name, sql: string(b)})
	}
	slices.SortFunc(ms, func(a, b migration) int { return a.version - b.version })
	for i, m := range ms {
		if m.version != i+1 {
			return nil, fmt.Errorf("pgstore: migration %04d_%s follows %d: versions must be 1, 2, 3... without gaps", m.version, m.name, i)
		}
	}
	return ms, nil
}

// SchemaVersion is the schema version this sendonce writes and reads: the
// number of its embedded migrations.
func SchemaVersion() int {
	ms, err := loadMigrations()
	if err != nil {
		return 0
	}
	return len(ms)
}

// Migrate brings the schema (opts.Schema, created if missing, or the first
// existing schema of the search_path) up to SchemaVersion. Each migration
// runs in its own transaction under a transaction-scoped advisory lock, so
// any number of nodes may migrate at once: one applies each migration, the
// others wait and then find it applied. A database migrated by a newer
// sendonce is refused. Of opts, only Schema and Logger are used.
func Migrate(ctx context.Context, url string, opts Options) error {
	ms, err := loadMigrations()
	if err != nil {
		return err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return fmt.Errorf("pgstore: invalid PostgreSQL URL: %w", err)
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("pgstore: migrate: connect to %s: %w", where(cfg), err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for {
		applied, err := migrateStep(ctx, conn, opts.Schema, ms)
		if err != nil {
			return err
		}
		if applied == nil {
			return nil
		}
		log.Info("pgstore: applied migration", "version", applied.version, "name", applied.name, "schema", opts.Schema)
	}
}

// migrateStep applies the first pending migration in one transaction and
// returns it, or returns nil when there is none.
func migrateStep(ctx context.Context, conn *pgx.Conn, schema string, ms []migration) (*migration, error) {
	var applied *migration
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		name := schema
		if name == "" {
			var cur *string
			if err := tx.QueryRow(ctx, "SELECT current_schema()").Scan(&cur); err != nil {
				return fmt.Errorf("pgstore: migrate: %w", err)
			}
			if cur == nil {
				return errors.New("pgstore: migrate: no schema of the search_path exists; create one, or set the schema to migrate into (Options.Schema)")
			}
			name = *cur
		}
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1, hashtext($2))", migrateLockClass, name); err != nil {
			return fmt.Errorf("pgstore: migrate: take the migration lock: %w", err)
		}
		ident := pgx.Identifier{name}.Sanitize()
		if schema != "" {
			if _, err := tx.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+ident); err != nil {
				return fmt.Errorf("pgstore: migrate: create schema %s: %w", ident, err)
			}
		}
		// The migrations name no schema; this puts their objects in ours.
		if _, err := tx.Exec(ctx, "SET LOCAL search_path TO "+ident); err != nil {
			return fmt.Errorf("pgstore: migrate: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+migrationsTable+` (
			version    integer PRIMARY KEY,
			name       text NOT NULL,
			applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
			return fmt.Errorf("pgstore: migrate: create %s: %w", migrationsTable, err)
		}
		var cur int
		if err := tx.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM "+migrationsTable).Scan(&cur); err != nil {
			return fmt.Errorf("pgstore: migrate: read schema version: %w", err)
		}
		if cur > len(ms) {
			return newerError(cur, len(ms))
		}
		if cur == len(ms) {
			return nil
		}
		m := ms[cur]
		if _, err := tx.Exec(ctx, m.sql); err != nil {
			return fmt.Errorf("pgstore: migrate: migration %04d_%s: %w", m.version, m.name, err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO "+migrationsTable+" (version, name) VALUES ($1, $2)", m.version, m.name); err != nil {
			return fmt.Errorf("pgstore: migrate: record migration %04d_%s: %w", m.version, m.name, err)
		}
		applied = &m
		return nil
	})
	return applied, err
}

func newerError(db, binary int) error {
	return fmt.Errorf("pgstore: database schema version %d is newer than this sendonce (%d): upgrade sendonce", db, binary)
}

// checkVersion refuses a schema that is missing, behind or ahead of this
// binary, naming the command that fixes it.
func (s *Store) checkVersion(ctx context.Context, db string) error {
	want := SchemaVersion()
	var cur int
	err := s.pool.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM "+s.q.migrations).Scan(&cur)
	var pe *pgconn.PgError
	switch {
	case errors.As(err, &pe) && (pe.Code == "42P01" || pe.Code == "3F000"): // no such table, no such schema
		return fmt.Errorf("pgstore: %s has no sendonce schema (no table %s): run \"sendonce migrate --postgres URL\", or start with \"sendonce serve --migrate\"", db, s.q.migrations)
	case err != nil:
		return fmt.Errorf("pgstore: connect to %s: %w", db, err)
	case cur > want:
		return newerError(cur, want)
	case cur < want:
		return fmt.Errorf("pgstore: database schema version %d is older than this sendonce (%d): run \"sendonce migrate --postgres URL\", or start with \"sendonce serve --migrate\"", cur, want)
	}
	return nil
}
