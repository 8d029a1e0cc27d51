package dispatch_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/sendonce/sendonce/internal/dispatch"
	"github.com/sendonce/sendonce/store"
)

// inDoubt admits key and takes it to in_doubt at now, as a lost answer
// after the commit marker would.
func inDoubt(t *testing.T, st store.Store, key string, now time.Time) {
	t.Helper()
	admit(t, st, key, now)
	recs, err := st.Claim(context.Background(), store.ClaimRequest{Owner: "test", Now: now, Lease: time.Minute, Limit: 1})
	if err != nil || len(recs) != 1 {
		t.Fatalf("claim %s: %v, %d records", key, err, len(recs))
	}
	l := store.Lease{ID: recs[0].ID, Fence: recs[0].Fence}
	if err := st.MarkCommitting(context.Background(), l, now); err != nil {
		t.Fatal(err)
	}
	if err := st.Complete(context.Background(), store.Completion{Lease: l, Result: store.ResultInDoubt, Error: "connection reset after the final dot", Now: now}); err != nil {
		t.Fatal(err)
	}
}

func storeResolve(st store.Store, now func() time.Time) func(ctx context.Context, tenant, key string, a store.Action, actor string) (store.Record, error) {
	return func(ctx context.Context, tenant, key string, a store.Action, actor string) (store.Record, error) {
		return st.Resolve(ctx, store.Resolution{Tenant: tenant, Key: key, Action: a, Actor: actor, Now: now()})
	}
}

func TestRulesResolveByAgeAndRecordWho(t *testing.T) {
	st := openStore(t)
	t0 := time.Date(2030, 5, 6, 7, 0, 0, 0, time.UTC)
	inDoubt(t, st, "old", t0)
	inDoubt(t, st, "young", t0.Add(20*time.Hour))
	now := t0
	cfg := dispatch.RulesConfig{
		Store: st,
		Rules: []dispatch.Rule{{After: 24 * time.Hour, Action: store.ActionResend}, {After: 72 * time.Hour, Action: store.ActionFail}},
		Now:   func() time.Time { return now },
	}
	cfg.Resolve = storeResolve(st, cfg.Now)

	now = t0.Add(23 * time.Hour)
	if n, err := dispatch.ApplyRules(t.Context(), cfg); err != nil || n != 0 {
		t.Fatalf("after 23h: resolved %d (%v), want none", n, err)
	}
	now = t0.Add(24 * time.Hour)
	if n, err := dispatch.ApplyRules(t.Context(), cfg); err != nil || n != 1 {
		t.Fatalf("after 24h: resolved %d (%v), want 1", n, err)
	}
	r := get(t, st, "old")
	if r.State != store.StateQueued || r.ResolvedBy != "resend by rule:resend-after-24h" {
		t.Fatalf("old after the resend rule: state %s, resolved_by %q", r.State, r.ResolvedBy)
	}
	if r := get(t, st, "young"); r.State != store.StateInDoubt {
		t.Fatalf("young was resolved at 4h in doubt: %s", r.State)
	}
	// A second pass at the same time changes nothing.
	if n, err := dispatch.ApplyRules(t.Context(), cfg); err != nil || n != 0 {
		t.Fatalf("second pass: resolved %d (%v), want none", n, err)
	}
	// Past both rules, the longer one (fail) wins.
	now = t0.Add(20*time.Hour + 73*time.Hour)
	if n, err := dispatch.ApplyRules(t.Context(), cfg); err != nil || n != 1 {
		t.Fatalf("after 73h: resolved %d (%v), want 1", n, err)
	}
	if r := get(t, st, "young"); r.State != store.StateFailed || r.ResolvedBy != "fail by rule:fail-after-72h" {
		t.Fatalf("young after 73h: %s, %q", r.State, r.ResolvedBy)
	}
}

// A resend rule stops at MaxAttempts, and a rule for one tenant leaves the
// others alone.
func TestRulesMaxAttemptsAndTenant(t *testing.T) {
	st := openStore(t)
	t0 := time.Date(2030, 5, 6, 7, 0, 0, 0, time.UTC)
	inDoubt(t, st, "k", t0) // attempts 1
	now := t0.Add(2 * time.Hour)
	cfg := dispatch.RulesConfig{Store: st, Now: func() time.Time { return now },
		Rules: []dispatch.Rule{{After: time.Hour, Action: store.ActionResend, MaxAttempts: 1}, {After: time.Hour, Action: store.ActionFail, Tenant: "other"}}}
	cfg.Resolve = storeResolve(st, cfg.Now)
	if n, err := dispatch.ApplyRules(t.Context(), cfg); err != nil || n != 0 {
		t.Fatalf("resolved %d (%v); the resend rule is spent and the fail rule is for another tenant", n, err)
	}
	cfg.Rules[1].Tenant = "t"
	if n, err := dispatch.ApplyRules(t.Context(), cfg); err != nil || n != 1 {
		t.Fatalf("resolved %d (%v), want 1 by the tenant's fail rule", n, err)
	}
	if r := get(t, st, "k"); r.ResolvedBy != "fail by rule:fail-after-1h-tenant-t" {
		t.Fatalf("resolved_by %q", r.ResolvedBy)
	}
}

func TestRulesValidated(t *testing.T) {
	err := dispatch.ValidateRules([]dispatch.Rule{{After: 0, Action: "retry"}})
	if err == nil {
		t.Fatal("a rule without after and with an unknown action was accepted")
	}
	for _, want := range []string{"after is 0s", `action "retry" is not an action`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}
