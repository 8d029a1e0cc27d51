// Package schedule runs recurring campaigns declared in the configuration,
// each scheduled instant exactly once, on any number of nodes.
//
// What it promises, and what it rests on:
//
//   - One fire per scheduled instant. A fire is keyed by the schedule's
//     name and the instant in UTC (store.FireKey); its record is created
//     by one insert guarded by the key, so however many nodes see the
//     instant, one record exists. Daylight-saving gaps and repeats are
//     resolved by Cron.Next so each local time fires once.
//   - One email per recipient per fire. Each email's idempotency key is
//     derived from the fire key and the recipient's address (EmailKey), so
//     a fire that runs twice, on one node or two, admits each email once:
//     the ledger answers the repeat as a duplicate.
//   - Nothing skipped. A fire expands its recipients in batches; after each
//     batch is durably admitted, the source's cursor is recorded under the
//     fire's lease (store.FireStore.ProgressFire). A node that dies mid-fire
//     leaves the lease to expire; the next claim, on any node, resumes at
//     the cursor. The batch after the cursor may be admitted again, which
//     the ledger absorbs.
//   - Errors stop only their fire. A template that fails to render or a
//     recipient source that fails stops that fire, records the error in its
//     record and logs it; the fire is retried with backoff from its cursor.
//     Other fires and schedules carry on.
//   - Catch-up after downtime follows each schedule's policy: skip,
//     latest, or all within the schedule's maximum lag (see Due).
//
// Every time comes from a Clock, so tests drive the scheduler with Tick and
// a fake clock, without sleeping.
package schedule

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store"
)

// Clock is the scheduler's time: Now, and a channel that fires after d.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type systemClock struct{}

func (systemClock) Now() time.Time                         { return time.Now() }
func (systemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// SystemClock is the wall clock.
var SystemClock Clock = systemClock{}

// Submitter admits emails; *sendonce.Client is one.
type Submitter interface {
	SubmitBatch(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error)
}

// CatchUp says which missed fires run when a node comes back.
type CatchUp string

// The catch-up policies.
const (
	CatchUpSkip   CatchUp = "skip"   // missed fires are skipped
	CatchUpLatest CatchUp = "latest" // only the newest missed fire within MaxLag runs
	CatchUpAll    CatchUp = "all"    // every missed fire within MaxLag runs, oldest first
)

// Schedule is one recurring campaign.
type Schedule struct {
	Name      string // 1-64 of [A-Za-z0-9_.-]; part of every key
	Cron      *Cron
	Location  *time.Location
	Source    Source
	Templates TemplateFiles
	From      string
	ReplyTo   string
	Tenant    string        // default sendonce.DefaultTenant
	CatchUp   CatchUp       // default skip
	MaxLag    time.Duration // for latest and all: how old a missed fire may be
}

// Defaults of Config.
const (
	DefaultLease        = 30 * time.Second
	DefaultPollInterval = time.Second
	DefaultBatchSize    = 500
	DefaultOnTime       = time.Minute
	DefaultBackoffBase  = 30 * time.Second
	DefaultBackoffMax   = 30 * time.Minute
	DefaultMaxLag       = 24 * time.Hour
)

// Config configures a Scheduler.
type Config struct {
	Store     store.FireStore
	Submitter Submitter
	Schedules []Schedule
	// Owner names this node in fire records. Default host/pid.
	Owner  string
	Clock  Clock
	Logger *slog.Logger
	// Lease is how long a fire stays held after its last progress; a node
	// that dies leaves it to others this long after its last batch.
	Lease        time.Duration
	PollInterval time.Duration
	BatchSize    int
	// OnTime is how late a fire may start and still count as on time
	// rather than missed (and so run under every catch-up policy).
	OnTime      time.Duration
	BackoffBase time.Duration
	BackoffMax  time.Duration
}

// Scheduler runs schedules against a FireStore. Safe for concurrent use.
type Scheduler struct {
	cfg    Config
	log    *slog.Logger
	clock  Clock
	byName map[string]*Schedule

	mu      sync.Mutex
	skipped map[string]bool // missed fires already logged as skipped
}

// New checks the configuration and every schedule's templates: a
// template that does not parse is refused here, with its file and line.
func New(cfg Config) (*Scheduler, error) {
	if cfg.Store == nil || cfg.Submitter == nil {
		return nil, errors.New("schedule: Config.Store and Config.Submitter are required")
	}
	if cfg.Owner == "" {
		host, _ := os.Hostname()
		cfg.Owner = fmt.Sprintf("%s/%d", host, os.Getpid())
	}
	if cfg.Clock == nil {
		cfg.Clock = SystemClock
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&cfg.Lease, DefaultLease)
	def(&cfg.PollInterval, DefaultPollInterval)
	def(&cfg.OnTime, DefaultOnTime)
	def(&cfg.BackoffBase, DefaultBackoffBase)
	def(&cfg.BackoffMax, DefaultBackoffMax)
	if cfg.BatchSize <= 0 {
		cfg.BatchSize = DefaultBatchSize
	}
	cfg.Schedules = slices.Clone(cfg.Schedules) // defaults are filled in below, not in the caller's slice
	s := &Scheduler{cfg: cfg, log: cfg.Logger, clock: cfg.Clock, byName: map[string]*Schedule{}, skipped: map[string]bool{}}
	for i := range cfg.Schedules {
		sc := &cfg.Schedules[i]
		at := fmt.Sprintf("schedules[%d] (%s)", i, sc.Name)
		if sc.Name == "" || s.byName[sc.Name] != nil {
			return nil, fmt.Errorf("%s: the name is empty or used twice", at)
		}
		if sc.Cron == nil || sc.Source == nil {
			return nil, fmt.Errorf("%s: a cron expression and a recipient source are required", at)
		}
		if sc.Location == nil {
			sc.Location = time.UTC
		}
		if sc.Tenant == "" {
			sc.Tenant = sendonce.DefaultTenant
		}
		if sc.CatchUp == "" {
			sc.CatchUp = CatchUpSkip
		}
		def(&sc.MaxLag, DefaultMaxLag)
		if _, err := LoadTemplates(sc.Templates); err != nil {
			return nil, fmt.Errorf("%s: %w", at, err)
		}
		s.byName[sc.Name] = sc
	}
	return s, nil
}

// Schedules returns the schedules, in configuration order.
func (s *Scheduler) Schedules() []Schedule { return slices.Clone(s.cfg.Schedules) }

// Run ticks every schedule each PollInterval until ctx ends; each schedule
// has its own loop, so a long fire of one delays no other. A fire in
// progress at shutdown is handed back at once (see RunFire).
func (s *Scheduler) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for i := range s.cfg.Schedules {
		sc := &s.cfg.Schedules[i]
		wg.Go(func() {
			for {
				s.tickSchedule(ctx, sc)
				select {
				case <-ctx.Done():
					return
				case <-s.clock.After(s.cfg.PollInterval):
				}
			}
		})
	}
	wg.Wait()
	return nil
}

// Tick runs, one after the other, every fire that is due now: unfinished
// fires whose lease expired or whose retry time came, then new fires per
// each schedule's catch-up policy. Tests drive the scheduler with it.
func (s *Scheduler) Tick(ctx context.Context) {
	for i := range s.cfg.Schedules {
		s.tickSchedule(ctx, &s.cfg.Schedules[i])
	}
}

func (s *Scheduler) tickSchedule(ctx context.Context, sc *Schedule) {
	if ctx.Err() != nil {
		return
	}
	now := s.clock.Now()
	open, err := s.cfg.Store.ListFires(ctx, store.FireFilter{Schedule: sc.Name, Unfinished: true})
	if err != nil {
		s.log.Warn("schedule: list unfinished fires", "schedule", sc.Name, "err", err)
		return
	}
	for _, f := range slices.Backward(open) { // oldest first
		if store.DecideClaim(f.State, f.LeaseExpiry, f.NextAttempt, now) == nil {
			s.RunFire(ctx, sc.Name, f.ScheduledAt, false)
		}
	}
	// Resumed fires may have run for long: judge what is due by the time
	// now, not the time the tick began.
	due, err := s.Due(ctx, sc.Name, s.clock.Now())
	if err != nil {
		s.log.Warn("schedule: compute due fires", "schedule", sc.Name, "err", err)
		return
	}
	for _, at := range due {
		if ctx.Err() != nil {
			return
		}
		s.RunFire(ctx, sc.Name, at, false)
	}
}

// maxDue bounds the instants considered in one tick (a per-second
// schedule with a day of lag would otherwise list 86,400).
const maxDue = 10000

// Due returns the instants of a schedule that should start now and have no
// fire record yet, oldest first. Instants at most OnTime old are on time
// and always due. Older ones are missed (no node was up, or all were
// busy): under skip none runs; under latest the newest missed instant
// within MaxLag runs if no later instant has a record or is on time; under
// all every missed instant within MaxLag runs. A schedule with no fire
// recorded yet has nothing to catch up: only its on-time instants are due.
func (s *Scheduler) Due(ctx context.Context, name string, now time.Time) ([]time.Time, error) {
	sc := s.byName[name]
	if sc == nil {
		return nil, fmt.Errorf("no schedule named %q", name)
	}
	lag := s.cfg.OnTime
	if sc.CatchUp != CatchUpSkip && sc.MaxLag > lag {
		lag = sc.MaxLag
	}
	from := now.Add(-lag)
	var inst []time.Time
	for t := sc.Cron.Next(from.Add(-time.Nanosecond), sc.Location); !t.IsZero() && !t.After(now); t = sc.Cron.Next(t, sc.Location) {
		inst = append(inst, t)
		if len(inst) > maxDue {
			inst = inst[1:]
		}
	}
	if len(inst) == 0 {
		return nil, nil
	}
	recorded, err := s.cfg.Store.ListFires(ctx, store.FireFilter{Schedule: name, Since: inst[0], Limit: len(inst) + 1000}) // room for manual fires of later instants
	if err != nil {
		return nil, err
	}
	have := map[int64]bool{}
	for _, f := range recorded {
		have[f.ScheduledAt.UnixNano()] = true
	}
	catchUp := sc.CatchUp
	if len(recorded) == 0 {
		any, err := s.cfg.Store.ListFires(ctx, store.FireFilter{Schedule: name, Limit: 1})
		if err != nil {
			return nil, err
		}
		if len(any) == 0 {
			catchUp = CatchUpSkip
		}
	}
	var onTime, missed []time.Time
	latestRecorded := time.Time{}
	for _, t := range inst {
		switch {
		case have[t.UnixNano()]:
			latestRecorded = t
		case now.Sub(t) <= s.cfg.OnTime:
			onTime = append(onTime, t)
		default:
			missed = append(missed, t)
		}
	}
	var out []time.Time
	switch catchUp {
	case CatchUpAll:
		out = append(out, missed...)
	case CatchUpLatest:
		if n := len(missed); n > 0 && missed[n-1].After(latestRecorded) && len(onTime) == 0 {
			out = append(out, missed[n-1])
			missed = missed[:n-1]
		}
	}
	if catchUp != CatchUpAll {
		s.logSkipped(name, missed, catchUp, latestRecorded)
	}
	return append(out, onTime...), nil
}

func (s *Scheduler) logSkipped(name string, missed []time.Time, policy CatchUp, latestRecorded time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var fresh []time.Time
	for _, t := range missed {
		if t.Before(latestRecorded) {
			continue // an older instant a node simply did not need: nothing was missed
		}
		k := store.FireKey(name, t)
		if !s.skipped[k] {
			s.skipped[k] = true
			fresh = append(fresh, t)
		}
	}
	// One line per tick, however many instants a long outage skipped.
	if len(fresh) > 0 {
		s.log.Warn("schedule: missed fires skipped", "schedule", name, "catch_up", string(policy), "count", len(fresh),
			"first", store.FireKey(name, fresh[0]), "last", store.FireKey(name, fresh[len(fresh)-1]))
	}
}

// EmailKey is the idempotency key of the email of one fire to one
// recipient: "FIREKEY/ADDRESS" (the address with its domain in lower
// case), or "FIREKEY/sha256:HEX" when that would not be a valid key (too
// long, or bytes outside printable ASCII). The same fire and address give
// the same key on every node and in every run.
func EmailKey(fireKey, address string) string {
	a := strings.TrimSpace(address)
	if at := strings.LastIndexByte(a, '@'); at >= 0 {
		a = a[:at] + strings.ToLower(a[at:])
	}
	k := fireKey + "/" + a
	if sendonce.ValidateKey(k) == nil {
		return k
	}
	h := sha256.Sum256([]byte(a))
	return fireKey + "/sha256:" + hex.EncodeToString(h[:])
}

// FireInfo is what templates see of the fire as .Fire.
type FireInfo struct {
	Key      string
	Schedule string
	At       time.Time // the scheduled instant in the schedule's zone
}

func templateData(r Recipient, fi FireInfo) map[string]any {
	d := maps.Clone(r.Data)
	if d == nil {
		d = map[string]any{}
	}
	d["Fire"] = fi
	return d
}

// errLeaseLost: another node took the fire over; this run stops quietly.
var errLeaseLost = errors.New("the fire's lease was lost to another node")

// RunFire claims the fire of schedule name at the instant at and runs it to
// the end, or until an error stops it, then records the outcome. It returns
// the fire's record as this call left it. A fire that is done, or held by
// another node, is not run (store.ErrFireDone, store.ErrFireBusy). A
// manual fire ("sendonce schedule run") uses the same keys as the
// scheduled one, so running it twice, or at the instant the scheduler runs
// it too, admits each email once.
func (s *Scheduler) RunFire(ctx context.Context, name string, at time.Time, manual bool) (store.Fire, error) {
	sc := s.byName[name]
	if sc == nil {
		return store.Fire{}, fmt.Errorf("no schedule named %q", name)
	}
	key := store.FireKey(name, at)
	f, err := s.cfg.Store.ClaimFire(ctx, store.FireClaim{Key: key, Schedule: name, ScheduledAt: at.UTC(), Owner: s.cfg.Owner,
		Manual: manual, Now: s.clock.Now(), Lease: s.cfg.Lease})
	if err != nil {
		if !errors.Is(err, store.ErrFireBusy) && !errors.Is(err, store.ErrFireDone) {
			s.log.Warn("schedule: claim fire", "fire", key, "err", err)
		}
		return store.Fire{}, err
	}
	log := s.log.With("schedule", name, "fire", key, "attempt", f.Attempts)
	log.Info("schedule: fire started", "cursor", f.Cursor, "admitted_so_far", f.Admitted)
	lease := store.FireLease{Key: key, Fence: f.Fence}
	// A batch can take longer than the lease (a slow source, a busy
	// database), so the lease is also renewed on its own every third of
	// it; losing it stops the run at once.
	fctx, cancelRun := context.WithCancel(ctx)
	var lost atomic.Bool
	renewed := make(chan struct{})
	go func() {
		defer close(renewed)
		for {
			select {
			case <-fctx.Done():
				return
			case <-s.clock.After(s.cfg.Lease / 3):
			}
			err := s.cfg.Store.RenewFire(fctx, lease, s.clock.Now(), s.cfg.Lease)
			if errors.Is(err, store.ErrLeaseLost) {
				lost.Store(true)
				cancelRun()
				return
			}
		}
	}()
	runErr := s.execute(fctx, sc, &f)
	cancelRun()
	<-renewed
	if lost.Load() {
		runErr = errLeaseLost
	}
	// The outcome is recorded even when ctx ended (shutdown), so another
	// node can take the fire at once instead of after the lease.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	now := s.clock.Now()
	switch {
	case errors.Is(runErr, errLeaseLost):
		log.Warn("schedule: fire taken over by another node; this run stops", "admitted", f.Admitted)
		return f, runErr
	case runErr == nil:
		if err := s.cfg.Store.FinishFire(wctx, store.FireFinish{Lease: lease, Done: true, Now: now}); err != nil {
			log.Warn("schedule: record fire done", "err", err)
			return f, err
		}
		f.State, f.FinishedAt = store.FireDone, now
		log.Info("schedule: fire done", "admitted", f.Admitted, "duplicates", f.Duplicates, "rejected", f.Rejected)
		return f, nil
	case ctx.Err() != nil:
		if err := s.cfg.Store.FinishFire(wctx, store.FireFinish{Lease: lease, Error: "interrupted by shutdown", RetryAt: now, Now: now}); err != nil {
			log.Warn("schedule: hand back interrupted fire", "err", err)
		}
		log.Info("schedule: fire interrupted by shutdown; another node or the next start resumes it", "cursor", f.Cursor)
		return f, ctx.Err()
	default:
		retry := now.Add(s.backoff(f.Attempts))
		if err := s.cfg.Store.FinishFire(wctx, store.FireFinish{Lease: lease, Error: runErr.Error(), RetryAt: retry, Now: now}); err != nil {
			log.Warn("schedule: record fire error", "err", err)
		}
		f.State, f.LastError, f.NextAttempt = store.FireWaiting, runErr.Error(), retry
		log.Error("schedule: fire stopped by an error; it will be retried from its cursor", "err", runErr,
			"retry_at", retry, "cursor", f.Cursor, "admitted", f.Admitted)
		return f, runErr
	}
}

func (s *Scheduler) backoff(attempts int) time.Duration {
	d := s.cfg.BackoffBase
	for i := 1; i < attempts && d < s.cfg.BackoffMax; i++ {
		d *= 2
	}
	return min(d, s.cfg.BackoffMax)
}

// execute expands the fire's recipients from its cursor in batches,
// admitting each batch and then recording its cursor. It updates f's
// cursor and counts as it goes.
func (s *Scheduler) execute(ctx context.Context, sc *Schedule, f *store.Fire) error {
	tpl, err := LoadTemplates(sc.Templates)
	if err != nil {
		return err
	}
	rd, err := sc.Source.Open(ctx, f.Cursor)
	if err != nil {
		return err
	}
	defer rd.Close()
	fi := FireInfo{Key: f.Key, Schedule: sc.Name, At: f.ScheduledAt.In(sc.Location)}
	tags := map[string]string{"schedule": sc.Name, "fire": f.Key}
	lease := store.FireLease{Key: f.Key, Fence: f.Fence}
	for {
		rows, cursor, err := rd.Next(ctx, s.cfg.BatchSize)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		subs := make([]sendonce.Submission, 0, len(rows))
		for _, r := range rows {
			out, err := tpl.Render(templateData(r, fi))
			if err != nil {
				return fmt.Errorf("recipient %s: %w", r.Address, err)
			}
			subs = append(subs, sendonce.Submission{
				Tenant: sc.Tenant,
				Key:    EmailKey(f.Key, r.Address),
				Source: "schedule",
				Email: sendonce.Email{From: sc.From, To: []string{r.Address}, ReplyTo: sc.ReplyTo,
					Subject: out.Subject, Text: out.Text, HTML: out.HTML, Tags: tags},
			})
		}
		res, err := s.cfg.Submitter.SubmitBatch(ctx, subs)
		if err != nil {
			return err
		}
		var added, dups, rejected int64
		for i, r := range res {
			switch {
			case r.Err == nil && r.Duplicate:
				dups++
			case r.Err == nil:
				added++
			case errors.Is(r.Err, sendonce.ErrKeyReused):
				// Admitted by an earlier run with other content (the
				// template or the data changed in between): it was
				// admitted once, and stays so.
				dups++
			default:
				rejected++
				s.log.Warn("schedule: recipient refused", "fire", f.Key, "address", subs[i].Email.To[0], "err", r.Err)
			}
		}
		err = s.cfg.Store.ProgressFire(ctx, store.FireProgress{Lease: lease, Cursor: cursor, Admitted: added, Duplicates: dups,
			Rejected: rejected, Now: s.clock.Now(), Extend: s.cfg.Lease})
		if errors.Is(err, store.ErrLeaseLost) {
			return errLeaseLost
		}
		if err != nil {
			return err
		}
		f.Cursor = cursor
		f.Admitted += added
		f.Duplicates += dups
		f.Rejected += rejected
	}
}

// Status is one schedule as `sendonce schedule list` shows it.
type Status struct {
	Schedule Schedule
	Next     []time.Time // the next fire instants
	Last     *store.Fire // the latest fire recorded, if any
}

// Status returns every schedule's next fire instants after now and its
// latest fire.
func (s *Scheduler) Status(ctx context.Context, next int) ([]Status, error) {
	now := s.clock.Now()
	var out []Status
	for _, sc := range s.cfg.Schedules {
		st := Status{Schedule: sc}
		t := now
		for range next {
			if t = sc.Cron.Next(t, sc.Location); t.IsZero() {
				break
			}
			st.Next = append(st.Next, t)
		}
		last, err := s.cfg.Store.ListFires(ctx, store.FireFilter{Schedule: sc.Name, Limit: 1})
		if err != nil {
			return nil, err
		}
		if len(last) > 0 {
			st.Last = &last[0]
		}
		out = append(out, st)
	}
	return out, nil
}

// Fires returns recorded fires (see store.FireStore.ListFires), latest
// scheduled instant first: what a dashboard shows of their progress.
func (s *Scheduler) Fires(ctx context.Context, f store.FireFilter) ([]store.Fire, error) {
	return s.cfg.Store.ListFires(ctx, f)
}

// Preview renders the email of schedule name for address, with the data
// of that recipient's row when the source has one (found), as the next fire
// would render it. Nothing is admitted.
func (s *Scheduler) Preview(ctx context.Context, name, address string) (out Rendered, found bool, err error) {
	sc := s.byName[name]
	if sc == nil {
		return Rendered{}, false, fmt.Errorf("no schedule named %q", name)
	}
	tpl, err := LoadTemplates(sc.Templates)
	if err != nil {
		return Rendered{}, false, err
	}
	at := sc.Cron.Next(s.clock.Now(), sc.Location)
	fi := FireInfo{Key: store.FireKey(name, at), Schedule: name, At: at.In(sc.Location)}
	rcpt := Recipient{Address: address, Data: map[string]any{"email": address}}
	rd, err := sc.Source.Open(ctx, "")
	if err != nil {
		return Rendered{}, false, err
	}
	defer rd.Close()
	for !found {
		rows, _, err := rd.Next(ctx, 1000)
		if err == io.EOF {
			break
		}
		if err != nil {
			return Rendered{}, false, err
		}
		for _, r := range rows {
			if strings.EqualFold(r.Address, address) {
				rcpt, found = r, true
				break
			}
		}
	}
	out, err = tpl.Render(templateData(rcpt, fi))
	return out, found, err
}
