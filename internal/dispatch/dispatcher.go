// Package dispatch delivers what the ledger holds: it claims due emails,
// hands each to the transport under a lease, and records what happened.
//
// It keeps the third clause of the promise (never sent twice by us): the
// commit marker is made durable before the irreversible step, and only while
// the lease has a safety margin left by this process's own monotonic clock;
// an attempt whose outcome is unknown after the marker is recorded in_doubt
// (unless the transport is idempotent), never silently repeated.
package dispatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/transport"
)

// Policy says what happens to an email whose delivery outcome is unknown.
type Policy string

const (
	// PolicyHold keeps it in_doubt until an operator or a rule resolves it.
	PolicyHold Policy = "hold"
	// PolicyResend records it in_doubt and at once requeues it; the resend
	// carries the same Message-ID, so receivers that deduplicate by it
	// discard the copy.
	PolicyResend Policy = "resend"
)

// Config configures a Dispatcher. Zero fields take the defaults below.
type Config struct {
	Store     store.Store
	Transport transport.Transport
	Logger    *slog.Logger

	// Owner names this dispatcher in leases; default host:pid:random.
	Owner string
	// Workers is how many emails are delivered at once. Default 16.
	Workers int
	// PollInterval is how often the ledger is polled when nothing wakes the
	// dispatcher. Default 1s.
	PollInterval time.Duration
	// Lease is how long a claim lasts before another dispatcher may take
	// the email over; it is renewed while an attempt runs. Default 2m.
	Lease time.Duration
	// LeaseMargin is the least lease time that must remain when the commit
	// marker is written, by this process's monotonic clock. It must exceed
	// any clock-rate difference between nodes over one lease plus the time
	// the marker write takes. Default Lease/4.
	LeaseMargin time.Duration
	// MaxAttempts is how many attempts a temporary failure gets before the
	// email is failed. Default 30.
	MaxAttempts int
	// BackoffBase and BackoffMax bound the exponential backoff between
	// attempts (with jitter). Defaults 30s and 2h.
	BackoffBase time.Duration
	BackoffMax  time.Duration
	// InDoubt is the in-doubt policy. Default PolicyHold.
	InDoubt Policy
	// ShutdownTimeout is how long Run waits, after its context ends, for
	// attempts in flight to finish before aborting them. Default 30s.
	ShutdownTimeout time.Duration
	// Wake, when it receives, makes the dispatcher poll at once (new
	// admissions). Optional.
	Wake <-chan struct{}
	// Now is the clock passed to the store. Default time.Now.
	Now func() time.Time
	// Observer, if set, is told about every finished attempt.
	Observer func(Event)
	// PurgeBody drops the stored message once an email is sent or failed.
	PurgeBody bool
}

// Event describes one finished attempt, for metrics and tests.
type Event struct {
	Record store.Record
	Result store.Result // 0: abandoned (lease lost, or the outcome could not be recorded)
	Err    error
	// Elapsed is the attempt's time from the claim to the recorded outcome.
	Elapsed time.Duration
	// PolicyResent: the result was InDoubt and the resend policy requeued it.
	PolicyResent bool
}

// Validate checks the configuration, naming the field and the fix.
func (c *Config) Validate() error {
	if c.Store == nil {
		return errors.New("dispatch: Config.Store is nil")
	}
	if c.Transport == nil {
		return errors.New("dispatch: Config.Transport is nil")
	}
	if c.InDoubt != "" && c.InDoubt != PolicyHold && c.InDoubt != PolicyResend {
		return fmt.Errorf("dispatch: in-doubt policy %q is not known; use %q or %q", c.InDoubt, PolicyHold, PolicyResend)
	}
	if c.Lease < 0 || c.LeaseMargin < 0 || c.Workers < 0 || c.MaxAttempts < 0 {
		return errors.New("dispatch: negative durations and counts are not allowed")
	}
	if c.Lease > 0 && c.LeaseMargin >= c.Lease {
		return fmt.Errorf("dispatch: lease margin %s must be shorter than the lease %s", c.LeaseMargin, c.Lease)
	}
	return nil
}

func (c *Config) defaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Owner == "" {
		host, _ := os.Hostname()
		c.Owner = fmt.Sprintf("%s:%d:%04x", host, os.Getpid(), rand.Uint32()&0xffff)
	}
	if c.Workers == 0 {
		c.Workers = 16
	}
	if c.PollInterval == 0 {
		c.PollInterval = time.Second
	}
	if c.Lease == 0 {
		c.Lease = 2 * time.Minute
	}
	if c.LeaseMargin == 0 {
		c.LeaseMargin = c.Lease / 4
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = 30
	}
	if c.BackoffBase == 0 {
		c.BackoffBase = 30 * time.Second
	}
	if c.BackoffMax == 0 {
		c.BackoffMax = 2 * time.Hour
	}
	if c.InDoubt == "" {
		c.InDoubt = PolicyHold
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 30 * time.Second
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Dispatcher delivers due emails. Create it with New and start it with Run.
type Dispatcher struct {
	cfg        Config
	log        *slog.Logger
	idempotent bool

	inflight atomic.Int64
	done     chan struct{} // a worker finished: capacity is free again
	requeued atomic.Bool   // a worker put its record back in the queue
}

// New returns a Dispatcher for cfg.
func New(cfg Config) (*Dispatcher, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.defaults()
	return &Dispatcher{
		cfg:        cfg,
		log:        cfg.Logger,
		idempotent: transport.IsIdempotent(cfg.Transport),
		done:       make(chan struct{}, 1),
	}, nil
}

// Run delivers until ctx ends, then stops claiming, lets attempts in flight
// finish for up to ShutdownTimeout, aborts the rest (an attempt aborted
// before its marker is released back to the queue; one aborted after it is
// recorded in_doubt) and returns nil.
func (d *Dispatcher) Run(ctx context.Context) error {
	// Attempts run under their own context so that a shutdown does not cut
	// them off at once; it is cancelled ShutdownTimeout after ctx ends.
	sendCtx, abort := context.WithCancel(context.WithoutCancel(ctx))
	defer abort()
	var wg sync.WaitGroup
	defer func() {
		finished := make(chan struct{})
		go func() { wg.Wait(); close(finished) }()
		timer := time.NewTimer(d.cfg.ShutdownTimeout)
		defer timer.Stop()
		select {
		case <-finished:
		case <-timer.C:
			d.log.Warn("shutdown timeout: aborting attempts in flight", "in_flight", d.inflight.Load())
			abort()
			<-finished
		}
	}()

	ticker := time.NewTicker(d.cfg.PollInterval)
	defer ticker.Stop()
	failures := 0
	// due is set while records may be due that no claim has taken: at the
	// start, after a wake or a tick, and after a claim that filled every
	// free worker (more may wait behind it). A worker finishing frees
	// capacity but makes nothing due, so it leads to a claim only while due
	// is set: without it, every delivery would cost an empty claim.
	due := true
	for {
		if ctx.Err() != nil {
			return nil
		}
		free := d.cfg.Workers - int(d.inflight.Load())
		full := false
		if free > 0 && due {
			claimed := time.Now() // monotonic: leases are judged by our own clock
			// The claim is not cut off by shutdown: a claim that committed
			// must be handed back rather than left to its lease expiry.
			cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			recs, err := d.cfg.Store.Claim(cctx, store.ClaimRequest{
				Owner: d.cfg.Owner, Now: d.cfg.Now(), Lease: d.cfg.Lease, Limit: free,
			})
			if err == nil && ctx.Err() != nil {
				d.release(cctx, recs)
				ccancel()
				return nil
			}
			ccancel()
			if err != nil {
				failures++
				d.log.Error("claim failed; dispatch paused", "err", err, "failures", failures)
			} else {
				failures = 0
			}
			for _, r := range recs {
				d.inflight.Add(1)
				wg.Add(1)
				go func(r store.Record) {
					defer wg.Done()
					d.deliver(sendCtx, r, claimed)
					d.inflight.Add(-1)
					select {
					case d.done <- struct{}{}:
					default:
					}
				}(r)
			}
			full = len(recs) == free && err == nil
			due = full || err != nil
		}
		if full {
			continue // more may be due; capacity decides when we wait
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
			due = true
		case <-d.cfg.Wake:
			due = true
		case <-d.done:
			if d.requeued.Swap(false) {
				due = true
			}
		}
	}
}

// release hands claimed records back to the queue untouched.
func (d *Dispatcher) release(ctx context.Context, recs []store.Record) {
	for _, r := range recs {
		now := d.cfg.Now()
		if err := d.cfg.Store.Complete(ctx, store.Completion{
			Lease: store.Lease{ID: r.ID, Fence: r.Fence}, Result: store.ResultRelease, RetryAt: now, Now: now,
			Error: "released at shutdown before the attempt started",
		}); err != nil {
			d.log.Warn("release at shutdown failed; the lease expiry will requeue it", "tenant", r.Tenant, "key", r.Key, "message_id", r.MessageID, "err", err)
		}
	}
}

// attempt is one delivery attempt of one claimed record.
type attempt struct {
	d     *Dispatcher
	rec   store.Record
	lease store.Lease

	mu        sync.Mutex
	deadline  time.Time // lease end by our monotonic clock
	lost      bool
	committed bool
}

func (a *attempt) remaining() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	return time.Until(a.deadline)
}

// renew extends the lease. The new deadline is measured from before the
// call, so a slow store can only shorten our idea of the lease, never
// lengthen it.
func (a *attempt) renew(ctx context.Context) error {
	start := time.Now()
	err := a.d.cfg.Store.Renew(ctx, a.lease, a.d.cfg.Now(), a.d.cfg.Lease)
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case err == nil:
		a.deadline = start.Add(a.d.cfg.Lease)
	case errors.Is(err, store.ErrLeaseLost):
		a.lost = true
	}
	return err
}

// commit is the transport's CommitFunc: the durable marker, made only with
// the lease margin left.
func (a *attempt) commit(ctx context.Context) error {
	if a.remaining() < a.d.cfg.LeaseMargin {
		if err := a.renew(ctx); err != nil {
			return fmt.Errorf("dispatch: renew before commit: %w", err)
		}
		if a.remaining() < a.d.cfg.LeaseMargin {
			return fmt.Errorf("dispatch: lease margin exhausted before commit: %w", store.ErrLeaseLost)
		}
	}
	if err := a.d.cfg.Store.MarkCommitting(ctx, a.lease, a.d.cfg.Now()); err != nil {
		if errors.Is(err, store.ErrLeaseLost) {
			a.mu.Lock()
			a.lost = true
			a.mu.Unlock()
		}
		return fmt.Errorf("dispatch: commit marker: %w", err)
	}
	a.mu.Lock()
	a.committed = true
	a.mu.Unlock()
	return nil
}

func (d *Dispatcher) deliver(ctx context.Context, r store.Record, claimed time.Time) {
	resent := false
	observe := func(res store.Result, err error) {
		if d.cfg.Observer != nil {
			r.Data = nil
			d.cfg.Observer(Event{Record: r, Result: res, Err: err, Elapsed: time.Since(claimed), PolicyResent: resent})
		}
	}
	a := &attempt{d: d, rec: r, lease: store.Lease{ID: r.ID, Fence: r.Fence}, deadline: claimed.Add(d.cfg.Lease)}
	log := d.log.With("tenant", r.Tenant, "key", r.Key, "message_id", r.MessageID, "attempt", r.Attempts, "fence", r.Fence)

	sendCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Keep the lease alive while the attempt runs. Losing it before the
	// marker aborts the attempt; after the marker the upstream's answer is
	// still worth waiting for and recording.
	stopRenew := make(chan struct{})
	renewDone := make(chan struct{})
	go func() {
		defer close(renewDone)
		t := time.NewTicker(d.cfg.Lease / 3)
		defer t.Stop()
		for {
			select {
			case <-stopRenew:
				return
			case <-t.C:
				if err := a.renew(sendCtx); errors.Is(err, store.ErrLeaseLost) {
					a.mu.Lock()
					committed := a.committed
					a.mu.Unlock()
					if !committed {
						log.Warn("lease lost before the commit marker; aborting the attempt")
						cancel()
					}
					return
				} else if err != nil {
					log.Warn("lease renewal failed", "err", err)
				}
			}
		}
	}()

	msg := &transport.Message{Tenant: r.Tenant, Key: r.Key, MessageID: r.MessageID, From: r.From, To: r.To, Data: r.Data}
	receipt, err := d.cfg.Transport.Send(sendCtx, msg, a.commit)
	close(stopRenew)
	<-renewDone

	a.mu.Lock()
	committed, lost := a.committed, a.lost
	a.mu.Unlock()
	committed, err = brokenOutcome(committed, err) // no-op unless built with -tags sendonce_broken (broken.go)

	c := store.Completion{Lease: a.lease, Now: d.cfg.Now(), Reply: receipt.Reply, PurgeData: d.cfg.PurgeBody}
	switch {
	case err == nil:
		c.Result = store.ResultSent
	case !committed && lost:
		// Someone else owns the record now; we sent nothing and must write nothing.
		log.Warn("attempt abandoned: lease lost before the commit marker", "err", err)
		observe(0, err)
		return
	case !committed && ctx.Err() != nil:
		// Shutdown aborted us before the irreversible step: give it back.
		c.Result, c.RetryAt, c.Error = store.ResultRelease, c.Now, "released at shutdown: "+err.Error()
	default:
		c.Result, c.Error = d.classify(err, committed, r.Attempts)
		if c.Result == store.ResultRetry {
			c.RetryAt = c.Now.Add(d.backoff(r.Attempts))
		}
		var te *transport.Error
		if errors.As(err, &te) && te.Code > 0 && c.Reply == "" {
			c.Reply = te.Err.Error()
		}
	}

	// The outcome must be recorded even during shutdown, and a known
	// outcome is worth waiting for the store: if it stays away, the lease
	// expiry would turn a known "sent" into in_doubt.
	wctx, wcancel := context.WithTimeout(context.WithoutCancel(ctx), d.completeTimeout(ctx))
	defer wcancel()
	if cerr := d.complete(wctx, c); cerr != nil {
		// The lease expiry will move the record on: to in_doubt if the marker
		// was set, back to the queue if not. Nothing is lost either way.
		log.Error("recording the outcome failed; lease expiry will settle it", "result", c.Result, "err", cerr, "send_err", err)
		observe(0, cerr)
		return
	}
	if c.Result == store.ResultRetry || c.Result == store.ResultRelease {
		d.requeued.Store(true) // back in the queue, perhaps due already
	}
	lvl := slog.LevelInfo
	if c.Result != store.ResultSent {
		lvl = slog.LevelWarn
	}
	log.Log(wctx, lvl, "attempt finished", "result", c.Result, "reply", c.Reply, "err", c.Error)
	if c.Result == store.ResultInDoubt && d.cfg.InDoubt == PolicyResend {
		if _, rerr := d.cfg.Store.Resolve(wctx, store.Resolution{
			Tenant: r.Tenant, Key: r.Key, Action: store.ActionResend, Actor: "policy:resend", Now: d.cfg.Now(),
		}); rerr != nil {
			log.Error("in-doubt policy resend failed; the email stays in_doubt", "err", rerr)
		} else {
			resent = true
		}
	}
	observe(c.Result, err)
}

// completeTimeout is how long an outcome may wait for the store: a lease's
// worth while running (a record whose lease expired meanwhile still takes
// the late answer, see store.Store.Complete), less once shutting down.
func (d *Dispatcher) completeTimeout(ctx context.Context) time.Duration {
	if ctx.Err() != nil {
		return 10 * time.Second
	}
	return max(d.cfg.Lease, 10*time.Second)
}

// complete records an outcome, retrying with backoff while the store is
// unreachable. Logical refusals (lease lost, invalid state) are final.
func (d *Dispatcher) complete(ctx context.Context, c store.Completion) error {
	wait := 50 * time.Millisecond
	for {
		err := d.cfg.Store.Complete(ctx, c)
		if err == nil || errors.Is(err, store.ErrLeaseLost) || errors.Is(err, store.ErrInvalidState) || errors.Is(err, store.ErrClosed) {
			return err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-t.C:
		}
		wait = min(2*wait, 5*time.Second)
	}
}

// classify maps a failed Send to the record's next state. After the marker,
// only an explicit answer from the upstream is trusted: anything else may
// have delivered the message.
func (d *Dispatcher) classify(err error, committed bool, attempts int) (store.Result, string) {
	kind := transport.KindOf(err)
	if committed && !transport.Classified(err) {
		kind = transport.Ambiguous
	}
	if kind == transport.Ambiguous && d.idempotent {
		kind = transport.Temporary // repeating cannot make a second copy
	}
	msg := err.Error()
	switch kind {
	case transport.Permanent:
		return store.ResultFailed, msg
	case transport.Ambiguous:
		return store.ResultInDoubt, msg
	}
	if attempts >= d.cfg.MaxAttempts {
		return store.ResultFailed, fmt.Sprintf("gave up after %d attempts: %s", attempts, msg)
	}
	return store.ResultRetry, msg
}

// backoff is exponential in the attempt number with "equal jitter": half
// the delay is fixed, half random, so retries spread out but never bunch up
// at zero.
func (d *Dispatcher) backoff(attempt int) time.Duration {
	delay := d.cfg.BackoffBase
	for i := 1; i < attempt && delay < d.cfg.BackoffMax; i++ {
		delay *= 2
	}
	delay = min(delay, d.cfg.BackoffMax)
	half := delay / 2
	return half + rand.N(half+1)
}
