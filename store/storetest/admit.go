package storetest

import (
	"bytes"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

func testAdmitNew(t *testing.T, s store.Store) {
	a := admission(tenantA, "k1", "fp-1", Epoch)
	res := admit(t, s, a)[0]
	if res.Outcome != store.OutcomeNew {
		t.Fatalf("outcome %v, want new", res.Outcome)
	}
	want := store.Record{
		ID: res.Record.ID, Tenant: a.Tenant, Key: a.Key, Fingerprint: a.Fingerprint, MessageID: a.MessageID,
		From: a.From, To: a.To, Subject: a.Subject, Tags: a.Tags, Source: a.Source, State: store.StateQueued,
		NextAttempt: Epoch, CreatedAt: Epoch, UpdatedAt: Epoch,
	}
	if res.Record.ID == 0 {
		t.Fatal("new record has ID 0")
	}
	wantSame(t, "Admit result", res.Record, want)
	got := get(t, s, tenantA, "k1")
	wantSame(t, "Get after Admit", got, want)
	if got.Data != nil {
		t.Errorf("Get returned Data (%d bytes); Data is filled only by Claim", len(got.Data))
	}
	if res.Record.Data != nil {
		t.Errorf("Admit result has Data (%d bytes); the record is returned without Data", len(res.Record.Data))
	}
	// IDs grow with admission order: List relies on it for newest first.
	r2 := admitNew(t, s, "k2", Epoch)
	if r2.ID <= res.Record.ID {
		t.Errorf("second record has ID %d, not above the first's %d", r2.ID, res.Record.ID)
	}
}

func testAdmitNotBefore(t *testing.T, s store.Store) {
	a := admission(tenantA, "later", "fp-1", Epoch)
	a.NotBefore = Epoch.Add(time.Hour)
	r := admit(t, s, a)[0].Record
	if !r.NextAttempt.Equal(a.NotBefore) {
		t.Errorf("NextAttempt %v, want NotBefore %v", r.NextAttempt, a.NotBefore)
	}
	if g := get(t, s, tenantA, "later"); !g.NextAttempt.Equal(a.NotBefore) {
		t.Errorf("Get: NextAttempt %v, want NotBefore %v", g.NextAttempt, a.NotBefore)
	}
}

func testAdmitConcurrent(t *testing.T, s store.Store) {
	const n = 200
	var (
		wg       sync.WaitGroup
		start    = make(chan struct{})
		outcomes = make([]store.AdmitResult, n)
		errs     = make([]error, n)
	)
	for i := range n {
		wg.Go(func() {
			<-start
			res, err := s.Admit(ctx(t), []store.Admission{admission(tenantA, "same", "fp-1", Epoch)})
			if err == nil && len(res) != 1 {
				err = fmt.Errorf("%d results for 1 admission", len(res))
			}
			if err != nil {
				errs[i] = err
				return
			}
			outcomes[i] = res[0]
		})
	}
	close(start)
	wg.Wait()
	count := map[store.Outcome]int{}
	var id int64
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("Admit %d: %v", i, errs[i])
		}
		count[outcomes[i].Outcome]++
		if id == 0 {
			id = outcomes[i].Record.ID
		} else if outcomes[i].Record.ID != id {
			t.Fatalf("Admit %d returned record %d, another returned %d", i, outcomes[i].Record.ID, id)
		}
	}
	if count[store.OutcomeNew] != 1 || count[store.OutcomeDuplicate] != n-1 || len(count) != 2 {
		t.Fatalf("outcomes %v, want exactly 1 new and %d duplicate", count, n-1)
	}
	if got := get(t, s, tenantA, "same"); got.Duplicates != n-1 {
		t.Fatalf("Duplicates %d, want %d", got.Duplicates, n-1)
	}
}

func testAdmitTwoTenants(t *testing.T, s store.Store) {
	ra := admit(t, s, admission(tenantA, "shared", "fp-a", Epoch))[0]
	rb := admit(t, s, admission(tenantB, "shared", "fp-b", Epoch))[0]
	if ra.Outcome != store.OutcomeNew || rb.Outcome != store.OutcomeNew {
		t.Fatalf("outcomes %v and %v, want new and new: tenants must not share keys", ra.Outcome, rb.Outcome)
	}
	if ra.Record.ID == rb.Record.ID {
		t.Fatalf("both tenants got record %d", ra.Record.ID)
	}
	// A duplicate in one tenant does not touch the other.
	if r := admit(t, s, admission(tenantA, "shared", "fp-a", Epoch))[0]; r.Outcome != store.OutcomeDuplicate {
		t.Fatalf("resubmission in tenant A: %v, want duplicate", r.Outcome)
	}
	if g := get(t, s, tenantB, "shared"); g.Duplicates != 0 || g.Fingerprint != "fp-b" {
		t.Fatalf("tenant B record: duplicates %d fingerprint %q, want 0 and fp-b", g.Duplicates, g.Fingerprint)
	}
	if g := get(t, s, tenantA, "shared"); g.Duplicates != 1 || g.Fingerprint != "fp-a" {
		t.Fatalf("tenant A record: duplicates %d fingerprint %q, want 1 and fp-a", g.Duplicates, g.Fingerprint)
	}
}

func testAdmitConflict(t *testing.T, s store.Store) {
	orig := admission(tenantA, "k", "fp-1", Epoch)
	admit(t, s, orig)
	if r := admit(t, s, orig)[0]; r.Outcome != store.OutcomeDuplicate || r.Record.Duplicates != 1 {
		t.Fatalf("resubmission: %v with %d duplicates, want duplicate with 1", r.Outcome, r.Record.Duplicates)
	}
	before := get(t, s, tenantA, "k")

	other := admission(tenantA, "k", "fp-2", Epoch.Add(time.Minute))
	other.Subject = "another subject"
	other.Data = []byte("other data")
	other.To = []string{"c@example.com"}
	res := admit(t, s, other)[0]
	if res.Outcome != store.OutcomeConflict {
		t.Fatalf("outcome %v, want conflict", res.Outcome)
	}
	wantSame(t, "conflict result (must be the existing record)", res.Record, before)
	wantSame(t, "Get after conflict", get(t, s, tenantA, "k"), before)
	// The data to be sent is the original one.
	recs := claim(t, s, Epoch, 10)
	if len(recs) != 1 || !bytes.Equal(recs[0].Data, orig.Data) {
		t.Fatalf("Claim after conflict: %d records, data %q; want the original data %q", len(recs), dataOf(recs), orig.Data)
	}
}

func dataOf(recs []store.Record) []byte {
	if len(recs) == 0 {
		return nil
	}
	return recs[0].Data
}

func testAdmitBatch(t *testing.T, s store.Store) {
	admit(t, s, admission(tenantA, "old-1", "fp-1", Epoch), admission(tenantA, "old-2", "fp-1", Epoch))
	batch := []store.Admission{
		admission(tenantA, "new-1", "fp-1", Epoch), // new
		admission(tenantA, "old-1", "fp-1", Epoch), // duplicate of an earlier record
		admission(tenantA, "old-2", "fp-9", Epoch), // conflict with an earlier record
		admission(tenantA, "new-2", "fp-1", Epoch), // new
		admission(tenantA, "new-2", "fp-1", Epoch), // duplicate of the item just above
		admission(tenantA, "new-1", "fp-9", Epoch), // conflict with the first item
		admission(tenantB, "new-1", "fp-9", Epoch), // new: another tenant
	}
	want := []store.Outcome{store.OutcomeNew, store.OutcomeDuplicate, store.OutcomeConflict,
		store.OutcomeNew, store.OutcomeDuplicate, store.OutcomeConflict, store.OutcomeNew}
	res := admit(t, s, batch...)
	for i, r := range res {
		if r.Outcome != want[i] {
			t.Errorf("item %d (%s/%s): outcome %v, want %v", i, batch[i].Tenant, batch[i].Key, r.Outcome, want[i])
		}
		if r.Record.Key != batch[i].Key || r.Record.Tenant != batch[i].Tenant {
			t.Errorf("item %d: result is for %s/%s, want %s/%s (results must be in order)",
				i, r.Record.Tenant, r.Record.Key, batch[i].Tenant, batch[i].Key)
		}
	}
	if res[0].Record.ID != res[5].Record.ID || res[3].Record.ID != res[4].Record.ID {
		t.Errorf("duplicate/conflict inside the batch returned another record than the new one")
	}
	if g := get(t, s, tenantA, "new-2"); g.Duplicates != 1 {
		t.Errorf("new-2: Duplicates %d, want 1", g.Duplicates)
	}
	if g := get(t, s, tenantA, "new-1"); g.Duplicates != 0 || g.Fingerprint != "fp-1" {
		t.Errorf("new-1: Duplicates %d fingerprint %q, want 0 and fp-1", g.Duplicates, g.Fingerprint)
	}
	if g := get(t, s, tenantA, "old-1"); g.Duplicates != 1 {
		t.Errorf("old-1: Duplicates %d, want 1", g.Duplicates)
	}
	if g := get(t, s, tenantA, "old-2"); g.Duplicates != 0 || g.Fingerprint != "fp-1" {
		t.Errorf("old-2: Duplicates %d fingerprint %q, want 0 and fp-1", g.Duplicates, g.Fingerprint)
	}
}

func testAdmitEmpty(t *testing.T, s store.Store) {
	res, err := s.Admit(ctx(t), nil)
	if err != nil || len(res) != 0 {
		t.Fatalf("Admit(nil): %v, %v; want no results and no error", res, err)
	}
}

func testClaimFields(t *testing.T, s store.Store) {
	a := admission(tenantA, "k", "fp-1", Epoch)
	r := admit(t, s, a)[0].Record
	now := Epoch.Add(time.Second)
	recs, err := s.Claim(ctx(t), store.ClaimRequest{Owner: "worker-7", Now: now, Lease: 30 * time.Second, Limit: 5})
	if err != nil || len(recs) != 1 {
		t.Fatalf("Claim: %d records, %v; want 1", len(recs), err)
	}
	c := recs[0]
	if !bytes.Equal(c.Data, a.Data) {
		t.Errorf("Data %q, want %q", c.Data, a.Data)
	}
	want := r
	want.State = store.StateSending
	want.Attempts = 1
	want.Fence = r.Fence + 1
	want.LeaseOwner = "worker-7"
	want.LeaseExpiry = now.Add(30 * time.Second)
	want.UpdatedAt = now
	wantSame(t, "claimed record", c, want)
	wantSame(t, "Get after Claim", get(t, s, tenantA, "k"), want)
	if c.Fence <= r.Fence {
		t.Errorf("fence %d did not increase from %d", c.Fence, r.Fence)
	}
}

func testClaimExclusive(t *testing.T, s store.Store) {
	const n, workers = 120, 8
	var batch []store.Admission
	for i := range n {
		batch = append(batch, admission(tenantA, fmt.Sprintf("k%03d", i), "fp-1", Epoch))
	}
	admitted := admit(t, s, batch...)
	fences := map[int64]int64{}
	for _, r := range admitted {
		fences[r.Record.ID] = r.Record.Fence
	}
	var (
		mu      sync.Mutex
		claimed = map[int64]int{}
		wg      sync.WaitGroup
		start   = make(chan struct{})
		errs    = make(chan error, workers)
	)
	for w := range workers {
		wg.Go(func() {
			<-start
			for {
				recs, err := s.Claim(ctx(t), store.ClaimRequest{Owner: fmt.Sprintf("w%d", w), Now: Epoch, Lease: lease, Limit: 7})
				if err != nil {
					errs <- err
					return
				}
				if len(recs) == 0 {
					return
				}
				mu.Lock()
				for _, r := range recs {
					claimed[r.ID]++
					if len(r.Data) == 0 {
						errs <- fmt.Errorf("record %d claimed without Data", r.ID)
					}
					if r.Fence <= fences[r.ID] {
						errs <- fmt.Errorf("record %d claimed with fence %d, not above %d", r.ID, r.Fence, fences[r.ID])
					}
				}
				mu.Unlock()
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if len(claimed) != n {
		t.Errorf("%d records claimed, want %d", len(claimed), n)
	}
	for id, c := range claimed {
		if c != 1 {
			t.Errorf("record %d claimed %d times", id, c)
		}
	}
}

func testClaimDue(t *testing.T, s store.Store) {
	a := admission(tenantA, "k", "fp-1", Epoch)
	a.NotBefore = Epoch.Add(time.Hour)
	r := admit(t, s, a)[0].Record
	if recs := claim(t, s, Epoch.Add(time.Hour-time.Nanosecond), 10); len(recs) != 0 {
		t.Fatalf("claimed %v before NotBefore", ids(recs))
	}
	c := claimOne(t, s, Epoch.Add(time.Hour), r.ID) // due at NotBefore exactly
	retryAt := Epoch.Add(2 * time.Hour)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultRetry, Error: "421 try later", RetryAt: retryAt, Now: Epoch.Add(time.Hour)})
	if recs := claim(t, s, retryAt.Add(-time.Nanosecond), 10); len(recs) != 0 {
		t.Fatalf("claimed %v before RetryAt", ids(recs))
	}
	claimOne(t, s, retryAt, r.ID)
}

func testClaimOrder(t *testing.T, s store.Store) {
	// Admitted in one order, due in another.
	var keys []string
	for i, d := range []time.Duration{3, 1, 4, 2} {
		a := admission(tenantA, fmt.Sprintf("k%d", i), "fp-1", Epoch)
		a.NotBefore = Epoch.Add(d * time.Minute)
		admit(t, s, a)
		keys = append(keys, a.Key)
	}
	now := Epoch.Add(time.Hour)
	first := claim(t, s, now, 1)
	if len(first) != 1 || first[0].Key != "k1" {
		t.Fatalf("Claim(limit 1) took %v, want only k1 (the oldest due)", keysOf(first))
	}
	rest := claim(t, s, now, 2)
	if got := keysOf(rest); !slices.Equal(got, []string{"k3", "k0"}) {
		t.Fatalf("Claim(limit 2) took %v, want [k3 k0] in due order", got)
	}
	if last := claim(t, s, now, 10); !slices.Equal(keysOf(last), []string{"k2"}) {
		t.Fatalf("last Claim took %v, want [k2]", keysOf(last))
	}
	_ = keys
}

func keysOf(recs []store.Record) []string {
	out := make([]string, len(recs))
	for i, r := range recs {
		out[i] = r.Key
	}
	return out
}

func testClaimStates(t *testing.T, s store.Store) {
	// One record in each state; only the queued one and the expired
	// unmarked sending one are claimable.
	ids := map[string]int64{}
	for _, k := range []string{"sent", "failed", "indoubt", "held", "expired"} {
		ids[k] = admitNew(t, s, k, Epoch).ID
	}
	recs := claim(t, s, Epoch, 10)
	byKey := map[string]store.Record{}
	for _, r := range recs {
		byKey[r.Key] = r
	}
	complete(t, s, store.Completion{Lease: leaseOf(byKey["sent"]), Result: store.ResultSent, Now: Epoch})
	complete(t, s, store.Completion{Lease: leaseOf(byKey["failed"]), Result: store.ResultFailed, Error: "550", Now: Epoch})
	complete(t, s, store.Completion{Lease: leaseOf(byKey["indoubt"]), Result: store.ResultInDoubt, Error: "eof", Now: Epoch})
	later := Epoch.Add(lease / 2)
	if err := s.Renew(ctx(t), leaseOf(byKey["held"]), later, lease); err != nil {
		t.Fatal(err)
	}
	queued := admitNew(t, s, "queued", Epoch)
	got := claim(t, s, Epoch.Add(lease), 10) // "expired" expires now; "held" was renewed
	if k := keysOf(got); !slices.Equal(sorted(k), []string{"expired", "queued"}) {
		t.Fatalf("claimed %v, want exactly [expired queued]", k)
	}
	_ = queued
}

func sorted(s []string) []string { s = slices.Clone(s); slices.Sort(s); return s }
