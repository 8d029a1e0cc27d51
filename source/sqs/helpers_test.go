package sqs

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/awslocal"
	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/source/sourcetest"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// fixture is one fauxqs server and one ledger.
type fixture struct {
	t        *testing.T
	endpoint string
	sqs      *awssqs.Client
	client   *sendonce.Client
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	endpoint := awslocal.StartSQS(t)
	ctx := context.Background()
	st, err := sqlitestore.Open(ctx, t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	c, err := sendonce.New(sendonce.Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	cfg := awsConfig(endpoint, nil)
	return &fixture{t: t, endpoint: endpoint, sqs: awssqs.NewFromConfig(*cfg), client: c}
}

// awsConfig points the SDK at fauxqs with fake static credentials; hc,
// when set, carries the requests (for injecting faults).
func awsConfig(endpoint string, hc aws.HTTPClient) *aws.Config {
	cfg := &aws.Config{
		Region:       "us-east-1",
		Credentials:  credentials.NewStaticCredentialsProvider("test", "test", ""),
		BaseEndpoint: aws.String(endpoint),
	}
	if hc != nil {
		cfg.HTTPClient = hc
	}
	return cfg
}

func (f *fixture) createQueue(name string, attrs map[string]string) string {
	f.t.Helper()
	out, err := f.sqs.CreateQueue(context.Background(), &awssqs.CreateQueueInput{QueueName: aws.String(name), Attributes: attrs})
	if err != nil {
		f.t.Fatalf("create queue %s: %v", name, err)
	}
	return aws.ToString(out.QueueUrl)
}

func (f *fixture) queueARN(url string) string {
	f.t.Helper()
	out, err := f.sqs.GetQueueAttributes(context.Background(), &awssqs.GetQueueAttributesInput{
		QueueUrl: aws.String(url), AttributeNames: []types.QueueAttributeName{types.QueueAttributeNameQueueArn},
	})
	if err != nil {
		f.t.Fatal(err)
	}
	return out.Attributes[string(types.QueueAttributeNameQueueArn)]
}

// outgoing is one message a producer sends.
type outgoing struct {
	body    string
	attrs   map[string]string // String message attributes
	group   string            // FIFO MessageGroupId
	dedupID string            // FIFO MessageDeduplicationId
	id      string            // set by send: the SQS message ID
}

// send puts msgs on the queue with SendMessageBatch, ten at a time, from
// several goroutines like a fleet of producers.
func (f *fixture) send(url string, msgs []*outgoing) {
	f.t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(msgs)/10+1)
	for start := 0; start < len(msgs); start += 10 {
		chunk := msgs[start:min(start+10, len(msgs))]
		wg.Go(func() {
			entries := make([]types.SendMessageBatchRequestEntry, len(chunk))
			for i, m := range chunk {
				e := types.SendMessageBatchRequestEntry{Id: aws.String("m" + strconv.Itoa(i)), MessageBody: aws.String(m.body)}
				if len(m.attrs) > 0 {
					e.MessageAttributes = map[string]types.MessageAttributeValue{}
					for k, v := range m.attrs {
						e.MessageAttributes[k] = types.MessageAttributeValue{DataType: aws.String("String"), StringValue: aws.String(v)}
					}
				}
				if m.group != "" {
					e.MessageGroupId = aws.String(m.group)
				}
				if m.dedupID != "" {
					e.MessageDeduplicationId = aws.String(m.dedupID)
				}
				entries[i] = e
			}
			out, err := f.sqs.SendMessageBatch(context.Background(), &awssqs.SendMessageBatchInput{QueueUrl: aws.String(url), Entries: entries})
			if err != nil {
				errs <- err
				return
			}
			if len(out.Failed) > 0 {
				errs <- fmt.Errorf("send: %s: %s", aws.ToString(out.Failed[0].Code), aws.ToString(out.Failed[0].Message))
				return
			}
			for _, s := range out.Successful {
				i, _ := strconv.Atoi(aws.ToString(s.Id)[1:])
				chunk[i].id = aws.ToString(s.MessageId)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		f.t.Fatal(err)
	}
}

// depth is how many messages the queue holds: visible, in flight, delayed.
func (f *fixture) depth(url string) (visible, inFlight, delayed int, err error) {
	out, err := f.sqs.GetQueueAttributes(context.Background(), &awssqs.GetQueueAttributesInput{
		QueueUrl: aws.String(url),
		AttributeNames: []types.QueueAttributeName{
			types.QueueAttributeNameApproximateNumberOfMessages,
			types.QueueAttributeNameApproximateNumberOfMessagesNotVisible,
			types.QueueAttributeNameApproximateNumberOfMessagesDelayed,
		},
	})
	if err != nil {
		return 0, 0, 0, err
	}
	n := func(a types.QueueAttributeName) int {
		v, _ := strconv.Atoi(out.Attributes[string(a)])
		return v
	}
	return n(types.QueueAttributeNameApproximateNumberOfMessages), n(types.QueueAttributeNameApproximateNumberOfMessagesNotVisible), n(types.QueueAttributeNameApproximateNumberOfMessagesDelayed), nil
}

// waitEmpty polls the queue's counters until nothing is left in it.
func (f *fixture) waitEmpty(url string, within time.Duration) {
	f.t.Helper()
	sourcetest.Eventually(f.t, within, "the queue is empty", func() (bool, string) {
		v, nv, d, err := f.depth(url)
		return err == nil && v == 0 && nv == 0 && d == 0, fmt.Sprintf("visible %d, in flight %d, delayed %d, err %v", v, nv, d, err)
	})
}

// records lists every record of the default tenant.
func (f *fixture) records() []store.Record {
	f.t.Helper()
	var out []store.Record
	cursor := ""
	for {
		page, err := f.client.List(context.Background(), "", sendonce.ListOptions{Limit: store.MaxListLimit, Cursor: cursor})
		if err != nil {
			f.t.Fatal(err)
		}
		out = append(out, page.Records...)
		if page.Next == "" {
			return out
		}
		cursor = page.Next
	}
}

// running is a Source consuming in a goroutine.
type running struct {
	t      *testing.T
	src    *Source
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// run starts src; it is stopped at the end of the test at the latest.
func run(t *testing.T, src *Source, a source.Admitter) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{t: t, src: src, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- src.Run(ctx, a) }()
	t.Cleanup(r.stop)
	return r
}

// stop cancels Run's context and reports an error unless Run returns nil
// in time. It may be called from any goroutine.
func (r *running) stop() {
	r.once.Do(func() {
		r.cancel()
		select {
		case err := <-r.done:
			if err != nil {
				r.t.Errorf("%s: Run returned %v, want nil", r.src.Name(), err)
			}
		case <-time.After(30 * time.Second):
			r.t.Errorf("%s: Run did not return within 30s of the cancel", r.src.Name())
		}
	})
}

// tally counts a source's events.
type tally struct {
	mu          sync.Mutex
	kinds       map[EventKind]int
	received    map[string]int // message ID → times received
	redelivered int            // receives with ApproximateReceiveCount > 1
	onEvent     func(Event)
}

func newTally() *tally {
	return &tally{kinds: map[EventKind]int{}, received: map[string]int{}}
}

func (c *tally) observe(e Event) {
	c.mu.Lock()
	c.kinds[e.Kind]++
	if e.Kind == EventReceived {
		c.received[e.MessageID]++
		if e.ReceiveCount > 1 {
			c.redelivered++
		}
	}
	fn := c.onEvent
	c.mu.Unlock()
	if fn != nil {
		fn(e)
	}
}

func (c *tally) count(k EventKind) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.kinds[k]
}

func (c *tally) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return fmt.Sprintf("%v, redelivered %d", c.kinds, c.redelivered)
}

// admitFunc adapts a function to source.Admitter.
type admitFunc func(context.Context, []sendonce.Submission) ([]sendonce.BatchResult, error)

func (f admitFunc) SubmitBatch(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
	return f(ctx, subs)
}

// dropTarget is an HTTP transport that fails every SQS call of one
// action, like a network that loses them: the SDK sees a connection error.
type dropTarget struct {
	target  string // X-Amz-Target, e.g. "AmazonSQS.ChangeMessageVisibilityBatch"
	base    http.RoundTripper
	dropped atomic.Int64
}

func (d *dropTarget) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Header.Get("X-Amz-Target") == d.target {
		d.dropped.Add(1)
		return nil, errors.New("injected: connection reset")
	}
	return d.base.RoundTrip(r)
}

// uuid is a random version-4 UUID, like Celery's task IDs.
func uuid() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// testLogger shows the source's logs with -v, tagged by consumer.
func testLogger(t *testing.T, who string) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("consumer", who, "test", t.Name())
}
