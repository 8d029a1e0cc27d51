// Package redisstream is the Redis Streams front door: it consumes JSON
// jobs (see docs/jobs.md) from a stream through a consumer group and
// admits them into the ledger.
//
// A producer adds one entry per job, the job in the field "job" and,
// optionally, its key in "idempotency_key":
//
//	XADD emails * job '{"from": ..., "to": [...], "subject": ...}' idempotency_key celery-task-id
//
// What it promises, for every entry it reads:
//
//   - It acknowledges the entry (XACK) only after the ledger has recorded
//     its email durably, or answered that it already had it.
//   - An entry that can never be admitted (no "job" field, not a job, an
//     invalid field, a key reused for another email) is added to the
//     dead-letter stream with the reason in its sendonce_error field and
//     acknowledged, in one MULTI/EXEC transaction.
//   - An entry left pending by a consumer that died is claimed (XAUTOCLAIM)
//     by another once it has been idle for Options.ClaimIdle, and admitted
//     again: the ledger answers it as a duplicate if the first admission
//     committed. An entry delivered more than Options.MaxDeliveries times
//     (one that keeps killing its consumers) is dead-lettered.
//   - When the ledger cannot be reached it acknowledges nothing, keeps the
//     entries claimed (resetting their idle time, so no other consumer
//     takes them from a live one) and retries with backoff.
package redisstream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/source"
)

// The fields of an entry.
const (
	// FieldJob holds the JSON job.
	FieldJob = "job"
	// FieldKey holds the job's idempotency key when the job has no "key".
	FieldKey = "idempotency_key"
	// FieldError, FieldSourceStream and FieldSourceID are added to every
	// dead letter: why, from which stream, and the original entry's ID.
	FieldError        = "sendonce_error"
	FieldSourceStream = "sendonce_source_stream"
	FieldSourceID     = "sendonce_source_id"
)

// Defaults of Options.
const (
	DefaultGroup           = "sendonce"
	DefaultConcurrency     = 2
	DefaultBatchSize       = 10
	DefaultBlock           = 2 * time.Second
	DefaultClaimIdle       = time.Minute
	DefaultMaxDeliveries   = 5
	DefaultShutdownTimeout = 30 * time.Second
	// DeadLetterSuffix makes the default dead-letter stream's name.
	DeadLetterSuffix = ":dead"
)

// Options configures a Source.
type Options struct {
	// URL is the server, redis://[user:password@]host:port[/db] or
	// rediss:// for TLS. Ignored when Client is set.
	URL string
	// Client, when set, is used instead of a client made from URL; the
	// Source then does not close it.
	Client redis.UniversalClient
	// Stream is the stream's key. Required.
	Stream string
	// Group is the consumer group, created (with the stream, MKSTREAM) if
	// absent, reading from the stream's first entry. Default "sendonce".
	Group string
	// Consumer names this consumer in the group. Default the host name:
	// a restarted node then takes up its own pending entries at once.
	Consumer string
	// Tenant owns the keys of every job of this stream. Default
	// sendonce.DefaultTenant. Jobs cannot choose it.
	Tenant string
	// Concurrency is the number of readers, each with one batch in
	// flight. Default 2.
	Concurrency int
	// BatchSize is the COUNT of each read, admitted with one durable
	// commit. Default 10.
	BatchSize int
	// Block is how long a read waits for new entries. Default 2s; it also
	// bounds how long a shutdown waits for an idle reader.
	Block time.Duration
	// ClaimIdle is how long an entry must have been pending without its
	// consumer acting on it before another consumer claims it, taking the
	// first for dead. Longer than any admission, in practice. Default 1m.
	ClaimIdle time.Duration
	// MaxDeliveries is how many deliveries an entry may have before it
	// is dead-lettered instead of claimed again. Default 5.
	MaxDeliveries int
	// DeadLetterStream receives the entries that can never be admitted.
	// Default Stream + ":dead".
	DeadLetterStream string
	// ShutdownTimeout bounds how long the batches in flight may take to
	// finish once Run's context ends; after it they are left pending,
	// and claimed again later. Default 30s.
	ShutdownTimeout time.Duration
	// Logger gets the source's logs. Default: discard.
	Logger *slog.Logger
}

// Source consumes one stream through a consumer group. It implements
// source.Source and source.StatsReporter.
type Source struct {
	opts     Options
	rdb      redis.UniversalClient
	ownsConn bool
	log      *slog.Logger
	name     string
	counters source.Counters
}

var (
	_ source.Source        = (*Source)(nil)
	_ source.StatsReporter = (*Source)(nil)
	_ source.LagReporter   = (*Source)(nil)
)

func (o *Options) validate() error {
	if o.Client == nil && o.URL == "" {
		return errors.New("redisstream: Options.URL is required; give the server as redis://host:6379/0")
	}
	if o.Stream == "" {
		return errors.New("redisstream: Options.Stream is required; give the key of the stream the producers XADD jobs to")
	}
	if o.DeadLetterStream == o.Stream {
		return errors.New("redisstream: Options.DeadLetterStream is the stream itself; invalid jobs would come back forever. Use another key, or leave it empty for " + o.Stream + DeadLetterSuffix)
	}
	if err := source.CheckCounts("redisstream", map[string]int{"Concurrency": o.Concurrency, "BatchSize": o.BatchSize, "MaxDeliveries": o.MaxDeliveries}); err != nil {
		return err
	}
	if err := source.CheckDurations("redisstream", map[string]time.Duration{"Block": o.Block, "ClaimIdle": o.ClaimIdle, "ShutdownTimeout": o.ShutdownTimeout}); err != nil {
		return err
	}
	if o.Block > 0 && o.Block < time.Millisecond {
		return fmt.Errorf("redisstream: Options.Block is %v; Redis counts it in milliseconds, use at least 1ms", o.Block)
	}
	return nil
}

func (o *Options) withDefaults() {
	if o.Group == "" {
		o.Group = DefaultGroup
	}
	if o.Consumer == "" {
		o.Consumer, _ = os.Hostname()
		if o.Consumer == "" {
			o.Consumer = "sendonce"
		}
	}
	if o.Tenant == "" {
		o.Tenant = sendonce.DefaultTenant
	}
	if o.Concurrency == 0 {
		o.Concurrency = DefaultConcurrency
	}
	if o.BatchSize == 0 {
		o.BatchSize = DefaultBatchSize
	}
	if o.Block == 0 {
		o.Block = DefaultBlock
	}
	if o.ClaimIdle == 0 {
		o.ClaimIdle = DefaultClaimIdle
	}
	if o.MaxDeliveries == 0 {
		o.MaxDeliveries = DefaultMaxDeliveries
	}
	if o.DeadLetterStream == "" {
		o.DeadLetterStream = o.Stream + DeadLetterSuffix
	}
	if o.ShutdownTimeout == 0 {
		o.ShutdownTimeout = DefaultShutdownTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// New checks the options, connects, and creates the consumer group (and
// the stream) if absent.
func New(ctx context.Context, o Options) (*Source, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	o.withDefaults()
	s := &Source{opts: o, rdb: o.Client, name: "redis:" + o.Stream}
	if s.rdb == nil {
		ro, err := redis.ParseURL(o.URL)
		if err != nil {
			return nil, fmt.Errorf("redisstream: Options.URL: %w; give it as redis://[user:password@]host:6379[/db]", err)
		}
		s.rdb = redis.NewClient(ro)
		s.ownsConn = true
	}
	s.log = o.Logger.With("source", s.name)
	err := s.rdb.XGroupCreateMkStream(ctx, o.Stream, o.Group, "0").Err()
	if err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
		s.close()
		return nil, fmt.Errorf("redisstream: create the consumer group %s of stream %s (Options.Group, Options.Stream): %w", o.Group, o.Stream, err)
	}
	return s, nil
}

func (s *Source) close() {
	if s.ownsConn {
		s.rdb.Close()
	}
}

// Name is "redis:" and the stream's key.
func (s *Source) Name() string { return s.name }

// Stats are the source's counts so far.
func (s *Source) Stats() source.Stats { return s.counters.Snapshot() }

// Lag reads the consumer group's lag and pending count (XINFO GROUPS) and
// the ID, hence the time, of the first entry not yet delivered to the
// group (XRANGE with COUNT 1): two round trips, no scan.
func (s *Source) Lag(ctx context.Context) (source.Lag, error) {
	groups, err := s.rdb.XInfoGroups(ctx, s.opts.Stream).Result()
	if err != nil {
		return source.Lag{}, fmt.Errorf("redisstream: XINFO GROUPS %s: %w", s.opts.Stream, err)
	}
	for _, g := range groups {
		if g.Name != s.opts.Group {
			continue
		}
		if g.Lag < 0 {
			// Entries were deleted or trimmed between the group's
			// position and the stream's end: Redis cannot count.
			return source.Lag{}, fmt.Errorf("redisstream: the lag of group %s of stream %s cannot be determined (entries were deleted or trimmed past it)", s.opts.Group, s.opts.Stream)
		}
		lag := source.Lag{Waiting: g.Lag, Unacked: g.Pending}
		if g.Lag > 0 {
			next, err := s.rdb.XRangeN(ctx, s.opts.Stream, "("+g.LastDeliveredID, "+", 1).Result()
			if err != nil {
				return source.Lag{}, fmt.Errorf("redisstream: XRANGE %s: %w", s.opts.Stream, err)
			}
			if len(next) == 1 {
				lag.Oldest = idTime(next[0].ID)
			}
		}
		return lag, nil
	}
	return source.Lag{}, fmt.Errorf("redisstream: stream %s has no consumer group %s (Options.Group)", s.opts.Stream, s.opts.Group)
}

// idTime is the time in an entry ID ("<milliseconds>-<sequence>"), the
// zero time for an ID a producer chose in another form.
func idTime(id string) time.Time {
	ms, _, ok := strings.Cut(id, "-")
	if !ok {
		return time.Time{}
	}
	n, err := strconv.ParseInt(ms, 10, 64)
	if err != nil || n <= 0 {
		return time.Time{}
	}
	return time.UnixMilli(n)
}

// Run reads with Options.Concurrency readers and claims abandoned entries
// until ctx ends, then lets the batches in flight finish (see
// Options.ShutdownTimeout), closes its connection (unless given one) and
// returns nil.
func (s *Source) Run(ctx context.Context, a source.Admitter) error {
	if a == nil {
		return errors.New("redisstream: Run needs an Admitter, such as a *sendonce.Client")
	}
	defer s.close()
	s.log.Info("consuming", "group", s.opts.Group, "consumer", s.opts.Consumer, "readers", s.opts.Concurrency,
		"claim_idle", s.opts.ClaimIdle, "max_deliveries", s.opts.MaxDeliveries, "dead_letter_stream", s.opts.DeadLetterStream)
	// This consumer's own pending entries first, before any reader adds
	// new ones: a restart under the same name takes them up at once
	// instead of after ClaimIdle.
	s.readOwnPending(ctx, a)
	var wg sync.WaitGroup
	wg.Go(func() { s.claimLoop(ctx, a) })
	for range s.opts.Concurrency {
		wg.Go(func() { s.readLoop(ctx, a) })
	}
	wg.Wait()
	s.log.Info("stopped")
	return nil
}

func (s *Source) readArgs(id string) *redis.XReadGroupArgs {
	return &redis.XReadGroupArgs{
		Group:    s.opts.Group,
		Consumer: s.opts.Consumer,
		Streams:  []string{s.opts.Stream, id},
		Count:    int64(s.opts.BatchSize),
		Block:    s.opts.Block,
	}
}

// readLoop is one reader of new entries.
func (s *Source) readLoop(ctx context.Context, a source.Admitter) {
	var backoff source.Backoff
	for ctx.Err() == nil {
		res, err := s.rdb.XReadGroup(ctx, s.readArgs(">")).Result()
		if errors.Is(err, redis.Nil) {
			continue // nothing new within Block
		}
		if err != nil {
			if ctx.Err() != nil {
				// Entries a cancelled read may have been given stay
				// pending, and are claimed again: nothing is lost.
				return
			}
			if isNoGroup(err) {
				s.recreateGroup(ctx)
			}
			s.counters.Errors.Add(1)
			s.log.Error("read failed; backing off", "err", err)
			if !backoff.Wait(ctx) {
				return
			}
			continue
		}
		backoff.Reset()
		for _, st := range res {
			s.handle(ctx, a, st.Messages, nil)
		}
	}
}

// isNoGroup: the stream or the group is gone, as after a restart of a
// Redis without persistence, or a DEL of the stream.
func isNoGroup(err error) bool { return strings.HasPrefix(err.Error(), "NOGROUP") }

func (s *Source) recreateGroup(ctx context.Context) {
	err := s.rdb.XGroupCreateMkStream(ctx, s.opts.Stream, s.opts.Group, "0").Err()
	if err == nil {
		s.log.Warn("the consumer group was gone and has been created again; was the stream deleted, or Redis restarted without persistence?")
	}
}

// readOwnPending admits the entries delivered to this consumer name and
// never acknowledged: the work of a previous run under the same name.
func (s *Source) readOwnPending(ctx context.Context, a source.Admitter) {
	var backoff source.Backoff
	start := "0"
	for ctx.Err() == nil {
		res, err := s.rdb.XReadGroup(ctx, s.readArgs(start)).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			if ctx.Err() != nil {
				return
			}
			if isNoGroup(err) {
				s.recreateGroup(ctx)
			}
			s.counters.Errors.Add(1)
			s.log.Error("reading this consumer's pending entries failed; backing off", "err", err)
			if !backoff.Wait(ctx) {
				return
			}
			continue
		}
		if len(res) == 0 || len(res[0].Messages) == 0 {
			return
		}
		msgs := res[0].Messages
		start = msgs[len(msgs)-1].ID
		counts, err := s.deliveryCounts(ctx, msgs)
		if err != nil {
			counts = nil // judged again at the next claim
		}
		s.handle(ctx, a, msgs, counts)
	}
}

// claimLoop takes over, every ClaimIdle/2, the entries other consumers
// have left pending for ClaimIdle.
func (s *Source) claimLoop(ctx context.Context, a source.Admitter) {
	t := time.NewTicker(max(s.opts.ClaimIdle/2, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := "0-0"
		for ctx.Err() == nil {
			msgs, next, err := s.rdb.XAutoClaim(ctx, &redis.XAutoClaimArgs{
				Stream: s.opts.Stream, Group: s.opts.Group, Consumer: s.opts.Consumer,
				MinIdle: s.opts.ClaimIdle, Start: start, Count: int64(s.opts.BatchSize),
			}).Result()
			if err != nil {
				if ctx.Err() == nil {
					s.counters.Errors.Add(1)
					s.log.Error("claiming abandoned entries failed", "err", err)
				}
				break
			}
			if len(msgs) > 0 {
				s.log.Info("claimed entries abandoned by another consumer", "entries", len(msgs))
				counts, err := s.deliveryCounts(ctx, msgs)
				if err != nil {
					s.log.Warn("reading the delivery counts of claimed entries failed", "err", err)
				}
				s.handle(ctx, a, msgs, counts)
			}
			if next == "0-0" || next == "" {
				break
			}
			start = next
		}
	}
}

// deliveryCounts reads how many times each entry was delivered.
func (s *Source) deliveryCounts(ctx context.Context, msgs []redis.XMessage) (map[string]int64, error) {
	pipe := s.rdb.Pipeline()
	cmds := make([]*redis.XPendingExtCmd, len(msgs))
	for i, m := range msgs {
		cmds[i] = pipe.XPendingExt(ctx, &redis.XPendingExtArgs{Stream: s.opts.Stream, Group: s.opts.Group, Start: m.ID, End: m.ID, Count: 1})
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	out := make(map[string]int64, len(msgs))
	for i, c := range cmds {
		if p, err := c.Result(); err == nil && len(p) == 1 {
			out[msgs[i].ID] = p[0].RetryCount
		}
	}
	return out, nil
}

// entry is one stream entry on its way through a batch.
type entry struct {
	m redis.XMessage
	d *source.Delivery
}

// handle admits one batch of entries, acknowledges what may be, and
// dead-letters what can never be admitted. counts, when known, are the
// entries' delivery counts.
//
// While the ledger cannot be reached it retries with backoff, keeping the
// entries claimed; it gives up (leaving them pending) when ctx ends.
func (s *Source) handle(ctx context.Context, a source.Admitter, msgs []redis.XMessage, counts map[string]int64) {
	lctx, stop := source.Linger(ctx, s.opts.ShutdownTimeout)
	defer stop()
	var (
		es   = make([]*entry, 0, len(msgs))
		gone []string
	)
	for _, m := range msgs {
		if m.Values == nil {
			// The entry was deleted (XDEL, trimming) while pending:
			// there is nothing left to admit.
			gone = append(gone, m.ID)
			continue
		}
		s.counters.Received.Add(1)
		e := &entry{m: m}
		body, hints, err := s.parseFields(m.Values)
		if err != nil {
			e.d = &source.Delivery{Outcome: source.Reject, Reason: err}
		} else {
			e.d = source.NewDelivery(body, hints, s.opts.Tenant, s.name)
		}
		if n := counts[m.ID]; n > int64(s.opts.MaxDeliveries) && e.d.Outcome == source.Pending {
			e.d.Outcome = source.Reject
			e.d.Reason = fmt.Errorf("the entry was delivered %d times (more than the source's max_deliveries, %d) without being acknowledged: each consumer that took it died or lost it first; "+
				"check the consumers' logs, then add the entry back to %s to retry it", n, s.opts.MaxDeliveries, s.opts.Stream)
		}
		es = append(es, e)
	}
	if len(gone) > 0 {
		s.ack(lctx, gone)
	}
	if len(es) == 0 {
		return
	}
	ds := make([]*source.Delivery, len(es))
	for i, e := range es {
		ds[i] = e.d
	}
	stopKeeping := s.keepClaimed(lctx, es)
	var backoff source.Backoff
	for {
		err := source.AdmitBatch(lctx, a, ds, &s.counters)
		if err == nil {
			break
		}
		s.log.Error("admission failed; the entries stay pending and are retried", "entries", len(ds), "err", err)
		if !backoff.Wait(ctx) {
			stopKeeping()
			return // left pending: claimed again after ClaimIdle, or read again at the next start
		}
	}
	stopKeeping()
	var ackIDs []string
	for _, e := range es {
		switch e.d.Outcome {
		case source.Admitted, source.Duplicate:
			ackIDs = append(ackIDs, e.m.ID)
		case source.Reject:
			s.deadLetter(lctx, e)
		}
	}
	if len(ackIDs) > 0 {
		s.ack(lctx, ackIDs)
	}
}

func (s *Source) parseFields(v map[string]any) ([]byte, source.KeyHints, error) {
	job, ok := v[FieldJob]
	if !ok {
		var names []string
		for k := range v {
			names = append(names, k)
		}
		return nil, source.KeyHints{}, &source.JobError{Reason: fmt.Sprintf("the entry has no %q field (it has %s); add the JSON job as XADD %s * %s '{...}' [%s KEY]",
			FieldJob, strings.Join(names, ", "), s.opts.Stream, FieldJob, FieldKey)}
	}
	var hints source.KeyHints
	if k, ok := v[FieldKey]; ok {
		hints.Attribute = fmt.Sprint(k)
	}
	return []byte(fmt.Sprint(job)), hints, nil
}

func (s *Source) ack(ctx context.Context, ids []string) {
	if err := s.rdb.XAck(ctx, s.opts.Stream, s.opts.Group, ids...).Err(); err != nil {
		s.counters.Errors.Add(1)
		s.log.Warn("XACK failed; the entries stay pending, are claimed again and answered as duplicates", "entries", len(ids), "err", err)
	}
}

// deadLetter adds the entry, with the reason, to the dead-letter stream
// and acknowledges it, both or neither (MULTI/EXEC).
func (s *Source) deadLetter(ctx context.Context, e *entry) {
	reason := source.ReasonText(e.d.Reason)
	vals := make([]any, 0, 2*len(e.m.Values)+6)
	for k, v := range e.m.Values {
		if k != FieldError && k != FieldSourceStream && k != FieldSourceID {
			vals = append(vals, k, v)
		}
	}
	vals = append(vals, FieldError, reason, FieldSourceStream, s.opts.Stream, FieldSourceID, e.m.ID)
	_, err := s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.XAdd(ctx, &redis.XAddArgs{Stream: s.opts.DeadLetterStream, Values: vals})
		p.XAck(ctx, s.opts.Stream, s.opts.Group, e.m.ID)
		return nil
	})
	if err != nil {
		s.counters.Errors.Add(1)
		s.log.Error("moving an invalid job to the dead-letter stream failed; it stays pending and is retried", "id", e.m.ID, "reason", reason, "err", err)
		return
	}
	s.counters.DeadLettered.Add(1)
	s.log.Warn("invalid job moved to the dead-letter stream", "id", e.m.ID, "dead_letter_stream", s.opts.DeadLetterStream, "reason", reason)
}

// keepClaimed resets the entries' idle time (XCLAIM JUSTID, which does
// not count as a delivery) at a third of ClaimIdle until stop is called,
// so that no other consumer claims a batch this live one is still
// admitting.
func (s *Source) keepClaimed(ctx context.Context, es []*entry) (stop func()) {
	ids := make([]string, len(es))
	for i, e := range es {
		ids[i] = e.m.ID
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(max(s.opts.ClaimIdle/3, 5*time.Millisecond))
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			err := s.rdb.XClaimJustID(ctx, &redis.XClaimArgs{Stream: s.opts.Stream, Group: s.opts.Group, Consumer: s.opts.Consumer, Messages: ids}).Err()
			if err != nil && ctx.Err() == nil {
				s.log.Warn("keeping the entries claimed failed; another consumer may claim them, and the ledger answers it as a duplicate", "entries", len(ids), "err", err)
			}
		}
	}()
	return func() {
		cancel()
		<-done
	}
}
