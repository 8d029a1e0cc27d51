package source

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/sendonce/sendonce"
)

// Outcome is what a source does with one message once the ledger has
// answered.
type Outcome int

const (
	// Pending: nothing is known to be durable. The message stays
	// unacknowledged, to be admitted again or redelivered.
	Pending Outcome = iota
	// Admitted: a new email, durable. Acknowledge.
	Admitted
	// Duplicate: the ledger already had this email. Acknowledge, so the
	// broker stops redelivering it.
	Duplicate
	// Reject: the message can never be admitted. Dead-letter it with
	// Delivery.Reason, then acknowledge.
	Reject
)

// Delivery is one broker message on its way through admission.
type Delivery struct {
	// Sub is the parsed job, with the source's tenant and name.
	Sub sendonce.Submission
	// Reason says why the message can never be admitted: ParseJob's
	// error, or the ledger's answer about the item (a *sendonce.FieldError,
	// sendonce.ErrTooLarge, sendonce.ErrKeyReused).
	Reason  error
	Outcome Outcome
}

// NewDelivery parses a message body (see ParseJob) for the source named
// name, whose jobs belong to tenant. A body that is not a valid job is a
// Delivery with Outcome Reject and its Reason.
func NewDelivery(body []byte, hints KeyHints, tenant, name string) *Delivery {
	d := &Delivery{}
	d.Sub, d.Reason = ParseJob(body, hints)
	d.Sub.Tenant = tenant
	d.Sub.Source = name
	if d.Reason != nil {
		d.Outcome = Reject
	}
	return d
}

// AdmitBatch admits the deliveries that are still Pending with one
// SubmitBatch call (one durable commit) and sets each one's Outcome,
// counting them in c. When the ledger cannot be reached it returns the
// error and leaves them Pending: the caller acknowledges nothing of them.
func AdmitBatch(ctx context.Context, a Admitter, ds []*Delivery, c *Counters) error {
	var valid []*Delivery
	var subs []sendonce.Submission
	for _, d := range ds {
		if d.Outcome == Pending {
			valid = append(valid, d)
			subs = append(subs, d.Sub)
		}
	}
	if len(valid) == 0 {
		return nil
	}
	res, err := a.SubmitBatch(ctx, subs)
	if err == nil && len(res) != len(subs) {
		err = fmt.Errorf("the admitter answered %d results for %d submissions", len(res), len(subs))
	}
	if err != nil {
		c.Errors.Add(int64(len(valid)))
		return err
	}
	for i, d := range valid {
		r := res[i]
		switch {
		case r.Err == nil && r.Duplicate:
			d.Outcome = Duplicate
			c.Duplicates.Add(1)
		case r.Err == nil:
			d.Outcome = Admitted
			c.Admitted.Add(1)
		case errors.Is(r.Err, sendonce.ErrKeyReused):
			// Permanent: the key names another email. Acknowledging it
			// silently would lose the producer's mistake; keeping it
			// would retry it forever.
			d.Outcome = Reject
			d.Reason = fmt.Errorf("%w: the key %q is already the key of a different email (message %s), which is kept; give this job its own key", sendonce.ErrKeyReused, d.Sub.Key, r.Record.MessageID)
		default:
			// Per-item errors are about the item itself (an invalid
			// field, too large); an unreachable store is the batch's
			// error, never an item's.
			d.Outcome = Reject
			d.Reason = r.Err
		}
	}
	return nil
}

// MaxReasonLen bounds the reason a source writes beside a dead letter.
const MaxReasonLen = 4096

// ReasonText is the reason of a rejected delivery as a dead letter
// carries it, cut to MaxReasonLen bytes.
func ReasonText(err error) string {
	s := err.Error()
	if len(s) > MaxReasonLen {
		s = s[:MaxReasonLen]
	}
	return s
}

// Backoff is the wait after a failure: doubling from Min up to Max, so
// that an outage of the ledger or the broker is not answered with a storm
// of retries. The zero value waits 200ms, then 400ms, ... up to 15s.
type Backoff struct {
	Min, Max time.Duration
	cur      time.Duration
}

// Next is the next wait.
func (b *Backoff) Next() time.Duration {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = 200 * time.Millisecond
	}
	if hi <= 0 {
		hi = 15 * time.Second
	}
	b.cur = min(max(2*b.cur, lo), hi)
	return b.cur
}

// Reset starts again from Min after a success.
func (b *Backoff) Reset() { b.cur = 0 }

// Wait sleeps for Next, or until ctx ends: false then.
func (b *Backoff) Wait(ctx context.Context) bool {
	t := time.NewTimer(b.Next())
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// Linger returns a context that is not cancelled when ctx is, but grace
// after that. A source does the admission and the acknowledgment of a
// batch in flight under it, so a shutdown lets the batch finish (its
// messages are not redelivered needlessly) for at most grace; after that
// the calls are cancelled, and what is not durable is not acknowledged.
// stop releases its resources.
func Linger(ctx context.Context, grace time.Duration) (lctx context.Context, stop func()) {
	lctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var (
		mu    sync.Mutex
		timer *time.Timer
	)
	stopAfter := context.AfterFunc(ctx, func() {
		mu.Lock()
		timer = time.AfterFunc(grace, cancel)
		mu.Unlock()
	})
	return lctx, func() {
		stopAfter()
		mu.Lock()
		if timer != nil {
			timer.Stop()
		}
		mu.Unlock()
		cancel()
	}
}
