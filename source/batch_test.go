package source_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/source/sourcetest"
)

// TestAdmitBatch: one SubmitBatch for the valid deliveries; each gets its
// outcome and is counted; a reused key and an item the ledger refuses are
// rejected with a reason; an unreachable ledger leaves them Pending.
func TestAdmitBatch(t *testing.T) {
	l := sourcetest.NewLedger(t)
	ctx := context.Background()
	if _, err := l.Submit(ctx, sendonce.Submission{Key: "taken", Email: sendonce.Email{From: "a@example.org", To: []string{"b@example.com"}, Subject: "first"}}); err != nil {
		t.Fatal(err)
	}
	mk := func(body string) *source.Delivery {
		return source.NewDelivery([]byte(body), source.KeyHints{}, "default", "test:q")
	}
	ds := []*source.Delivery{
		mk(`{"key": "new", "from": "a@example.org", "to": ["b@example.com"], "subject": "hi"}`),
		mk(`{"key": "taken", "from": "a@example.org", "to": ["b@example.com"], "subject": "first"}`),
		mk(`{"key": "taken", "from": "a@example.org", "to": ["b@example.com"], "subject": "other"}`),
		mk(`{"raw": "bm90IGEgbWVzc2FnZQ==", "rcpt_to": ["b@example.com"]}`),
		mk(`not json`),
	}
	var calls int
	counting := sourcetest.AdmitFunc(func(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
		calls++
		if len(subs) != 4 {
			t.Errorf("%d submissions, want the 4 that parsed", len(subs))
		}
		return l.SubmitBatch(ctx, subs)
	})
	var c source.Counters
	if err := source.AdmitBatch(ctx, counting, ds, &c); err != nil {
		t.Fatal(err)
	}
	want := []source.Outcome{source.Admitted, source.Duplicate, source.Reject, source.Reject, source.Reject}
	for i, d := range ds {
		if d.Outcome != want[i] {
			t.Errorf("delivery %d: outcome %v, want %v (reason %v)", i, d.Outcome, want[i], d.Reason)
		}
	}
	if !errors.Is(ds[2].Reason, sendonce.ErrKeyReused) || !strings.Contains(ds[2].Reason.Error(), "give this job its own key") {
		t.Errorf("conflict reason %v", ds[2].Reason)
	}
	if st := c.Snapshot(); calls != 1 || st.Admitted != 1 || st.Duplicates != 1 || st.Errors != 0 {
		t.Errorf("%d calls, counts %+v", calls, st)
	}

	down := sourcetest.AdmitFunc(func(context.Context, []sendonce.Submission) ([]sendonce.BatchResult, error) {
		return nil, errors.New("database is locked")
	})
	ds = []*source.Delivery{mk(`{"key": "later", "from": "a@example.org", "to": ["b@example.com"], "subject": "hi"}`)}
	if err := source.AdmitBatch(ctx, down, ds, &c); err == nil || ds[0].Outcome != source.Pending {
		t.Errorf("an unreachable ledger: err %v, outcome %v; want the error and Pending", err, ds[0].Outcome)
	}
	if c.Snapshot().Errors != 1 {
		t.Errorf("counts %+v, want 1 error", c.Snapshot())
	}
}

func TestBackoffDoublesAndCaps(t *testing.T) {
	b := source.Backoff{Min: time.Millisecond, Max: 5 * time.Millisecond}
	var got []time.Duration
	for range 5 {
		got = append(got, b.Next())
	}
	want := []time.Duration{1, 2, 4, 5, 5}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("waits %v, want %v ms", got, want)
		}
	}
	b.Reset()
	if d := b.Next(); d != time.Millisecond {
		t.Errorf("after Reset: %v", d)
	}
}

// TestLingerOutlivesItsParent: the lingering context survives the
// cancellation of its parent for the grace period, then ends.
func TestLingerOutlivesItsParent(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	lctx, stop := source.Linger(ctx, 50*time.Millisecond)
	defer stop()
	cancel()
	if lctx.Err() != nil {
		t.Fatal("the lingering context ended with its parent")
	}
	select {
	case <-lctx.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the lingering context did not end after its grace")
	}
}

func TestCheckOptionsNameTheField(t *testing.T) {
	if err := source.CheckCounts("x", map[string]int{"B": -1, "A": -2}); err == nil || err.Error() != "x: Options.A is -2; use a positive number, or 0 for the default" {
		t.Errorf("CheckCounts: %v", err)
	}
	if err := source.CheckDurations("x", map[string]time.Duration{"Wait": -time.Second, "Zero": 0}); err == nil || err.Error() != "x: Options.Wait is -1s; use a positive duration, or 0 for the default" {
		t.Errorf("CheckDurations: %v", err)
	}
	if source.CheckCounts("x", map[string]int{"A": 0, "B": 3}) != nil || source.CheckDurations("x", map[string]time.Duration{"A": time.Second}) != nil {
		t.Error("valid options refused")
	}
}
