package sqlitestore

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/sendonce/sendonce/store"
)

// benchParallelism multiplies GOMAXPROCS for the number of concurrent
// submitters: group commit needs callers waiting to batch anything.
const benchParallelism = 32

// BenchmarkAdmitParallel measures acknowledged (durable) admissions of
// unique keys by many concurrent callers, one email per Admit call.
func BenchmarkAdmitParallel(b *testing.B) {
	s := mustOpen(b, b.TempDir())
	var n atomic.Int64
	before := s.Stats()
	b.SetParallelism(benchParallelism)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			key := fmt.Sprintf("key-%d", n.Add(1))
			if _, err := s.Admit(context.Background(), []store.Admission{benchAdmission(key)}); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	st := s.Stats()
	if c := st.Commits - before.Commits; c > 0 {
		b.ReportMetric(float64(st.Requests-before.Requests)/float64(c), "admits/commit")
	}
}

func benchAdmission(key string) store.Admission {
	a := crashAdmission(key)
	a.Subject = "Your receipt"
	a.Tags = map[string]string{"campaign": "bench"}
	a.Data = make([]byte, 2048)
	return a
}

// BenchmarkCeilingBareInsert is the ceiling for BenchmarkAdmitParallel: the
// same concurrent callers, the same rows, the same single writer draining up
// to DefaultMaxBatch waiting rows into one transaction with one commit, the
// same database settings, but a plain INSERT: no ON CONFLICT, no RETURNING,
// no duplicate handling, no JSON encoding. The ratio of the two is the cost
// of the ledger logic.
func BenchmarkCeilingBareInsert(b *testing.B) {
	dir := b.TempDir()
	s := mustOpen(b, dir) // creates the schema
	s.Close()
	db, err := sql.Open("sqlite", dsn(filepath.Join(dir, DBFile), DefaultBusyTimeout, false))
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)

	type req struct {
		key  string
		done chan error
	}
	reqs := make(chan req, DefaultMaxBatch)
	stop := make(chan struct{})
	writerDone := make(chan struct{})
	data := make([]byte, 2048)
	// Prepared once, as the store prepares its own statements.
	ins, err := db.Prepare(`INSERT INTO emails
		(tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags, source, state,
		 next_attempt, created_at, updated_at)
		VALUES ('t', ?, 'fp', '<x@y>', '', '["a@b"]', 'Your receipt', '{"campaign":"bench"}', '', 'queued', 1, 1, 1)`)
	if err != nil {
		b.Fatal(err)
	}
	defer ins.Close()
	body, err := db.Prepare(`INSERT INTO email_bodies (id, data) VALUES (last_insert_rowid(), ?)`)
	if err != nil {
		b.Fatal(err)
	}
	defer body.Close()
	go func() {
		defer close(writerDone)
		batch := make([]req, 0, DefaultMaxBatch)
		for {
			select {
			case r := <-reqs:
				batch = append(batch[:0], r)
			case <-stop:
				return
			}
		drain:
			for len(batch) < DefaultMaxBatch {
				select {
				case r := <-reqs:
					batch = append(batch, r)
				default:
					break drain
				}
			}
			err := func() error {
				tx, err := db.Begin()
				if err != nil {
					return err
				}
				defer tx.Rollback()
				st, bst := tx.Stmt(ins), tx.Stmt(body)
				for _, r := range batch {
					if _, err := st.Exec(r.key); err != nil {
						return err
					}
					if _, err := bst.Exec(data); err != nil {
						return err
					}
				}
				return tx.Commit()
			}()
			for _, r := range batch {
				r.done <- err
			}
		}
	}()
	defer func() { close(stop); <-writerDone }()

	var n atomic.Int64
	b.SetParallelism(benchParallelism)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		done := make(chan error, 1)
		for pb.Next() {
			reqs <- req{key: fmt.Sprintf("key-%d", n.Add(1)), done: done}
			if err := <-done; err != nil {
				b.Error(err)
				return
			}
		}
	})
}
