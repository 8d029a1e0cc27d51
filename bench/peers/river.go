package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
)

// emailArgs is River's job: the same key and payload as sendonce's email.
// Only the key takes part in uniqueness (River's documented way to make a
// job unique by one field of its args), as sendonce's idempotency key does.
type emailArgs struct {
	Key  string `json:"key" river:"unique"`
	Body string `json:"body"`
}

func (emailArgs) Kind() string { return "email" }

// uniqueByKey makes a second insert of the same key a skipped duplicate for
// as long as the first job is in the table, in any state but cancelled or
// discarded (River's default ByState).
var uniqueByKey = &river.InsertOpts{UniqueOpts: river.UniqueOpts{ByArgs: true}}

// river measures Client.Insert (one job per call, as Submit is one email)
// or InsertMany, with UniqueOpts ByArgs, into a freshly migrated schema of
// the run's database. The client is insert-only (no queues, no workers):
// nothing works the jobs while they are measured, as nothing sends
// sendonce's emails.
func (b *bench) river(ctx context.Context, mode string) (Row, error) {
	row := Row{System: "river", Store: "postgres", Mode: mode, Durable: true}
	schema := "river_" + strings.ReplaceAll(mode, "-", "_")
	cfg, err := pgxpool.ParseConfig(b.dbURL)
	if err != nil {
		return row, err
	}
	cfg.MaxConns = b.o.RiverConns
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return row, err
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize()); err != nil {
		return row, err
	}
	quiet := slog.New(slog.DiscardHandler)
	migrator, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Schema: schema, Logger: quiet})
	if err != nil {
		return row, err
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return row, fmt.Errorf("migrate River: %w", err)
	}
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{Schema: schema, Logger: quiet})
	if err != nil {
		return row, err
	}
	if err := b.checkpoint(ctx); err != nil {
		return row, err
	}
	payload := body(b.o.Size)
	batch := 1
	if strings.HasPrefix(mode, "batch") {
		batch = b.o.Batch
	}
	k := newKeyer("key-", b.o.Concurrency, mode == "dup")
	m, err := drive(ctx, b.o.Concurrency, batch, b.o.Duration, k, func(ctx context.Context, keys []string) (int, error) {
		if len(keys) == 1 {
			res, err := client.Insert(ctx, emailArgs{Key: keys[0], Body: payload}, uniqueByKey)
			if err != nil {
				return 0, err
			}
			if res.UniqueSkippedAsDuplicate {
				return 1, nil
			}
			return 0, nil
		}
		params := make([]river.InsertManyParams, len(keys))
		for i, key := range keys {
			params[i] = river.InsertManyParams{Args: emailArgs{Key: key, Body: payload}, InsertOpts: uniqueByKey}
		}
		res, err := client.InsertMany(ctx, params)
		if err != nil {
			return 0, err
		}
		dups := 0
		for _, r := range res {
			if r.UniqueSkippedAsDuplicate {
				dups++
			}
		}
		return dups, nil
	})
	m.System, m.Store, m.Mode, m.Durable = row.System, row.Store, row.Mode, row.Durable
	if err != nil {
		return m, err
	}
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM "+pgx.Identifier{schema, "river_job"}.Sanitize()).Scan(&m.Stored); err != nil {
		return m, fmt.Errorf("count River's jobs: %w", err)
	}
	return m, nil
}
