package storetest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

// SeedEnv names the environment variable that fixes the simulation's seed,
// to replay a failure: STORETEST_SEED=1234 go test -run Simulation ./...
const SeedEnv = "STORETEST_SEED"

// The simulation applies a seeded random sequence of operations to the
// store and to a plain in-memory model of the contract, and compares the
// two after every step, in the manner of bbolt's simulation test. A
// difference is a bug in the store (or in the contract's model).

type mrec struct {
	id                 int64
	tenant, key, fp    string
	state              store.State
	attempts           int
	dups               int64
	fence              int64
	committing         bool
	owner              string
	expiry, next, sent time.Time
	created            time.Time
	lastErr            string
	lastErrKnown       bool // false after the store wrote its own reason (in_doubt by expiry)
	reply, resolvedBy  string
}

type model struct {
	recs map[string]*mrec // by tenant/key
	byID map[int64]*mrec
}

func (m *model) lookup(tenant, key string) *mrec { return m.recs[tenant+"/"+key] }

func leaseHeld(r *mrec, l store.Lease, now time.Time) bool {
	return r != nil && r.fence == l.Fence && r.state == store.StateSending && now.Before(r.expiry)
}

func testSimulation(t *testing.T, s store.Store) {
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(SeedEnv); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("%s=%q: %v", SeedEnv, v, err)
		}
	}
	t.Logf("simulation seed %d (replay with %s=%d)", seed, SeedEnv, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x5e0d0ce))
	sim := &simulation{t: t, s: s, rng: rng, now: Epoch, m: &model{recs: map[string]*mrec{}, byID: map[int64]*mrec{}}, dirty: map[int64]bool{}}
	const steps = 500
	for sim.step = 0; sim.step < steps; sim.step++ {
		sim.randomOp()
		if t.Failed() {
			t.Fatalf("stopped at step %d; replay with %s=%d", sim.step, SeedEnv, seed)
		}
		if sim.step%50 == 49 {
			sim.compareAll()
		} else {
			sim.compareDirty()
		}
		if t.Failed() {
			t.Fatalf("store and model differ after step %d (%s); replay with %s=%d", sim.step, sim.last, SeedEnv, seed)
		}
	}
	sim.compareCounts()
}

type simulation struct {
	t      *testing.T
	s      store.Store
	rng    *rand.Rand
	now    time.Time
	m      *model
	leases []store.Lease
	step   int
	last   string
	dirty  map[int64]bool // records the current step may have changed
}

var (
	simTenants = []string{tenantA, tenantB}
	simFPs     = []string{"fp-1", "fp-2"}
)

const simKeys = 8

func (sim *simulation) pick(n int) int { return sim.rng.IntN(n) }

func (sim *simulation) randomLease() (store.Lease, bool) {
	if len(sim.leases) == 0 {
		return store.Lease{}, false
	}
	// Mostly recent leases, sometimes stale ones.
	i := len(sim.leases) - 1 - sim.pick(min(len(sim.leases), 6))
	return sim.leases[i], true
}

func (sim *simulation) randomOp() {
	switch p := sim.pick(100); {
	case p < 15:
		// Whole seconds, like the leases and retry times, so that "due
		// exactly now" and "expires exactly now" happen often.
		d := time.Duration(sim.pick(40)) * time.Second
		sim.now = sim.now.Add(d)
		sim.last = fmt.Sprintf("advance %v", d)
	case p < 35:
		sim.admit()
	case p < 52:
		sim.claim()
	case p < 60:
		sim.renew()
	case p < 70:
		sim.mark()
	case p < 92:
		sim.complete()
	default:
		sim.resolve()
	}
}

func (sim *simulation) checkErr(what string, got, want error) {
	sim.t.Helper()
	if want == nil && got != nil || want != nil && !errors.Is(got, want) {
		sim.t.Errorf("step %d: %s: error %v, model says %v", sim.step, what, got, want)
	}
}

func (sim *simulation) admit() {
	n := 1 + sim.pick(3)
	var batch []store.Admission
	for range n {
		a := admission(simTenants[sim.pick(2)], fmt.Sprintf("k%d", sim.pick(simKeys)), simFPs[sim.pick(2)], sim.now)
		if sim.pick(4) == 0 {
			a.NotBefore = sim.now.Add(time.Duration(sim.pick(60)) * time.Second)
		}
		batch = append(batch, a)
	}
	sim.last = fmt.Sprintf("admit %d", n)
	res, err := sim.s.Admit(ctx(sim.t), batch)
	if err != nil || len(res) != n {
		sim.t.Errorf("step %d: Admit: %d results, %v", sim.step, len(res), err)
		return
	}
	for i, a := range batch {
		r := sim.m.lookup(a.Tenant, a.Key)
		want := store.OutcomeNew
		switch {
		case r == nil:
			next := a.NotBefore
			if next.IsZero() {
				next = a.Now
			}
			r = &mrec{id: res[i].Record.ID, tenant: a.Tenant, key: a.Key, fp: a.Fingerprint, state: store.StateQueued,
				next: next, created: a.Now, lastErrKnown: true}
			if _, dup := sim.m.byID[r.id]; dup || r.id == 0 {
				sim.t.Errorf("step %d: new record got ID %d, already used or zero", sim.step, r.id)
			}
			sim.m.recs[a.Tenant+"/"+a.Key] = r
			sim.m.byID[r.id] = r
		case r.fp == a.Fingerprint:
			want = store.OutcomeDuplicate
			r.dups++
		default:
			want = store.OutcomeConflict
		}
		if res[i].Outcome != want {
			sim.t.Errorf("step %d: Admit %s/%s item %d: %v, model says %v", sim.step, a.Tenant, a.Key, i, res[i].Outcome, want)
		}
		sim.dirty[r.id] = true
		if res[i].Record.ID != r.id {
			sim.t.Errorf("step %d: Admit %s/%s: record %d, model has %d", sim.step, a.Tenant, a.Key, res[i].Record.ID, r.id)
		}
	}
}

func (sim *simulation) claim() {
	limit := 1 + sim.pick(3)
	owner := fmt.Sprintf("w%d", sim.pick(3))
	leaseFor := time.Duration(30+sim.pick(60)) * time.Second
	sim.last = fmt.Sprintf("claim limit %d lease %v", limit, leaseFor)
	// The model first moves marked, expired leases to in_doubt.
	type cand struct {
		r   *mrec
		due time.Time
	}
	due := map[int64]time.Time{}
	for _, r := range sim.m.byID {
		switch {
		case r.state == store.StateSending && r.committing && !sim.now.Before(r.expiry):
			sim.dirty[r.id] = true
			r.state = store.StateInDoubt
			r.lastErrKnown = false
		case r.state == store.StateSending && !r.committing && !sim.now.Before(r.expiry):
			due[r.id] = r.expiry
		case r.state == store.StateQueued && !sim.now.Before(r.next):
			due[r.id] = r.next
		}
	}
	recs, err := sim.s.Claim(ctx(sim.t), store.ClaimRequest{Owner: owner, Now: sim.now, Lease: leaseFor, Limit: limit})
	if err != nil {
		sim.t.Errorf("step %d: Claim: %v", sim.step, err)
		return
	}
	if want := min(limit, len(due)); len(recs) != want {
		sim.t.Errorf("step %d: Claim took %d records, model has %d due (limit %d)", sim.step, len(recs), len(due), limit)
		return
	}
	taken := map[int64]bool{}
	var latest time.Time
	for i, rec := range recs {
		d, ok := due[rec.ID]
		if !ok || taken[rec.ID] {
			sim.t.Errorf("step %d: Claim took record %d, which is not due or taken twice", sim.step, rec.ID)
			return
		}
		if i > 0 && d.Before(latest) {
			sim.t.Errorf("step %d: Claim returned records out of due order", sim.step)
		}
		latest = d
		taken[rec.ID] = true
	}
	for id, d := range due {
		if !taken[id] && d.Before(latest) {
			sim.t.Errorf("step %d: Claim left record %d (due %v) for a later one (due %v)", sim.step, id, d, latest)
		}
	}
	for _, rec := range recs {
		r := sim.m.byID[rec.ID]
		sim.dirty[r.id] = true
		r.state, r.fence, r.attempts = store.StateSending, r.fence+1, r.attempts+1
		r.owner, r.expiry, r.committing = owner, sim.now.Add(leaseFor), false
		if rec.Fence != r.fence {
			sim.t.Errorf("step %d: Claim gave record %d fence %d, model says %d", sim.step, rec.ID, rec.Fence, r.fence)
		}
		if !bytes.Equal(rec.Data, admission(r.tenant, r.key, r.fp, r.created).Data) {
			sim.t.Errorf("step %d: Claim of record %d returned data %q", sim.step, rec.ID, rec.Data)
		}
		sim.leases = append(sim.leases, leaseOf(rec))
	}
}

func (sim *simulation) renew() {
	l, ok := sim.randomLease()
	if !ok {
		return
	}
	d := time.Duration(30+sim.pick(60)) * time.Second
	sim.last = fmt.Sprintf("renew %v for %v", l, d)
	sim.dirty[l.ID] = true
	r := sim.m.byID[l.ID]
	var want error
	if leaseHeld(r, l, sim.now) {
		r.expiry = sim.now.Add(d)
	} else {
		want = store.ErrLeaseLost
	}
	sim.checkErr(sim.last, sim.s.Renew(ctx(sim.t), l, sim.now, d), want)
}

func (sim *simulation) mark() {
	l, ok := sim.randomLease()
	if !ok {
		return
	}
	sim.last = fmt.Sprintf("mark %v", l)
	sim.dirty[l.ID] = true
	r := sim.m.byID[l.ID]
	var want error
	if leaseHeld(r, l, sim.now) {
		r.committing = true
	} else {
		want = store.ErrLeaseLost
	}
	sim.checkErr(sim.last, sim.s.MarkCommitting(ctx(sim.t), l, sim.now), want)
}

func (sim *simulation) complete() {
	l, ok := sim.randomLease()
	if !ok {
		return
	}
	c := store.Completion{
		Lease:  l,
		Result: store.Result(1 + sim.pick(5)),
		Error:  fmt.Sprintf("error %d", sim.step),
		Reply:  fmt.Sprintf("reply %d", sim.step),
		Now:    sim.now,
	}
	if sim.pick(3) > 0 {
		c.RetryAt = sim.now.Add(time.Duration(sim.pick(120)) * time.Second)
	}
	sim.last = fmt.Sprintf("complete %v %v", l, c.Result)
	sim.dirty[l.ID] = true
	sim.checkErr(sim.last, sim.s.Complete(ctx(sim.t), c), sim.m.complete(c))
}

// complete applies c to the model and returns the error the store must give.
func (m *model) complete(c store.Completion) error {
	r := m.byID[c.Lease.ID]
	if r == nil || r.fence != c.Lease.Fence {
		return store.ErrLeaseLost
	}
	switch r.state {
	case store.StateSent:
		if c.Result == store.ResultSent {
			return nil
		}
		return store.ErrInvalidState
	case store.StateFailed:
		if c.Result == store.ResultFailed {
			return nil
		}
		return store.ErrInvalidState
	case store.StateQueued:
		if c.Result == store.ResultRetry || c.Result == store.ResultRelease {
			return nil
		}
		return store.ErrInvalidState
	}
	retryAt := c.RetryAt
	if retryAt.IsZero() {
		retryAt = c.Now
	}
	setErr := func() { r.lastErr, r.lastErrKnown = c.Error, true }
	switch c.Result {
	case store.ResultSent:
		r.state, r.sent, r.reply = store.StateSent, c.Now, c.Reply
	case store.ResultFailed:
		r.state, r.reply = store.StateFailed, c.Reply
		setErr()
	case store.ResultRetry:
		r.state, r.reply, r.next, r.committing = store.StateQueued, c.Reply, retryAt, false
		setErr()
	case store.ResultInDoubt:
		r.state, r.reply = store.StateInDoubt, c.Reply
		setErr()
	case store.ResultRelease:
		if r.state != store.StateSending || r.committing {
			return store.ErrInvalidState
		}
		r.state, r.next, r.committing, r.attempts = store.StateQueued, retryAt, false, r.attempts-1
	}
	return nil
}

func (sim *simulation) resolve() {
	tenant, key := simTenants[sim.pick(2)], fmt.Sprintf("k%d", sim.pick(simKeys))
	// Prefer in_doubt records, so resolves mostly do something.
	for _, r := range sim.m.byID {
		if r.state == store.StateInDoubt && sim.pick(2) == 0 {
			tenant, key = r.tenant, r.key
			break
		}
	}
	a := []store.Action{store.ActionResend, store.ActionMarkSent, store.ActionFail}[sim.pick(3)]
	actor := fmt.Sprintf("op%d", sim.pick(3))
	sim.last = fmt.Sprintf("resolve %s/%s %s", tenant, key, a)
	got, err := sim.s.Resolve(ctx(sim.t), store.Resolution{Tenant: tenant, Key: key, Action: a, Actor: actor, Now: sim.now})
	r := sim.m.lookup(tenant, key)
	if r != nil {
		sim.dirty[r.id] = true
	}
	switch {
	case r == nil:
		sim.checkErr(sim.last, err, store.ErrNotFound)
		return
	case r.state != store.StateInDoubt:
		sim.checkErr(sim.last, err, store.ErrInvalidState)
		return
	}
	r.fence++
	r.committing = false
	r.resolvedBy = store.ResolvedBy(a, actor)
	switch a {
	case store.ActionResend:
		r.state, r.next = store.StateQueued, sim.now
	case store.ActionMarkSent:
		r.state, r.sent = store.StateSent, sim.now
	case store.ActionFail:
		r.state = store.StateFailed
	}
	sim.checkErr(sim.last, err, nil)
	if err == nil {
		sim.compare(r, got, "Resolve result")
	}
}

func (sim *simulation) compareDirty() {
	for id := range sim.dirty {
		r := sim.m.byID[id]
		if r == nil {
			continue
		}
		got, err := sim.s.Get(ctx(sim.t), r.tenant, r.key)
		if err != nil {
			sim.t.Errorf("Get %s/%s: %v", r.tenant, r.key, err)
			continue
		}
		sim.compare(r, got, "Get")
	}
	clear(sim.dirty)
}

func (sim *simulation) compareAll() {
	clear(sim.dirty)
	for _, r := range sim.m.byID {
		got, err := sim.s.Get(ctx(sim.t), r.tenant, r.key)
		if err != nil {
			sim.t.Errorf("Get %s/%s: %v", r.tenant, r.key, err)
			continue
		}
		sim.compare(r, got, "Get")
	}
}

func (sim *simulation) compare(r *mrec, got store.Record, what string) {
	sim.t.Helper()
	var d []string
	chk := func(field string, ok bool, g, w any) {
		if !ok {
			d = append(d, fmt.Sprintf("%s: store %v, model %v", field, g, w))
		}
	}
	chk("ID", got.ID == r.id, got.ID, r.id)
	chk("Fingerprint", got.Fingerprint == r.fp, got.Fingerprint, r.fp)
	chk("State", got.State == r.state, got.State, r.state)
	chk("Attempts", got.Attempts == r.attempts, got.Attempts, r.attempts)
	chk("Duplicates", got.Duplicates == r.dups, got.Duplicates, r.dups)
	chk("Fence", got.Fence == r.fence, got.Fence, r.fence)
	chk("Reply", got.Reply == r.reply, got.Reply, r.reply)
	chk("SentAt", got.SentAt.Equal(r.sent), got.SentAt, r.sent)
	chk("CreatedAt", got.CreatedAt.Equal(r.created), got.CreatedAt, r.created)
	chk("ResolvedBy", got.ResolvedBy == r.resolvedBy, got.ResolvedBy, r.resolvedBy)
	if r.lastErrKnown {
		chk("LastError", got.LastError == r.lastErr, got.LastError, r.lastErr)
	}
	switch r.state {
	case store.StateSending:
		chk("Committing", got.Committing == r.committing, got.Committing, r.committing)
		chk("LeaseOwner", got.LeaseOwner == r.owner, got.LeaseOwner, r.owner)
		chk("LeaseExpiry", got.LeaseExpiry.Equal(r.expiry), got.LeaseExpiry, r.expiry)
	case store.StateQueued:
		chk("NextAttempt", got.NextAttempt.Equal(r.next), got.NextAttempt, r.next)
	}
	if len(d) > 0 {
		sim.t.Errorf("step %d (%s): %s of %s/%s: %v", sim.step, sim.last, what, r.tenant, r.key, d)
	}
}

func (sim *simulation) compareCounts() {
	want := store.Counts{}
	for _, r := range sim.m.byID {
		want[r.state]++
	}
	got, err := sim.s.Counts(ctx(sim.t), "*")
	if err != nil {
		sim.t.Fatalf("Counts: %v", err)
	}
	for _, st := range []store.State{store.StateQueued, store.StateSending, store.StateSent, store.StateFailed, store.StateInDoubt} {
		if got[st] != want[st] {
			sim.t.Errorf("Counts[%s] = %d, model says %d", st, got[st], want[st])
		}
	}
}
