package pgstore

import (
	"fmt"
	"sync"
	"testing"

	"github.com/sendonce/sendonce/store"
)

// OnCommit sees every committed admission batch, with the Admit calls and
// the admissions it held: together they are exactly what was admitted, and
// batches held behind a lock share commits.
func TestOnCommitSeesEveryAdmissionBatch(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var seen []CommitInfo
	s := mustOpen(t, newSchema(t), Options{Migrate: true, OnCommit: func(c CommitInfo) {
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, c)
	}})
	const n = 60
	before := s.Stats()
	release := holdInserts(t, s)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			batch := []store.Admission{testAdmission("t", fmt.Sprintf("k%d", i))}
			if i%10 == 0 { // some calls carry two emails
				batch = append(batch, testAdmission("t", fmt.Sprintf("k%d-b", i)))
			}
			if _, err := s.Admit(t.Context(), batch); err != nil {
				errs <- err
			}
		})
	}
	waitQueued(s, before, n)
	release()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// AdmitTx runs in the caller's transaction: not a batch of the store.
	tx, err := s.pool.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.AdmitTx(t.Context(), tx, []store.Admission{testAdmission("t", "in-tx")}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}

	mu.Lock()
	defer mu.Unlock()
	var reqs, adms int
	for _, c := range seen {
		if c.Requests < 1 || c.Admissions < c.Requests || c.Commit < 0 {
			t.Errorf("implausible commit %+v", c)
		}
		reqs += c.Requests
		adms += c.Admissions
	}
	if reqs != n || adms != n+n/10 {
		t.Errorf("OnCommit saw %d requests with %d admissions, want %d with %d", reqs, adms, n, n+n/10)
	}
	if commits := s.Stats().Commits - before.Commits; int64(len(seen)) != commits {
		t.Errorf("OnCommit called %d times for %d commits", len(seen), commits)
	}
	if len(seen) >= n {
		t.Errorf("%d commits for %d requests held behind a lock: nothing was batched", len(seen), n)
	}
}
