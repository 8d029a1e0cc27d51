package main

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/pgstore"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// bench holds what the phases share.
type bench struct {
	o      options
	log    io.Writer
	tag    string // unique to this run: names its database, schemas, queues
	dbURL  string // the run's own database
	queues []string
	// pgSettings and redisSettings describe the servers, for the report.
	pgSettings string
}

// createDatabase makes the run's own database and returns a function that
// drops it.
func (b *bench) createDatabase(ctx context.Context) (string, func(), error) {
	name := "sendonce_peers_" + b.tag
	admin, err := pgx.Connect(ctx, b.o.PG)
	if err != nil {
		return "", nil, fmt.Errorf("connect to PostgreSQL (-pg): %w", err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", nil, fmt.Errorf("create database %s: %w", name, err)
	}
	var ver, sc, fsync string
	if err := admin.QueryRow(ctx, "SELECT current_setting('server_version'), current_setting('synchronous_commit'), current_setting('fsync')").Scan(&ver, &sc, &fsync); err != nil {
		return "", nil, err
	}
	b.pgSettings = fmt.Sprintf("PostgreSQL %s, synchronous_commit %s, fsync %s", ver, sc, fsync)
	u, _ := url.Parse(b.o.PG) // validated
	u.Path = "/" + name
	b.dbURL = u.String()
	return name, func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c, err := pgx.Connect(cctx, b.o.PG)
		if err != nil {
			fmt.Fprintf(b.log, "drop database %s: %v\n", name, err)
			return
		}
		defer c.Close(cctx)
		if _, err := c.Exec(cctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			fmt.Fprintf(b.log, "drop database %s: %v\n", name, err)
		}
	}, nil
}

// checkpoint flushes PostgreSQL's dirty pages before a phase, so that no
// phase pays for the checkpoint of the one before it.
func (b *bench) checkpoint(ctx context.Context) error {
	c, err := pgx.Connect(ctx, b.dbURL)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, "CHECKPOINT")
	return err
}

// body is the email's text (and the peers' payload): size bytes of lines.
func body(size int) string {
	line := strings.Repeat("sendonce bench ", 6)[:75] + "\n"
	var sb strings.Builder
	for sb.Len() < size {
		sb.WriteString(line)
	}
	return sb.String()[:size]
}

// sendoncePG measures Client.Submit (or SubmitBatch) into a fresh pgstore
// schema of the run's database, with the store's default options.
func (b *bench) sendoncePG(ctx context.Context, mode string) (Row, error) {
	row := Row{System: "sendonce", Store: "postgres", Mode: mode, Durable: true}
	schema := "sendonce_" + strings.ReplaceAll(mode, "-", "_")
	opts := pgstore.Options{Schema: schema, AdmitWorkers: b.o.AdmitWorkers, MaxConns: b.o.SendonceConns}
	if err := pgstore.Migrate(ctx, b.dbURL, opts); err != nil {
		return row, err
	}
	st, err := pgstore.Open(ctx, b.dbURL, opts)
	if err != nil {
		return row, err
	}
	defer st.Close()
	if err := b.checkpoint(ctx); err != nil {
		return row, err
	}
	return b.sendonce(ctx, row, st)
}

// sendonceSQLite measures the same calls into a fresh SQLite ledger, for
// reference: the embedded store that needs no server at all.
func (b *bench) sendonceSQLite(ctx context.Context, mode string) (Row, error) {
	row := Row{System: "sendonce", Store: "sqlite", Mode: mode, Durable: true}
	st, err := sqlitestore.Open(ctx, filepath.Join(b.o.Dir, "ledger-"+mode), sqlitestore.Options{})
	if err != nil {
		return row, err
	}
	defer st.Close()
	return b.sendonce(ctx, row, st)
}

func (b *bench) sendonce(ctx context.Context, row Row, st store.Store) (Row, error) {
	c, err := sendonce.New(sendonce.Config{Store: st})
	if err != nil {
		return row, err
	}
	email := sendonce.Email{
		From:    "Bench <bench@example.com>",
		To:      []string{"rcpt@example.com"},
		Subject: "Your receipt",
		Text:    body(b.o.Size),
		Tags:    map[string]string{"campaign": "bench"},
	}
	batch := 1
	if strings.HasPrefix(row.Mode, "batch") {
		batch = b.o.Batch
	}
	k := newKeyer("key-", b.o.Concurrency, row.Mode == "dup")
	m, err := drive(ctx, b.o.Concurrency, batch, b.o.Duration, k, func(ctx context.Context, keys []string) (int, error) {
		if len(keys) == 1 {
			r, err := c.Submit(ctx, sendonce.Submission{Key: keys[0], Email: email})
			if err != nil {
				return 0, err
			}
			if r.Duplicate {
				return 1, nil
			}
			return 0, nil
		}
		subs := make([]sendonce.Submission, len(keys))
		for i, key := range keys {
			subs[i] = sendonce.Submission{Key: key, Email: email}
		}
		res, err := c.SubmitBatch(ctx, subs)
		if err != nil {
			return 0, err
		}
		dups := 0
		for _, r := range res {
			if r.Err != nil {
				return 0, r.Err
			}
			if r.Duplicate {
				dups++
			}
		}
		return dups, nil
	})
	m.System, m.Store, m.Mode, m.Durable = row.System, row.Store, row.Mode, row.Durable
	if err != nil {
		return m, err
	}
	counts, err := c.Counts(ctx, sendonce.DefaultTenant)
	if err != nil {
		return m, fmt.Errorf("count the ledger: %w", err)
	}
	m.Stored = 0
	for _, n := range counts {
		m.Stored += n
	}
	return m, nil
}
