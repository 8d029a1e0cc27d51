package dispatch_test

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sendonce/sendonce/internal/dispatch"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
	"github.com/sendonce/sendonce/transport"
)

// scripted is a transport whose every Send runs a test-provided function;
// it stands in for an upstream where the test must control each step.
type scripted struct {
	name       string
	idempotent bool
	send       func(ctx context.Context, msg *transport.Message, commit transport.CommitFunc) (transport.Receipt, error)
	calls      atomic.Int64
}

func (s *scripted) Name() string { return s.name }
func (s *scripted) Close() error { return nil }
func (s *scripted) Idempotent() bool {
	return s.idempotent
}
func (s *scripted) Send(ctx context.Context, msg *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
	s.calls.Add(1)
	return s.send(ctx, msg, commit)
}

func openStore(t *testing.T) *sqlitestore.Store {
	t.Helper()
	st, err := sqlitestore.Open(context.Background(), t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func admit(t *testing.T, st store.Store, key string, now time.Time) {
	t.Helper()
	res, err := st.Admit(context.Background(), []store.Admission{{
		Tenant: "t", Key: key, Fingerprint: "f", MessageID: "<" + key + "@example.org>",
		From: "a@example.org", To: []string{"b@example.com"}, Subject: "s", Source: "test",
		Data: []byte("Subject: s\r\n\r\nbody\r\n"), Now: now,
	}})
	if err != nil || res[0].Outcome != store.OutcomeNew {
		t.Fatalf("admit %s: %v %v", key, res, err)
	}
}

// run starts a dispatcher and returns a channel of its events and a stop
// function that shuts it down and waits for Run to return.
func run(t *testing.T, cfg dispatch.Config) (<-chan dispatch.Event, func()) {
	t.Helper()
	events := make(chan dispatch.Event, 100)
	cfg.Observer = func(e dispatch.Event) { events <- e }
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 10 * time.Millisecond
	}
	d, err := dispatch.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return events, stop
}

func next(t *testing.T, events <-chan dispatch.Event) dispatch.Event {
	t.Helper()
	select {
	case e := <-events:
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("no attempt finished within 10s")
		return dispatch.Event{}
	}
}

func get(t *testing.T, st store.Store, key string) store.Record {
	t.Helper()
	r, err := st.Get(context.Background(), "t", key)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestOutcomes(t *testing.T) {
	committedThen := func(err error) func(context.Context, *transport.Message, transport.CommitFunc) (transport.Receipt, error) {
		return func(ctx context.Context, m *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
			if cerr := commit(ctx); cerr != nil {
				return transport.Receipt{}, cerr
			}
			return transport.Receipt{}, err
		}
	}
	cases := []struct {
		name       string
		idempotent bool
		policy     dispatch.Policy
		send       func(context.Context, *transport.Message, transport.CommitFunc) (transport.Receipt, error)
		state      store.State
		result     store.Result
	}{
		{"accepted", false, "", func(ctx context.Context, m *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
			if err := commit(ctx); err != nil {
				return transport.Receipt{}, err
			}
			return transport.Receipt{Reply: "250 2.0.0 queued"}, nil
		}, store.StateSent, store.ResultSent},
		{"temporary before commit", false, "", func(context.Context, *transport.Message, transport.CommitFunc) (transport.Receipt, error) {
			return transport.Receipt{}, transport.Errorf(transport.Temporary, "rcpt", 451, "451 try later")
		}, store.StateQueued, store.ResultRetry},
		{"unclassified before commit is temporary", false, "", func(context.Context, *transport.Message, transport.CommitFunc) (transport.Receipt, error) {
			return transport.Receipt{}, errors.New("dial tcp: connection refused")
		}, store.StateQueued, store.ResultRetry},
		{"permanent", false, "", func(context.Context, *transport.Message, transport.CommitFunc) (transport.Receipt, error) {
			return transport.Receipt{}, transport.Errorf(transport.Permanent, "rcpt", 550, "550 no such user")
		}, store.StateFailed, store.ResultFailed},
		{"4xx after the dot is temporary", false, "", committedThen(transport.Errorf(transport.Temporary, "final-dot", 451, "451 local error")), store.StateQueued, store.ResultRetry},
		{"5xx after the dot is permanent", false, "", committedThen(transport.Errorf(transport.Permanent, "final-dot", 554, "554 rejected")), store.StateFailed, store.ResultFailed},
		{"ambiguous after the dot", false, "", committedThen(transport.Errorf(transport.Ambiguous, "final-dot", 0, "EOF")), store.StateInDoubt, store.ResultInDoubt},
		{"unclassified after the commit is ambiguous", false, "", committedThen(errors.New("read: connection reset")), store.StateInDoubt, store.ResultInDoubt},
		{"ambiguous with policy resend", false, dispatch.PolicyResend, committedThen(transport.Errorf(transport.Ambiguous, "final-dot", 0, "EOF")), store.StateQueued, store.ResultInDoubt},
		{"ambiguous on an idempotent transport is retried", true, "", committedThen(transport.Errorf(transport.Ambiguous, "link", 0, "EIO")), store.StateQueued, store.ResultRetry},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st := openStore(t)
			admit(t, st, "k", time.Now())
			tr := &scripted{idempotent: tc.idempotent, send: tc.send}
			events, stop := run(t, dispatch.Config{Store: st, Transport: tr, InDoubt: tc.policy, BackoffBase: time.Hour})
			ev := next(t, events)
			stop()
			if ev.Result != tc.result {
				t.Fatalf("result %v, want %v (err %v)", ev.Result, tc.result, ev.Err)
			}
			r := get(t, st, "k")
			if r.State != tc.state {
				t.Fatalf("state %s, want %s (last error %q)", r.State, tc.state, r.LastError)
			}
			if r.Attempts != 1 {
				t.Errorf("attempts %d, want 1", r.Attempts)
			}
			if tr.calls.Load() != 1 {
				t.Errorf("transport called %d times, want 1", tr.calls.Load())
			}
			switch tc.state {
			case store.StateFailed, store.StateInDoubt:
				if r.LastError == "" {
					t.Error("no last_error recorded")
				}
			case store.StateQueued:
				if tc.policy == dispatch.PolicyResend {
					if r.ResolvedBy == "" {
						t.Error("policy resend not recorded")
					}
				} else if !r.NextAttempt.After(time.Now().Add(20 * time.Minute)) {
					t.Errorf("retry due at %v: backoff not applied", r.NextAttempt)
				}
			}
		})
	}
}

func TestGivesUpAfterMaxAttempts(t *testing.T) {
	st := openStore(t)
	admit(t, st, "k", time.Now())
	tr := &scripted{send: func(context.Context, *transport.Message, transport.CommitFunc) (transport.Receipt, error) {
		return transport.Receipt{}, transport.Errorf(transport.Temporary, "connect", 0, "connection refused")
	}}
	events, stop := run(t, dispatch.Config{Store: st, Transport: tr, MaxAttempts: 3, BackoffBase: time.Millisecond, BackoffMax: time.Millisecond})
	for i := 0; i < 3; i++ {
		next(t, events)
	}
	stop()
	r := get(t, st, "k")
	if r.State != store.StateFailed || r.Attempts != 3 {
		t.Fatalf("state %s attempts %d, want failed after 3", r.State, r.Attempts)
	}
}

// TestShutdownReleasesBeforeCommit: an attempt stuck before its marker when
// the shutdown timeout runs out is given back to the queue, not counted.
func TestShutdownReleasesBeforeCommit(t *testing.T) {
	st := openStore(t)
	admit(t, st, "k", time.Now())
	started := make(chan struct{})
	tr := &scripted{send: func(ctx context.Context, m *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
		close(started)
		<-ctx.Done()
		return transport.Receipt{}, transport.Wrap(transport.Temporary, "data", 0, ctx.Err())
	}}
	events, stop := run(t, dispatch.Config{Store: st, Transport: tr, ShutdownTimeout: time.Millisecond})
	<-started
	stop()
	if ev := next(t, events); ev.Result != store.ResultRelease {
		t.Fatalf("result %v, want release", ev.Result)
	}
	r := get(t, st, "k")
	if r.State != store.StateQueued || r.Attempts != 0 {
		t.Fatalf("state %s attempts %d, want queued with 0 attempts", r.State, r.Attempts)
	}
}

// TestShutdownAfterCommitIsInDoubt: an attempt cut off after its marker
// may have delivered; it must not be released for a silent resend.
func TestShutdownAfterCommitIsInDoubt(t *testing.T) {
	st := openStore(t)
	admit(t, st, "k", time.Now())
	committed := make(chan struct{})
	tr := &scripted{send: func(ctx context.Context, m *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
		if err := commit(ctx); err != nil {
			return transport.Receipt{}, err
		}
		close(committed)
		<-ctx.Done()
		return transport.Receipt{}, transport.Wrap(transport.Ambiguous, "final-dot", 0, ctx.Err())
	}}
	events, stop := run(t, dispatch.Config{Store: st, Transport: tr, ShutdownTimeout: time.Millisecond})
	<-committed
	stop()
	if ev := next(t, events); ev.Result != store.ResultInDoubt {
		t.Fatalf("result %v, want in_doubt", ev.Result)
	}
	if r := get(t, st, "k"); r.State != store.StateInDoubt {
		t.Fatalf("state %s, want in_doubt", r.State)
	}
}

// TestLeaseLostBeforeCommitWritesNothing: a worker whose lease was taken
// over (here: the store's clock jumped past the lease) must not set the
// marker, must not perform the irreversible step, and must not write; the
// next claim takes the email over and sends it once.
func TestLeaseLostBeforeCommitWritesNothing(t *testing.T) {
	st := openStore(t)
	base := time.Now()
	admit(t, st, "k", base)
	var skew atomic.Int64
	now := func() time.Time { return base.Add(time.Duration(skew.Load())) }
	var irreversible atomic.Int64
	seenBySecond := make(chan store.Record, 1)
	tr := &scripted{}
	tr.send = func(ctx context.Context, m *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
		if tr.calls.Load() == 1 {
			skew.Store(int64(10 * time.Minute)) // the lease (1m) is long gone by the store's clock
		} else {
			r, _ := st.Get(ctx, "t", "k")
			seenBySecond <- r
		}
		if err := commit(ctx); err != nil {
			return transport.Receipt{}, err
		}
		irreversible.Add(1)
		return transport.Receipt{Reply: "250 ok"}, nil
	}
	events, stop := run(t, dispatch.Config{Store: st, Transport: tr, Lease: time.Minute, Now: now})
	ev := next(t, events)
	if ev.Result != 0 || !errors.Is(ev.Err, store.ErrLeaseLost) {
		t.Fatalf("first attempt %v %v, want abandoned with ErrLeaseLost", ev.Result, ev.Err)
	}
	if ev := next(t, events); ev.Result != store.ResultSent {
		t.Fatalf("takeover attempt %v %v, want sent", ev.Result, ev.Err)
	}
	stop()
	r := <-seenBySecond
	if r.Fence != 2 || r.Committing || r.LastError != "" || r.State != store.StateSending {
		t.Fatalf("at takeover the record was %+v: the abandoned worker wrote", r)
	}
	if irreversible.Load() != 1 {
		t.Fatalf("irreversible step ran %d times, want 1", irreversible.Load())
	}
	if r := get(t, st, "k"); r.State != store.StateSent {
		t.Fatalf("state %s, want sent", r.State)
	}
}

func TestManyEmailsEachSentOnce(t *testing.T) {
	st := openStore(t)
	const n = 200
	for i := 0; i < n; i++ {
		admit(t, st, "k"+string(rune('A'+i%26))+string(rune('a'+i/26)), time.Now())
	}
	var mu sync.Mutex
	seen := map[string]int{}
	tr := &scripted{send: func(ctx context.Context, m *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
		if err := commit(ctx); err != nil {
			return transport.Receipt{}, err
		}
		mu.Lock()
		seen[m.Key]++
		mu.Unlock()
		return transport.Receipt{Reply: "250 ok"}, nil
	}}
	events, stop := run(t, dispatch.Config{Store: st, Transport: tr, Workers: 8})
	for i := 0; i < n; i++ {
		if ev := next(t, events); ev.Result != store.ResultSent {
			t.Fatalf("attempt %d: %v %v", i, ev.Result, ev.Err)
		}
	}
	stop()
	if len(seen) != n {
		t.Fatalf("%d distinct keys sent, want %d", len(seen), n)
	}
	for k, c := range seen {
		if c != 1 {
			t.Errorf("%s sent %d times", k, c)
		}
	}
	counts, err := st.Counts(context.Background(), "t")
	if err != nil || counts[store.StateSent] != n {
		t.Fatalf("counts %v %v", counts, err)
	}
}

// TestSweeperRemovesOnlyFinalRecordsPastRetention runs the sweeper on a
// real ledger: sent records older than the retention window go, a recent
// one and a queued old one stay.
func TestSweeperRemovesOnlyFinalRecordsPastRetention(t *testing.T) {
	st := openStore(t)
	now := time.Now()
	old := now.Add(-40 * 24 * time.Hour)
	for _, k := range []string{"old-1", "old-2", "recent"} {
		at := old
		if k == "recent" {
			at = now
		}
		admit(t, st, k, at)
		recs, err := st.Claim(context.Background(), store.ClaimRequest{Owner: "t", Now: at, Lease: time.Minute, Limit: 1})
		if err != nil || len(recs) != 1 {
			t.Fatal(recs, err)
		}
		if err := st.Complete(context.Background(), store.Completion{Lease: store.Lease{ID: recs[0].ID, Fence: recs[0].Fence}, Result: store.ResultSent, Now: at}); err != nil {
			t.Fatal(err)
		}
	}
	admit(t, st, "old-queued", old)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		dispatch.RunSweeper(ctx, dispatch.SweepConfig{Store: st, Retention: 30 * 24 * time.Hour, Batch: 1, Every: time.Hour})
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err1 := st.Get(context.Background(), "t", "old-1")
		_, err2 := st.Get(context.Background(), "t", "old-2")
		if errors.Is(err1, store.ErrNotFound) && errors.Is(err2, store.ErrNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("old sent records not swept within 10s")
		}
		runtime.Gosched()
	}
	cancel()
	<-done
	get(t, st, "recent")
	get(t, st, "old-queued")
}
