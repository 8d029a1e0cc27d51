// Package amqp is the RabbitMQ (AMQP 0-9-1) front door: it consumes JSON
// jobs (see docs/jobs.md) from a queue and admits them into the ledger.
//
// What it promises, for every message it is delivered:
//
//   - It acknowledges the message (basic.ack) only after the ledger has
//     recorded its email durably, or answered that it already had it.
//     Deliveries are acknowledged manually; a prefetch limit (basic.qos)
//     bounds how many are unacknowledged at once.
//   - A message that can never be admitted (not a job, an invalid field, a
//     key reused for another email) is published to
//     Options.DeadLetterExchange with the reason in its sendonce_error
//     header (persistent, mandatory, with a publisher confirm), and only
//     then acknowledged. It is never requeued forever and never dropped
//     silently: New refuses a source with no dead-letter exchange unless
//     Options.RejectWithoutDeadLetterExchange says that rejecting to the
//     queue's own x-dead-letter-exchange (or dropping) is intended.
//   - When the ledger cannot be reached it acknowledges nothing: the
//     deliveries stay with this consumer, retried with backoff, and go back
//     to the queue if the consumer stops or its connection is lost.
//   - When the broker or the connection goes away it reconnects with
//     exponential backoff (amqp091 has no reconnection of its own); the
//     broker has then requeued every unacknowledged delivery, and the
//     ledger answers those already admitted as duplicates.
package amqp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/source"
)

// Headers.
const (
	// HeaderIdempotencyKey is the header a producer may set to give a job
	// its idempotency key without a "key" field (before message_id).
	HeaderIdempotencyKey = "idempotency_key"
	// HeaderError and HeaderSourceQueue are set on every dead letter: why,
	// and from which queue.
	HeaderError       = "sendonce_error"
	HeaderSourceQueue = "sendonce_source_queue"
)

// Defaults of Options.
const (
	DefaultPrefetch        = 50
	DefaultConcurrency     = 4
	DefaultBatchSize       = 10
	DefaultBatchWait       = 5 * time.Millisecond
	DefaultReconnectMax    = 30 * time.Second
	DefaultShutdownTimeout = 30 * time.Second
	reconnectMin           = 100 * time.Millisecond
)

// Options configures a Source.
type Options struct {
	// URL is the broker, amqp://user:password@host:5672/vhost or amqps://.
	// Required.
	URL string
	// Queue is the queue to consume. It must exist (declared by the
	// producers or the operator, durable). Required.
	Queue string
	// Tenant owns the keys of every job of this queue. Default
	// sendonce.DefaultTenant. Jobs cannot choose it.
	Tenant string
	// Prefetch is the basic.qos prefetch count: how many deliveries may
	// be unacknowledged at once. Default 50.
	Prefetch int
	// Concurrency is the number of workers, each admitting one batch at a
	// time. Default 4.
	Concurrency int
	// BatchSize is how many deliveries one worker admits with one
	// durable commit. Default 10.
	BatchSize int
	// BatchWait is how long a worker waits, after a first delivery, for
	// more to fill its batch: fewer commits under load, at most this much
	// added latency. Default 5ms; negative for none.
	BatchWait time.Duration
	// DeadLetterExchange receives, with the reason, every message that
	// can never be admitted. Give the queue the same exchange as its
	// x-dead-letter-exchange argument, so that messages rejected or
	// expired by other means land beside them. It must exist.
	DeadLetterExchange string
	// DeadLetterRoutingKey routes the dead letters; default each
	// message's own routing key (as RabbitMQ's own dead-lettering does).
	DeadLetterRoutingKey string
	// RejectWithoutDeadLetterExchange, with no DeadLetterExchange,
	// rejects invalid jobs with basic.nack(requeue=false): the broker
	// moves them to the queue's x-dead-letter-exchange if it has one, and
	// drops them otherwise; the reason is only in sendonce's log.
	RejectWithoutDeadLetterExchange bool
	// ReconnectMax caps the backoff between reconnection attempts,
	// which doubles from 100ms. Default 30s.
	ReconnectMax time.Duration
	// ShutdownTimeout bounds how long the batches in flight may take to
	// finish once Run's context ends; after it they are abandoned
	// unacknowledged, and the broker requeues them. Default 30s.
	ShutdownTimeout time.Duration
	// Dial, when set, opens the TCP connections (a proxy, a test).
	Dial func(network, addr string) (net.Conn, error)
	// Logger gets the source's logs. Default: discard.
	Logger *slog.Logger
}

// Source consumes one queue. It implements source.Source and
// source.StatsReporter.
type Source struct {
	opts     Options
	log      *slog.Logger
	name     string
	counters source.Counters
	tagSeq   atomic.Int64
	live     atomic.Pointer[amqp091.Connection] // the consuming session's, for Lag
}

var (
	_ source.Source        = (*Source)(nil)
	_ source.StatsReporter = (*Source)(nil)
	_ source.LagReporter   = (*Source)(nil)
)

func (o *Options) validate() error {
	if o.URL == "" {
		return errors.New("amqp: Options.URL is required; give the broker as amqp://user:password@host:5672/vhost")
	}
	if _, err := amqp091.ParseURI(o.URL); err != nil {
		return fmt.Errorf("amqp: Options.URL: %v; give it as amqp://user:password@host:5672/vhost", err)
	}
	if o.Queue == "" {
		return errors.New("amqp: Options.Queue is required; name the queue the producers publish jobs to")
	}
	if o.DeadLetterExchange == "" && !o.RejectWithoutDeadLetterExchange {
		return fmt.Errorf("amqp: queue %s: Options.DeadLetterExchange is empty, so a message that is not a valid job would have nowhere to go with its reason; "+
			"declare a dead-letter exchange (and a queue bound to it), give it as DeadLetterExchange (sendonce publishes invalid jobs there with the reason in the %s header), "+
			"and give the queue the same x-dead-letter-exchange argument; or set RejectWithoutDeadLetterExchange to reject them to the queue's own x-dead-letter-exchange (dropped if it has none)",
			o.Queue, HeaderError)
	}
	if err := source.CheckCounts("amqp", map[string]int{"Prefetch": o.Prefetch, "Concurrency": o.Concurrency, "BatchSize": o.BatchSize}); err != nil {
		return err
	}
	if o.Prefetch > 65535 {
		return fmt.Errorf("amqp: Options.Prefetch is %d; AMQP allows at most 65535", o.Prefetch)
	}
	if err := source.CheckDurations("amqp", map[string]time.Duration{"ReconnectMax": o.ReconnectMax, "ShutdownTimeout": o.ShutdownTimeout}); err != nil {
		return err
	}
	return nil
}

func (o *Options) withDefaults() {
	if o.Tenant == "" {
		o.Tenant = sendonce.DefaultTenant
	}
	if o.Prefetch == 0 {
		o.Prefetch = DefaultPrefetch
	}
	if o.Concurrency == 0 {
		o.Concurrency = DefaultConcurrency
	}
	if o.BatchSize == 0 {
		o.BatchSize = DefaultBatchSize
	}
	if o.BatchSize > o.Prefetch {
		o.BatchSize = o.Prefetch
	}
	if o.BatchWait == 0 {
		o.BatchWait = DefaultBatchWait
	}
	if o.ReconnectMax == 0 {
		o.ReconnectMax = DefaultReconnectMax
	}
	if o.ShutdownTimeout == 0 {
		o.ShutdownTimeout = DefaultShutdownTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// New checks the options, and connects once to check that the queue and
// the dead-letter exchange exist.
func New(ctx context.Context, o Options) (*Source, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	o.withDefaults()
	s := &Source{opts: o, name: "amqp:" + o.Queue}
	s.log = o.Logger.With("source", s.name)
	conn, err := s.dial()
	if err != nil {
		return nil, fmt.Errorf("amqp: connect to %s (Options.URL): %w", redact(o.URL), err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("amqp: open a channel: %w", err)
	}
	if _, err := ch.QueueDeclarePassive(o.Queue, true, false, false, false, nil); err != nil {
		return nil, fmt.Errorf("amqp: queue %s (Options.Queue) cannot be consumed: %w; declare it (durable, with x-dead-letter-exchange) before starting sendonce", o.Queue, err)
	}
	if o.DeadLetterExchange != "" {
		if ch, err = conn.Channel(); err != nil { // a failed passive declare closed the first
			return nil, fmt.Errorf("amqp: open a channel: %w", err)
		}
		if err := ch.ExchangeDeclarePassive(o.DeadLetterExchange, "", true, false, false, false, nil); err != nil {
			return nil, fmt.Errorf("amqp: dead-letter exchange %s (Options.DeadLetterExchange) does not exist: %w; declare it and bind a queue to it", o.DeadLetterExchange, err)
		}
	}
	return s, nil
}

func redact(raw string) string {
	if u, err := url.Parse(raw); err == nil {
		return u.Redacted()
	}
	return "(unparsable URL)"
}

func (s *Source) dial() (*amqp091.Connection, error) {
	cfg := amqp091.Config{
		Heartbeat:  10 * time.Second,
		Properties: amqp091.Table{"connection_name": "sendonce " + s.name},
		Dial:       s.opts.Dial,
	}
	if cfg.Dial == nil {
		cfg.Dial = amqp091.DefaultDial(30 * time.Second)
	}
	return amqp091.DialConfig(s.opts.URL, cfg)
}

// Name is "amqp:" and the queue's name.
func (s *Source) Name() string { return s.name }

// Stats are the source's counts so far.
func (s *Source) Stats() source.Stats { return s.counters.Snapshot() }

// Run consumes until ctx ends, reconnecting whenever the connection is
// lost, then lets the batches in flight finish (see
// Options.ShutdownTimeout) and returns nil.
func (s *Source) Run(ctx context.Context, a source.Admitter) error {
	if a == nil {
		return errors.New("amqp: Run needs an Admitter, such as a *sendonce.Client")
	}
	s.log.Info("consuming", "prefetch", s.opts.Prefetch, "workers", s.opts.Concurrency, "dead_letter_exchange", s.opts.DeadLetterExchange)
	backoff := source.Backoff{Min: reconnectMin, Max: s.opts.ReconnectMax}
	for ctx.Err() == nil {
		sess, err := s.connect()
		if err != nil {
			s.counters.Errors.Add(1)
			wait := backoff.Next()
			s.log.Error("connecting failed; retrying", "err", err, "backoff", wait)
			if !waitFor(ctx, wait) {
				break
			}
			continue
		}
		backoff.Reset()
		s.live.Store(sess.conn)
		lost := s.consume(ctx, sess, a)
		s.live.Store(nil)
		if lost != nil {
			s.counters.Errors.Add(1)
			s.log.Warn("connection lost; the broker requeues what was not acknowledged; reconnecting", "err", lost)
		}
	}
	s.log.Info("stopped")
	return nil
}

// Lag declares the queue passively on a channel of its own (on the
// consuming connection while Run has one, else on a connection made for
// the call) and reports its message count: the messages ready for
// delivery. AMQP does not tell the unacknowledged ones (only the
// management API does), so Unacked is 0. A failed declare closes only
// that channel, never the consuming one.
func (s *Source) Lag(ctx context.Context) (source.Lag, error) {
	type answer struct {
		n   int
		err error
	}
	done := make(chan answer, 1)
	go func() {
		// amqp091 takes no context: the call runs on its own and ends
		// with the connection's timeouts if ctx gives up on it first.
		n, err := s.queueCount()
		done <- answer{n, err}
	}()
	select {
	case a := <-done:
		if a.err != nil {
			return source.Lag{}, fmt.Errorf("amqp: count queue %s: %w", s.opts.Queue, a.err)
		}
		return source.Lag{Waiting: int64(a.n)}, nil
	case <-ctx.Done():
		return source.Lag{}, fmt.Errorf("amqp: count queue %s: %w", s.opts.Queue, ctx.Err())
	}
}

func (s *Source) queueCount() (int, error) {
	conn := s.live.Load()
	if conn == nil || conn.IsClosed() {
		c, err := s.dial()
		if err != nil {
			return 0, err
		}
		defer c.Close()
		conn = c
	}
	ch, err := conn.Channel()
	if err != nil {
		return 0, err
	}
	defer ch.Close()
	q, err := ch.QueueDeclarePassive(s.opts.Queue, true, false, false, false, nil)
	if err != nil {
		return 0, err
	}
	return q.Messages, nil
}

func waitFor(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// session is one connection with its consuming channel and its
// dead-letter publishing channel.
type session struct {
	conn       *amqp091.Connection
	ch         *amqp091.Channel
	tag        string
	deliveries <-chan amqp091.Delivery
	closed     chan *amqp091.Error

	pubMu   sync.Mutex
	pub     *amqp091.Channel // confirm mode
	returns chan amqp091.Return
}

func (s *Source) connect() (*session, error) {
	conn, err := s.dial()
	if err != nil {
		return nil, err
	}
	sess := &session{conn: conn, closed: conn.NotifyClose(make(chan *amqp091.Error, 1))}
	fail := func(what string, err error) (*session, error) {
		conn.Close()
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if sess.ch, err = conn.Channel(); err != nil {
		return fail("open a channel", err)
	}
	if err := sess.ch.Qos(s.opts.Prefetch, 0, false); err != nil {
		return fail("set the prefetch", err)
	}
	if s.opts.DeadLetterExchange != "" {
		if sess.pub, err = conn.Channel(); err != nil {
			return fail("open the dead-letter channel", err)
		}
		if err := sess.pub.Confirm(false); err != nil {
			return fail("put the dead-letter channel in confirm mode", err)
		}
		sess.returns = sess.pub.NotifyReturn(make(chan amqp091.Return, 1))
	}
	sess.tag = fmt.Sprintf("sendonce-%d-%d", time.Now().UnixNano(), s.tagSeq.Add(1))
	if sess.deliveries, err = sess.ch.Consume(s.opts.Queue, sess.tag, false, false, false, false, nil); err != nil {
		return fail("consume queue "+s.opts.Queue, err)
	}
	return sess, nil
}

// consume runs the workers of one session until ctx ends (nil) or the
// connection is lost (its error).
func (s *Source) consume(ctx context.Context, sess *session, a source.Admitter) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var lost error
	var lostMu sync.Mutex
	// A channel closed by the broker (a channel error) ends the session
	// as a lost connection does: the deliveries of that channel can no
	// longer be acknowledged.
	chClosed := sess.ch.NotifyClose(make(chan *amqp091.Error, 1))
	var pubClosed chan *amqp091.Error
	if sess.pub != nil {
		pubClosed = sess.pub.NotifyClose(make(chan *amqp091.Error, 1))
	}
	go func() {
		var err *amqp091.Error
		var ok bool
		select {
		case err, ok = <-sess.closed:
		case err, ok = <-chClosed:
		case err, ok = <-pubClosed:
		case <-sctx.Done():
			return
		}
		lostMu.Lock()
		if ok && err != nil {
			lost = err
		} else {
			lost = errors.New("the connection or a channel was closed")
		}
		lostMu.Unlock()
		cancel()
	}()
	var wg sync.WaitGroup
	for range s.opts.Concurrency {
		wg.Go(func() { s.work(ctx, sctx, sess, a) })
	}
	<-sctx.Done()
	if ctx.Err() != nil {
		// Shutdown: no new deliveries; the workers finish their batches.
		sess.ch.Cancel(sess.tag, false)
	}
	wg.Wait()
	// Closing requeues the deliveries prefetched and not acknowledged.
	sess.conn.Close()
	lostMu.Lock()
	defer lostMu.Unlock()
	if ctx.Err() != nil {
		return nil
	}
	return lost
}

// work takes batches of deliveries until the session ends.
func (s *Source) work(ctx, sctx context.Context, sess *session, a source.Admitter) {
	for {
		var batch []amqp091.Delivery
		select {
		case <-sctx.Done():
			return
		case d, ok := <-sess.deliveries:
			if !ok {
				return
			}
			batch = append(batch, d)
		}
		if s.opts.BatchSize > 1 && s.opts.BatchWait > 0 {
			batch = s.gather(sess, batch)
		}
		s.handle(ctx, sctx, sess, a, batch)
	}
}

// gather adds deliveries to batch until it is full or BatchWait has
// passed.
func (s *Source) gather(sess *session, batch []amqp091.Delivery) []amqp091.Delivery {
	t := time.NewTimer(s.opts.BatchWait)
	defer t.Stop()
	for len(batch) < s.opts.BatchSize {
		select {
		case d, ok := <-sess.deliveries:
			if !ok {
				return batch
			}
			batch = append(batch, d)
		case <-t.C:
			return batch
		}
	}
	return batch
}

// handle admits one batch and acknowledges, dead-letters or leaves each
// delivery. While the ledger cannot be reached it retries with backoff
// until the session ends (shutdown, or a lost connection: the broker
// then requeues the deliveries).
func (s *Source) handle(ctx, sctx context.Context, sess *session, a source.Admitter, batch []amqp091.Delivery) {
	lctx, stop := source.Linger(ctx, s.opts.ShutdownTimeout)
	defer stop()
	ds := make([]*source.Delivery, len(batch))
	for i, d := range batch {
		s.counters.Received.Add(1)
		hints := source.KeyHints{DedupID: d.MessageId, DedupName: "message_id"}
		if v, ok := d.Headers[HeaderIdempotencyKey]; ok {
			hints.Attribute = headerString(v)
		}
		ds[i] = source.NewDelivery(d.Body, hints, s.opts.Tenant, s.name)
		if d.Redelivered {
			s.log.Debug("redelivered", "delivery_tag", d.DeliveryTag, "key", ds[i].Sub.Key)
		}
	}
	backoff := source.Backoff{}
	for {
		err := source.AdmitBatch(lctx, a, ds, &s.counters)
		if err == nil {
			break
		}
		s.log.Error("admission failed; the deliveries stay unacknowledged and are retried", "deliveries", len(ds), "err", err)
		if !backoff.Wait(sctx) {
			return // unacknowledged: the broker requeues them when the channel closes
		}
	}
	for i, d := range batch {
		switch ds[i].Outcome {
		case source.Admitted, source.Duplicate:
			if err := d.Ack(false); err != nil {
				s.counters.Errors.Add(1)
				s.log.Warn("ack failed; the message will be redelivered and answered as a duplicate", "key", ds[i].Sub.Key, "err", err)
			}
		case source.Reject:
			s.deadLetter(lctx, sctx, sess, d, ds[i].Reason)
		}
	}
}

func headerString(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case []byte:
		return string(v)
	}
	return fmt.Sprint(v)
}

// deadLetter publishes the delivery with the reason to the dead-letter
// exchange and acknowledges it, or rejects it without requeue when the
// source has no dead-letter exchange.
func (s *Source) deadLetter(ctx, sctx context.Context, sess *session, d amqp091.Delivery, why error) {
	reason := source.ReasonText(why)
	if s.opts.DeadLetterExchange == "" {
		if err := d.Nack(false, false); err != nil {
			s.counters.Errors.Add(1)
			s.log.Error("rejecting an invalid job failed; it will be redelivered", "reason", reason, "err", err)
			return
		}
		s.counters.DeadLettered.Add(1)
		s.log.Warn("invalid job rejected to the queue's own dead-letter exchange, if it has one", "reason", reason)
		return
	}
	if err := s.publishDeadLetter(ctx, sess, d, reason); err != nil {
		s.counters.Errors.Add(1)
		s.log.Error("publishing an invalid job to the dead-letter exchange failed; it is requeued and retried", "exchange", s.opts.DeadLetterExchange, "reason", reason, "err", err)
		// Back off before the requeue, so that a dead-letter exchange
		// that cannot take it is not answered with a hot loop.
		var b source.Backoff
		b.Next()
		if b.Wait(sctx) {
			d.Nack(false, true)
		}
		return
	}
	if err := d.Ack(false); err != nil {
		// Redelivered, and dead-lettered a second time: the reason is the
		// same; better twice than never.
		s.counters.Errors.Add(1)
		s.log.Warn("ack of a dead-lettered job failed; it will be dead-lettered again", "err", err)
		return
	}
	s.counters.DeadLettered.Add(1)
	s.log.Warn("invalid job moved to the dead-letter exchange", "exchange", s.opts.DeadLetterExchange, "reason", reason)
}

func (s *Source) publishDeadLetter(ctx context.Context, sess *session, d amqp091.Delivery, reason string) error {
	headers := amqp091.Table{}
	for k, v := range d.Headers {
		headers[k] = v
	}
	headers[HeaderError] = reason
	headers[HeaderSourceQueue] = s.opts.Queue
	key := s.opts.DeadLetterRoutingKey
	if key == "" {
		key = d.RoutingKey
	}
	msg := amqp091.Publishing{
		Headers:         headers,
		ContentType:     d.ContentType,
		ContentEncoding: d.ContentEncoding,
		DeliveryMode:    amqp091.Persistent,
		CorrelationId:   d.CorrelationId,
		MessageId:       d.MessageId,
		Timestamp:       d.Timestamp,
		Type:            d.Type,
		AppId:           d.AppId,
		Body:            d.Body,
	}
	sess.pubMu.Lock()
	defer sess.pubMu.Unlock()
	// A return left over from an earlier publish is not this one's.
	select {
	case <-sess.returns:
	default:
	}
	dc, err := sess.pub.PublishWithDeferredConfirmWithContext(ctx, s.opts.DeadLetterExchange, key, true, false, msg)
	if err != nil {
		return err
	}
	ok, err := dc.WaitContext(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("the broker refused it (basic.nack)")
	}
	// RabbitMQ sends basic.return before the confirm of an unroutable
	// mandatory message, and the library hands it over in that order.
	select {
	case r := <-sess.returns:
		return fmt.Errorf("no queue is bound to exchange %s with routing key %q (%d %s); bind the dead-letter queue to it", s.opts.DeadLetterExchange, key, r.ReplyCode, r.ReplyText)
	default:
	}
	return nil
}
