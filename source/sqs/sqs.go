// Package sqs is the Amazon SQS front door: it consumes JSON jobs (see
// docs/jobs.md) from a standard or FIFO queue and admits them into the
// ledger.
//
// What it promises, for every message it receives:
//
//   - It deletes the message only after the ledger has recorded its email
//     durably, or answered that it already had it (a duplicate: the
//     redelivery SQS is allowed to make, which sendonce exists to absorb).
//   - A message that can never be admitted (not a job, an invalid field, a
//     key reused for another email) is moved to Options.DeadLetterQueueURL
//     with the reason in its sendonce_error attribute, then deleted; with no
//     such queue it is left for the queue's own redrive policy. It is never
//     retried forever and never dropped silently: New refuses a queue that
//     has neither.
//   - When the ledger cannot be reached it deletes nothing; SQS redelivers
//     after the visibility timeout and the ledger deduplicates.
//   - While a batch is being admitted it keeps the messages invisible
//     (ChangeMessageVisibilityBatch at half the visibility timeout), so a
//     slow admission does not hand them to another consumer.
//
// All the valid jobs of one ReceiveMessage batch are admitted with one
// SubmitBatch call: one durable commit for up to ten messages.
package sqs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/source"
)

// Defaults and limits of Options.
const (
	DefaultConcurrency     = 4
	DefaultWaitTime        = 20 * time.Second
	MaxWaitTime            = 20 * time.Second // SQS's limit on long polling
	DefaultMaxMessages     = 10
	MaxMessages            = 10 // SQS's limit per ReceiveMessage
	MaxVisibilityTimeout   = 12 * time.Hour
	DefaultShutdownTimeout = 30 * time.Second

	// AttrIdempotencyKey is the message attribute a producer may set to
	// give a job its idempotency key without a "key" field.
	AttrIdempotencyKey = "idempotency_key"
	// AttrError and AttrSourceQueue are set on every message moved to the
	// dead-letter queue: why, and from which queue.
	AttrError       = "sendonce_error"
	AttrSourceQueue = "sendonce_source_queue"
)

// How long a receiver waits after a failed receive or admission: doubling
// from backoffMin, so that a store outage is not answered with a receive
// storm that would push valid messages towards the redrive limit.
const (
	backoffMin = 200 * time.Millisecond
	backoffMax = 15 * time.Second
)

// maxReasonLen bounds the sendonce_error attribute.
const maxReasonLen = 4096

// Options configures a Source.
type Options struct {
	// QueueURL is the queue, as SQS returns it (GetQueueUrl). Required.
	QueueURL string
	// Tenant owns the keys of every job of this queue. Default
	// sendonce.DefaultTenant. Jobs cannot choose it.
	Tenant string
	// Concurrency is the number of receivers, each with one batch in
	// flight. Default 4.
	Concurrency int
	// WaitTime is the long-polling wait of ReceiveMessage, whole seconds
	// up to 20. Default 20s.
	WaitTime time.Duration
	// MaxMessages is the batch size of ReceiveMessage, 1 to 10. Default 10.
	MaxMessages int
	// VisibilityTimeout, when set (whole seconds, up to 12h), overrides
	// the queue's for the messages this source receives.
	VisibilityTimeout time.Duration
	// DeadLetterQueueURL receives every message that can never be
	// admitted, with the reason in the sendonce_error attribute. When
	// empty, the queue must have a RedrivePolicy.
	DeadLetterQueueURL string
	// ShutdownTimeout bounds how long the batches in flight may take to
	// finish their admission and deletes once Run's context ends; after
	// it they are abandoned undeleted, and SQS redelivers them. Default 30s.
	ShutdownTimeout time.Duration
	// AWSConfig, when set, is used instead of config.LoadDefaultConfig
	// (which reads AWS_REGION, the credentials chain and
	// AWS_ENDPOINT_URL_SQS).
	AWSConfig *aws.Config
	// Logger gets the source's logs. Default: discard.
	Logger *slog.Logger
	// Observer, when set, is called for every event, from several
	// goroutines at once; it must be fast and safe for concurrent use.
	Observer func(Event)
}

// EventKind says what happened to a message.
type EventKind string

// The events. Every received message ends in exactly one of Admitted,
// Duplicate, Conflict, Invalid and AdmitFailed; DeadLettered, Deleted and
// the failures follow.
const (
	EventReceived         EventKind = "received"
	EventAdmitted         EventKind = "admitted"  // new email, durable
	EventDuplicate        EventKind = "duplicate" // the ledger already had it
	EventConflict         EventKind = "conflict"  // key reused for another email
	EventInvalid          EventKind = "invalid"   // not a job, or an invalid field
	EventAdmitFailed      EventKind = "admit_failed"
	EventDeadLettered     EventKind = "dead_lettered" // copied to the DLQ with the reason
	EventDeadLetterFailed EventKind = "dead_letter_failed"
	EventDeleted          EventKind = "deleted"
	EventDeleteFailed     EventKind = "delete_failed"
	EventExtendFailed     EventKind = "extend_failed"
)

// Event is one step of one message, for metrics and tests.
type Event struct {
	Kind      EventKind
	MessageID string
	// Key is the idempotency key, once the job is parsed.
	Key string
	// ReceiveCount is SQS's ApproximateReceiveCount: above 1, the message
	// is a redelivery.
	ReceiveCount int
	Err          error
}

// Source consumes one SQS queue. It implements source.Source and
// source.LagReporter.
type Source struct {
	opts       Options
	client     *awssqs.Client
	log        *slog.Logger
	name       string
	queueName  string
	dlqFIFO    bool
	visibility time.Duration
	counters   source.Counters
}

var (
	_ source.Source        = (*Source)(nil)
	_ source.StatsReporter = (*Source)(nil)
	_ source.LagReporter   = (*Source)(nil)
)

// Stats are the source's counts so far. A message left for the queue's
// redrive policy is not counted as dead-lettered: SQS moves it later.
func (s *Source) Stats() source.Stats { return s.counters.Snapshot() }

func (o *Options) validate() error {
	if o.QueueURL == "" {
		return errors.New("sqs: Options.QueueURL is required; give the queue URL as `aws sqs get-queue-url` prints it")
	}
	if _, err := queueName(o.QueueURL); err != nil {
		return fmt.Errorf("sqs: Options.QueueURL: %w", err)
	}
	if o.DeadLetterQueueURL != "" {
		if _, err := queueName(o.DeadLetterQueueURL); err != nil {
			return fmt.Errorf("sqs: Options.DeadLetterQueueURL: %w", err)
		}
		if o.DeadLetterQueueURL == o.QueueURL {
			return errors.New("sqs: Options.DeadLetterQueueURL is the queue itself; invalid jobs would come back forever. Use a separate queue")
		}
	}
	if o.Concurrency < 0 {
		return fmt.Errorf("sqs: Options.Concurrency is %d; use a positive number of receivers or 0 for %d", o.Concurrency, DefaultConcurrency)
	}
	if o.WaitTime < 0 || o.WaitTime > MaxWaitTime || o.WaitTime%time.Second != 0 {
		return fmt.Errorf("sqs: Options.WaitTime is %v; use whole seconds from 1s to %v, or 0 for %v", o.WaitTime, MaxWaitTime, DefaultWaitTime)
	}
	if o.MaxMessages < 0 || o.MaxMessages > MaxMessages {
		return fmt.Errorf("sqs: Options.MaxMessages is %d; use 1 to %d, or 0 for %d", o.MaxMessages, MaxMessages, DefaultMaxMessages)
	}
	if o.VisibilityTimeout < 0 || o.VisibilityTimeout > MaxVisibilityTimeout || o.VisibilityTimeout%time.Second != 0 {
		return fmt.Errorf("sqs: Options.VisibilityTimeout is %v; use whole seconds up to %v, or 0 for the queue's own", o.VisibilityTimeout, MaxVisibilityTimeout)
	}
	if o.ShutdownTimeout < 0 {
		return fmt.Errorf("sqs: Options.ShutdownTimeout is %v; use a positive duration or 0 for %v", o.ShutdownTimeout, DefaultShutdownTimeout)
	}
	return nil
}

func (o *Options) withDefaults() {
	if o.Tenant == "" {
		o.Tenant = sendonce.DefaultTenant
	}
	if o.Concurrency == 0 {
		o.Concurrency = DefaultConcurrency
	}
	if o.WaitTime == 0 {
		o.WaitTime = DefaultWaitTime
	}
	if o.MaxMessages == 0 {
		o.MaxMessages = DefaultMaxMessages
	}
	if o.ShutdownTimeout == 0 {
		o.ShutdownTimeout = DefaultShutdownTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// queueName is the last path segment of a queue URL.
func queueName(u string) (string, error) {
	p, err := url.Parse(u)
	if err != nil || p.Scheme == "" || p.Host == "" {
		return "", fmt.Errorf("%q is not a queue URL; give it as SQS returns it, like https://sqs.us-east-1.amazonaws.com/123456789012/emails", u)
	}
	name := p.Path[strings.LastIndexByte(p.Path, '/')+1:]
	if name == "" {
		return "", fmt.Errorf("%q has no queue name in its path; give it as SQS returns it, like https://sqs.us-east-1.amazonaws.com/123456789012/emails", u)
	}
	return name, nil
}

// New checks the options and the queue and returns a Source. It refuses a
// queue from which an invalid job could not go anywhere: one with no
// RedrivePolicy when Options.DeadLetterQueueURL is empty.
func New(ctx context.Context, o Options) (*Source, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	o.withDefaults()
	var cfg aws.Config
	if o.AWSConfig != nil {
		cfg = *o.AWSConfig
	} else {
		var err error
		if cfg, err = config.LoadDefaultConfig(ctx); err != nil {
			return nil, fmt.Errorf("sqs: load the AWS configuration: %w", err)
		}
	}
	s := &Source{opts: o, client: awssqs.NewFromConfig(cfg), log: o.Logger}
	s.queueName, _ = queueName(o.QueueURL) // validated above
	s.name = "sqs:" + s.queueName
	s.log = s.log.With("source", s.name)

	attrs, err := s.client.GetQueueAttributes(ctx, &awssqs.GetQueueAttributesInput{
		QueueUrl: aws.String(o.QueueURL),
		AttributeNames: []types.QueueAttributeName{
			types.QueueAttributeNameRedrivePolicy, types.QueueAttributeNameVisibilityTimeout,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("sqs: read the attributes of queue %s (Options.QueueURL): %w", o.QueueURL, err)
	}
	if o.DeadLetterQueueURL == "" && attrs.Attributes[string(types.QueueAttributeNameRedrivePolicy)] == "" {
		return nil, fmt.Errorf("sqs: queue %s has no RedrivePolicy and Options.DeadLetterQueueURL is empty, so a message that is not a valid job would be received again forever; "+
			"either set Options.DeadLetterQueueURL (sendonce then moves invalid jobs there with the reason in the %s attribute), "+
			"or give the queue a redrive policy to a dead-letter queue (aws sqs set-queue-attributes --attributes RedrivePolicy='{\"deadLetterTargetArn\":\"<dlq arn>\",\"maxReceiveCount\":\"5\"}')",
			o.QueueURL, AttrError)
	}
	s.visibility = o.VisibilityTimeout
	if s.visibility == 0 {
		secs, err := strconv.Atoi(attrs.Attributes[string(types.QueueAttributeNameVisibilityTimeout)])
		if err != nil {
			return nil, fmt.Errorf("sqs: queue %s reports no VisibilityTimeout (%v); set Options.VisibilityTimeout", o.QueueURL, err)
		}
		s.visibility = time.Duration(secs) * time.Second
	}
	if o.DeadLetterQueueURL != "" {
		// Fail now, not at the first invalid job, if the DLQ is wrong.
		if _, err := s.client.GetQueueAttributes(ctx, &awssqs.GetQueueAttributesInput{
			QueueUrl:       aws.String(o.DeadLetterQueueURL),
			AttributeNames: []types.QueueAttributeName{types.QueueAttributeNameQueueArn},
		}); err != nil {
			return nil, fmt.Errorf("sqs: read the dead-letter queue %s (Options.DeadLetterQueueURL): %w", o.DeadLetterQueueURL, err)
		}
		dlqName, _ := queueName(o.DeadLetterQueueURL)
		s.dlqFIFO = strings.HasSuffix(dlqName, ".fifo")
	}
	return s, nil
}

// Name is "sqs:" and the queue's name.
// Lag reads the queue's ApproximateNumberOfMessages (waiting) and
// ApproximateNumberOfMessagesNotVisible (received, not yet deleted): one
// GetQueueAttributes call. SQS says both are approximate.
func (s *Source) Lag(ctx context.Context) (source.Lag, error) {
	out, err := s.client.GetQueueAttributes(ctx, &awssqs.GetQueueAttributesInput{
		QueueUrl: aws.String(s.opts.QueueURL),
		AttributeNames: []types.QueueAttributeName{
			types.QueueAttributeNameApproximateNumberOfMessages, types.QueueAttributeNameApproximateNumberOfMessagesNotVisible,
		},
	})
	if err != nil {
		return source.Lag{}, fmt.Errorf("sqs: attributes of %s: %w", s.opts.QueueURL, err)
	}
	var lag source.Lag
	for name, n := range map[types.QueueAttributeName]*int64{
		types.QueueAttributeNameApproximateNumberOfMessages:           &lag.Waiting,
		types.QueueAttributeNameApproximateNumberOfMessagesNotVisible: &lag.Unacked,
	} {
		if *n, err = strconv.ParseInt(out.Attributes[string(name)], 10, 64); err != nil {
			return source.Lag{}, fmt.Errorf("sqs: attribute %s of %s is %q: %w", name, s.opts.QueueURL, out.Attributes[string(name)], err)
		}
	}
	return lag, nil
}

func (s *Source) Name() string { return s.name }

// Run receives with Options.Concurrency receivers until ctx ends, then
// lets the batches in flight finish (see Options.ShutdownTimeout) and
// returns nil.
func (s *Source) Run(ctx context.Context, a source.Admitter) error {
	if a == nil {
		return errors.New("sqs: Run needs an Admitter, such as a *sendonce.Client")
	}
	s.log.Info("consuming", "queue", s.opts.QueueURL, "receivers", s.opts.Concurrency, "visibility_timeout", s.visibility, "dead_letter_queue", s.opts.DeadLetterQueueURL)
	var wg sync.WaitGroup
	for range s.opts.Concurrency {
		wg.Go(func() { s.receive(ctx, a) })
	}
	wg.Wait()
	s.log.Info("stopped")
	return nil
}

// receive is one receiver: one batch in flight at a time.
func (s *Source) receive(ctx context.Context, a source.Admitter) {
	in := &awssqs.ReceiveMessageInput{
		QueueUrl:                    aws.String(s.opts.QueueURL),
		MaxNumberOfMessages:         int32(s.opts.MaxMessages),
		WaitTimeSeconds:             int32(s.opts.WaitTime / time.Second),
		MessageAttributeNames:       []string{"All"},
		MessageSystemAttributeNames: []types.MessageSystemAttributeName{types.MessageSystemAttributeNameAll},
	}
	if s.opts.VisibilityTimeout > 0 {
		in.VisibilityTimeout = int32(s.opts.VisibilityTimeout / time.Second)
	}
	var backoff time.Duration
	for ctx.Err() == nil {
		out, err := s.client.ReceiveMessage(ctx, in)
		if err != nil {
			if ctx.Err() != nil {
				// Messages a cancelled receive may have taken reappear
				// after the visibility timeout: nothing is lost.
				return
			}
			s.log.Error("receive failed; backing off", "err", err, "backoff", nextBackoff(backoff))
			if !wait(ctx, &backoff) {
				return
			}
			continue
		}
		if len(out.Messages) == 0 {
			continue
		}
		if s.handle(ctx, a, out.Messages) {
			backoff = 0
		} else if !wait(ctx, &backoff) {
			return
		}
	}
}

func nextBackoff(b time.Duration) time.Duration {
	return min(max(2*b, backoffMin), backoffMax)
}

// wait backs off; false when ctx ended first.
func wait(ctx context.Context, b *time.Duration) bool {
	*b = nextBackoff(*b)
	t := time.NewTimer(*b)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// message is one received message on its way through a batch.
type message struct {
	m            types.Message
	id           string
	receiveCount int
	sub          sendonce.Submission
	reason       error // why it can never be admitted; nil while valid
	deletable    bool  // admitted (new or duplicate) or dead-lettered
}

func (s *Source) emit(m *message, kind EventKind, err error) {
	switch kind {
	case EventReceived:
		s.counters.Received.Add(1)
	case EventAdmitted:
		s.counters.Admitted.Add(1)
	case EventDuplicate:
		s.counters.Duplicates.Add(1)
	case EventDeadLettered:
		s.counters.DeadLettered.Add(1)
	case EventAdmitFailed, EventDeadLetterFailed, EventDeleteFailed, EventExtendFailed:
		s.counters.Errors.Add(1)
	}
	if s.opts.Observer != nil {
		s.opts.Observer(Event{Kind: kind, MessageID: m.id, Key: m.sub.Key, ReceiveCount: m.receiveCount, Err: err})
	}
}

// handle admits one received batch and deletes what may be deleted. It
// returns false when the ledger could not be reached.
//
// Its SQS and ledger calls use a context that ctx's cancellation does not
// reach for Options.ShutdownTimeout: a batch in flight at shutdown still
// finishes, so its messages are not redelivered needlessly; when the time
// is up the calls are cancelled, and what is not durable is not deleted.
func (s *Source) handle(ctx context.Context, a source.Admitter, batch []types.Message) bool {
	hctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var (
		mu    sync.Mutex
		grace *time.Timer
	)
	stopGrace := context.AfterFunc(ctx, func() {
		mu.Lock()
		grace = time.AfterFunc(s.opts.ShutdownTimeout, cancel)
		mu.Unlock()
	})
	defer func() {
		stopGrace()
		mu.Lock()
		if grace != nil {
			grace.Stop()
		}
		mu.Unlock()
		cancel()
	}()

	msgs := make([]*message, len(batch))
	for i, bm := range batch {
		m := &message{m: bm, id: aws.ToString(bm.MessageId)}
		m.receiveCount, _ = strconv.Atoi(bm.Attributes[string(types.MessageSystemAttributeNameApproximateReceiveCount)])
		hints := source.KeyHints{
			DedupID:   bm.Attributes[string(types.MessageSystemAttributeNameMessageDeduplicationId)],
			DedupName: "MessageDeduplicationId",
		}
		if av, ok := bm.MessageAttributes[AttrIdempotencyKey]; ok {
			hints.Attribute = aws.ToString(av.StringValue)
		}
		m.sub, m.reason = source.ParseJob([]byte(aws.ToString(bm.Body)), hints)
		m.sub.Tenant = s.opts.Tenant
		m.sub.Source = s.name
		msgs[i] = m
		s.emit(m, EventReceived, nil)
		if m.reason != nil {
			s.emit(m, EventInvalid, m.reason)
		}
		if m.receiveCount > 1 {
			s.log.Debug("redelivered", "message_id", m.id, "key", m.sub.Key, "receive_count", m.receiveCount)
		}
	}

	stopExtending := s.keepInvisible(hctx, msgs)
	admitted := s.admit(hctx, a, msgs)
	s.deadLetter(hctx, msgs)
	stopExtending()
	s.delete(hctx, msgs)
	return admitted
}

// admit submits the valid messages in one SubmitBatch: one durable commit.
func (s *Source) admit(ctx context.Context, a source.Admitter, msgs []*message) bool {
	var valid []*message
	var subs []sendonce.Submission
	for _, m := range msgs {
		if m.reason == nil {
			valid = append(valid, m)
			subs = append(subs, m.sub)
		}
	}
	if len(valid) == 0 {
		return true
	}
	res, err := a.SubmitBatch(ctx, subs)
	if err == nil && len(res) != len(subs) {
		err = fmt.Errorf("the admitter answered %d results for %d submissions", len(res), len(subs))
	}
	if err != nil {
		// Nothing is known to be durable: delete nothing. SQS redelivers
		// after the visibility timeout, and if the commit did happen the
		// ledger answers the redelivery as a duplicate.
		s.log.Error("admission failed; the batch is left on the queue for redelivery", "messages", len(valid), "err", err)
		for _, m := range valid {
			s.emit(m, EventAdmitFailed, err)
		}
		return false
	}
	for i, m := range valid {
		r := res[i]
		switch {
		case r.Err == nil && r.Duplicate:
			m.deletable = true
			s.log.Info("duplicate suppressed", "message_id", m.id, "key", m.sub.Key, "receive_count", m.receiveCount, "duplicates", r.Record.Duplicates)
			s.emit(m, EventDuplicate, nil)
		case r.Err == nil:
			m.deletable = true
			s.emit(m, EventAdmitted, nil)
		case errors.Is(r.Err, sendonce.ErrKeyReused):
			// A permanent answer: the key names another email. Deleting
			// it would lose the producer's mistake; keeping it would
			// retry it forever.
			m.reason = fmt.Errorf("%w: the key %q is already the key of a different email (message %s), which is kept; give this job its own key", sendonce.ErrKeyReused, m.sub.Key, r.Record.MessageID)
			s.emit(m, EventConflict, m.reason)
		default:
			// Per-item errors are about the item itself (an invalid
			// field, too large): SubmitBatch reports an unreachable
			// store as the batch's error, never per item.
			m.reason = r.Err
			s.emit(m, EventInvalid, r.Err)
		}
	}
	return true
}

// deadLetter moves every message that can never be admitted to the
// dead-letter queue with the reason, or, without one, leaves it for the
// queue's redrive policy.
func (s *Source) deadLetter(ctx context.Context, msgs []*message) {
	for _, m := range msgs {
		if m.reason == nil {
			continue
		}
		reason := m.reason.Error()
		if len(reason) > maxReasonLen {
			reason = reason[:maxReasonLen]
		}
		if s.opts.DeadLetterQueueURL == "" {
			s.log.Warn("invalid job left for the queue's redrive policy", "message_id", m.id, "receive_count", m.receiveCount, "reason", reason)
			continue
		}
		in := &awssqs.SendMessageInput{
			QueueUrl:          aws.String(s.opts.DeadLetterQueueURL),
			MessageBody:       m.m.Body,
			MessageAttributes: s.deadLetterAttributes(m, reason),
		}
		if s.dlqFIFO {
			group := m.m.Attributes[string(types.MessageSystemAttributeNameMessageGroupId)]
			if group == "" {
				group = "sendonce-dead-letters"
			}
			in.MessageGroupId = aws.String(group)
			// The original's ID: a DLQ send repeated after a crash is
			// then one message.
			in.MessageDeduplicationId = aws.String(m.id)
		}
		if _, err := s.client.SendMessage(ctx, in); err != nil {
			s.log.Error("moving an invalid job to the dead-letter queue failed; it stays on the queue and is retried", "message_id", m.id, "reason", reason, "err", err)
			s.emit(m, EventDeadLetterFailed, err)
			continue
		}
		m.deletable = true
		s.log.Warn("invalid job moved to the dead-letter queue", "message_id", m.id, "dead_letter_queue", s.opts.DeadLetterQueueURL, "reason", reason)
		s.emit(m, EventDeadLettered, m.reason)
	}
}

// deadLetterAttributes are the original's attributes, so that the job can
// be replayed as it was, plus the reason and the source queue. SQS allows
// ten attributes; originals that do not fit beside ours are left out.
func (s *Source) deadLetterAttributes(m *message, reason string) map[string]types.MessageAttributeValue {
	out := map[string]types.MessageAttributeValue{
		AttrError:       {DataType: aws.String("String"), StringValue: aws.String(reason)},
		AttrSourceQueue: {DataType: aws.String("String"), StringValue: aws.String(s.opts.QueueURL)},
	}
	if len(m.m.MessageAttributes)+len(out) <= 10 {
		for k, v := range m.m.MessageAttributes {
			if k != AttrError && k != AttrSourceQueue {
				out[k] = types.MessageAttributeValue{DataType: v.DataType, StringValue: v.StringValue, BinaryValue: v.BinaryValue}
			}
		}
	}
	return out
}

// keepInvisible extends the visibility of msgs at half the visibility
// timeout until the returned stop is called, so that a slow admission
// does not let SQS hand the batch to another consumer.
func (s *Source) keepInvisible(ctx context.Context, msgs []*message) (stop func()) {
	if s.visibility < 2*time.Second {
		return func() {} // too short to extend in time; the ledger still dedups
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(s.visibility / 2)
		defer t.Stop()
		entries := make([]types.ChangeMessageVisibilityBatchRequestEntry, len(msgs))
		for i, m := range msgs {
			entries[i] = types.ChangeMessageVisibilityBatchRequestEntry{
				Id:                aws.String(strconv.Itoa(i)),
				ReceiptHandle:     m.m.ReceiptHandle,
				VisibilityTimeout: int32(s.visibility / time.Second),
			}
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			out, err := s.client.ChangeMessageVisibilityBatch(ctx, &awssqs.ChangeMessageVisibilityBatchInput{
				QueueUrl: aws.String(s.opts.QueueURL),
				Entries:  entries,
			})
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				// The batch may now be handed to another consumer too;
				// the ledger answers whichever admits second as a
				// duplicate.
				s.log.Warn("extending the visibility failed; the batch may be redelivered", "messages", len(msgs), "err", err)
				for _, m := range msgs {
					s.emit(m, EventExtendFailed, err)
				}
				continue
			}
			for _, f := range out.Failed {
				i, _ := strconv.Atoi(aws.ToString(f.Id))
				if i >= 0 && i < len(msgs) {
					err := fmt.Errorf("%s: %s", aws.ToString(f.Code), aws.ToString(f.Message))
					s.log.Warn("extending the visibility failed; the message may be redelivered", "message_id", msgs[i].id, "err", err)
					s.emit(msgs[i], EventExtendFailed, err)
				}
			}
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

// delete deletes the admitted and dead-lettered messages in one call. A
// failed delete only means a redelivery, which the ledger answers as a
// duplicate.
func (s *Source) delete(ctx context.Context, msgs []*message) {
	var entries []types.DeleteMessageBatchRequestEntry
	idx := map[string]*message{}
	for i, m := range msgs {
		if !m.deletable {
			continue
		}
		id := strconv.Itoa(i)
		idx[id] = m
		entries = append(entries, types.DeleteMessageBatchRequestEntry{Id: aws.String(id), ReceiptHandle: m.m.ReceiptHandle})
	}
	if len(entries) == 0 {
		return
	}
	out, err := s.client.DeleteMessageBatch(ctx, &awssqs.DeleteMessageBatchInput{QueueUrl: aws.String(s.opts.QueueURL), Entries: entries})
	if err != nil {
		s.log.Warn("delete failed; the admitted messages will be redelivered and answered as duplicates", "messages", len(entries), "err", err)
		for _, m := range idx {
			s.emit(m, EventDeleteFailed, err)
		}
		return
	}
	for _, f := range out.Failed {
		if m := idx[aws.ToString(f.Id)]; m != nil {
			err := fmt.Errorf("%s: %s", aws.ToString(f.Code), aws.ToString(f.Message))
			s.log.Warn("delete failed; the message will be redelivered and answered as a duplicate", "message_id", m.id, "err", err)
			s.emit(m, EventDeleteFailed, err)
			delete(idx, aws.ToString(f.Id))
		}
	}
	for _, m := range idx {
		s.emit(m, EventDeleted, nil)
	}
}
