package storetest

import (
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

func testRenew(t *testing.T, s store.Store) {
	r := admitNew(t, s, "k", Epoch)
	c := claimOne(t, s, Epoch, r.ID)
	at := Epoch.Add(lease - time.Second)
	if err := s.Renew(ctx(t), leaseOf(c), at, 2*time.Minute); err != nil {
		t.Fatalf("Renew before expiry: %v", err)
	}
	g := get(t, s, tenantA, "k")
	if !g.LeaseExpiry.Equal(at.Add(2*time.Minute)) || g.Fence != c.Fence || g.State != store.StateSending {
		t.Fatalf("after Renew: expiry %v fence %d state %s; want %v, %d, sending", g.LeaseExpiry, g.Fence, g.State, at.Add(2*time.Minute), c.Fence)
	}
	if recs := claim(t, s, Epoch.Add(lease+time.Second), 10); len(recs) != 0 {
		t.Fatalf("renewed record was claimed again: %v", ids(recs))
	}
	expiry := g.LeaseExpiry
	before := get(t, s, tenantA, "k")
	wantErr(t, "Renew at expiry", s.Renew(ctx(t), leaseOf(c), expiry, time.Minute), store.ErrLeaseLost)
	wantErr(t, "Renew after expiry", s.Renew(ctx(t), leaseOf(c), expiry.Add(time.Second), time.Minute), store.ErrLeaseLost)
	wantSame(t, "failed Renew", get(t, s, tenantA, "k"), before)
}

// staleLease claims a record, lets the lease expire and has a second Claim
// take it over. It returns the old lease and the new claim.
func staleLease(t *testing.T, s store.Store) (old store.Lease, cur store.Record) {
	t.Helper()
	r := admitNew(t, s, "k", Epoch)
	first := claimOne(t, s, Epoch, r.ID)
	second := claimOne(t, s, Epoch.Add(lease), r.ID)
	if second.Fence != first.Fence+1 {
		t.Fatalf("takeover fence %d, want %d", second.Fence, first.Fence+1)
	}
	return leaseOf(first), second
}

func testStaleFence(t *testing.T, s store.Store) {
	old, cur := staleLease(t, s)
	now := Epoch.Add(lease + time.Second) // the new lease is valid; the old one is stale
	before := get(t, s, tenantA, "k")
	wantErr(t, "Renew with stale fence", s.Renew(ctx(t), old, now, time.Hour), store.ErrLeaseLost)
	wantErr(t, "MarkCommitting with stale fence", s.MarkCommitting(ctx(t), old, now), store.ErrLeaseLost)
	for _, res := range []store.Result{store.ResultSent, store.ResultFailed, store.ResultRetry, store.ResultInDoubt, store.ResultRelease} {
		err := s.Complete(ctx(t), store.Completion{Lease: old, Result: res, Error: "stale", Reply: "stale", RetryAt: now, Now: now})
		wantErr(t, "Complete("+res.String()+") with stale fence", err, store.ErrLeaseLost)
	}
	wantSame(t, "writes with a stale fence", get(t, s, tenantA, "k"), before)
	// The current holder is unaffected.
	if err := s.MarkCommitting(ctx(t), leaseOf(cur), now); err != nil {
		t.Fatalf("MarkCommitting by the current holder: %v", err)
	}
	complete(t, s, store.Completion{Lease: leaseOf(cur), Result: store.ResultSent, Now: now})
	wantState(t, get(t, s, tenantA, "k"), store.StateSent)
	// After the attempt ended, the old lease still changes nothing.
	wantErr(t, "Complete with stale fence after sent", s.Complete(ctx(t), store.Completion{Lease: old, Result: store.ResultFailed, Now: now}), store.ErrLeaseLost)
}

func testReclaimUnmarked(t *testing.T, s store.Store) {
	r := admitNew(t, s, "k", Epoch)
	first := claimOne(t, s, Epoch, r.ID)
	if recs := claim(t, s, Epoch.Add(lease-time.Nanosecond), 10); len(recs) != 0 {
		t.Fatalf("claimed %v before the lease expired", ids(recs))
	}
	// The worker died before the marker: the upstream cannot have the
	// message, so it is retried.
	second := claimOne(t, s, Epoch.Add(lease), r.ID)
	if second.Fence != first.Fence+1 || second.Attempts != 2 || len(second.Data) == 0 {
		t.Fatalf("reclaim: fence %d attempts %d data %d bytes; want fence %d, 2 attempts, data", second.Fence, second.Attempts, len(second.Data), first.Fence+1)
	}
}

func testExpiredMarkedInDoubt(t *testing.T, s store.Store) {
	r := admitNew(t, s, "k", Epoch)
	c := claimOne(t, s, Epoch, r.ID)
	if err := s.MarkCommitting(ctx(t), leaseOf(c), Epoch.Add(time.Second)); err != nil {
		t.Fatalf("MarkCommitting: %v", err)
	}
	if g := get(t, s, tenantA, "k"); !g.Committing || g.State != store.StateSending {
		t.Fatalf("after MarkCommitting: committing %v state %s", g.Committing, g.State)
	}
	// Expiry of a marked lease: the Claim moves it to in_doubt and does
	// not take it.
	other := admitNew(t, s, "other", Epoch)
	recs := claim(t, s, Epoch.Add(lease), 10)
	if len(recs) != 1 || recs[0].ID != other.ID {
		t.Fatalf("Claim after marked lease expired took %v, want only the other record %d", ids(recs), other.ID)
	}
	g := get(t, s, tenantA, "k")
	wantState(t, g, store.StateInDoubt)
	if g.Fence != c.Fence {
		t.Errorf("in_doubt fence %d, want unchanged %d", g.Fence, c.Fence)
	}
	for _, rec := range claim(t, s, Epoch.Add(24*time.Hour), 10) {
		if rec.ID == c.ID {
			t.Fatalf("in_doubt record %d claimed again", c.ID)
		}
	}
	wantState(t, get(t, s, tenantA, "k"), store.StateInDoubt)
	// A stray worker with the in_doubt lease cannot revive the attempt.
	wantErr(t, "Renew of in_doubt", s.Renew(ctx(t), leaseOf(c), Epoch.Add(lease), lease), store.ErrLeaseLost)
	wantErr(t, "MarkCommitting of in_doubt", s.MarkCommitting(ctx(t), leaseOf(c), Epoch.Add(lease)), store.ErrLeaseLost)
	wantErr(t, "Release of in_doubt", s.Complete(ctx(t), store.Completion{Lease: leaseOf(c), Result: store.ResultRelease, Now: Epoch.Add(lease)}), store.ErrInvalidState)
	wantState(t, get(t, s, tenantA, "k"), store.StateInDoubt)
}

func inDoubtByExpiry(t *testing.T, s store.Store, key string) store.Record {
	t.Helper()
	r := admitNew(t, s, key, Epoch)
	c := claimOne(t, s, Epoch, r.ID)
	if err := s.MarkCommitting(ctx(t), leaseOf(c), Epoch); err != nil {
		t.Fatalf("MarkCommitting: %v", err)
	}
	claim(t, s, Epoch.Add(lease), 10)
	wantState(t, get(t, s, tenantA, key), store.StateInDoubt)
	return c
}

func testLateComplete(t *testing.T, s store.Store) {
	c := inDoubtByExpiry(t, s, "late-sent")
	now := Epoch.Add(2 * lease)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultSent, Reply: "250 2.0.0 queued as X", Now: now})
	g := get(t, s, tenantA, "late-sent")
	if g.State != store.StateSent || !g.SentAt.Equal(now) || g.Reply != "250 2.0.0 queued as X" {
		t.Fatalf("late Sent: state %s sentAt %v reply %q", g.State, g.SentAt, g.Reply)
	}
	c = inDoubtByExpiry(t, s, "late-failed")
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultFailed, Error: "550 no such user", Now: now})
	if g := get(t, s, tenantA, "late-failed"); g.State != store.StateFailed || g.LastError != "550 no such user" {
		t.Fatalf("late Failed: state %s error %q", g.State, g.LastError)
	}
}

func testMarkExpired(t *testing.T, s store.Store) {
	r := admitNew(t, s, "k", Epoch)
	c := claimOne(t, s, Epoch, r.ID)
	before := get(t, s, tenantA, "k")
	wantErr(t, "MarkCommitting at expiry", s.MarkCommitting(ctx(t), leaseOf(c), Epoch.Add(lease)), store.ErrLeaseLost)
	wantErr(t, "MarkCommitting after expiry", s.MarkCommitting(ctx(t), leaseOf(c), Epoch.Add(lease+time.Hour)), store.ErrLeaseLost)
	wantSame(t, "refused MarkCommitting", get(t, s, tenantA, "k"), before)
	// No marker: the record is retried, not in doubt.
	claimOne(t, s, Epoch.Add(lease), r.ID)
}

func testMarkIdempotent(t *testing.T, s store.Store) {
	r := admitNew(t, s, "k", Epoch)
	c := claimOne(t, s, Epoch, r.ID)
	for i := range 2 {
		if err := s.MarkCommitting(ctx(t), leaseOf(c), Epoch.Add(time.Second)); err != nil {
			t.Fatalf("MarkCommitting #%d: %v", i+1, err)
		}
	}
	if g := get(t, s, tenantA, "k"); !g.Committing || g.Fence != c.Fence {
		t.Fatalf("committing %v fence %d", g.Committing, g.Fence)
	}
}
