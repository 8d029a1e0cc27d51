package storetest

import (
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

// claimed admits key and claims it at Epoch; marked also sets the marker.
func claimed(t *testing.T, s store.Store, key string, marked bool) store.Record {
	t.Helper()
	r := admitNew(t, s, key, Epoch)
	c := claimOne(t, s, Epoch, r.ID)
	if marked {
		if err := s.MarkCommitting(ctx(t), leaseOf(c), Epoch); err != nil {
			t.Fatalf("MarkCommitting: %v", err)
		}
	}
	return c
}

func testCompleteSent(t *testing.T, s store.Store) {
	c := claimed(t, s, "k", true)
	now := Epoch.Add(time.Second)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultSent, Reply: "250 ok", Now: now})
	g := get(t, s, tenantA, "k")
	if g.State != store.StateSent || !g.SentAt.Equal(now) || g.Reply != "250 ok" || g.Attempts != 1 || !g.State.Final() {
		t.Fatalf("sent: state %s sentAt %v reply %q attempts %d", g.State, g.SentAt, g.Reply, g.Attempts)
	}
	if recs := claim(t, s, now.Add(24*time.Hour), 10); len(recs) != 0 {
		t.Fatalf("sent record claimed again: %v", ids(recs))
	}
}

func testCompleteFailed(t *testing.T, s store.Store) {
	c := claimed(t, s, "k", true)
	now := Epoch.Add(time.Second)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultFailed, Error: "550 5.1.1 unknown user", Reply: "550 5.1.1 unknown user", Now: now})
	g := get(t, s, tenantA, "k")
	if g.State != store.StateFailed || g.LastError != "550 5.1.1 unknown user" || !g.SentAt.IsZero() {
		t.Fatalf("failed: state %s error %q sentAt %v", g.State, g.LastError, g.SentAt)
	}
	if recs := claim(t, s, now.Add(24*time.Hour), 10); len(recs) != 0 {
		t.Fatalf("failed record claimed again: %v", ids(recs))
	}
}

func testCompleteRetry(t *testing.T, s store.Store) {
	c := claimed(t, s, "k", true) // a 4xx after the marker still proves the upstream refused
	now := Epoch.Add(time.Second)
	retryAt := now.Add(5 * time.Minute)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultRetry, Error: "451 try later", RetryAt: retryAt, Now: now})
	g := get(t, s, tenantA, "k")
	if g.State != store.StateQueued || !g.NextAttempt.Equal(retryAt) || g.LastError != "451 try later" || g.Attempts != 1 || g.Committing {
		t.Fatalf("retry: state %s next %v error %q attempts %d committing %v", g.State, g.NextAttempt, g.LastError, g.Attempts, g.Committing)
	}
	c2 := claimOne(t, s, retryAt, c.ID)
	if c2.Attempts != 2 || c2.Fence != c.Fence+1 || c2.Committing {
		t.Fatalf("second attempt: attempts %d fence %d committing %v", c2.Attempts, c2.Fence, c2.Committing)
	}
}

func testCompleteInDoubt(t *testing.T, s store.Store) {
	c := claimed(t, s, "k", true)
	now := Epoch.Add(time.Second)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultInDoubt, Error: "connection reset after DATA", Now: now})
	g := get(t, s, tenantA, "k")
	if g.State != store.StateInDoubt || g.LastError != "connection reset after DATA" || g.State.Final() {
		t.Fatalf("in doubt: state %s error %q", g.State, g.LastError)
	}
	if recs := claim(t, s, now.Add(24*time.Hour), 10); len(recs) != 0 {
		t.Fatalf("in_doubt record claimed: %v", ids(recs))
	}
}

func testCompleteRelease(t *testing.T, s store.Store) {
	c := claimed(t, s, "k", false)
	now := Epoch.Add(time.Second)
	retryAt := now.Add(time.Minute)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultRelease, RetryAt: retryAt, Now: now})
	g := get(t, s, tenantA, "k")
	if g.State != store.StateQueued || !g.NextAttempt.Equal(retryAt) || g.Attempts != 0 {
		t.Fatalf("release: state %s next %v attempts %d; want queued, %v, 0", g.State, g.NextAttempt, g.Attempts, retryAt)
	}
	if recs := claim(t, s, retryAt.Add(-time.Nanosecond), 10); len(recs) != 0 {
		t.Fatalf("released record claimed before RetryAt: %v", ids(recs))
	}
	if c2 := claimOne(t, s, retryAt, c.ID); c2.Attempts != 1 {
		t.Fatalf("claim after release: attempts %d, want 1", c2.Attempts)
	}
}

func testReleaseAfterMarker(t *testing.T, s store.Store) {
	c := claimed(t, s, "k", true)
	before := get(t, s, tenantA, "k")
	err := s.Complete(ctx(t), store.Completion{Lease: leaseOf(c), Result: store.ResultRelease, RetryAt: Epoch, Now: Epoch})
	wantErr(t, "Release after the marker", err, store.ErrInvalidState)
	wantSame(t, "refused Release", get(t, s, tenantA, "k"), before)
}

func testCompleteRepeat(t *testing.T, s store.Store) {
	// A retried Complete (its first call's answer was lost) is harmless.
	c := claimed(t, s, "sent", true)
	done := store.Completion{Lease: leaseOf(c), Result: store.ResultSent, Reply: "250", Now: Epoch}
	complete(t, s, done)
	after := get(t, s, tenantA, "sent")
	done.Now = Epoch.Add(time.Minute)
	complete(t, s, done)
	wantSame(t, "repeated Sent", get(t, s, tenantA, "sent"), after)
	err := s.Complete(ctx(t), store.Completion{Lease: leaseOf(c), Result: store.ResultFailed, Now: Epoch})
	wantErr(t, "Failed after Sent", err, store.ErrInvalidState)
	wantSame(t, "Failed after Sent", get(t, s, tenantA, "sent"), after)

	c = claimed(t, s, "released", false)
	rel := store.Completion{Lease: leaseOf(c), Result: store.ResultRelease, RetryAt: Epoch, Now: Epoch}
	complete(t, s, rel)
	after = get(t, s, tenantA, "released")
	complete(t, s, rel)
	wantSame(t, "repeated Release (attempts must not go down twice)", get(t, s, tenantA, "released"), after)
	err = s.Complete(ctx(t), store.Completion{Lease: leaseOf(c), Result: store.ResultSent, Now: Epoch})
	wantErr(t, "Sent after Release", err, store.ErrInvalidState)
}

func testAttempts(t *testing.T, s store.Store) {
	// Attempts: +1 per Claim (including a reclaim after a crash), unchanged
	// by Retry and by the final result, -1 by Release.
	r := admitNew(t, s, "k", Epoch)
	now := Epoch
	step := func(what string, want int) {
		t.Helper()
		if g := get(t, s, tenantA, "k"); g.Attempts != want {
			t.Fatalf("after %s: Attempts %d, want %d", what, g.Attempts, want)
		}
	}
	step("admit", 0)
	c := claimOne(t, s, now, r.ID)
	step("claim", 1)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultRelease, Now: now})
	step("release", 0)
	c = claimOne(t, s, now, r.ID)
	step("claim", 1)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultRetry, Error: "421", RetryAt: now, Now: now})
	step("retry", 1)
	claimOne(t, s, now, r.ID)
	step("claim", 2)
	now = now.Add(lease)
	c = claimOne(t, s, now, r.ID) // the worker died before its marker
	step("reclaim after expiry", 3)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultSent, Now: now})
	step("sent", 3)
}
