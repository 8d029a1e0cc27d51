package storetest

import (
	"bytes"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

func resolve(t *testing.T, s store.Store, key string, a store.Action, now time.Time) store.Record {
	t.Helper()
	r, err := s.Resolve(ctx(t), store.Resolution{Tenant: tenantA, Key: key, Action: a, Actor: "alice", Now: now})
	if err != nil {
		t.Fatalf("Resolve(%q, %s): %v", key, a, err)
	}
	if r.Data != nil {
		t.Errorf("Resolve returned Data; the record is returned without Data")
	}
	wantSame(t, "Resolve result vs Get", r, get(t, s, tenantA, key))
	if r.ResolvedBy != store.ResolvedBy(a, "alice") {
		t.Errorf("ResolvedBy %q, want %q", r.ResolvedBy, store.ResolvedBy(a, "alice"))
	}
	return r
}

func testResolveResend(t *testing.T, s store.Store) {
	c := inDoubtByExpiry(t, s, "k")
	now := Epoch.Add(2 * lease)
	r := resolve(t, s, "k", store.ActionResend, now)
	if r.State != store.StateQueued || r.Fence <= c.Fence || !r.NextAttempt.Equal(now) || r.Committing {
		t.Fatalf("resend: state %s fence %d (was %d) next %v committing %v", r.State, r.Fence, c.Fence, r.NextAttempt, r.Committing)
	}
	// The in-doubt worker's lease is dead, even for a late definite answer:
	// the operator's decision stands.
	wantErr(t, "late Complete after resend", s.Complete(ctx(t), store.Completion{Lease: leaseOf(c), Result: store.ResultSent, Now: now}), store.ErrLeaseLost)
	wantErr(t, "Renew after resend", s.Renew(ctx(t), leaseOf(c), now, lease), store.ErrLeaseLost)
	wantSame(t, "after refused late writes", get(t, s, tenantA, "k"), r)
	c2 := claimOne(t, s, now, c.ID)
	if c2.Fence <= r.Fence || !bytes.Equal(c2.Data, admission(tenantA, "k", "fp-1", Epoch).Data) {
		t.Fatalf("resent claim: fence %d (resolve gave %d), data %q", c2.Fence, r.Fence, c2.Data)
	}
}

func testResolveMarkSent(t *testing.T, s store.Store) {
	c := inDoubtByExpiry(t, s, "k")
	now := Epoch.Add(2 * lease)
	r := resolve(t, s, "k", store.ActionMarkSent, now)
	if r.State != store.StateSent || !r.SentAt.Equal(now) || r.Fence <= c.Fence {
		t.Fatalf("mark_sent: state %s sentAt %v fence %d", r.State, r.SentAt, r.Fence)
	}
	wantErr(t, "late Complete after mark_sent", s.Complete(ctx(t), store.Completion{Lease: leaseOf(c), Result: store.ResultFailed, Now: now}), store.ErrLeaseLost)
}

func testResolveFail(t *testing.T, s store.Store) {
	c := claimed(t, s, "k", true)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultInDoubt, Error: "timeout after DATA", Now: Epoch})
	now := Epoch.Add(time.Hour)
	r := resolve(t, s, "k", store.ActionFail, now)
	if r.State != store.StateFailed || r.Fence <= c.Fence || !r.SentAt.IsZero() {
		t.Fatalf("fail: state %s fence %d sentAt %v", r.State, r.Fence, r.SentAt)
	}
	if recs := claim(t, s, now.Add(time.Hour), 10); len(recs) != 0 {
		t.Fatalf("failed record claimed: %v", ids(recs))
	}
}

func testResolveNotInDoubt(t *testing.T, s store.Store) {
	// A second resolve of the same record is refused: it is no longer in_doubt.
	inDoubtByExpiry(t, s, "twice")
	resolve(t, s, "twice", store.ActionFail, Epoch.Add(time.Hour))
	_, err := s.Resolve(ctx(t), store.Resolution{Tenant: tenantA, Key: "twice", Action: store.ActionResend, Actor: "bob", Now: Epoch.Add(time.Hour)})
	wantErr(t, "second Resolve", err, store.ErrInvalidState)

	claimed(t, s, "sending", false)
	c2 := claimed(t, s, "sent", false)
	complete(t, s, store.Completion{Lease: leaseOf(c2), Result: store.ResultSent, Now: Epoch})
	admitNew(t, s, "queued", Epoch)
	for _, k := range []string{"queued", "sending", "sent"} {
		before := get(t, s, tenantA, k)
		for _, a := range []store.Action{store.ActionResend, store.ActionMarkSent, store.ActionFail} {
			_, err := s.Resolve(ctx(t), store.Resolution{Tenant: tenantA, Key: k, Action: a, Actor: "bob", Now: Epoch})
			wantErr(t, "Resolve("+k+", "+string(a)+")", err, store.ErrInvalidState)
		}
		wantSame(t, "refused Resolve of "+k, get(t, s, tenantA, k), before)
	}
}

func testResolveNotFound(t *testing.T, s store.Store) {
	inDoubtByExpiry(t, s, "k")
	before := get(t, s, tenantA, "k")
	_, err := s.Resolve(ctx(t), store.Resolution{Tenant: tenantA, Key: "nope", Action: store.ActionResend, Actor: "x", Now: Epoch})
	wantErr(t, "Resolve of an unknown key", err, store.ErrNotFound)
	_, err = s.Resolve(ctx(t), store.Resolution{Tenant: tenantB, Key: "k", Action: store.ActionMarkSent, Actor: "x", Now: Epoch})
	wantErr(t, "Resolve of another tenant's key", err, store.ErrNotFound)
	wantSame(t, "after Resolve by another tenant", get(t, s, tenantA, "k"), before)
}

func testResolveBadAction(t *testing.T, s store.Store) {
	inDoubtByExpiry(t, s, "k")
	before := get(t, s, tenantA, "k")
	_, err := s.Resolve(ctx(t), store.Resolution{Tenant: tenantA, Key: "k", Action: "explode", Actor: "x", Now: Epoch})
	if err == nil {
		t.Fatal("Resolve with an unknown action succeeded")
	}
	wantSame(t, "after Resolve with an unknown action", get(t, s, tenantA, "k"), before)
}
