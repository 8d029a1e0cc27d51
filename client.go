// Package sendonce sends every email exactly once, even when the queue in
// front of it delivers a message twice.
//
// A Client records each email in a ledger (a store.Store) under its
// idempotency key before acknowledging it, answers every later submission of
// the same key as a duplicate, and delivers each email once through a
// transport.Transport. The one outcome no protocol can decide (the connection
// broke after the message was handed over, before the answer) is recorded as
// in_doubt and never silently repeated. See docs/guarantees.md.
package sendonce

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/mail"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce/internal/dispatch"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/transport"
)

// Record is the ledger entry of one email.
type Record = store.Record

// State is where an email is in its lifecycle.
type State = store.State

// The states of an email.
const (
	StateQueued  = store.StateQueued
	StateSending = store.StateSending
	StateSent    = store.StateSent
	StateFailed  = store.StateFailed
	StateInDoubt = store.StateInDoubt
)

// Action resolves an in-doubt email.
type Action = store.Action

// The resolve actions.
const (
	ActionResend   = store.ActionResend
	ActionMarkSent = store.ActionMarkSent
	ActionFail     = store.ActionFail
)

// InDoubtPolicy says what happens to an email whose outcome is unknown.
type InDoubtPolicy = dispatch.Policy

// The in-doubt policies.
const (
	InDoubtHold   = dispatch.PolicyHold
	InDoubtResend = dispatch.PolicyResend
)

// InDoubtRule settles in-doubt emails automatically after a while (see
// dispatch.Rule): for example resend after 1h, fail after 24h.
type InDoubtRule = dispatch.Rule

// DefaultMaxMessageBytes is the default limit on a rendered message.
const DefaultMaxMessageBytes = 10 << 20

// Config configures a Client. Store is required; Transport is required for
// Run.
type Config struct {
	Store     store.Store
	Transport transport.Transport
	Logger    *slog.Logger

	// MessageIDDomain is the domain part of derived Message-IDs. Default:
	// the domain of the email's From address.
	MessageIDDomain string
	// MaxMessageBytes limits the rendered message. Default 10 MiB.
	MaxMessageBytes int

	// Dispatch tunes delivery; zero fields take the dispatcher's defaults.
	Dispatch DispatchConfig

	// Now is the clock. Default time.Now.
	Now func() time.Time

	// Metrics, when set, is told about every submission, attempt and
	// resolution (internal/metrics implements it with Prometheus).
	Metrics Metrics
}

// Metrics is told what a Client does, for monitoring. Every method must
// return at once; the Client calls them on its hot paths.
type Metrics interface {
	// Admitted: one submission of tenant from source (the front door)
	// ended with outcome new, duplicate, conflict, rejected (invalid, never
	// reached the ledger) or error (the ledger failed) after elapsed.
	Admitted(tenant, source, outcome string, elapsed time.Duration)
	// Attempted: one delivery attempt of tenant's email through transport
	// ended with outcome sent, failed, retry, in_doubt, release or
	// abandoned after elapsed.
	Attempted(tenant, transport, outcome string, elapsed time.Duration)
	// Resolved: an in-doubt email of tenant was resolved with action by an
	// operator, a rule or the policy ("operator", "rule", "policy").
	Resolved(tenant, action, by string)
}

// DispatchConfig tunes delivery. See internal/dispatch for each default.
type DispatchConfig struct {
	Workers         int
	PollInterval    time.Duration
	Lease           time.Duration
	LeaseMargin     time.Duration
	MaxAttempts     int
	BackoffBase     time.Duration
	BackoffMax      time.Duration
	InDoubt         InDoubtPolicy
	ShutdownTimeout time.Duration
	// Observer, if set, is called after every finished attempt.
	Observer func(r Record, result string, err error)
	// PurgeBody drops the stored message once an email is sent or failed
	// (privacy); the record stays for deduplication.
	PurgeBody bool
	// InDoubtRules, when set, make Run settle in-doubt emails that have
	// waited long enough, recorded as resolved by "rule:...".
	InDoubtRules []InDoubtRule
	// RulesEvery is how often the rules are applied. Default 1 minute.
	RulesEvery time.Duration
	// Retention, when positive, makes Run remove sent and failed records
	// older than it. It is also the window in which a repeated key is
	// recognised, so keep it longer than any queue's redelivery horizon
	// (SQS keeps messages up to 14 days). Default 0: keep everything.
	Retention time.Duration
}

// Client is the library's entry point. It is safe for concurrent use.
type Client struct {
	cfg  Config
	log  *slog.Logger
	wake chan struct{}
}

// New returns a Client.
func New(cfg Config) (*Client, error) {
	if cfg.Store == nil {
		return nil, errors.New("sendonce: Config.Store is required")
	}
	if cfg.MaxMessageBytes < 0 {
		return nil, fmt.Errorf("sendonce: Config.MaxMessageBytes is %d; use a positive size or 0 for the default", cfg.MaxMessageBytes)
	}
	if cfg.MaxMessageBytes == 0 {
		cfg.MaxMessageBytes = DefaultMaxMessageBytes
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Client{cfg: cfg, log: cfg.Logger, wake: make(chan struct{}, 1)}, nil
}

// Submission is one email to submit under an idempotency key.
type Submission struct {
	// Tenant namespaces the key. Default DefaultTenant.
	Tenant string
	// Key is the idempotency key: the same key is the same email.
	Key string
	// Email is the email to send, or, when Raw is set, must be empty.
	Email Email
	// Raw is a complete message with its envelope, sent as it is.
	Raw *Raw
	// Source names the front door, for the record ("library" by default).
	Source string
	// NotBefore delays delivery. Zero means now.
	NotBefore time.Time
}

// Receipt is the answer to a submission.
type Receipt struct {
	Record Record
	// Duplicate is true when the key was already recorded with the same
	// payload: nothing new was accepted, and Record is the stored email.
	Duplicate bool
}

// BatchResult is the answer to one item of SubmitBatch: a Receipt, or Err.
type BatchResult struct {
	Receipt
	Err error
}

// Submit records one email durably and returns once it is safe to
// acknowledge the sender. A repeat with the same payload returns the stored
// record with Duplicate set. The same key with a different payload returns
// ErrKeyReused (and the stored record). Invalid input returns a *FieldError.
func (c *Client) Submit(ctx context.Context, s Submission) (Receipt, error) {
	res, err := c.SubmitBatch(ctx, []Submission{s})
	if err != nil {
		return Receipt{}, err
	}
	return res[0].Receipt, res[0].Err
}

// SubmitBatch records many emails in one durable commit. It returns an
// error only when nothing could be recorded (the store failed: retry the
// whole batch). Each item's outcome is in its BatchResult, and an item's
// Err is always permanent: invalid input, a message too large, or a key
// already used for another email. Retrying such an item cannot succeed.
func (c *Client) SubmitBatch(ctx context.Context, subs []Submission) ([]BatchResult, error) {
	start := time.Now() // latency is measured on the monotonic clock, not Config.Now
	out := make([]BatchResult, len(subs))
	adms := make([]store.Admission, 0, len(subs))
	idx := make([]int, 0, len(subs))
	now := c.cfg.Now()
	for i := range subs {
		a, err := c.prepare(&subs[i], now)
		if err != nil {
			out[i].Err = err
			c.admitted(subs[i].Tenant, subs[i].Source, "rejected", 0)
			c.log.Info("submission rejected", "source", subs[i].Source, "tenant", subs[i].Tenant, "key", subs[i].Key, "err", err)
			continue
		}
		adms = append(adms, a)
		idx = append(idx, i)
	}
	if len(adms) == 0 {
		return out, nil
	}
	res, err := c.cfg.Store.Admit(ctx, adms)
	elapsed := time.Since(start)
	if err != nil {
		for _, a := range adms {
			c.admitted(a.Tenant, a.Source, "error", elapsed)
		}
		return nil, fmt.Errorf("sendonce: admit: %w", err)
	}
	fresh := false
	for j, r := range res {
		i := idx[j]
		out[i].Record = r.Record
		c.admitted(adms[j].Tenant, adms[j].Source, r.Outcome.String(), elapsed)
		if c.log.Enabled(ctx, slog.LevelDebug) {
			c.log.Debug("submission admitted", "source", adms[j].Source, "tenant", adms[j].Tenant, "key", adms[j].Key, "message_id", r.Record.MessageID, "outcome", r.Outcome.String())
		}
		switch r.Outcome {
		case store.OutcomeNew:
			fresh = true
		case store.OutcomeDuplicate:
			out[i].Duplicate = true
		case store.OutcomeConflict:
			out[i].Err = fmt.Errorf("%w: key %q", ErrKeyReused, subs[i].Key)
		}
	}
	if fresh {
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	return out, nil
}

func (c *Client) admitted(tenant, source, outcome string, elapsed time.Duration) {
	if c.cfg.Metrics != nil {
		c.cfg.Metrics.Admitted(tenant, source, outcome, elapsed)
	}
}

func (c *Client) prepare(s *Submission, now time.Time) (store.Admission, error) {
	if s.Tenant == "" {
		s.Tenant = DefaultTenant
	}
	if s.Source == "" {
		s.Source = "library"
	}
	if err := ValidateKey(s.Key); err != nil {
		return store.Admission{}, err
	}
	if s.Raw != nil {
		return c.prepareRaw(s, now)
	}
	n, err := s.Email.normalize()
	if err != nil {
		return store.Admission{}, err
	}
	mid := MessageID(s.Tenant, s.Key, c.idDomain(n.from.Address))
	data, err := n.render(mid, now)
	if err != nil {
		return store.Admission{}, fmt.Errorf("sendonce: render %q: %w", s.Key, err)
	}
	if len(data) > c.cfg.MaxMessageBytes {
		return store.Admission{}, fmt.Errorf("%w: the rendered message is %d bytes; the limit is %d", ErrTooLarge, len(data), c.cfg.MaxMessageBytes)
	}
	return store.Admission{
		Tenant:      s.Tenant,
		Key:         s.Key,
		Fingerprint: n.fingerprint(),
		MessageID:   mid,
		From:        n.from.Address,
		To:          n.recipients(),
		Subject:     n.Subject,
		Tags:        n.Tags,
		Source:      s.Source,
		Data:        data,
		NotBefore:   s.NotBefore,
		Now:         now,
	}, nil
}

func (c *Client) prepareRaw(s *Submission, now time.Time) (store.Admission, error) {
	if !s.Email.isZero() {
		return store.Admission{}, fieldErr("raw", "give either an email's fields or a raw message, not both")
	}
	p, err := prepareRaw(s.Raw, c.cfg.MaxMessageBytes)
	if err != nil {
		return store.Admission{}, err
	}
	hdrFrom := ""
	if a, err := mail.ParseAddress(p.header.Get("From")); err == nil {
		hdrFrom = a.Address
	}
	if hdrFrom == "" {
		hdrFrom = p.from
	}
	data, mid := p.render(MessageID(s.Tenant, s.Key, c.idDomain(hdrFrom)), now)
	return store.Admission{
		Tenant:      s.Tenant,
		Key:         s.Key,
		Fingerprint: p.fingerprint,
		MessageID:   mid,
		From:        p.from,
		To:          p.to,
		Subject:     p.subject(),
		Source:      s.Source,
		Data:        data,
		NotBefore:   s.NotBefore,
		Now:         now,
	}, nil
}

// idDomain is the domain of derived Message-IDs.
func (c *Client) idDomain(from string) string {
	if c.cfg.MessageIDDomain != "" {
		return c.cfg.MessageIDDomain
	}
	return domainOf(from)
}

// ErrTxUnsupported: the store cannot admit inside a caller's transaction
// (only the PostgreSQL store can).
var ErrTxUnsupported = errors.New("sendonce: this store cannot admit inside a caller's transaction; use the PostgreSQL store")

// txAdmitter is implemented by stores that can admit inside a transaction
// the caller owns (store/pgstore).
type txAdmitter interface {
	AdmitTx(ctx context.Context, tx pgx.Tx, batch []store.Admission) ([]store.AdmitResult, error)
}

// SubmitTx admits an email inside the caller's own PostgreSQL transaction:
// the email exists if and only if the caller's transaction commits (the
// transactional outbox). Write the order row and submit its confirmation
// email in one transaction, and neither can exist without the other. The
// dispatcher finds the email at its next poll after the commit.
//
// A concurrent submission of the same key in another transaction waits on
// the unique index until this one commits or rolls back, then sees the
// outcome: PostgreSQL keeps the "accepted once" clause for us.
func (c *Client) SubmitTx(ctx context.Context, tx pgx.Tx, s Submission) (Receipt, error) {
	ta, ok := c.cfg.Store.(txAdmitter)
	if !ok {
		return Receipt{}, ErrTxUnsupported
	}
	a, err := c.prepare(&s, c.cfg.Now())
	if err != nil {
		return Receipt{}, err
	}
	res, err := ta.AdmitTx(ctx, tx, []store.Admission{a})
	if err != nil {
		return Receipt{}, fmt.Errorf("sendonce: admit in transaction: %w", err)
	}
	rc := Receipt{Record: res[0].Record, Duplicate: res[0].Outcome == store.OutcomeDuplicate}
	if res[0].Outcome == store.OutcomeConflict {
		return rc, fmt.Errorf("%w: key %q", ErrKeyReused, s.Key)
	}
	return rc, nil
}

// Get returns the record of key in tenant, or ErrNotFound.
func (c *Client) Get(ctx context.Context, tenant, key string) (Record, error) {
	return c.cfg.Store.Get(ctx, orDefault(tenant), key)
}

// Event is one entry of an email's timeline.
type Event = store.Event

// Events returns the timeline of key in tenant (every submission,
// duplicate, attempt, outcome and resolution), oldest first, or
// ErrNotFound.
func (c *Client) Events(ctx context.Context, tenant, key string) ([]Event, error) {
	return c.cfg.Store.Events(ctx, orDefault(tenant), key)
}

// Message returns the stored message of key in tenant (empty once purged
// after sending), or ErrNotFound.
func (c *Client) Message(ctx context.Context, tenant, key string) ([]byte, error) {
	return c.cfg.Store.Message(ctx, orDefault(tenant), key)
}

// ListOptions selects a page of records; every condition set must hold.
type ListOptions struct {
	State     State
	KeyPrefix string // keys starting with it
	Recipient string // this address among the recipients, exactly
	// CreatedFrom <= created < CreatedBefore; zero leaves a side open.
	CreatedFrom, CreatedBefore time.Time
	Limit                      int
	Cursor                     string
}

// List returns a page of a tenant's records, newest first.
func (c *Client) List(ctx context.Context, tenant string, o ListOptions) (store.Page, error) {
	if tenant == store.AllTenants {
		return store.Page{}, fieldErr("tenant", "%q is not a tenant", tenant)
	}
	return c.cfg.Store.List(ctx, store.Filter{Tenant: orDefault(tenant), State: o.State, KeyPrefix: o.KeyPrefix, Recipient: o.Recipient,
		CreatedFrom: o.CreatedFrom, CreatedBefore: o.CreatedBefore, Limit: o.Limit, Cursor: o.Cursor})
}

// Resolve settles an in-doubt email: resend it (with the same Message-ID),
// mark it sent, or fail it. actor is recorded with the decision.
func (c *Client) Resolve(ctx context.Context, tenant, key string, action Action, actor string) (Record, error) {
	if !action.Valid() {
		return Record{}, fieldErr("action", "%q is not an action; use resend, mark_sent or fail", action)
	}
	r, err := c.cfg.Store.Resolve(ctx, store.Resolution{Tenant: orDefault(tenant), Key: key, Action: action, Actor: actor, Now: c.cfg.Now()})
	if err != nil {
		return r, err
	}
	c.log.Info("in-doubt email resolved", "tenant", r.Tenant, "key", r.Key, "message_id", r.MessageID, "action", action, "by", actor)
	if c.cfg.Metrics != nil {
		c.cfg.Metrics.Resolved(r.Tenant, string(action), actorKind(actor))
	}
	if action == ActionResend {
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	return r, nil
}

// actorKind sorts an actor into the metrics' "by" label: "rule:..." is an
// automatic in-doubt rule, "policy:..." the dispatcher's in-doubt policy,
// anyone else an operator.
func actorKind(actor string) string {
	switch {
	case strings.HasPrefix(actor, "rule:"):
		return "rule"
	case strings.HasPrefix(actor, "policy:"):
		return "policy"
	}
	return "operator"
}

// Counts returns how many emails of tenant are in each state.
func (c *Client) Counts(ctx context.Context, tenant string) (store.Counts, error) {
	return c.cfg.Store.Counts(ctx, orDefault(tenant))
}

// Ping reports whether the store can serve requests.
func (c *Client) Ping(ctx context.Context) error { return c.cfg.Store.Ping(ctx) }

// Run delivers emails until ctx ends, then shuts down gracefully (see
// DispatchConfig.ShutdownTimeout). It needs Config.Transport.
func (c *Client) Run(ctx context.Context) error {
	dc := c.cfg.Dispatch
	cfg := dispatch.Config{
		Store:           c.cfg.Store,
		Transport:       c.cfg.Transport,
		Logger:          c.log,
		Workers:         dc.Workers,
		PollInterval:    dc.PollInterval,
		Lease:           dc.Lease,
		LeaseMargin:     dc.LeaseMargin,
		MaxAttempts:     dc.MaxAttempts,
		BackoffBase:     dc.BackoffBase,
		BackoffMax:      dc.BackoffMax,
		InDoubt:         dc.InDoubt,
		ShutdownTimeout: dc.ShutdownTimeout,
		Wake:            c.wake,
		Now:             c.cfg.Now,
		PurgeBody:       dc.PurgeBody,
	}
	if obs, m := dc.Observer, c.cfg.Metrics; obs != nil || m != nil {
		trName := ""
		if c.cfg.Transport != nil { // dispatch.New refuses a nil transport below
			trName = c.cfg.Transport.Name()
		}
		cfg.Observer = func(e dispatch.Event) {
			res := e.Result.String()
			if e.Result == 0 {
				res = "abandoned"
			}
			if m != nil {
				m.Attempted(e.Record.Tenant, trName, res, e.Elapsed)
				if e.PolicyResent {
					m.Resolved(e.Record.Tenant, string(ActionResend), "policy")
				}
			}
			if obs != nil {
				obs(e.Record, res, e.Err)
			}
		}
	}
	d, err := dispatch.New(cfg)
	if err != nil {
		return fmt.Errorf("sendonce: %w", err)
	}
	if err := dispatch.ValidateRules(dc.InDoubtRules); err != nil {
		return fmt.Errorf("sendonce: %w", err)
	}
	if len(dc.InDoubtRules) > 0 {
		rulesDone := make(chan struct{})
		defer func() { <-rulesDone }()
		go func() {
			defer close(rulesDone)
			dispatch.RunRules(ctx, dispatch.RulesConfig{Store: c.cfg.Store, Rules: slices.Clone(dc.InDoubtRules), Every: dc.RulesEvery,
				Resolve: c.Resolve, Now: c.cfg.Now, Logger: c.log})
		}()
	}
	if dc.Retention > 0 {
		sweepDone := make(chan struct{})
		defer func() { <-sweepDone }()
		go func() {
			defer close(sweepDone)
			dispatch.RunSweeper(ctx, dispatch.SweepConfig{Store: c.cfg.Store, Retention: dc.Retention, Now: c.cfg.Now, Logger: c.log})
		}()
	}
	return d.Run(ctx)
}

func orDefault(tenant string) string {
	if tenant == "" {
		return DefaultTenant
	}
	return tenant
}
