package sendonce_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store/sqlitestore"
	"github.com/sendonce/sendonce/transport"
)

// lostAnswer hands every message over and loses the answer.
type lostAnswer struct{}

func (lostAnswer) Name() string { return "lost" }
func (lostAnswer) Close() error { return nil }
func (lostAnswer) Send(ctx context.Context, _ *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
	if err := commit(ctx); err != nil {
		return transport.Receipt{}, err
	}
	return transport.Receipt{}, transport.Errorf(transport.Ambiguous, "final dot", 0, "timeout waiting for the reply")
}

// Run applies the in-doubt rules: an email that has waited long enough in
// doubt is failed by the rule, and the record says which rule did it.
func TestRunAppliesInDoubtRules(t *testing.T) {
	st, err := sqlitestore.Open(t.Context(), t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var mu sync.Mutex
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); defer mu.Unlock(); now = now.Add(d) }
	c, err := sendonce.New(sendonce.Config{Store: st, Transport: lostAnswer{}, Now: clock, Dispatch: sendonce.DispatchConfig{
		PollInterval: 10 * time.Millisecond, RulesEvery: 10 * time.Millisecond,
		InDoubtRules: []sendonce.InDoubtRule{{After: 6 * time.Hour, Action: sendonce.ActionFail}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Submit(t.Context(), sendonce.Submission{Key: "k", Email: sendonce.Email{From: "a@example.com", To: []string{"b@example.net"}, Subject: "s"}}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()

	wait := func(want sendonce.State) sendonce.Record {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) { // polling, not synchronisation
			r, err := c.Get(t.Context(), "", "k")
			if err == nil && r.State == want {
				return r
			}
			if time.Now().After(deadline) {
				t.Fatalf("state %s (%v), want %s", r.State, err, want)
			}
		}
	}
	wait(sendonce.StateInDoubt)
	advance(6 * time.Hour)
	r := wait(sendonce.StateFailed)
	if r.ResolvedBy != "fail by rule:fail-after-6h" {
		t.Fatalf("resolved_by %q", r.ResolvedBy)
	}
}
