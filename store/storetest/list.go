package storetest

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

func list(t *testing.T, s store.Store, f store.Filter) store.Page {
	t.Helper()
	p, err := s.List(ctx(t), f)
	if err != nil {
		t.Fatalf("List(%+v): %v", f, err)
	}
	return p
}

func admitN(t *testing.T, s store.Store, tenant string, n int) []store.Record {
	t.Helper()
	var recs []store.Record
	for i := range n { // one by one: admission order is ID order
		a := admission(tenant, fmt.Sprintf("%s-%03d", tenant, i), "fp-1", Epoch)
		a.NotBefore = Epoch.Add(time.Duration(i)) // due in admission order, the first at Epoch
		recs = append(recs, admit(t, s, a)[0].Record)
	}
	return recs
}

func testListOrder(t *testing.T, s store.Store) {
	recs := admitN(t, s, tenantA, 5)
	p := list(t, s, store.Filter{Tenant: tenantA})
	if len(p.Records) != 5 || p.Next != "" {
		t.Fatalf("List: %d records, next %q; want 5 and no next page", len(p.Records), p.Next)
	}
	for i, r := range p.Records {
		want := recs[len(recs)-1-i]
		wantSame(t, fmt.Sprintf("List record %d (newest first)", i), r, want)
		if r.Data != nil {
			t.Errorf("List returned Data for %q", r.Key)
		}
	}
}

func testListState(t *testing.T, s store.Store) {
	recs := admitN(t, s, tenantA, 4)
	c := claimOne(t, s, Epoch, recs[0].ID)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultSent, Now: Epoch})
	if rs := list(t, s, store.Filter{Tenant: tenantA, State: store.StateSent}).Records; len(rs) != 1 || rs[0].ID != recs[0].ID {
		t.Fatalf("List(sent): %v, want [%d]", ids(rs), recs[0].ID)
	}
	if rs := list(t, s, store.Filter{Tenant: tenantA, State: store.StateQueued}).Records; len(rs) != 3 || rs[0].ID != recs[3].ID {
		t.Fatalf("List(queued): %v, want 3 newest first", ids(rs))
	}
	_, err := s.List(ctx(t), store.Filter{Tenant: tenantA, State: "bogus"})
	if err == nil {
		t.Errorf("List with an unknown state succeeded")
	}
	if rs := list(t, s, store.Filter{Tenant: tenantA, State: store.StateInDoubt}).Records; len(rs) != 0 {
		t.Fatalf("List(in_doubt): %v, want none", ids(rs))
	}
}

func testListTenant(t *testing.T, s store.Store) {
	admitN(t, s, tenantA, 3)
	admitN(t, s, tenantB, 2)
	for _, r := range list(t, s, store.Filter{Tenant: tenantB}).Records {
		if r.Tenant != tenantB {
			t.Fatalf("List(tenant B) returned a record of %q", r.Tenant)
		}
	}
	if n := len(list(t, s, store.Filter{Tenant: tenantB}).Records); n != 2 {
		t.Fatalf("List(tenant B): %d records, want 2", n)
	}
	if n := len(list(t, s, store.Filter{Tenant: "nobody"}).Records); n != 0 {
		t.Fatalf("List(unknown tenant): %d records, want 0", n)
	}
}

func testListPaging(t *testing.T, s store.Store) {
	recs := admitN(t, s, tenantA, 23)
	admitN(t, s, tenantB, 4) // interleaved IDs of another tenant must not show
	seen := map[int64]bool{}
	var order []int64
	f := store.Filter{Tenant: tenantA, Limit: 5}
	for pages := 0; ; pages++ {
		if pages > 10 {
			t.Fatal("paging does not end")
		}
		p := list(t, s, f)
		if len(p.Records) > 5 {
			t.Fatalf("page of %d records, limit 5", len(p.Records))
		}
		for _, r := range p.Records {
			if seen[r.ID] {
				t.Fatalf("record %d on two pages", r.ID)
			}
			seen[r.ID] = true
			order = append(order, r.ID)
		}
		if p.Next == "" {
			break
		}
		f.Cursor = p.Next
	}
	if len(order) != len(recs) {
		t.Fatalf("paging visited %d records, want %d", len(order), len(recs))
	}
	for i, id := range order {
		if id != recs[len(recs)-1-i].ID {
			t.Fatalf("paging order %v is not newest first", order)
		}
	}
	// Records admitted while paging do not disturb the pages already ahead.
	p1 := list(t, s, store.Filter{Tenant: tenantA, Limit: 10})
	admitN(t, s, "tenant-c", 1)
	admit(t, s, admission(tenantA, "newer", "fp-1", Epoch))
	p2 := list(t, s, store.Filter{Tenant: tenantA, Limit: 10, Cursor: p1.Next})
	if len(p2.Records) != 10 || p2.Records[0].ID != recs[12].ID {
		t.Fatalf("second page after a new admission starts at %v, want record %d", ids(p2.Records), recs[12].ID)
	}
}

func testListBadCursor(t *testing.T, s store.Store) {
	admitN(t, s, tenantA, 2)
	for _, c := range []string{"garbage!", "%%%", "bm90LWEtY3Vyc29y"} {
		_, err := s.List(ctx(t), store.Filter{Tenant: tenantA, Cursor: c})
		if !errors.Is(err, store.ErrBadCursor) {
			t.Errorf("List with cursor %q: %v, want ErrBadCursor", c, err)
		}
	}
}

func testListLimits(t *testing.T, s store.Store) {
	admitN(t, s, tenantA, store.DefaultListLimit+3)
	p := list(t, s, store.Filter{Tenant: tenantA})
	if len(p.Records) != store.DefaultListLimit || p.Next == "" {
		t.Fatalf("List with Limit 0: %d records, next %q; want %d and a next page", len(p.Records), p.Next, store.DefaultListLimit)
	}
	p = list(t, s, store.Filter{Tenant: tenantA, Limit: store.MaxListLimit + 1})
	if len(p.Records) != store.DefaultListLimit+3 || p.Next != "" {
		t.Fatalf("List with Limit above the maximum: %d records, next %q", len(p.Records), p.Next)
	}
}

func testCounts(t *testing.T, s store.Store) {
	// Tenant A: one record in each state (and two queued); tenant B: two
	// queued records that are not due yet.
	var recs []store.Record
	for i := range 6 {
		a := admission(tenantA, fmt.Sprintf("a%d", i), "fp-1", Epoch)
		a.NotBefore = Epoch.Add(time.Duration(i) * time.Second)
		recs = append(recs, admit(t, s, a)[0].Record)
	}
	for i := range 2 {
		a := admission(tenantB, fmt.Sprintf("b%d", i), "fp-1", Epoch)
		a.NotBefore = Epoch.Add(time.Hour)
		admit(t, s, a)
	}
	cs := claim(t, s, Epoch.Add(3*time.Second), 10)
	if len(cs) != 4 {
		t.Fatalf("claimed %v, want the 4 due records", ids(cs))
	}
	for i, res := range []store.Result{store.ResultSent, store.ResultFailed, store.ResultInDoubt} {
		complete(t, s, store.Completion{Lease: leaseOf(cs[i]), Result: res, Now: Epoch})
	}
	want := map[string]store.Counts{
		tenantA:  {store.StateQueued: 2, store.StateSending: 1, store.StateSent: 1, store.StateFailed: 1, store.StateInDoubt: 1},
		tenantB:  {store.StateQueued: 2},
		"*":      {store.StateQueued: 4, store.StateSending: 1, store.StateSent: 1, store.StateFailed: 1, store.StateInDoubt: 1},
		"nobody": {},
	}
	for tenant, w := range want {
		got, err := s.Counts(ctx(t), tenant)
		if err != nil {
			t.Fatalf("Counts(%q): %v", tenant, err)
		}
		for _, st := range []store.State{store.StateQueued, store.StateSending, store.StateSent, store.StateFailed, store.StateInDoubt} {
			if got[st] != w[st] {
				t.Errorf("Counts(%q)[%s] = %d, want %d", tenant, st, got[st], w[st])
			}
		}
		for st, n := range got {
			if !st.Valid() && n != 0 {
				t.Errorf("Counts(%q) has unknown state %q", tenant, st)
			}
		}
	}
	_ = recs
}

func testTenantGet(t *testing.T, s store.Store) {
	admitNew(t, s, "secret", Epoch)
	_, err := s.Get(ctx(t), tenantB, "secret")
	wantErr(t, "Get of another tenant's key", err, store.ErrNotFound)
	_, err = s.Get(ctx(t), tenantA, "missing")
	wantErr(t, "Get of an unknown key", err, store.ErrNotFound)
}

func testPing(t *testing.T, s store.Store) {
	if err := s.Ping(ctx(t)); err != nil {
		t.Fatalf("Ping: %v", err)
	}
}

func testClosed(t *testing.T, s store.Store) {
	r := admitNew(t, s, "k", Epoch)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	c := ctx(t)
	l := store.Lease{ID: r.ID, Fence: 1}
	_, err := s.Admit(c, []store.Admission{admission(tenantA, "k2", "fp", Epoch)})
	wantErr(t, "Admit after Close", err, store.ErrClosed)
	_, err = s.Get(c, tenantA, "k")
	wantErr(t, "Get after Close", err, store.ErrClosed)
	_, err = s.List(c, store.Filter{Tenant: tenantA})
	wantErr(t, "List after Close", err, store.ErrClosed)
	_, err = s.Claim(c, store.ClaimRequest{Owner: "w", Now: Epoch, Lease: lease, Limit: 1})
	wantErr(t, "Claim after Close", err, store.ErrClosed)
	wantErr(t, "Renew after Close", s.Renew(c, l, Epoch, lease), store.ErrClosed)
	wantErr(t, "MarkCommitting after Close", s.MarkCommitting(c, l, Epoch), store.ErrClosed)
	wantErr(t, "Complete after Close", s.Complete(c, store.Completion{Lease: l, Result: store.ResultSent, Now: Epoch}), store.ErrClosed)
	_, err = s.Resolve(c, store.Resolution{Tenant: tenantA, Key: "k", Action: store.ActionFail, Now: Epoch})
	wantErr(t, "Resolve after Close", err, store.ErrClosed)
	_, err = s.Counts(c, tenantA)
	wantErr(t, "Counts after Close", err, store.ErrClosed)
	_, err = s.Message(c, tenantA, "k")
	wantErr(t, "Message after Close", err, store.ErrClosed)
	_, err = s.Events(c, tenantA, "k")
	wantErr(t, "Events after Close", err, store.ErrClosed)
	wantErr(t, "Ping after Close", s.Ping(c), store.ErrClosed)
}

func testListSearch(t *testing.T, s store.Store) {
	mk := func(tenant, key string, to []string, at time.Time) store.Record {
		a := admission(tenant, key, "fp-1", at)
		a.To = to
		return admit(t, s, a)[0].Record
	}
	a1 := mk(tenantA, "invoice-1", []string{"ann@example.net"}, Epoch)
	a2 := mk(tenantA, "invoice-2", []string{"bob@example.net", "ann@example.net"}, Epoch.Add(time.Minute))
	a3 := mk(tenantA, "reset-1", []string{"bob@example.net"}, Epoch.Add(2*time.Minute))
	mk(tenantA, "invoicf", []string{"ann@example.net.evil"}, Epoch.Add(3*time.Minute)) // just past the prefix, and a longer address
	b1 := mk(tenantB, "invoice-9", []string{"ann@example.net"}, Epoch.Add(4*time.Minute))
	cases := []struct {
		name string
		f    store.Filter
		want []int64
	}{
		{"key prefix", store.Filter{Tenant: tenantA, KeyPrefix: "invoice-"}, []int64{a2.ID, a1.ID}},
		{"recipient exact", store.Filter{Tenant: tenantA, Recipient: "ann@example.net"}, []int64{a2.ID, a1.ID}},
		{"prefix and recipient", store.Filter{Tenant: tenantA, KeyPrefix: "invoice", Recipient: "bob@example.net"}, []int64{a2.ID}},
		{"created range", store.Filter{Tenant: tenantA, CreatedFrom: Epoch.Add(time.Minute), CreatedBefore: Epoch.Add(3 * time.Minute)}, []int64{a3.ID, a2.ID}},
		{"oldest first", store.Filter{Tenant: tenantA, KeyPrefix: "invoice-", Oldest: true}, []int64{a1.ID, a2.ID}},
		{"all tenants", store.Filter{Tenant: store.AllTenants, KeyPrefix: "invoice-"}, []int64{b1.ID, a2.ID, a1.ID}},
		{"no match", store.Filter{Tenant: tenantA, Recipient: "nobody@example.net"}, nil},
	}
	for _, c := range cases {
		got := ids(list(t, s, c.f).Records)
		if fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("List(%s): %v, want %v", c.name, got, c.want)
		}
	}
}

func testListOldestPaging(t *testing.T, s store.Store) {
	recs := admitN(t, s, tenantA, 7)
	admitN(t, s, tenantB, 3)
	f := store.Filter{Tenant: store.AllTenants, State: store.StateQueued, Oldest: true, Limit: 3}
	var got []int64
	for pages := 0; ; pages++ {
		if pages > 5 {
			t.Fatal("paging does not end")
		}
		p := list(t, s, f)
		got = append(got, ids(p.Records)...)
		if p.Next == "" {
			break
		}
		f.Cursor = p.Next
	}
	if len(got) != 10 || got[0] != recs[0].ID {
		t.Fatalf("oldest-first paging over all tenants: %v, want 10 records from %d", got, recs[0].ID)
	}
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] {
			t.Fatalf("oldest-first paging not ascending: %v", got)
		}
	}
}

func testMessage(t *testing.T, s store.Store) {
	a := admission(tenantA, "m", "fp-1", Epoch)
	a.NotBefore = Epoch.Add(time.Hour) // not due: the claim below must take only "p"
	admit(t, s, a)
	got, err := s.Message(ctx(t), tenantA, "m")
	if err != nil || string(got) != string(a.Data) {
		t.Fatalf("Message: %q, %v; want the admitted data %q", got, err, a.Data)
	}
	_, err = s.Message(ctx(t), tenantB, "m")
	wantErr(t, "Message of another tenant", err, store.ErrNotFound)
	_, err = s.Message(ctx(t), tenantA, "nothing")
	wantErr(t, "Message of an unknown key", err, store.ErrNotFound)
	// Purged on send: the record stays, the message is gone.
	c := claimOne(t, s, Epoch, admitNew(t, s, "p", Epoch).ID)
	complete(t, s, store.Completion{Lease: leaseOf(c), Result: store.ResultSent, Now: Epoch, PurgeData: true})
	if got, err := s.Message(ctx(t), tenantA, "p"); err != nil || len(got) != 0 {
		t.Fatalf("Message after a purge: %q, %v; want empty", got, err)
	}
}
