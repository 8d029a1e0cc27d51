package storetest

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

// testSweep: the retention sweeper removes final records created before
// the cut-off, in batches of at most the limit, oldest first, and leaves
// every record that still has work or a decision pending. A swept key can
// be admitted again as new: the retention window is the dedup window.
func testSweep(t *testing.T, s store.Store) {
	old, recent := Epoch, Epoch.Add(48*time.Hour)
	final := func(key string, at time.Time, res store.Result) {
		r := admit(t, s, admission(tenantA, key, "fp-1", at))[0].Record
		c := claimOne(t, s, at, r.ID)
		if err := s.MarkCommitting(ctx(t), leaseOf(c), at); err != nil {
			t.Fatal(err)
		}
		complete(t, s, store.Completion{Lease: leaseOf(c), Result: res, Error: "x", Now: at, PurgeData: true})
	}
	for i := 0; i < 5; i++ {
		final(fmt.Sprintf("old-sent-%d", i), old.Add(time.Duration(i)*time.Second), store.ResultSent)
	}
	final("old-failed", old.Add(10*time.Second), store.ResultFailed)
	final("old-in-doubt", old.Add(11*time.Second), store.ResultInDoubt)
	queued := admission(tenantA, "old-queued", "fp-1", old.Add(12*time.Second))
	queued.NotBefore = old.Add(1000 * time.Hour) // still waiting: never swept
	admit(t, s, queued)
	final("recent-sent", recent, store.ResultSent)

	cut := Epoch.Add(24 * time.Hour)
	n, err := s.Sweep(ctx(t), cut, 4)
	if err != nil || n != 4 {
		t.Fatalf("first Sweep: %d, %v; want 4 (the limit)", n, err)
	}
	if _, err := s.Get(ctx(t), tenantA, "old-sent-0"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("oldest record not swept first: %v", err)
	}
	n, err = s.Sweep(ctx(t), cut, 4)
	if err != nil || n != 2 {
		t.Fatalf("second Sweep: %d, %v; want 2", n, err)
	}
	if n, err := s.Sweep(ctx(t), cut, 4); err != nil || n != 0 {
		t.Fatalf("third Sweep: %d, %v; want 0", n, err)
	}
	for _, k := range []string{"old-in-doubt", "old-queued", "recent-sent"} {
		get(t, s, tenantA, k)
	}
	if r := admit(t, s, admission(tenantA, "old-sent-1", "fp-other", recent))[0]; r.Outcome != store.OutcomeNew {
		t.Fatalf("a swept key admitted again: %v, want new", r.Outcome)
	}
}
