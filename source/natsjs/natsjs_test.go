package natsjs

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/source/sourcetest"
)

// serverURL is the machine's NATS; NATS_URL overrides it.
func serverURL() string {
	if u := os.Getenv("NATS_URL"); u != "" {
		return u
	}
	return "nats://127.0.0.1:4222"
}

// needJetStream connects to the machine's NATS with JetStream, or skips
// the test loudly when there is none (fails under CI=true).
func needJetStream(t testing.TB) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	fail := func(err error) {
		msg := fmt.Sprintf("SKIPPED: no NATS with JetStream at %s (%v); start nats-server -js or set NATS_URL", serverURL(), err)
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and %s", msg)
		}
		t.Skip(msg)
	}
	nc, err := nats.Connect(serverURL(), nats.Timeout(3*time.Second))
	if err != nil {
		fail(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := js.AccountInfo(ctx); err != nil {
		fail(err)
	}
	return nc, js
}

func unique(prefix string) string {
	var b [6]byte
	rand.Read(b[:])
	return prefix + "_" + strings.ToUpper(hex.EncodeToString(b[:]))
}

func testLogger(t testing.TB, who string) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("consumer", who, "test", t.Name())
}

// streams is one test's job stream and dead-letter stream.
type streams struct {
	js      jetstream.JetStream
	name    string
	subject string
	dead    string // the dead-letter stream
	deadSub string
}

func newStreams(t testing.TB, js jetstream.JetStream, name string) *streams {
	t.Helper()
	ctx := context.Background()
	s := &streams{js: js, name: name, subject: strings.ToLower(name) + ".jobs", dead: name + "_DEAD", deadSub: strings.ToLower(name) + ".dead"}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: s.name, Subjects: []string{s.subject}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: s.dead, Subjects: []string{s.deadSub}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		js.DeleteStream(context.Background(), s.name)
		js.DeleteStream(context.Background(), s.dead)
	})
	return s
}

func (s *streams) publish(t testing.TB, body []byte, id string) {
	t.Helper()
	msg := nats.NewMsg(s.subject)
	msg.Data = body
	if id != "" {
		msg.Header.Set(jetstream.MsgIDHeader, id)
	}
	if _, err := s.js.PublishMsg(context.Background(), msg); err != nil {
		t.Fatalf("publish: %v", err)
	}
}

// harness runs the conformance suite on one stream of the machine's NATS.
type harness struct {
	*streams
	n atomic.Int64
}

func newHarness(t *testing.T) sourcetest.Harness {
	_, js := needJetStream(t)
	return &harness{streams: newStreams(t, js, unique("SENDONCE_TEST"))}
}

func (h *harness) Publish(t testing.TB, body []byte, key string) { h.publish(t, body, key) }

func (h *harness) NewSource(t testing.TB) source.Source {
	t.Helper()
	who := fmt.Sprintf("consumer%d", h.n.Add(1))
	s, err := New(context.Background(), Options{
		URL: serverURL(), Stream: h.name, DeadLetterSubject: h.deadSub,
		AckWait: 2 * time.Second, FetchWait: 200 * time.Millisecond, BatchSize: 5, ShutdownTimeout: 10 * time.Second,
		Logger: testLogger(t, who),
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Crash closes the consumer's connection: what it has not acknowledged
// is redelivered after AckWait.
func (h *harness) Crash(t testing.TB, src source.Source) { src.(*Source).nc.Close() }

func (h *harness) DeadLetters(t testing.TB) []sourcetest.DeadLetter {
	t.Helper()
	ctx := context.Background()
	st, err := h.js.Stream(ctx, h.dead)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []sourcetest.DeadLetter
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			t.Fatalf("dead letter %d: %v", seq, err)
		}
		if m.Header.Get(HeaderSourceStream) != h.name || m.Header.Get(HeaderSourceSequence) == "" {
			t.Errorf("dead letter %d: source stream %q, sequence %q", seq, m.Header.Get(HeaderSourceStream), m.Header.Get(HeaderSourceSequence))
		}
		out = append(out, sourcetest.DeadLetter{Body: m.Data, Reason: m.Header.Get(HeaderError)})
	}
	return out
}

func (h *harness) Outstanding(t testing.TB) int {
	t.Helper()
	cons, err := h.js.Consumer(context.Background(), h.name, DefaultConsumer)
	if err != nil {
		t.Fatal(err)
	}
	info, err := cons.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return int(info.NumPending) + info.NumAckPending
}

func TestConformance(t *testing.T) {
	t.Parallel()
	sourcetest.Run(t, newHarness)
}

// TestRefuses: a source needs its stream, a dead-letter subject that
// another stream captures, and a pull consumer with explicit acks; each
// error names the option and the fix.
func TestRefuses(t *testing.T) {
	t.Parallel()
	nc, js := needJetStream(t)
	s := newStreams(t, js, unique("SENDONCE_REFUSE"))
	ctx := context.Background()
	st, err := js.Stream(ctx, s.name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateConsumer(ctx, jetstream.ConsumerConfig{Durable: "auto", AckPolicy: jetstream.AckNonePolicy}); err != nil {
		t.Fatal(err)
	}
	url := serverURL()
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{Stream: "S", DeadLetterSubject: "d"}, "Options.URL is required"},
		{Options{URL: url}, "Options.Stream is required"},
		{Options{URL: url, Stream: s.name}, "no stream captures the dead-letter subject sendonce.dead." + s.name},
		{Options{URL: url, Stream: s.name, DeadLetterSubject: s.deadSub, AckWait: 100 * time.Millisecond}, "Options.AckWait"},
		{Options{URL: url, Stream: "NO_SUCH_" + s.name, DeadLetterSubject: s.deadSub}, "Options.Stream"},
		{Options{URL: url, Stream: s.name, DeadLetterSubject: "nowhere." + strings.ToLower(s.name)}, "no stream captures"},
		{Options{URL: url, Stream: s.name, DeadLetterSubject: s.subject}, "source's own stream"},
		{Options{URL: url, Stream: s.name, DeadLetterSubject: s.deadSub, Consumer: "auto"}, "explicit acks"},
	} {
		if _, err := New(ctx, tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error saying %q", tc.o, err, tc.want)
		}
	}
	src, err := New(ctx, Options{Conn: nc, Stream: s.name, DeadLetterSubject: s.deadSub})
	if err != nil {
		t.Fatal(err)
	}
	if src.Name() != "nats:"+s.name+"/sendonce" {
		t.Errorf("Name() = %q", src.Name())
	}
}

func TestVersionAtLeast(t *testing.T) {
	for v, want := range map[string]bool{"2.9.10": false, "2.10.4": true, "2.10.3": false, "2.11.0-beta": true, "3.0.0": true, "": false} {
		if got := versionAtLeast(v, 2, 10, 4); got != want {
			t.Errorf("versionAtLeast(%q) = %v", v, got)
		}
	}
}
