package pgstore

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/sendonce/sendonce/store"
)

// benchParallelism multiplies GOMAXPROCS for the number of concurrent
// submitters: group commit needs callers waiting to batch anything. The
// same as sqlitestore's, so the two stores' numbers compare.
const benchParallelism = 32

func benchAdmission(key string) store.Admission {
	a := testAdmission("t", key)
	a.Subject = "Your receipt"
	a.Tags = map[string]string{"campaign": "bench"}
	a.Data = make([]byte, 2048)
	return a
}

// BenchmarkAdmitParallel measures acknowledged (committed) admissions of
// unique keys by many concurrent callers, one email per Admit call.
func BenchmarkAdmitParallel(b *testing.B) {
	s := openFresh(b)
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

// BenchmarkCeilingBatchedInsert is the ceiling for BenchmarkAdmitParallel
// on this machine: the same concurrent callers, the same rows, the same
// number of batch workers each draining up to DefaultMaxBatch waiting rows
// into one transaction, the same pool settings, but one bare multi-row
// INSERT ... ON CONFLICT DO NOTHING per batch: no RETURNING, no key order,
// no id order, no duplicate handling, no JSON encoding. The ratio of the
// two is the cost of the ledger logic.
func BenchmarkCeilingBatchedInsert(b *testing.B) {
	s := openFresh(b) // creates the schema
	table := s.q.emails
	s.Close()
	cfg, err := poolConfig(testURL, Options{})
	if err != nil {
		b.Fatal(err)
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()

	type req struct {
		key  string
		done chan error
	}
	reqs := make(chan req, DefaultMaxBatch)
	stop := make(chan struct{})
	var workers sync.WaitGroup
	data := make([]byte, 2048)
	insert := `INSERT INTO ` + table + ` (tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags, source,
		state, next_attempt, created_at, updated_at, data)
		SELECT 't', k, 'fp', '<x@y>', '', '["a@b"]', 'Your receipt', '{"campaign":"bench"}', '', 'queued', 1, 1, 1, d
		FROM unnest($1::text[], $2::bytea[]) AS u(k, d)
		ON CONFLICT (tenant, idem_key) DO NOTHING`
	for range DefaultAdmitWorkers {
		workers.Go(func() {
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
				keys, datas := make([]string, len(batch)), make([][]byte, len(batch))
				for i, r := range batch {
					keys[i], datas[i] = r.key, data
				}
				err := pgx.BeginFunc(context.Background(), pool, func(tx pgx.Tx) error {
					_, err := tx.Exec(context.Background(), insert, keys, datas)
					return err
				})
				for _, r := range batch {
					r.done <- err
				}
			}
		})
	}
	defer func() { close(stop); workers.Wait() }()

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
