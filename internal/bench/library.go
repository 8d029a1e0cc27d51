package bench

import (
	"context"
	"database/sql"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/pgstore"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

func (b *bencher) email() sendonce.Email {
	return sendonce.Email{
		From:    "Bench <bench@example.com>",
		To:      []string{"rcpt@example.com"},
		Subject: "Your receipt",
		Text:    body(b.opts.Size),
		Tags:    map[string]string{"campaign": "bench"},
	}
}

// openSQLite opens a fresh ledger in a new directory under Dir.
func (b *bencher) openSQLite(ctx context.Context, name string) (*sqlitestore.Store, string, error) {
	dir := filepath.Join(b.opts.Dir, name)
	st, err := sqlitestore.Open(ctx, dir, sqlitestore.Options{})
	return st, dir, err
}

// library measures Client.Submit, then its ceilings.
func (b *bencher) library(ctx context.Context) ([]Row, error) {
	if b.opts.Store != "" {
		return b.libraryPG(ctx)
	}
	if b.opts.Prefill > 0 {
		return b.libraryScale(ctx)
	}
	row, err := b.libraryRow(ctx)
	if err != nil {
		return nil, err
	}
	row.Ceiling = "ceiling-sqlite-insert"
	bare, err := b.ceilingSQLite(ctx)
	if err != nil {
		return nil, err
	}
	app, err := b.ceilingFsync(ctx)
	if err != nil {
		return nil, err
	}
	return []Row{row, bare, app}, nil
}

// libraryRow measures Client.Submit into a fresh SQLite ledger (no
// dispatcher running).
func (b *bencher) libraryRow(ctx context.Context) (Row, error) {
	st, _, err := b.openSQLite(ctx, fmt.Sprintf("library-%d", b.seq.Add(1)))
	if err != nil {
		return Row{}, err
	}
	defer st.Close()
	return b.submitRow(ctx, PathLibrary, st)
}

func (b *bencher) submitRow(ctx context.Context, name string, st store.Store) (Row, error) {
	c, err := sendonce.New(sendonce.Config{Store: st})
	if err != nil {
		return Row{}, err
	}
	stop, err := b.profile()
	if err != nil {
		return Row{}, err
	}
	defer stop()
	e := b.email()
	return b.drive(ctx, name, b.opts.Concurrency, func(ctx context.Context, _ int) (int, error) {
		_, err := c.Submit(ctx, sendonce.Submission{Key: b.key("lib"), Email: e})
		return 1, err
	})
}

// smallLedger is the size of the ledger --prefill compares with.
const smallLedger = 10_000

// libraryScale measures Client.Submit into a ledger of Prefill records,
// then into one of smallLedger records: the second is the first's ceiling.
func (b *bencher) libraryScale(ctx context.Context) ([]Row, error) {
	var rows []Row
	for _, n := range []int{b.opts.Prefill, smallLedger} {
		name := fmt.Sprintf("library@%d", n)
		dir := filepath.Join(b.opts.Dir, fmt.Sprintf("scale-%d", n))
		st, err := sqlitestore.Open(ctx, dir, sqlitestore.Options{})
		if err != nil {
			return nil, err
		}
		st.Close() // it made the schema
		if b.opts.Progress != nil {
			fmt.Fprintf(b.opts.Progress, "prefilling a ledger with %d sent records...\n", n)
		}
		if err := prefillSQLite(ctx, dir, n); err != nil {
			return nil, err
		}
		if st, err = sqlitestore.Open(ctx, dir, sqlitestore.Options{}); err != nil {
			return nil, err
		}
		row, err := b.submitRow(ctx, name, st)
		st.Close()
		if err != nil {
			return nil, err
		}
		rows = append(rows, row)
	}
	rows[0].Ceiling = rows[1].Path
	rows[0].Note = "ceiling: the same admissions into a ledger of " + itoa(smallLedger) + " records"
	return rows, nil
}

// prefillSQLite adds n sent records, bodies purged, to the ledger in dir,
// with keys spread evenly over the space that key("lib") draws from. It is
// set-up, not measurement: it commits without fsync and checkpoints at the
// end, so the measured phase starts with the records in the database file.
func prefillSQLite(ctx context.Context, dir string, n int) error {
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(5000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(OFF)")
	db, err := sql.Open("sqlite", "file:"+(&url.URL{Path: filepath.Join(dir, sqlitestore.DBFile)}).EscapedPath()+"?"+q.Encode())
	if err != nil {
		return err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	step := int64((uint64(1) << 63) / uint64(n))
	now := time.Now().UnixNano()
	const chunk = 200_000
	for from := 0; from < n; from += chunk {
		to := min(n, from+chunk) - 1
		if _, err := db.ExecContext(ctx, `INSERT INTO emails
			(tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags, source, state,
			 attempts, next_attempt, created_at, updated_at, sent_at)
			WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?)
			SELECT 'default', printf('lib%016x', x * ?), 'v1:prefill', printf('<prefill.%d@example.com>', x),
				'bench@example.com', '["rcpt@example.com"]', 'Your receipt', '{"campaign":"bench"}', '', 'sent',
				1, 0, ?, ?, ?
			FROM c`, from, to, step, now, now, now); err != nil {
			return fmt.Errorf("bench: prefill: %w", err)
		}
	}
	_, err = db.ExecContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)")
	return err
}

// groupCommit is the ceilings' writer: one goroutine drains up to max
// waiting requests and answers them all with the outcome of one write.
type groupCommit struct {
	reqs chan gcReq
	stop chan struct{}
	done sync.WaitGroup
}

type gcReq struct {
	key  string
	done chan error
}

func startGroupCommit(workers, max int, write func(keys []string) error) *groupCommit {
	g := &groupCommit{reqs: make(chan gcReq, max), stop: make(chan struct{})}
	for range workers {
		g.done.Go(func() {
			batch := make([]gcReq, 0, max)
			keys := make([]string, 0, max)
			for {
				select {
				case r := <-g.reqs:
					batch = append(batch[:0], r)
				case <-g.stop:
					return
				}
			drain:
				for len(batch) < max {
					select {
					case r := <-g.reqs:
						batch = append(batch, r)
					default:
						break drain
					}
				}
				keys = keys[:0]
				for _, r := range batch {
					keys = append(keys, r.key)
				}
				err := write(keys)
				for _, r := range batch {
					r.done <- err
				}
			}
		})
	}
	return g
}

func (g *groupCommit) close() { close(g.stop); g.done.Wait() }

// drive runs the phase's callers through the group commit.
func (b *bencher) driveGroup(ctx context.Context, name string, g *groupCommit) (Row, error) {
	dones := make([]chan error, b.opts.Concurrency)
	for i := range dones {
		dones[i] = make(chan error, 1)
	}
	return b.drive(ctx, name, b.opts.Concurrency, func(ctx context.Context, w int) (int, error) {
		select {
		case g.reqs <- gcReq{key: b.key("bare"), done: dones[w]}:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		return 1, <-dones[w]
	})
}

// ceilingSQLite: the same callers, the same single writer draining up to
// sqlitestore.DefaultMaxBatch waiting rows into one transaction, the same
// settings (WAL, synchronous=FULL) and row shape, with plain INSERTs and no
// ledger logic.
func (b *bencher) ceilingSQLite(ctx context.Context) (Row, error) {
	st, dir, err := b.openSQLite(ctx, "ceiling-sqlite")
	if err != nil {
		return Row{}, err
	}
	st.Close() // it made the schema
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(5000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(FULL)")
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+(&url.URL{Path: filepath.Join(dir, sqlitestore.DBFile)}).EscapedPath()+"?"+q.Encode())
	if err != nil {
		return Row{}, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	data := make([]byte, b.opts.Size+600) // the rendered message: body and headers
	// Prepared once, as the store prepares its own statements.
	// The record, then its message in email_bodies, as the store writes them.
	ins, err := db.PrepareContext(ctx, `INSERT INTO emails
		(tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags, source, state,
		 next_attempt, created_at, updated_at)
		VALUES ('t', ?, 'fp', '<x@y>', '', '["a@b"]', 'Your receipt', '{"campaign":"bench"}', '', 'queued', 1, 1, 1)`)
	if err != nil {
		return Row{}, err
	}
	defer ins.Close()
	body, err := db.PrepareContext(ctx, `INSERT INTO email_bodies (id, data) VALUES (last_insert_rowid(), ?)`)
	if err != nil {
		return Row{}, err
	}
	defer body.Close()
	g := startGroupCommit(1, sqlitestore.DefaultMaxBatch, func(keys []string) error {
		tx, err := db.Begin()
		if err != nil {
			return err
		}
		defer tx.Rollback()
		st, bst := tx.Stmt(ins), tx.Stmt(body)
		for _, k := range keys {
			if _, err := st.Exec(k); err != nil {
				return err
			}
			if _, err := bst.Exec(data); err != nil {
				return err
			}
		}
		return tx.Commit()
	})
	defer g.close()
	return b.driveGroup(ctx, "ceiling-sqlite-insert", g)
}

// ceilingFsync: the same callers, group-committed appends of a record of
// the message's size to one file, one fsync per batch.
func (b *bencher) ceilingFsync(ctx context.Context) (Row, error) {
	f, err := os.OpenFile(filepath.Join(b.opts.Dir, "ceiling-append.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return Row{}, err
	}
	defer f.Close()
	rec := make([]byte, b.opts.Size+600)
	var buf []byte
	g := startGroupCommit(1, sqlitestore.DefaultMaxBatch, func(keys []string) error {
		buf = buf[:0]
		for _, k := range keys {
			buf = append(buf, k...)
			buf = append(buf, rec...)
		}
		if _, err := f.Write(buf); err != nil {
			return err
		}
		return f.Sync()
	})
	defer g.close()
	return b.driveGroup(ctx, "ceiling-fsync-append", g)
}

// libraryPG measures Client.Submit on PostgreSQL in a fresh schema, then a
// bare batched INSERT ... ON CONFLICT loop with the same callers, batch
// workers and batch limit into the same table.
func (b *bencher) libraryPG(ctx context.Context) ([]Row, error) {
	schema := fmt.Sprintf("sendonce_bench_%d_%d", os.Getpid(), time.Now().UnixNano())
	if err := pgstore.Migrate(ctx, b.opts.Store, pgstore.Options{Schema: schema}); err != nil {
		return nil, err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if conn, err := pgx.Connect(cctx, b.opts.Store); err == nil {
			_, _ = conn.Exec(cctx, "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
			conn.Close(cctx)
		}
	}()
	st, err := pgstore.Open(ctx, b.opts.Store, pgstore.Options{Schema: schema})
	if err != nil {
		return nil, err
	}
	row, err := b.submitRow(ctx, PathLibrary, st)
	st.Close()
	if err != nil {
		return nil, err
	}
	row.Ceiling = "ceiling-pg-batched-insert"

	pool, err := pgxpool.New(ctx, b.opts.Store)
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	table := pgx.Identifier{schema, "sendonce_emails"}.Sanitize()
	insert := `INSERT INTO ` + table + ` (tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags, source,
		state, next_attempt, created_at, updated_at, data)
		SELECT 't', k, 'fp', '<x@y>', '', '["a@b"]', 'Your receipt', '{"campaign":"bench"}', '', 'queued', 1, 1, 1, d
		FROM unnest($1::text[], $2::bytea[]) AS u(k, d)
		ON CONFLICT (tenant, idem_key) DO NOTHING`
	data := make([]byte, b.opts.Size+600)
	g := startGroupCommit(pgstore.DefaultAdmitWorkers, pgstore.DefaultMaxBatch, func(keys []string) error {
		datas := make([][]byte, len(keys))
		for i := range datas {
			datas[i] = data
		}
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, insert, keys, datas)
			return err
		})
	})
	defer g.close()
	bare, err := b.driveGroup(ctx, "ceiling-pg-batched-insert", g)
	if err != nil {
		return nil, err
	}
	return []Row{row, bare}, nil
}
