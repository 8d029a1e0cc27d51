package sim

import (
	"errors"
	"fmt"
	"time"

	"github.com/sendonce/sendonce/store"
)

func (s *sim) remaining(w *worker) time.Duration { return w.deadline - s.mono(w) }

// abandon ends an attempt that lost its lease before the marker: like
// internal/dispatch, it writes nothing; someone else owns the record.
func (s *sim) abandon(w *worker, why string) {
	s.tracef("%s abandons %q fence %d: %s", w.owner, w.key, w.lease.Fence, why)
	s.reset(w)
}

func (s *sim) reset(w *worker) {
	*w = worker{slot: w.slot, gen: w.gen, owner: w.owner, skew: w.skew, rate: w.rate, pausedUntil: w.pausedUntil}
}

func (s *sim) renew(w *worker) error {
	start := s.mono(w)
	err := s.write(w, "renew", func() error {
		return s.st.Renew(s.ctx, w.lease, s.wnow(w), s.cfg.Lease)
	})
	if err == nil {
		w.deadline = start + s.cfg.Lease
	}
	s.tracef("%s renew %q fence %d -> %v", w.owner, w.key, w.lease.Fence, errString(err))
	return err
}

func errString(err error) string {
	// Only the sentinel goes into the trace: the store's messages carry
	// record IDs, which differ between runs sharing a store.
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, store.ErrLeaseLost):
		return "ErrLeaseLost"
	case errors.Is(err, store.ErrInvalidState):
		return "ErrInvalidState"
	}
	return err.Error()
}

// workerStep advances w by one transition of its state machine.
func (s *sim) workerStep(w *worker) error {
	switch w.st {
	case wIdle:
		start := s.mono(w)
		s.touchClaim(s.wnow(w))
		recs, err := s.st.Claim(s.ctx, store.ClaimRequest{Owner: w.owner, Now: s.wnow(w), Lease: s.cfg.Lease, Limit: 1})
		if err != nil {
			return fmt.Errorf("sim: claim: %w", err)
		}
		if len(recs) == 0 {
			s.tracef("%s claim: nothing due", w.owner)
			return nil
		}
		r := recs[0]
		if r.Tenant != s.tenant || s.keys[r.Key] == nil {
			return s.fail("%s claimed a record of another run: %s/%s", w.owner, r.Tenant, r.Key)
		}
		if r.MessageID != "<"+r.Key+"@sim.invalid>" || string(r.Data) != "Subject: "+r.Key+"\r\n\r\nbody\r\n" {
			return s.fail("%s claimed %q with another identity or payload: %s %q", w.owner, r.Key, r.MessageID, r.Data)
		}
		if s.keys[r.Key].lastState.Final() {
			return s.fail("%s claimed %q, which was %s", w.owner, r.Key, s.keys[r.Key].lastState)
		}
		s.touch(r.Key)
		w.st, w.key, w.attempts = wClaimed, r.Key, r.Attempts
		w.lease = store.Lease{ID: r.ID, Fence: r.Fence}
		w.deadline = start + s.cfg.Lease
		s.rep.Claims++
		s.tracef("%s claim %q fence %d attempt %d", w.owner, r.Key, r.Fence, r.Attempts)
		return nil

	case wClaimed:
		x := s.rng.IntN(100)
		switch {
		case x < 20:
			if err := s.renew(w); errors.Is(err, store.ErrLeaseLost) {
				s.abandon(w, "lease lost at renewal before the marker")
			} else if err != nil && !errors.Is(err, store.ErrInvalidState) {
				return err
			}
			return nil
		case x < 32 && !s.quiet || x < 25:
			// The upstream refuses before the dot (connect, MAIL, RCPT,
			// DATA): it does not have the message; commit is never called.
			if s.rng.IntN(3) == 0 {
				w.result, w.errMsg = store.ResultFailed, "permanent at rcpt: 550 no such user"
			} else {
				w.result, w.errMsg = store.ResultRetry, "temporary at mail: 451 try later"
			}
			w.st, w.replyAt = wWaiting, s.now
			s.tracef("%s %q refused before the dot: %s", w.owner, w.key, w.errMsg)
			return nil
		}
		// attempt.commit: the margin by our own clock, renewing if short.
		if s.remaining(w) < s.cfg.LeaseMargin {
			err := s.renew(w)
			if err != nil {
				if errors.Is(err, store.ErrLeaseLost) || errors.Is(err, store.ErrInvalidState) {
					s.abandon(w, "renew before commit: "+errString(err))
					return nil
				}
				return err
			}
			if s.remaining(w) < s.cfg.LeaseMargin {
				s.abandon(w, "lease margin exhausted before commit")
				return nil
			}
		}
		w.st = wReady
		s.tracef("%s %q margin ok (%s left)", w.owner, w.key, s.remaining(w).Truncate(time.Millisecond))
		return nil

	case wReady:
		err := s.write(w, "mark", func() error { return s.st.MarkCommitting(s.ctx, w.lease, s.wnow(w)) })
		s.tracef("%s mark %q fence %d -> %s", w.owner, w.key, w.lease.Fence, errString(err))
		switch {
		case err == nil:
			w.committed = true
			s.keys[w.key].markers[w.lease.Fence] = true
			s.rep.Markers++
			w.st = wMarked
		case errors.Is(err, store.ErrLeaseLost) || errors.Is(err, store.ErrInvalidState):
			s.rep.MarkersRefused++
			if s.cfg.broken == sendDespiteMarker {
				w.st = wMarked // BROKEN: goes on to the irreversible step
				return nil
			}
			s.abandon(w, "marker refused")
		default:
			return err
		}
		return nil

	case wMarked:
		return s.dot(w)

	case wWaiting:
		if s.now.Before(w.replyAt) {
			if s.rng.IntN(2) == 0 && w.committed {
				// The renewal loop keeps running after the marker; its
				// failures no longer abort anything.
				if err := s.renew(w); err != nil && !errors.Is(err, store.ErrLeaseLost) && !errors.Is(err, store.ErrInvalidState) {
					return err
				}
			} else {
				s.tracef("%s waits for the answer on %q", w.owner, w.key)
			}
			return nil
		}
		return s.complete(w)
	}
	return nil
}

// dot is the irreversible step: the sink may receive the message, and the
// worker learns (or not) what happened.
func (s *sim) dot(w *worker) error {
	ki := s.keys[w.key]
	if !ki.markers[w.lease.Fence] && !s.cfg.noMarkerCheck {
		return s.fail("%s performs the irreversible step on %q under fence %d without an accepted marker", w.owner, w.key, w.lease.Fence)
	}
	received := false
	delay := time.Duration(0)
	x := s.rng.IntN(100)
	if s.quiet {
		x = x * 72 / 100 // only definite, prompt answers
	}
	switch {
	case x < 55:
		received = true
		w.result, w.reply = store.ResultSent, "250 2.0.0 queued as "+w.key
	case x < 65:
		w.result, w.errMsg = store.ResultRetry, "temporary at final-dot: 451 local error"
	case x < 72:
		w.result, w.errMsg = store.ResultFailed, "permanent at final-dot: 554 rejected"
	case x < 82:
		received = true
		w.result, w.errMsg = store.ResultInDoubt, "ambiguous at final-dot: connection dropped after the dot"
	case x < 90:
		received = s.rng.IntN(2) == 0
		w.result, w.errMsg = store.ResultInDoubt, "ambiguous at final-dot: no reply"
	default:
		// A slow reply: the answer comes later, or after the client's
		// timeout (Lease/2), when the worker sees only "ambiguous".
		delay = s.dur(time.Millisecond, s.cfg.Lease*2)
		switch s.rng.IntN(3) {
		case 0, 1:
			received = true
			w.result, w.reply = store.ResultSent, "250 2.0.0 slow but queued"
		default:
			w.result, w.errMsg = store.ResultRetry, "temporary at final-dot: 421 slow and closing"
		}
		if timeout := s.cfg.Lease / 2; delay > timeout {
			delay = timeout
			w.result, w.reply, w.errMsg = store.ResultInDoubt, "", "ambiguous at final-dot: timeout"
		}
	}
	if received {
		ki.deliveries++
		s.rep.Deliveries++
		if ki.deliveries > 1 {
			s.rep.AllowedDuplicates++
		}
	}
	w.st, w.replyAt = wWaiting, s.now.Add(delay)
	s.tracef("%s DOT %q fence %d: sink received=%v (total %d, resends %d); answer %s in %s %s%s",
		w.owner, w.key, w.lease.Fence, received, ki.deliveries, ki.resends, w.result, delay, w.reply, w.errMsg)
	if ki.deliveries > 1+ki.resends {
		return s.fail("%q delivered %d times at the sink with only %d resends after in_doubt", w.key, ki.deliveries, ki.resends)
	}
	return nil
}

// complete records the attempt's outcome, as internal/dispatch does after
// classify.
func (s *sim) complete(w *worker) error {
	res, msg := w.result, w.errMsg
	if res == store.ResultInDoubt && s.cfg.broken == retryAmbiguous {
		res = store.ResultRetry // BROKEN: repeats an attempt that may have delivered
	}
	if res == store.ResultRetry && w.attempts >= s.cfg.MaxAttempts {
		res, msg = store.ResultFailed, fmt.Sprintf("gave up after %d attempts: %s", w.attempts, msg)
	}
	c := store.Completion{Lease: w.lease, Result: res, Error: msg, Reply: w.reply, Now: s.wnow(w)}
	if res == store.ResultRetry {
		c.RetryAt = c.Now.Add(s.backoff(w.attempts))
	}
	before := s.snap[w.key]
	err := s.write(w, "complete", func() error { return s.st.Complete(s.ctx, c) })
	s.tracef("%s complete %q fence %d %s -> %s", w.owner, w.key, w.lease.Fence, res, errString(err))
	switch {
	case err == nil:
		if res == store.ResultFailed {
			s.keys[w.key].failOK = true
		}
		if before.State == store.StateInDoubt && res != store.ResultInDoubt {
			s.rep.LateAnswers++
		}
	case errors.Is(err, store.ErrLeaseLost):
	case errors.Is(err, store.ErrInvalidState):
		return s.fail("complete %s of %q under fence %d: %v (record %s)", res, w.key, w.lease.Fence, err, brief(before))
	default:
		return err
	}
	s.reset(w)
	return nil
}

func (s *sim) backoff(attempt int) time.Duration {
	d := s.cfg.BackoffBase
	for i := 1; i < attempt && d < s.cfg.BackoffMax; i++ {
		d *= 2
	}
	d = min(d, s.cfg.BackoffMax)
	half := d / 2
	return (half + time.Duration(s.rng.Int64N(int64(half)+1))).Truncate(time.Millisecond)
}

// quiesce stops the faults and lets the system settle: the clock moves past
// every lease and backoff, workers drain the queue, the operator resolves
// every in-doubt email. Then every key must be final (invariant 4).
func (s *sim) quiesce() error {
	s.quiet = true
	s.tracef("quiescence")
	for round := 0; round < 100; round++ {
		for _, w := range s.workers {
			w.pausedUntil = time.Time{}
			for i := 0; i < 50; i++ {
				idle := w.st == wIdle
				waitingLater := w.st == wWaiting && s.now.Before(w.replyAt)
				if waitingLater {
					break
				}
				claims := s.rep.Claims
				s.step++
				if err := s.workerStep(w); err != nil {
					return err
				}
				if err := s.check(); err != nil {
					return err
				}
				if idle && s.rep.Claims == claims {
					break // nothing due for this worker
				}
			}
		}
		s.step++
		if err := s.operator(true); err != nil {
			return err
		}
		if err := s.check(); err != nil {
			return err
		}
		done := true
		for _, k := range s.order {
			if !s.keys[k].lastState.Final() {
				done = false
			}
		}
		for _, w := range s.workers {
			if w.st != wIdle {
				done = false
			}
		}
		if done {
			return s.finish()
		}
		d := max(s.cfg.Lease, s.cfg.BackoffMax) + 2*s.cfg.MaxSkew + time.Second
		s.now = s.now.Add(d)
		s.tracef("quiescence round %d: clock +%s", round, d)
	}
	var open []string
	for _, k := range s.order {
		if st := s.keys[k].lastState; !st.Final() {
			open = append(open, k+"="+string(st))
		}
	}
	return s.fail("not quiescent after 100 rounds: %v", open)
}

func (s *sim) finish() error {
	s.rep.Steps = s.step
	for _, k := range s.order {
		ki := s.keys[k]
		switch ki.lastState {
		case store.StateSent:
			s.rep.Sent++
			if ki.deliveries == 0 {
				return s.fail("%q is sent but was lost: the sink never received it", k)
			}
		case store.StateFailed:
			s.rep.Failed++
		default:
			return s.fail("%q ends %s, not final", k, ki.lastState)
		}
	}
	s.tracef("end: %s", s.rep)
	return nil
}
