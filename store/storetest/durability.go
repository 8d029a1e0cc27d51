package storetest

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

func testReopen(t *testing.T, open func() store.Store) {
	s := open()
	var batch []store.Admission
	for i := range 20 {
		batch = append(batch, admission(tenantA, fmt.Sprintf("k%02d", i), "fp-1", Epoch))
	}
	admit(t, s, batch...)
	admit(t, s, batch[0])                                 // a duplicate
	admit(t, s, admission(tenantB, "k00", "fp-b", Epoch)) // another tenant
	cs := claim(t, s, Epoch, 3)
	complete(t, s, store.Completion{Lease: leaseOf(cs[0]), Result: store.ResultSent, Reply: "250", Now: Epoch})
	before := map[string]store.Record{}
	for _, tenant := range []string{tenantA, tenantB} {
		for _, r := range list(t, s, store.Filter{Tenant: tenant, Limit: 100}).Records {
			before[tenant+"/"+r.Key] = r
		}
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	s = open()
	t.Cleanup(func() { s.Close() })
	n := 0
	for _, tenant := range []string{tenantA, tenantB} {
		for _, r := range list(t, s, store.Filter{Tenant: tenant, Limit: 100}).Records {
			b, ok := before[tenant+"/"+r.Key]
			if !ok {
				t.Errorf("record %s/%s appeared after reopen", tenant, r.Key)
				continue
			}
			wantSame(t, "record after reopen", r, b)
			n++
		}
	}
	if n != len(before) {
		t.Fatalf("%d records after reopen, want %d", n, len(before))
	}
	// Still deduplicated after the restart, and the data is still there.
	if r := admit(t, s, batch[5])[0]; r.Outcome != store.OutcomeDuplicate {
		t.Fatalf("resubmission after reopen: %v, want duplicate", r.Outcome)
	}
	rest := claim(t, s, Epoch, 100)
	if len(rest) != 18 { // 20 + 1 - 3 claimed, whose leases are still valid
		t.Fatalf("after reopen claimed %d records, want 18", len(rest))
	}
	for _, r := range rest {
		if r.Tenant == tenantA && !bytes.Equal(r.Data, admission(tenantA, r.Key, "fp-1", Epoch).Data) {
			t.Fatalf("record %s: data %q after reopen", r.Key, r.Data)
		}
	}
}

func testReopenLeases(t *testing.T, open func() store.Store) {
	s := open()
	r := admitNew(t, s, "marked", Epoch)
	c := claimOne(t, s, Epoch, r.ID)
	if err := s.MarkCommitting(ctx(t), leaseOf(c), Epoch); err != nil {
		t.Fatal(err)
	}
	r2 := admitNew(t, s, "unmarked", Epoch.Add(time.Second))
	c2 := claimOne(t, s, Epoch.Add(time.Second), r2.ID)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// The process "crashed" with two attempts in flight.
	s = open()
	t.Cleanup(func() { s.Close() })
	recs := claim(t, s, Epoch.Add(2*lease), 10)
	if len(recs) != 1 || recs[0].ID != r2.ID || recs[0].Fence != c2.Fence+1 {
		t.Fatalf("after reopen claimed %v, want only the unmarked record with fence %d", ids(recs), c2.Fence+1)
	}
	wantState(t, get(t, s, tenantA, "marked"), store.StateInDoubt)
	wantErr(t, "old lease after reopen", s.Renew(ctx(t), leaseOf(c2), Epoch.Add(2*lease), lease), store.ErrLeaseLost)
}
