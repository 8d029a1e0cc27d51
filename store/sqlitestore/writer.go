package sqlitestore

import (
	"context"
	"fmt"
	"time"

	"github.com/sendonce/sendonce/store"
)

// An op runs one write request inside the writer's transaction. It returns
// the caller's answer (a value and a logical error such as ErrLeaseLost),
// and a non-nil dbErr only when the database failed. An op must write
// nothing when its answer is a logical error, so that it can share a
// transaction with other requests, and must compute its answer from the
// database alone, so that it can be re-run after a rollback.
type op func(ctx context.Context, tx *wtx) (ans answer, dbErr error)

type answer struct {
	val any
	err error
}

type request struct {
	ctx  context.Context
	op   op
	ans  answer
	done chan struct{} // closed by the writer once ans is set
}

// write hands op to the writer and waits for its commit.
func (s *Store) write(ctx context.Context, o op) (any, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	r := &request{ctx: ctx, op: o, done: make(chan struct{})}
	select {
	case s.reqs <- r:
	case <-s.quit:
		return nil, store.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	select {
	case <-r.done:
		return r.ans.val, r.ans.err
	case <-ctx.Done():
		// The writer may still run and commit r; the contract lets the
		// caller retry.
		return nil, ctx.Err()
	case <-s.writerDone:
		select {
		case <-r.done: // answered before the writer exited
			return r.ans.val, r.ans.err
		default:
			return nil, store.ErrClosed
		}
	}
}

// writer owns the write connection. It takes a request, drains whatever else
// is already waiting (up to MaxBatch), runs the lot in one transaction and
// commits once: one fsync for the whole batch.
func (s *Store) writer() {
	defer close(s.writerDone)
	batch := make([]*request, 0, s.opts.MaxBatch)
	for {
		select {
		case r := <-s.reqs:
			batch = append(batch[:0], r)
		case <-s.quit:
			s.refuseQueued()
			return
		}
	drain:
		for len(batch) < s.opts.MaxBatch {
			select {
			case r := <-s.reqs:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		s.runBatch(batch)
		clear(batch) // drop references for the GC
	}
}

func (s *Store) refuseQueued() {
	for {
		select {
		case r := <-s.reqs:
			r.ans = answer{err: store.ErrClosed}
			close(r.done)
		default:
			return
		}
	}
}

func (s *Store) runBatch(batch []*request) {
	s.batches.Add(1)
	// A caller that has already given up is not run: it has been told
	// ctx.Err(), and not running its request makes that answer exact.
	live := batch[:0:0]
	for _, r := range batch {
		if err := r.ctx.Err(); err != nil {
			r.ans = answer{err: err}
			close(r.done)
			continue
		}
		live = append(live, r)
	}
	if len(live) == 0 {
		return
	}
	answers, err := s.runTx(live)
	if err == nil {
		for i, r := range live {
			r.ans = answers[i]
			close(r.done)
		}
		return
	}
	if len(live) == 1 {
		live[0].ans = answer{err: err}
		close(live[0].done)
		return
	}
	// Something in the batch broke the database transaction. Run every
	// request alone so only the one at fault fails.
	s.reruns.Add(1)
	for _, r := range live {
		ans, err := s.runTx([]*request{r})
		if err != nil {
			r.ans = answer{err: err}
		} else {
			r.ans = ans[0]
		}
		close(r.done)
	}
}

// runTx runs reqs in one transaction and commits it. The transaction does
// not use any caller's context: one caller giving up must not abort the
// batch of the others.
func (s *Store) runTx(reqs []*request) ([]answer, error) {
	ctx := context.Background()
	tx, err := s.wdb.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("sqlitestore: begin: %w", err)
	}
	answers := make([]answer, len(reqs))
	w := &wtx{Tx: tx, cache: s.stmts}
	for i, r := range reqs {
		ans, err := r.op(ctx, w)
		if err != nil {
			tx.Rollback()
			return nil, err
		}
		answers[i] = ans
	}
	start := time.Now()
	if err := tx.Commit(); err != nil {
		tx.Rollback()
		return nil, fmt.Errorf("sqlitestore: commit: %w", err)
	}
	if s.opts.OnCommit != nil {
		s.opts.OnCommit(CommitInfo{Requests: len(reqs), Sync: time.Since(start)})
	}
	s.commits.Add(1)
	s.requests.Add(int64(len(reqs)))
	return answers, nil
}
