package amqp

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/source/sourcetest"
)

// brokerAddr is the machine's RabbitMQ; AMQP_ADDR overrides it.
func brokerAddr() string {
	if a := os.Getenv("AMQP_ADDR"); a != "" {
		return a
	}
	return "127.0.0.1:5672"
}

func brokerURL(addr string) string { return "amqp://guest:guest@" + addr + "/" }

// needBroker connects to the machine's RabbitMQ, or skips the test loudly
// when there is none (fails under CI=true).
func needBroker(t testing.TB) *amqp091.Connection {
	t.Helper()
	conn, err := amqp091.DialConfig(brokerURL(brokerAddr()), amqp091.Config{Dial: amqp091.DefaultDial(3 * time.Second)})
	if err != nil {
		msg := fmt.Sprintf("SKIPPED: no RabbitMQ at %s (%v); start rabbitmq-server or set AMQP_ADDR", brokerAddr(), err)
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and %s", msg)
		}
		t.Skip(msg)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func unique(prefix string) string {
	var b [6]byte
	rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}

func testLogger(t testing.TB, who string) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("consumer", who, "test", t.Name())
}

// tracker dials the broker and remembers the connections, so that a test
// can cut them abruptly, as the death of the process would.
type tracker struct {
	mu    sync.Mutex
	conns []net.Conn
}

func (tr *tracker) dial(network, addr string) (net.Conn, error) {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err == nil {
		tr.mu.Lock()
		tr.conns = append(tr.conns, c)
		tr.mu.Unlock()
	}
	return c, err
}

func (tr *tracker) cut() {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, c := range tr.conns {
		c.Close()
	}
	tr.conns = nil
}

// queues is one test's queue, its dead-letter exchange and the queue
// bound to that exchange.
type queues struct {
	conn  *amqp091.Connection
	name  string
	dlx   string
	dead  string
	pubMu sync.Mutex
	pub   *amqp091.Channel
}

func newQueues(t testing.TB, conn *amqp091.Connection, name string) *queues {
	t.Helper()
	q := &queues{conn: conn, name: name, dlx: name + ".dlx", dead: name + ".dead"}
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := ch.ExchangeDeclare(q.dlx, "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(q.dead, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(q.dead, "", q.dlx, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(q.name, true, false, false, false, amqp091.Table{"x-dead-letter-exchange": q.dlx}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if ch, err := conn.Channel(); err == nil {
			ch.QueueDelete(q.name, false, false, false)
			ch.QueueDelete(q.dead, false, false, false)
			ch.ExchangeDelete(q.dlx, false, false)
			ch.Close()
		}
	})
	if q.pub, err = conn.Channel(); err != nil {
		t.Fatal(err)
	}
	if err := q.pub.Confirm(false); err != nil {
		t.Fatal(err)
	}
	return q
}

// publish sends bodies persistently, each with its message_id (when
// given), and waits for the broker's confirms.
func (q *queues) publish(t testing.TB, bodies [][]byte, ids []string) {
	t.Helper()
	q.pubMu.Lock()
	defer q.pubMu.Unlock()
	ctx := context.Background()
	dcs := make([]*amqp091.DeferredConfirmation, len(bodies))
	for i, b := range bodies {
		msg := amqp091.Publishing{DeliveryMode: amqp091.Persistent, ContentType: "application/json", Body: b}
		if ids != nil {
			msg.MessageId = ids[i]
		}
		dc, err := q.pub.PublishWithDeferredConfirmWithContext(ctx, "", q.name, true, false, msg)
		if err != nil {
			t.Fatalf("publish: %v", err)
		}
		dcs[i] = dc
	}
	for _, dc := range dcs {
		if ok, err := dc.WaitContext(ctx); err != nil || !ok {
			t.Fatalf("publish not confirmed: %v %v", ok, err)
		}
	}
}

func (q *queues) ready(t testing.TB, name string) int {
	t.Helper()
	ch, err := q.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	st, err := ch.QueueDeclarePassive(name, true, false, false, false, nil)
	if err != nil {
		t.Fatalf("queue %s: %v", name, err)
	}
	return st.Messages
}

// harness runs the conformance suite on one queue of the machine's
// RabbitMQ.
type harness struct {
	*queues
	mu       sync.Mutex
	trackers map[source.Source]*tracker
	letters  []sourcetest.DeadLetter
	n        atomic.Int64
}

func newHarness(t *testing.T) sourcetest.Harness {
	conn := needBroker(t)
	return &harness{queues: newQueues(t, conn, unique("sendonce-test")), trackers: map[source.Source]*tracker{}}
}

func (h *harness) Publish(t testing.TB, body []byte, key string) {
	var ids []string
	if key != "" {
		ids = []string{key}
	}
	h.publish(t, [][]byte{body}, ids)
}

func (h *harness) NewSource(t testing.TB) source.Source {
	t.Helper()
	tr := &tracker{}
	who := fmt.Sprintf("consumer%d", h.n.Add(1))
	s, err := New(context.Background(), Options{
		URL: brokerURL(brokerAddr()), Queue: h.name, DeadLetterExchange: h.dlx,
		Prefetch: 20, Concurrency: 2, BatchSize: 5, ShutdownTimeout: 10 * time.Second,
		Dial: tr.dial, Logger: testLogger(t, who),
	})
	if err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	h.trackers[s] = tr
	h.mu.Unlock()
	return s
}

// Crash cuts the consumer's TCP connection: the broker requeues its
// unacknowledged deliveries at once.
func (h *harness) Crash(t testing.TB, src source.Source) {
	h.mu.Lock()
	tr := h.trackers[src]
	h.mu.Unlock()
	tr.cut()
}

func (h *harness) DeadLetters(t testing.TB) []sourcetest.DeadLetter {
	t.Helper()
	ch, err := h.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	h.mu.Lock()
	defer h.mu.Unlock()
	for {
		d, ok, err := ch.Get(h.dead, true)
		if err != nil {
			t.Fatalf("basic.get %s: %v", h.dead, err)
		}
		if !ok {
			break
		}
		if q := headerString(d.Headers[HeaderSourceQueue]); q != h.name {
			t.Errorf("dead letter has %s %q, want %q", HeaderSourceQueue, q, h.name)
		}
		h.letters = append(h.letters, sourcetest.DeadLetter{Body: d.Body, Reason: headerString(d.Headers[HeaderError])})
	}
	return append([]sourcetest.DeadLetter(nil), h.letters...)
}

func (h *harness) Outstanding(t testing.TB) int { return h.ready(t, h.name) }

func TestConformance(t *testing.T) {
	t.Parallel()
	sourcetest.Run(t, newHarness)
}

// proxy is a TCP proxy on 127.0.0.1 to the broker that a test can cut
// (every connection through it closed, new ones refused) and restore:
// to the consumer, the broker went away and came back.
type proxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	down   bool
	conns  map[net.Conn]bool
	cuts   int
	wg     sync.WaitGroup
	closed atomic.Bool
}

func startProxy(t testing.TB, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, conns: map[net.Conn]bool{}}
	p.wg.Go(p.serve)
	t.Cleanup(func() {
		p.closed.Store(true)
		ln.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.down {
			p.mu.Unlock()
			c.Close()
			continue
		}
		up, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns[c], p.conns[up] = true, true
		p.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			io.Copy(dst, src)
			dst.Close()
			src.Close()
		}
		p.wg.Go(func() { pipe(up, c) })
		p.wg.Go(func() { pipe(c, up) })
	}
}

// cut closes every connection and refuses new ones until restore.
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	p.cuts++
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
}

func (p *proxy) restore() {
	p.mu.Lock()
	p.down = false
	p.mu.Unlock()
}

// TestBrokerGoesAwayMidRun: 10,000 jobs; twice in the middle of the run
// the broker goes away for the consumer (every connection cut, new ones
// refused for a while, through a proxy the test controls) and comes back.
// The source reconnects with backoff; the broker requeues what was not
// acknowledged; the ledger answers what was already admitted as a
// duplicate. Every job is one email: 10,000 records, the queue empty.
func TestBrokerGoesAwayMidRun(t *testing.T) {
	t.Parallel()
	conn := needBroker(t)
	q := newQueues(t, conn, unique("sendonce-test-restart"))
	p := startProxy(t, brokerAddr())
	runThroughOutages(t, q, p.addr(), func(noticed func()) {
		p.cut()
		noticed() // down until the source has failed to come back at least once
		p.restore()
	}, func() *amqp091.Connection { return conn })
}

// TestBrokerRestartMidRun: the same 10,000 jobs on a RabbitMQ node of the
// test's own, which is killed with SIGKILL twice in the middle of the run
// and started again on the same data: the durable queue and its
// persistent, confirmed messages come back from disk, the source
// reconnects, and every job is one email.
func TestBrokerRestartMidRun(t *testing.T) {
	t.Parallel()
	b := startPrivateBroker(t)
	conn := b.dial(t)
	q := newQueues(t, conn, unique("sendonce-test-kill"))
	runThroughOutages(t, q, b.addr, func(noticed func()) {
		b.kill(t)
		noticed()
		b.start(t)
	}, func() *amqp091.Connection { return b.dial(t) })
}

// runThroughOutages publishes 10,000 jobs, consumes them through a source
// connected to addr, and calls outage at 3,000 and 7,000 records with a
// function that waits until the source has noticed the broker is gone.
// Then it checks every job is one email and the queues are empty, through
// the connection reconnect gives.
func runThroughOutages(t *testing.T, q *queues, addr string, outage func(noticed func()), reconnect func() *amqp091.Connection) {
	const n = 10000
	bodies := make([][]byte, n)
	ids := make([]string, n)
	for i := range n {
		bodies[i] = sourcetest.Job(t, "", fmt.Sprintf("user%05d", i))
		ids[i] = fmt.Sprintf("tasks.send_reminder[%05d]", i) // the key, as message_id
	}
	began := time.Now()
	for start := 0; start < n; start += 1000 {
		q.publish(t, bodies[start:start+1000], ids[start:start+1000])
	}
	t.Logf("published %d jobs in %v", n, time.Since(began).Round(time.Millisecond))
	began = time.Now()

	l := sourcetest.NewLedger(t)
	src, err := New(context.Background(), Options{
		URL: brokerURL(addr), Queue: q.name, DeadLetterExchange: q.dlx,
		Prefetch: 400, Concurrency: 8, BatchSize: 50, ReconnectMax: 500 * time.Millisecond, Logger: testLogger(t, "consumer"),
	})
	if err != nil {
		t.Fatal(err)
	}
	var batches atomic.Int64
	counting := sourcetest.AdmitFunc(func(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
		batches.Add(1)
		return l.SubmitBatch(ctx, subs)
	})
	r := sourcetest.Start(t, src, counting)
	for _, at := range []int{3000, 7000} {
		sourcetest.Eventually(t, 3*time.Minute, fmt.Sprintf("%d records", at), func() (bool, string) {
			got := l.Emails()
			return got >= at, fmt.Sprintf("%d records; %+v", got, src.Stats())
		})
		before := src.Stats().Errors
		outage(func() {
			sourcetest.Eventually(t, 30*time.Second, "the source notices the broker is gone", func() (bool, string) {
				return src.Stats().Errors >= before+2, fmt.Sprintf("%+v", src.Stats())
			})
		})
	}
	sourcetest.Eventually(t, 3*time.Minute, "every job recorded", func() (bool, string) {
		got := l.Emails()
		return got >= n, fmt.Sprintf("%d records; %+v", got, src.Stats())
	})
	r.Stop()
	t.Logf("consumed in %v", time.Since(began).Round(time.Millisecond))
	recs := l.Records()
	seen := map[string]bool{}
	var dups int64
	for _, rec := range recs {
		if !strings.HasPrefix(rec.Key, "tasks.send_reminder[") || seen[rec.Key] {
			t.Errorf("unexpected or repeated key %q", rec.Key)
		}
		seen[rec.Key] = true
		dups += rec.Duplicates
	}
	st := src.Stats()
	t.Logf("%d records, %d duplicates answered (redeliveries after the outages), in %d commits; stats %+v", len(recs), dups, batches.Load(), st)
	if len(recs) != n {
		t.Errorf("%d records, want %d", len(recs), n)
	}
	if st.Admitted != n || st.Duplicates != dups || st.DeadLettered != 0 {
		t.Errorf("stats %+v, want %d admitted, %d duplicates, none dead-lettered", st, n, dups)
	}
	q.conn = reconnect()
	if got := q.ready(t, q.name); got != 0 {
		t.Errorf("the queue holds %d messages, want 0", got)
	}
	if got := q.ready(t, q.dead); got != 0 {
		t.Errorf("the dead-letter queue holds %d messages, want 0", got)
	}
}

// TestRefusesWithoutDeadLetterExchange: with nowhere for invalid jobs to
// go, New says so and names the fixes; a missing queue or exchange is
// named too.
func TestRefusesWithoutDeadLetterExchange(t *testing.T) {
	t.Parallel()
	conn := needBroker(t)
	q := newQueues(t, conn, unique("sendonce-test-refuse"))
	ctx := context.Background()
	url := brokerURL(brokerAddr())
	_, err := New(ctx, Options{URL: url, Queue: q.name})
	if err == nil {
		t.Fatal("New accepted a source with no dead-letter exchange")
	}
	for _, fix := range []string{"DeadLetterExchange", "x-dead-letter-exchange", "RejectWithoutDeadLetterExchange"} {
		if !strings.Contains(err.Error(), fix) {
			t.Errorf("the error does not name %s: %v", fix, err)
		}
	}
	if _, err := New(ctx, Options{URL: url, Queue: q.name, RejectWithoutDeadLetterExchange: true}); err != nil {
		t.Errorf("with the explicit opt-out: %v", err)
	}
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{Queue: "q", DeadLetterExchange: "x"}, "Options.URL is required"},
		{Options{URL: "http://127.0.0.1/", Queue: "q", DeadLetterExchange: "x"}, "Options.URL"},
		{Options{URL: url, DeadLetterExchange: "x"}, "Options.Queue is required"},
		{Options{URL: url, Queue: q.name, DeadLetterExchange: "x", Prefetch: 70000}, "Options.Prefetch"},
		{Options{URL: url, Queue: "no-such-queue-" + q.name, DeadLetterExchange: q.dlx}, "Options.Queue"},
		{Options{URL: url, Queue: q.name, DeadLetterExchange: "no-such-exchange-" + q.name}, "Options.DeadLetterExchange"},
		{Options{URL: "amqp://guest:guest@127.0.0.1:1/", Queue: q.name, DeadLetterExchange: q.dlx}, "Options.URL"},
	} {
		if _, err := New(ctx, tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error saying %q", tc.o, err, tc.want)
		}
	}
}

// TestRejectToQueueDeadLetterExchange: with the opt-out, an invalid job is
// rejected without requeue, and the broker moves it to the queue's own
// x-dead-letter-exchange.
func TestRejectToQueueDeadLetterExchange(t *testing.T) {
	t.Parallel()
	conn := needBroker(t)
	q := newQueues(t, conn, unique("sendonce-test-reject"))
	q.publish(t, [][]byte{[]byte(`{"colour": "blue"}`)}, nil)
	src, err := New(context.Background(), Options{URL: brokerURL(brokerAddr()), Queue: q.name, RejectWithoutDeadLetterExchange: true, Logger: testLogger(t, "consumer")})
	if err != nil {
		t.Fatal(err)
	}
	r := sourcetest.Start(t, src, sourcetest.NewLedger(t))
	sourcetest.Eventually(t, 20*time.Second, "rejected to the queue's dead-letter exchange", func() (bool, string) {
		return q.ready(t, q.dead) == 1, fmt.Sprintf("%+v", src.Stats())
	})
	r.Stop()
	if st := src.Stats(); st.DeadLettered != 1 {
		t.Errorf("stats %+v", st)
	}
}
