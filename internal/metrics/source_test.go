package metrics_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/redis/go-redis/v9"

	"github.com/sendonce/sendonce/internal/metrics"
	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/source/amqp"
	"github.com/sendonce/sendonce/source/natsjs"
	"github.com/sendonce/sendonce/source/redisstream"
)

// scrapeHandler reads one exposition of h into series name{labels} -> value.
func scrapeHandler(t *testing.T, h http.Handler) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", rec.Code, rec.Body)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(rec.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad exposition line %q", line)
		}
		out[line[:i]] = v
	}
	return out
}

// fakeSource reports fixed counts and, when lag is set, a lag; when block
// is set its Lag waits for the scrape's deadline, as a hung broker would.
type fakeSource struct {
	name  string
	stats source.Stats
	lag   func(ctx context.Context) (source.Lag, error)
}

func (f *fakeSource) Name() string                                     { return f.name }
func (f *fakeSource) Run(ctx context.Context, _ source.Admitter) error { return nil }
func (f *fakeSource) Stats() source.Stats                              { return f.stats }

type lagSource struct{ *fakeSource }

func (l lagSource) Lag(ctx context.Context) (source.Lag, error) { return l.lag(ctx) }

func TestSourceCollector(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	m := metrics.New(metrics.Config{NoRuntime: true, Now: func() time.Time { return now }, LagTimeout: 50 * time.Millisecond})
	hung := make(chan struct{})
	defer close(hung)
	srcs := []source.Source{
		&fakeSource{name: "sqs:plain", stats: source.Stats{Received: 7, Admitted: 4, Duplicates: 2, DeadLettered: 1}},
		lagSource{&fakeSource{name: "redis:emails", stats: source.Stats{Received: 3, Admitted: 3, Errors: 5}, lag: func(context.Context) (source.Lag, error) {
			return source.Lag{Waiting: 10, Unacked: 2, Oldest: now.Add(-90 * time.Second)}, nil
		}}},
		lagSource{&fakeSource{name: "redis:emails", lag: func(context.Context) (source.Lag, error) {
			return source.Lag{}, nil
		}}},
		lagSource{&fakeSource{name: "nats:down", lag: func(context.Context) (source.Lag, error) {
			return source.Lag{}, fmt.Errorf("connection refused")
		}}},
		lagSource{&fakeSource{name: "amqp:hung", lag: func(ctx context.Context) (source.Lag, error) {
			select {
			case <-hung: // the broker never answers within the scrape
			case <-ctx.Done():
			}
			<-hung
			return source.Lag{}, ctx.Err()
		}}},
	}
	if err := m.AddSources(srcs); err != nil {
		t.Fatal(err)
	}
	got := scrapeHandler(t, m.Handler())
	check(t, got, map[string]float64{
		`sendonce_source_messages_total{outcome="received",source="sqs:plain"}`:      7,
		`sendonce_source_messages_total{outcome="admitted",source="sqs:plain"}`:      4,
		`sendonce_source_messages_total{outcome="duplicate",source="sqs:plain"}`:     2,
		`sendonce_source_messages_total{outcome="dead_lettered",source="sqs:plain"}`: 1,
		`sendonce_source_messages_total{outcome="error",source="sqs:plain"}`:         0,
		`sendonce_source_messages_total{outcome="error",source="redis:emails"}`:      5,
		`sendonce_source_lag_up{source="redis:emails"}`:                              1,
		`sendonce_source_lag_messages{source="redis:emails"}`:                        12,
		`sendonce_source_unacked_messages{source="redis:emails"}`:                    2,
		`sendonce_source_lag_seconds{source="redis:emails"}`:                         90,
		`sendonce_source_lag_up{source="redis:emails#2"}`:                            1,
		`sendonce_source_lag_messages{source="redis:emails#2"}`:                      0,
		`sendonce_source_lag_seconds{source="redis:emails#2"}`:                       0,
		`sendonce_source_lag_up{source="nats:down"}`:                                 0,
		`sendonce_source_lag_up{source="amqp:hung"}`:                                 0,
	})
	for _, absent := range []string{
		`sendonce_source_lag_messages{source="nats:down"}`,
		`sendonce_source_lag_messages{source="amqp:hung"}`,
		`sendonce_source_lag_up{source="sqs:plain"}`, // no LagReporter
	} {
		if _, ok := got[absent]; ok {
			t.Errorf("%s exported, want it left out", absent)
		}
	}
	// The hung broker's call is still running: the next scrape does not
	// start another one, it says down at once.
	got = scrapeHandler(t, m.Handler())
	check(t, got, map[string]float64{`sendonce_source_lag_up{source="amqp:hung"}`: 0, `sendonce_source_lag_up{source="redis:emails"}`: 1})
}

// A scrape that follows another at once finds a source whose last Lag
// call has answered free to be asked again: one answered call never makes
// the next scrape report the broker down.
func TestBackToBackScrapes(t *testing.T) {
	m := metrics.New(metrics.Config{NoRuntime: true})
	src := lagSource{&fakeSource{name: "nats:quick", lag: func(context.Context) (source.Lag, error) {
		return source.Lag{Waiting: 3}, nil
	}}}
	if err := m.AddSources([]source.Source{src}); err != nil {
		t.Fatal(err)
	}
	for i := range 2000 {
		got := scrapeHandler(t, m.Handler())
		if got[`sendonce_source_lag_up{source="nats:quick"}`] != 1 || got[`sendonce_source_lag_messages{source="nats:quick"}`] != 3 {
			t.Fatalf("scrape %d: lag_up = %v, lag_messages = %v; want 1 and 3", i,
				got[`sendonce_source_lag_up{source="nats:quick"}`], got[`sendonce_source_lag_messages{source="nats:quick"}`])
		}
	}
}

func uniqueName(prefix string) string {
	var b [6]byte
	rand.Read(b[:])
	return prefix + "_" + strings.ToUpper(hex.EncodeToString(b[:]))
}

func skipOrFail(t *testing.T, msg string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and %s", msg)
	}
	t.Skip(msg)
}

// With no consumer running, the lag gauge of a Redis stream source is
// the number of entries added since its group was created.
func TestRedisLagOnScrape(t *testing.T) {
	addr := "127.0.0.1:6379"
	if a := os.Getenv("REDIS_ADDR"); a != "" {
		addr = a
	}
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	ctx := t.Context()
	if err := rdb.Ping(ctx).Err(); err != nil {
		skipOrFail(t, fmt.Sprintf("SKIPPED: no Redis at %s (%v); start redis-server or set REDIS_ADDR", addr, err))
	}
	stream := uniqueName("sendonce-test:lag")
	t.Cleanup(func() { rdb.Del(context.Background(), stream) })
	src, err := redisstream.New(ctx, redisstream.Options{Client: rdb, Stream: stream})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	m := metrics.New(metrics.Config{NoRuntime: true, Now: func() time.Time { return now.Add(time.Minute) }})
	if err := m.AddSources([]source.Source{src}); err != nil {
		t.Fatal(err)
	}
	name := src.Name()
	check(t, scrapeHandler(t, m.Handler()), map[string]float64{
		`sendonce_source_lag_up{source="` + name + `"}`:       1,
		`sendonce_source_lag_messages{source="` + name + `"}`: 0,
		`sendonce_source_lag_seconds{source="` + name + `"}`:  0,
	})
	const n = 7
	for i := range n {
		if err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{redisstream.FieldJob, fmt.Sprintf(`{"n":%d}`, i)}}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	got := scrapeHandler(t, m.Handler())
	check(t, got, map[string]float64{
		`sendonce_source_lag_up{source="` + name + `"}`:                            1,
		`sendonce_source_lag_messages{source="` + name + `"}`:                      n,
		`sendonce_source_unacked_messages{source="` + name + `"}`:                  0,
		`sendonce_source_messages_total{outcome="received",source="` + name + `"}`: 0,
	})
	// The first entry's ID holds the Redis server's clock; the age is
	// about a minute by the injected one, give or take the clocks' skew.
	if age := got[`sendonce_source_lag_seconds{source="`+name+`"}`]; age < 50 || age > 70 {
		t.Errorf("sendonce_source_lag_seconds = %v, want about 60", age)
	}
}

// With no consumer running, the lag gauge of a JetStream source is the
// number of messages published to its stream.
func TestNATSLagOnScrape(t *testing.T) {
	url := "nats://127.0.0.1:4222"
	if u := os.Getenv("NATS_URL"); u != "" {
		url = u
	}
	msg := func(err error) string {
		return fmt.Sprintf("SKIPPED: no NATS with JetStream at %s (%v); start nats-server -js or set NATS_URL", url, err)
	}
	nc, err := nats.Connect(url, nats.Timeout(3*time.Second))
	if err != nil {
		skipOrFail(t, msg(err))
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := js.AccountInfo(ctx); err != nil {
		skipOrFail(t, msg(err))
	}
	name := uniqueName("SENDONCE_LAG")
	subject, deadSub := strings.ToLower(name)+".jobs", strings.ToLower(name)+".dead"
	for stream, sub := range map[string]string{name: subject, name + "_DEAD": deadSub} {
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: stream, Subjects: []string{sub}, Storage: jetstream.MemoryStorage}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { js.DeleteStream(context.Background(), stream) })
	}
	src, err := natsjs.New(ctx, natsjs.Options{Conn: nc, Stream: name, DeadLetterSubject: deadSub})
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New(metrics.Config{NoRuntime: true})
	if err := m.AddSources([]source.Source{src}); err != nil {
		t.Fatal(err)
	}
	label := `{source="` + src.Name() + `"}`
	check(t, scrapeHandler(t, m.Handler()), map[string]float64{"sendonce_source_lag_up" + label: 1, "sendonce_source_lag_messages" + label: 0})
	const n = 9
	for i := range n {
		if _, err := js.Publish(ctx, subject, fmt.Appendf(nil, `{"n":%d}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	got := scrapeHandler(t, m.Handler())
	check(t, got, map[string]float64{
		"sendonce_source_lag_up" + label:           1,
		"sendonce_source_lag_messages" + label:     n,
		"sendonce_source_unacked_messages" + label: 0,
	})
	if _, ok := got["sendonce_source_lag_seconds"+label]; ok {
		t.Errorf("sendonce_source_lag_seconds exported for NATS, which does not tell the age")
	}
}

// With no consumer running, the lag gauge of a RabbitMQ source is the
// queue's message count, read on a connection of its own; a queue deleted
// under it makes the source's lag down, not zero.
func TestAMQPLagOnScrape(t *testing.T) {
	addr := "127.0.0.1:5672"
	if a := os.Getenv("AMQP_ADDR"); a != "" {
		addr = a
	}
	url := "amqp://guest:guest@" + addr + "/"
	conn, err := amqp091.DialConfig(url, amqp091.Config{Dial: amqp091.DefaultDial(3 * time.Second)})
	if err != nil {
		skipOrFail(t, fmt.Sprintf("SKIPPED: no RabbitMQ at %s (%v); start rabbitmq-server or set AMQP_ADDR", addr, err))
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	queue := uniqueName("sendonce-test-lag")
	if _, err := ch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ch.QueueDelete(queue, false, false, false) })
	src, err := amqp.New(t.Context(), amqp.Options{URL: url, Queue: queue, RejectWithoutDeadLetterExchange: true})
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New(metrics.Config{NoRuntime: true})
	if err := m.AddSources([]source.Source{src}); err != nil {
		t.Fatal(err)
	}
	label := `{source="` + src.Name() + `"}`
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	const n = 5
	for i := range n {
		dc, err := ch.PublishWithDeferredConfirmWithContext(t.Context(), "", queue, false, false,
			amqp091.Publishing{ContentType: "application/json", DeliveryMode: amqp091.Persistent, Body: fmt.Appendf(nil, `{"n":%d}`, i)})
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := dc.WaitContext(t.Context()); !ok || err != nil {
			t.Fatalf("publish not confirmed: %v", err)
		}
	}
	check(t, scrapeHandler(t, m.Handler()), map[string]float64{
		"sendonce_source_lag_up" + label:           1,
		"sendonce_source_lag_messages" + label:     n,
		"sendonce_source_unacked_messages" + label: 0,
	})
	if _, err := ch.QueueDelete(queue, false, false, false); err != nil {
		t.Fatal(err)
	}
	got := scrapeHandler(t, m.Handler())
	check(t, got, map[string]float64{"sendonce_source_lag_up" + label: 0})
	if _, ok := got["sendonce_source_lag_messages"+label]; ok {
		t.Error("a lag exported for a queue that is gone")
	}
}
