// Package natsjs is the NATS JetStream front door: it consumes JSON jobs
// (see docs/jobs.md) through a durable pull consumer of a stream and
// admits them into the ledger.
//
// What it promises, for every message it fetches:
//
//   - It acknowledges the message only after the ledger has recorded its
//     email durably, or answered that it already had it. While a batch is
//     being admitted it tells the server so (InProgress, at half the
//     consumer's AckWait), so a slow admission is not redelivered.
//   - A message that can never be admitted (not a job, an invalid field, a
//     key reused for another email) is published to
//     Options.DeadLetterSubject with the reason in its Sendonce-Error
//     header (and stored by the stream that captures that subject: New
//     refuses a subject no stream captures), and then terminated (Term,
//     with the reason where the server records one). It is never
//     redelivered forever and never dropped silently.
//   - When the ledger cannot be reached it acknowledges nothing: it keeps
//     the messages in progress and retries with backoff; at shutdown it
//     hands them back (Nak) for redelivery.
//   - A message redelivered after a consumer died (AckWait passed) is
//     admitted again; the ledger answers it as a duplicate if the first
//     admission committed.
package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/source"
)

// Headers.
const (
	// HeaderIdempotencyKey is the header a producer may set to give a job
	// its idempotency key without a "key" field (before Nats-Msg-Id).
	HeaderIdempotencyKey = "idempotency_key"
	// HeaderError, HeaderSourceStream and HeaderSourceSequence are set on
	// every dead letter: why, and where it came from.
	HeaderError          = "Sendonce-Error"
	HeaderSourceStream   = "Sendonce-Source-Stream"
	HeaderSourceSequence = "Sendonce-Source-Sequence"
)

// Defaults of Options.
const (
	DefaultConsumer        = "sendonce"
	DefaultConcurrency     = 2
	DefaultBatchSize       = 10
	DefaultFetchWait       = 2 * time.Second
	DefaultAckWait         = 30 * time.Second
	DefaultShutdownTimeout = 30 * time.Second
	// DeadLetterSubjectPrefix makes the default dead-letter subject.
	DeadLetterSubjectPrefix = "sendonce.dead."
)

// Options configures a Source.
type Options struct {
	// URL is the server, nats://[user:password@]host:4222 (several,
	// comma-separated). Ignored when Conn is set.
	URL string
	// Conn, when set, is used instead of a connection made from URL; the
	// Source then does not close it.
	Conn *nats.Conn
	// Stream is the JetStream stream holding the jobs. It must exist.
	// Required.
	Stream string
	// Consumer is the durable pull consumer's name. If absent it is
	// created with explicit acks, AckWait and MaxDeliver; an existing one
	// is used as it is (it must be a pull consumer with explicit acks).
	// Default "sendonce".
	Consumer string
	// Tenant owns the keys of every job of this stream. Default
	// sendonce.DefaultTenant. Jobs cannot choose it.
	Tenant string
	// Concurrency is the number of fetchers, each with one batch in
	// flight. Default 2.
	Concurrency int
	// BatchSize is the most messages one fetch takes, admitted with one
	// durable commit. Default 10.
	BatchSize int
	// FetchWait is how long an idle fetch waits for a message; it also
	// bounds how long a shutdown waits for an idle fetcher. Default 2s.
	FetchWait time.Duration
	// AckWait is the AckWait of a consumer this source creates. Default
	// 30s.
	AckWait time.Duration
	// MaxDeliver is the MaxDeliver of a consumer this source creates;
	// default unlimited. After that many deliveries the server stops
	// redelivering a message (a JetStream advisory reports it).
	MaxDeliver int
	// DeadLetterSubject receives every message that can never be
	// admitted, with the reason. A stream must capture it, and not the
	// source's stream. Default "sendonce.dead." + Stream.
	DeadLetterSubject string
	// ShutdownTimeout bounds how long the batches in flight may take to
	// finish once Run's context ends. Default 30s.
	ShutdownTimeout time.Duration
	// Logger gets the source's logs. Default: discard.
	Logger *slog.Logger
}

// Source consumes one durable consumer of a stream. It implements
// source.Source and source.StatsReporter.
type Source struct {
	opts       Options
	nc         *nats.Conn
	ownsConn   bool
	js         jetstream.JetStream
	cons       jetstream.Consumer
	ackWait    time.Duration
	termReason bool // the server records a Term's reason
	log        *slog.Logger
	name       string
	counters   source.Counters
}

var (
	_ source.Source        = (*Source)(nil)
	_ source.StatsReporter = (*Source)(nil)
	_ source.LagReporter   = (*Source)(nil)
)

func (o *Options) validate() error {
	if o.Conn == nil && o.URL == "" {
		return errors.New("natsjs: Options.URL is required; give the server as nats://host:4222")
	}
	if o.Stream == "" {
		return errors.New("natsjs: Options.Stream is required; name the JetStream stream that holds the jobs")
	}
	if err := source.CheckCounts("natsjs", map[string]int{"Concurrency": o.Concurrency, "BatchSize": o.BatchSize, "MaxDeliver": o.MaxDeliver}); err != nil {
		return err
	}
	if err := source.CheckDurations("natsjs", map[string]time.Duration{"FetchWait": o.FetchWait, "AckWait": o.AckWait, "ShutdownTimeout": o.ShutdownTimeout}); err != nil {
		return err
	}
	if o.AckWait > 0 && o.AckWait < time.Second {
		return fmt.Errorf("natsjs: Options.AckWait is %v; use at least 1s, so that InProgress can keep a batch", o.AckWait)
	}
	return nil
}

func (o *Options) withDefaults() {
	if o.Consumer == "" {
		o.Consumer = DefaultConsumer
	}
	if o.DeadLetterSubject == "" {
		o.DeadLetterSubject = DeadLetterSubjectPrefix + o.Stream
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
	if o.FetchWait == 0 {
		o.FetchWait = DefaultFetchWait
	}
	if o.AckWait == 0 {
		o.AckWait = DefaultAckWait
	}
	if o.ShutdownTimeout == 0 {
		o.ShutdownTimeout = DefaultShutdownTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// New checks the options, connects, checks the stream and the
// dead-letter subject, and creates the durable consumer if absent.
func New(ctx context.Context, o Options) (*Source, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	o.withDefaults()
	s := &Source{opts: o, nc: o.Conn, name: "nats:" + o.Stream + "/" + o.Consumer}
	s.log = o.Logger.With("source", s.name)
	if s.nc == nil {
		nc, err := nats.Connect(o.URL, nats.Name("sendonce "+s.name), nats.MaxReconnects(-1), nats.ReconnectWait(time.Second))
		if err != nil {
			return nil, fmt.Errorf("natsjs: connect to %s (Options.URL): %w", o.URL, err)
		}
		s.nc, s.ownsConn = nc, true
	}
	ok := false
	defer func() {
		if !ok {
			s.close()
		}
	}()
	var err error
	if s.js, err = jetstream.New(s.nc); err != nil {
		return nil, fmt.Errorf("natsjs: %w", err)
	}
	st, err := s.js.Stream(ctx, o.Stream)
	if err != nil {
		return nil, fmt.Errorf("natsjs: stream %s (Options.Stream): %w; create it (nats stream add) before starting sendonce", o.Stream, err)
	}
	dlStream, err := s.js.StreamNameBySubject(ctx, o.DeadLetterSubject)
	if err != nil {
		return nil, fmt.Errorf("natsjs: no stream captures the dead-letter subject %s (Options.DeadLetterSubject): %w; so that an invalid job is kept with its reason, "+
			"create one (nats stream add %s_DEAD --subjects %s), or name another subject that a stream captures", o.DeadLetterSubject, err, o.Stream, o.DeadLetterSubject)
	}
	if dlStream == o.Stream {
		return nil, fmt.Errorf("natsjs: the dead-letter subject %s (Options.DeadLetterSubject) is captured by the source's own stream %s; invalid jobs would come back forever. Use a subject of another stream", o.DeadLetterSubject, o.Stream)
	}
	s.cons, err = st.Consumer(ctx, o.Consumer)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		cfg := jetstream.ConsumerConfig{
			Durable:       o.Consumer,
			AckPolicy:     jetstream.AckExplicitPolicy,
			AckWait:       o.AckWait,
			MaxDeliver:    o.MaxDeliver,
			DeliverPolicy: jetstream.DeliverAllPolicy,
		}
		if cfg.MaxDeliver == 0 {
			cfg.MaxDeliver = -1
		}
		s.cons, err = st.CreateConsumer(ctx, cfg)
	}
	if err != nil {
		return nil, fmt.Errorf("natsjs: consumer %s of stream %s (Options.Consumer): %w", o.Consumer, o.Stream, err)
	}
	info := s.cons.CachedInfo()
	if info.Config.AckPolicy != jetstream.AckExplicitPolicy {
		return nil, fmt.Errorf("natsjs: consumer %s of stream %s acknowledges with policy %v; sendonce needs explicit acks (it acks only after admission): use another Options.Consumer", o.Consumer, o.Stream, info.Config.AckPolicy)
	}
	if info.Config.DeliverSubject != "" {
		return nil, fmt.Errorf("natsjs: consumer %s of stream %s is a push consumer; sendonce needs a durable pull consumer: use another Options.Consumer", o.Consumer, o.Stream)
	}
	s.ackWait = info.Config.AckWait
	if s.ackWait <= 0 {
		s.ackWait = DefaultAckWait
	}
	s.termReason = versionAtLeast(s.nc.ConnectedServerVersion(), 2, 10, 4)
	ok = true
	return s, nil
}

// versionAtLeast compares a server version "2.10.4" (suffixes ignored).
func versionAtLeast(v string, want ...int) bool {
	parts := strings.SplitN(strings.SplitN(v, "-", 2)[0], ".", 3)
	for i, w := range want {
		if i >= len(parts) {
			return false
		}
		n, err := strconv.Atoi(parts[i])
		if err != nil {
			return false
		}
		if n != w {
			return n > w
		}
	}
	return true
}

func (s *Source) close() {
	if s.ownsConn {
		s.nc.Close()
	}
}

// Name is "nats:", the stream and the consumer: "nats:EMAILS/sendonce".
func (s *Source) Name() string { return s.name }

// Stats are the source's counts so far.
func (s *Source) Stats() source.Stats { return s.counters.Snapshot() }

// Lag asks the server for the consumer's info: NumPending (messages of
// the stream not yet delivered to it) and NumAckPending (delivered, not
// yet acknowledged). One request.
func (s *Source) Lag(ctx context.Context) (source.Lag, error) {
	info, err := s.cons.Info(ctx)
	if err != nil {
		return source.Lag{}, fmt.Errorf("natsjs: info of consumer %s of stream %s: %w", s.opts.Consumer, s.opts.Stream, err)
	}
	return source.Lag{Waiting: int64(info.NumPending), Unacked: int64(info.NumAckPending)}, nil
}

// Run fetches with Options.Concurrency fetchers until ctx ends, then lets
// the batches in flight finish (see Options.ShutdownTimeout), closes its
// connection (unless given one) and returns nil.
func (s *Source) Run(ctx context.Context, a source.Admitter) error {
	if a == nil {
		return errors.New("natsjs: Run needs an Admitter, such as a *sendonce.Client")
	}
	defer s.close()
	s.log.Info("consuming", "fetchers", s.opts.Concurrency, "ack_wait", s.ackWait, "dead_letter_subject", s.opts.DeadLetterSubject)
	var wg sync.WaitGroup
	for range s.opts.Concurrency {
		wg.Go(func() { s.fetchLoop(ctx, a) })
	}
	wg.Wait()
	s.log.Info("stopped")
	return nil
}

// fetchLoop takes what is waiting without blocking, and when nothing is,
// waits up to FetchWait for one message.
func (s *Source) fetchLoop(ctx context.Context, a source.Admitter) {
	var backoff source.Backoff
	for ctx.Err() == nil {
		msgs, err := s.fetch(s.cons.FetchNoWait(s.opts.BatchSize))
		if err == nil && len(msgs) == 0 {
			msgs, err = s.fetch(s.cons.Fetch(1, jetstream.FetchMaxWait(s.opts.FetchWait)))
		}
		if len(msgs) > 0 {
			backoff.Reset()
			s.handle(ctx, a, msgs)
			continue
		}
		if err != nil && ctx.Err() == nil {
			s.counters.Errors.Add(1)
			s.log.Error("fetch failed; backing off", "err", err)
			if !backoff.Wait(ctx) {
				return
			}
		}
	}
}

func (s *Source) fetch(b jetstream.MessageBatch, err error) ([]jetstream.Msg, error) {
	if err != nil {
		return nil, err
	}
	var msgs []jetstream.Msg
	for m := range b.Messages() {
		msgs = append(msgs, m)
	}
	if err := b.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, jetstream.ErrNoMessages) {
		return msgs, err
	}
	return msgs, nil
}

// handle admits one batch and acknowledges, dead-letters or hands back
// each message.
func (s *Source) handle(ctx context.Context, a source.Admitter, msgs []jetstream.Msg) {
	lctx, stop := source.Linger(ctx, s.opts.ShutdownTimeout)
	defer stop()
	ds := make([]*source.Delivery, len(msgs))
	for i, m := range msgs {
		s.counters.Received.Add(1)
		h := m.Headers()
		hints := source.KeyHints{Attribute: h.Get(HeaderIdempotencyKey), DedupID: h.Get(jetstream.MsgIDHeader), DedupName: jetstream.MsgIDHeader}
		ds[i] = source.NewDelivery(m.Data(), hints, s.opts.Tenant, s.name)
	}
	stopProgress := s.inProgress(lctx, msgs)
	var backoff source.Backoff
	for {
		err := source.AdmitBatch(lctx, a, ds, &s.counters)
		if err == nil {
			break
		}
		s.log.Error("admission failed; the messages stay in progress and are retried", "messages", len(ds), "err", err)
		if !backoff.Wait(ctx) {
			stopProgress()
			for _, m := range msgs {
				m.Nak() // redelivered now rather than after AckWait
			}
			return
		}
	}
	stopProgress()
	for i, m := range msgs {
		switch ds[i].Outcome {
		case source.Admitted, source.Duplicate:
			if err := m.Ack(); err != nil {
				s.counters.Errors.Add(1)
				s.log.Warn("ack failed; the message will be redelivered and answered as a duplicate", "key", ds[i].Sub.Key, "err", err)
			}
		case source.Reject:
			s.deadLetter(lctx, m, ds[i].Reason)
		}
	}
}

// inProgress tells the server at half AckWait that msgs are still being
// worked on, until stop is called.
func (s *Source) inProgress(ctx context.Context, msgs []jetstream.Msg) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(s.ackWait / 2)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			for _, m := range msgs {
				if err := m.InProgress(); err != nil && ctx.Err() == nil {
					s.log.Warn("InProgress failed; the message may be redelivered, and the ledger answers it as a duplicate", "err", err)
				}
			}
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

// deadLetter publishes the message with the reason to the dead-letter
// subject (stored by its stream) and then terminates it.
func (s *Source) deadLetter(ctx context.Context, m jetstream.Msg, why error) {
	reason := source.ReasonText(why)
	meta, err := m.Metadata()
	if err != nil {
		s.counters.Errors.Add(1)
		s.log.Error("an invalid job has no JetStream metadata; left for redelivery", "err", err)
		return
	}
	out := nats.NewMsg(s.opts.DeadLetterSubject)
	for k, vs := range m.Headers() {
		if strings.HasPrefix(k, "Nats-") {
			continue // the server's own; Nats-Msg-Id is set below
		}
		for _, v := range vs {
			out.Header.Add(k, v)
		}
	}
	if id := m.Headers().Get(jetstream.MsgIDHeader); id != "" {
		out.Header.Set("Sendonce-Original-Msg-Id", id)
	}
	// A dead letter published twice (a crash between the publish and the
	// Term) is one message within the dead-letter stream's duplicate
	// window.
	out.Header.Set(jetstream.MsgIDHeader, fmt.Sprintf("sendonce-dead/%s/%d", meta.Stream, meta.Sequence.Stream))
	out.Header.Set(HeaderError, strings.ReplaceAll(reason, "\n", " "))
	out.Header.Set(HeaderSourceStream, meta.Stream)
	out.Header.Set(HeaderSourceSequence, strconv.FormatUint(meta.Sequence.Stream, 10))
	out.Data = m.Data()
	if _, err := s.js.PublishMsg(ctx, out); err != nil {
		s.counters.Errors.Add(1)
		s.log.Error("publishing an invalid job to the dead-letter subject failed; it is redelivered and retried", "subject", s.opts.DeadLetterSubject, "reason", reason, "err", err)
		m.NakWithDelay(time.Second)
		return
	}
	if s.termReason {
		err = m.TermWithReason(reason)
	} else {
		// Older servers do not take a reason with +TERM; the reason is
		// in the dead letter.
		err = m.Term()
	}
	if err != nil {
		s.counters.Errors.Add(1)
		s.log.Warn("Term of a dead-lettered job failed; it will be dead-lettered again (one message in the dead-letter stream's duplicate window)", "err", err)
		return
	}
	s.counters.DeadLettered.Add(1)
	s.log.Warn("invalid job moved to the dead-letter subject", "subject", s.opts.DeadLetterSubject, "reason", reason)
}
