package storetest

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

func events(t *testing.T, s store.Store, key string) []store.Event {
	t.Helper()
	evs, err := s.Events(ctx(t), tenantA, key)
	if err != nil {
		t.Fatalf("Events(%q): %v", key, err)
	}
	return evs
}

func kinds(evs []store.Event) string {
	var k []string
	for _, e := range evs {
		k = append(k, string(e.Kind))
	}
	return strings.Join(k, " ")
}

// Every change an operator cares about is on the record's timeline, in
// order, with the record's state, attempt and fence after it.
func testEventsTimeline(t *testing.T, s store.Store) {
	r := admitNew(t, s, "k", Epoch)
	admit(t, s, admission(tenantA, "k", "fp-1", Epoch.Add(time.Second)))     // duplicate
	admit(t, s, admission(tenantA, "k", "fp-other", Epoch.Add(time.Second))) // conflict: not this email's event
	t1 := Epoch.Add(time.Minute)
	c := claimOne(t, s, t1, r.ID)
	if err := s.Renew(ctx(t), leaseOf(c), t1, lease); err != nil { // not an event
		t.Fatal(err)
	}
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultRetry, Error: "421 try later", RetryAt: t1, Now: t1})
	t2 := t1.Add(time.Minute)
	c = claimOne(t, s, t2, r.ID)
	if err := s.MarkCommitting(ctx(t), leaseOf(c), t2); err != nil {
		t.Fatal(err)
	}
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultInDoubt, Error: "connection reset", Now: t2})
	t3 := t2.Add(time.Hour)
	resolve(t, s, "k", store.ActionResend, t3)
	c = claimOne(t, s, t3, r.ID)
	if err := s.MarkCommitting(ctx(t), leaseOf(c), t3); err != nil {
		t.Fatal(err)
	}
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultSent, Reply: "250 ok", Now: t3})

	evs := events(t, s, "k")
	want := "accepted duplicate attempt retry attempt committing in_doubt resolved attempt committing sent"
	if got := kinds(evs); got != want {
		t.Fatalf("timeline:\n  %s\nwant:\n  %s", got, want)
	}
	check := func(i int, at time.Time, st store.State, attempt int, detail string) {
		t.Helper()
		e := evs[i]
		if (!at.IsZero() && !e.At.Equal(at)) || e.State != st || e.Attempt != attempt || (detail != "" && e.Detail != detail) {
			t.Errorf("event %d (%s): at %v state %s attempt %d detail %q; want %v %s %d %q", i, e.Kind, e.At, e.State, e.Attempt, e.Detail, at, st, attempt, detail)
		}
	}
	check(0, Epoch, store.StateQueued, 0, "storetest")
	check(1, time.Time{}, store.StateQueued, 0, "1")
	check(2, t1, store.StateSending, 1, "")
	check(3, t1, store.StateQueued, 1, "421 try later")
	check(5, t2, store.StateSending, 2, "")
	check(6, t2, store.StateInDoubt, 2, "connection reset")
	check(7, t3, store.StateQueued, 2, store.ResolvedBy(store.ActionResend, "alice"))
	check(10, t3, store.StateSent, 3, "250 ok")
	for i := 1; i < len(evs); i++ {
		if evs[i].ID <= evs[i-1].ID {
			t.Fatalf("event IDs not ascending: %d then %d", evs[i-1].ID, evs[i].ID)
		}
	}
	if evs[2].Fence >= evs[4].Fence || evs[4].Fence >= evs[8].Fence {
		t.Errorf("attempt fences %d, %d, %d do not grow", evs[2].Fence, evs[4].Fence, evs[8].Fence)
	}
	_, err := s.Events(ctx(t), tenantB, "k")
	wantErr(t, "Events of another tenant's key", err, store.ErrNotFound)
}

// A lease that expires after the marker moves the record to in_doubt: an
// event too. A swept record takes its events with it.
func testEventsExpiryAndSweep(t *testing.T, s store.Store) {
	r := admitNew(t, s, "k", Epoch)
	c := claimOne(t, s, Epoch, r.ID)
	if err := s.MarkCommitting(ctx(t), leaseOf(c), Epoch); err != nil {
		t.Fatal(err)
	}
	claim(t, s, Epoch.Add(2*lease), 10) // expires the lease: in_doubt
	if got, want := kinds(events(t, s, "k")), "accepted attempt committing in_doubt"; got != want {
		t.Fatalf("timeline %q, want %q", got, want)
	}
	resolve(t, s, "k", store.ActionFail, Epoch.Add(3*lease))
	if got := kinds(events(t, s, "k")); !strings.HasSuffix(got, "in_doubt resolved") {
		t.Fatalf("timeline %q does not end with the resolution", got)
	}
	if n, err := s.Sweep(ctx(t), Epoch.Add(time.Hour), 10); err != nil || n != 1 {
		t.Fatalf("Sweep: %d, %v", n, err)
	}
	_, err := s.Events(ctx(t), tenantA, "k")
	wantErr(t, "Events of a swept record", err, store.ErrNotFound)
	// Admitted again after the sweep, the key starts a new timeline.
	admitNew(t, s, "k", Epoch.Add(2*time.Hour))
	if got := kinds(events(t, s, "k")); got != "accepted" {
		t.Fatalf("timeline of the key admitted again: %q", got)
	}
}

// Events returns the latest MaxEvents, oldest first.
func testEventsLimit(t *testing.T, s store.Store) {
	admitNew(t, s, "k", Epoch)
	// One call each: repeats within one batch may be recorded as one event.
	for range store.MaxEvents + 5 {
		admit(t, s, admission(tenantA, "k", "fp-1", Epoch))
	}
	evs := events(t, s, "k")
	if len(evs) != store.MaxEvents || evs[0].Kind != store.EventDuplicate || evs[len(evs)-1].Detail != fmt.Sprint(store.MaxEvents+5) {
		t.Fatalf("%d events, first %s, last %q; want %d, the latest, ending at duplicate %d", len(evs), evs[0].Kind, evs[len(evs)-1].Detail, store.MaxEvents, store.MaxEvents+5)
	}
}
