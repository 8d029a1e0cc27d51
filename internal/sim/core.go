package sim

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/sendonce/sendonce/store"
)

// keyInfo is what the simulation knows about one admitted key: the truth
// at the sink and what the protocol has said about it.
type keyInfo struct {
	key        string
	deliveries int         // messages the sink received for this key
	resends    int         // operator resends after in_doubt
	failOK     bool        // a permanent answer or exhausted retries was recorded
	lastState  store.State // as seen by the last check
	markers    map[int64]bool
}

type wstate int

const (
	wIdle    wstate = iota
	wClaimed        // holds a claim; preparing (renewals, pre-dot steps)
	wReady          // margin checked: about to write the marker
	wMarked         // marker accepted (or, broken, refused): about to do the dot
	wWaiting        // waiting for the answer (or holding a pre-dot result) to record
)

var wstateName = [...]string{"idle", "claimed", "ready", "marked", "waiting"}

// worker mirrors one internal/dispatch attempt loop with Workers=1.
type worker struct {
	slot, gen   int
	owner       string
	skew        time.Duration // offset of its wall clock (the now it passes the store)
	rate        float64       // rate of its monotonic clock
	pausedUntil time.Time

	st        wstate
	key       string
	attempts  int
	lease     store.Lease
	deadline  time.Duration // lease end by its monotonic clock
	committed bool
	replyAt   time.Time
	result    store.Result
	errMsg    string
	reply     string
}

type sim struct {
	cfg     Config
	ctx     context.Context
	st      store.Store
	rng     *rand.Rand
	now     time.Time
	tenant  string
	keys    map[string]*keyInfo
	order   []string // admitted keys in order
	workers []*worker
	rep     Report
	step    int
	quiet   bool // quiescence: no faults, no ambiguous answers

	snap     map[string]store.Record // the records as of the last check
	dirty    []string                // keys written since the last check
	lastFull int

	ring  [traceKeep]string
	nring int
	hash  hash.Hash64
}

func (s *sim) newWorker(slot int) *worker {
	gen := 0
	if slot < len(s.workers) {
		gen = s.workers[slot].gen + 1
	}
	sk := time.Duration(0)
	if s.cfg.MaxSkew > 0 {
		sk = time.Duration(s.rng.Int64N(int64(2*s.cfg.MaxSkew)+1)) - s.cfg.MaxSkew
		sk = sk.Truncate(time.Millisecond)
	}
	return &worker{
		slot: slot, gen: gen, owner: fmt.Sprintf("w%d.%d", slot, gen),
		skew: sk, rate: 0.99 + 0.02*s.rng.Float64(),
	}
}

func (s *sim) wnow(w *worker) time.Time { return s.now.Add(w.skew) }

func (s *sim) mono(w *worker) time.Duration {
	return time.Duration(float64(s.now.Sub(Epoch)) * w.rate)
}

func (s *sim) tracef(format string, args ...any) {
	line := fmt.Sprintf("%5d t+%-9s ", s.step, s.now.Sub(Epoch).Truncate(time.Millisecond)) + fmt.Sprintf(format, args...)
	s.ring[s.nring%traceKeep] = line
	s.nring++
	s.hash.Write([]byte(line))
	s.hash.Write([]byte{'\n'})
	if s.cfg.Trace != nil {
		s.cfg.Trace(line)
	}
}

func (s *sim) fail(format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	s.tracef("VIOLATION %s", msg)
	n := min(s.nring, traceKeep)
	tr := make([]string, 0, n)
	for i := s.nring - n; i < s.nring; i++ {
		tr = append(tr, s.ring[i%traceKeep])
	}
	return &Failure{Step: s.step, Msg: msg, Trace: tr}
}

func (s *sim) dur(lo, hi time.Duration) time.Duration {
	if hi <= lo {
		return lo
	}
	return (lo + time.Duration(s.rng.Int64N(int64(hi-lo)))).Truncate(time.Millisecond)
}

func (s *sim) run() error {
	for s.step = 0; s.step < s.cfg.Steps; s.step++ {
		if err := s.randomStep(); err != nil {
			return err
		}
		if err := s.check(); err != nil {
			return err
		}
	}
	return s.quiesce()
}

func (s *sim) randomStep() error {
	r := s.rng.Float64()
	switch {
	case r < s.cfg.CrashRate:
		w := s.workers[s.rng.IntN(len(s.workers))]
		nw := s.newWorker(w.slot)
		s.workers[w.slot] = nw
		s.rep.Crashes++
		s.tracef("CRASH %s in %s (key %q fence %d); replaced by %s", w.owner, wstateName[w.st], w.key, w.lease.Fence, nw.owner)
		return nil
	case r < s.cfg.CrashRate+s.cfg.PauseRate:
		w := s.workers[s.rng.IntN(len(s.workers))]
		d := s.dur(time.Second, 2*s.cfg.Lease)
		w.pausedUntil = s.now.Add(d)
		s.rep.Pauses++
		s.tracef("PAUSE %s in %s (key %q fence %d) for %s", w.owner, wstateName[w.st], w.key, w.lease.Fence, d)
		return nil
	}
	r = s.rng.Float64()
	switch {
	case r < 0.12:
		return s.admit()
	case r < 0.32:
		d := s.dur(time.Millisecond, s.cfg.Lease/2)
		if s.rng.IntN(8) == 0 {
			d = s.dur(s.cfg.Lease, 2*s.cfg.Lease)
		}
		s.now = s.now.Add(d)
		s.tracef("clock +%s", d)
		return nil
	case r < 0.37:
		return s.operator(false)
	}
	var ready []*worker
	for _, w := range s.workers {
		if !s.now.Before(w.pausedUntil) {
			ready = append(ready, w)
		}
	}
	if len(ready) == 0 {
		d := s.dur(time.Second, s.cfg.Lease/2)
		s.now = s.now.Add(d)
		s.tracef("all paused; clock +%s", d)
		return nil
	}
	return s.workerStep(ready[s.rng.IntN(len(ready))])
}

func (s *sim) admit() error {
	var key string
	isNew := len(s.order) < s.cfg.Keys && (len(s.order) == 0 || s.rng.Float64() >= s.cfg.DupRate)
	if isNew {
		key = fmt.Sprintf("k%03d", len(s.order))
	} else if len(s.order) > 0 {
		key = s.order[s.rng.IntN(len(s.order))]
	} else {
		return nil
	}
	a := store.Admission{
		Tenant: s.tenant, Key: key, Fingerprint: "fp-" + key, MessageID: "<" + key + "@sim.invalid>",
		From: "sim@sim.invalid", To: []string{"rcpt@sim.invalid"}, Subject: key, Source: "sim",
		Data: []byte("Subject: " + key + "\r\n\r\nbody\r\n"), Now: s.now,
	}
	if isNew && s.rng.IntN(5) == 0 {
		a.NotBefore = s.now.Add(s.dur(time.Second, s.cfg.Lease))
	}
	s.touch(key)
	want := store.OutcomeDuplicate
	if !isNew && s.rng.IntN(20) == 0 {
		// Same key, another payload: a conflict, never an overwrite.
		want = store.OutcomeConflict
	}
	if want == store.OutcomeConflict {
		a.Fingerprint, a.Data = "other-"+key, []byte("Subject: other\r\n\r\nanother body\r\n")
	}
	res, err := s.st.Admit(s.ctx, []store.Admission{a})
	if err != nil {
		return fmt.Errorf("sim: admit: %w", err)
	}
	if isNew {
		want = store.OutcomeNew
		s.keys[key] = &keyInfo{key: key, markers: map[int64]bool{}}
		s.order = append(s.order, key)
		s.rep.Admitted++
	} else {
		s.rep.DuplicateAdmits++
	}
	s.tracef("admit %q -> %s (state %s)", key, res[0].Outcome, res[0].Record.State)
	if res[0].Outcome != want {
		return s.fail("admit %q answered %s, want %s", key, res[0].Outcome, want)
	}
	return nil
}

// operator resolves one in-doubt record (all of them when all is set) with
// the hold policy: mark_sent, usually, when the sink has the message,
// otherwise resend.
func (s *sim) operator(all bool) error {
	page, err := s.st.List(s.ctx, store.Filter{Tenant: s.tenant, State: store.StateInDoubt, Limit: store.MaxListLimit})
	if err != nil {
		return fmt.Errorf("sim: list: %w", err)
	}
	recs := page.Records
	if len(recs) == 0 {
		return nil
	}
	if !all {
		i := s.rng.IntN(len(recs))
		recs = recs[i : i+1]
	}
	for _, r := range recs {
		ki := s.keys[r.Key]
		act := store.ActionResend
		if ki.deliveries > 0 && s.rng.IntN(10) < 7 {
			act = store.ActionMarkSent
		}
		s.touch(r.Key)
		got, err := s.st.Resolve(s.ctx, store.Resolution{Tenant: s.tenant, Key: r.Key, Action: act, Actor: "sim-operator", Now: s.now})
		if err != nil {
			return s.fail("resolve %q %s: %v", r.Key, act, err)
		}
		if act == store.ActionResend {
			ki.resends++
			s.rep.Resends++
			if ki.deliveries > 0 {
				s.rep.ResendsOfDelivered++
			}
		} else {
			s.rep.MarkSent++
		}
		s.tracef("operator %s %q (sink has %d) -> %s fence %d", act, r.Key, ki.deliveries, got.State, got.Fence)
	}
	return nil
}

// write runs one fenced write of w and checks invariant 2 around it: a
// write under a fence that is no longer the record's must be refused with
// ErrLeaseLost and change nothing.
func (s *sim) write(w *worker, what string, call func() error) error {
	// The snapshot is current: check refreshed it after the last step, and
	// nothing else ran since.
	before := s.snap[w.key]
	s.touch(w.key)
	werr := call()
	stale := before.Fence != w.lease.Fence
	if werr != nil && !errors.Is(werr, store.ErrLeaseLost) && !errors.Is(werr, store.ErrInvalidState) {
		return fmt.Errorf("sim: %s %q: %w", what, w.key, werr)
	}
	if stale && werr == nil {
		return s.fail("%s by %s with stale fence %d accepted (record fence %d, state %s)", what, w.owner, w.lease.Fence, before.Fence, before.State)
	}
	if werr != nil {
		after, err := s.st.Get(s.ctx, s.tenant, w.key)
		if err != nil {
			return fmt.Errorf("sim: get %q: %w", w.key, err)
		}
		if !same(before, after) {
			return s.fail("%s by %s refused (%v) but changed the record: %+v -> %+v", what, w.owner, errString(werr), brief(before), brief(after))
		}
		if stale && errors.Is(werr, store.ErrLeaseLost) {
			s.rep.StaleWritesRejected++
		}
	}
	return werr
}

// touch marks key for the next check.
func (s *sim) touch(key string) { s.dirty = append(s.dirty, key) }

// touchClaim marks what a Claim at now may change besides the record it
// returns: every sending record whose lease expired by now (with the
// marker it moves to in_doubt; without, it may be the one claimed). A
// change elsewhere would be a store bug, caught by the full check every 50
// steps.
func (s *sim) touchClaim(now time.Time) {
	for _, k := range s.order {
		if r := s.snap[k]; r.State == store.StateSending && !r.LeaseExpiry.After(now) {
			s.touch(k)
		}
	}
}

func same(a, b store.Record) bool {
	return a.State == b.State && a.Fence == b.Fence && a.Committing == b.Committing &&
		a.LeaseOwner == b.LeaseOwner && a.LeaseExpiry.Equal(b.LeaseExpiry) && a.Attempts == b.Attempts &&
		a.LastError == b.LastError && a.Reply == b.Reply && a.NextAttempt.Equal(b.NextAttempt) &&
		a.SentAt.Equal(b.SentAt) && a.UpdatedAt.Equal(b.UpdatedAt) && a.ResolvedBy == b.ResolvedBy
}

func brief(r store.Record) string {
	return fmt.Sprintf("{%s fence=%d committing=%v owner=%s attempts=%d}", r.State, r.Fence, r.Committing, r.LeaseOwner, r.Attempts)
}

// check verifies invariant 3 (and that nothing vanished) against the
// store after a step, re-reading what the step may have changed: every
// record after a Claim or an admission (and every 50 steps), otherwise the
// touched ones.
func (s *sim) check() error {
	var recs []store.Record
	full := s.step-s.lastFull >= 50
	if full {
		page, err := s.st.List(s.ctx, store.Filter{Tenant: s.tenant, Limit: store.MaxListLimit})
		if err != nil {
			return fmt.Errorf("sim: list: %w", err)
		}
		if len(page.Records) != len(s.order) {
			return s.fail("store lists %d records, %d keys were admitted", len(page.Records), len(s.order))
		}
		recs = page.Records
		s.lastFull = s.step
	} else {
		for i, k := range s.dirty {
			if slices.Contains(s.dirty[:i], k) {
				continue
			}
			r, err := s.st.Get(s.ctx, s.tenant, k)
			if err != nil {
				return s.fail("get %q: %v", k, err)
			}
			recs = append(recs, r)
		}
	}
	dirty := slices.Clone(s.dirty)
	s.dirty = s.dirty[:0]
	for _, r := range recs {
		ki := s.keys[r.Key]
		if ki == nil {
			return s.fail("store lists a key %q that was never admitted", r.Key)
		}
		if ki.lastState.Final() && r.State != ki.lastState {
			return s.fail("%q left final state %s for %s", r.Key, ki.lastState, r.State)
		}
		switch r.State {
		case store.StateSent:
			if ki.deliveries == 0 {
				return s.fail("%q is sent but the sink never received it", r.Key)
			}
		case store.StateFailed:
			if !ki.failOK {
				return s.fail("%q is failed without a permanent answer or exhausted retries", r.Key)
			}
		case store.StateInDoubt:
			if ki.lastState != store.StateInDoubt {
				s.rep.InDoubt++
			}
		}
		if old, ok := s.snap[r.Key]; ok {
			if r.Fence < old.Fence {
				return s.fail("%q fence went back from %d to %d", r.Key, old.Fence, r.Fence)
			}
			if full && !slices.Contains(dirty, r.Key) && !same(old, r) {
				return s.fail("%q changed with no call that may change it: %s -> %s", r.Key, brief(old), brief(r))
			}
		}
		ki.lastState = r.State
		s.snap[r.Key] = r
	}
	return nil
}
