package redisstream

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/source/sourcetest"
)

// sharedAddr is the machine's Redis; REDIS_ADDR overrides it.
func sharedAddr() string {
	if a := os.Getenv("REDIS_ADDR"); a != "" {
		return a
	}
	return "127.0.0.1:6379"
}

// needRedis returns a client of the machine's Redis, or skips the test
// loudly when there is none (fails under CI=true).
func needRedis(t testing.TB) *redis.Client {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: sharedAddr()})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		rdb.Close()
		msg := fmt.Sprintf("SKIPPED: no Redis at %s (%v); start redis-server or set REDIS_ADDR", sharedAddr(), err)
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and %s", msg)
		}
		t.Skip(msg)
	}
	t.Cleanup(func() { rdb.Close() })
	return rdb
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

// harness runs the conformance suite on one stream of the machine's Redis.
type harness struct {
	rdb    *redis.Client
	url    string
	stream string
	dlq    string
	n      atomic.Int64
}

func newHarness(t *testing.T) sourcetest.Harness {
	rdb := needRedis(t)
	h := &harness{rdb: rdb, url: "redis://" + sharedAddr() + "/0", stream: unique("sendonce-test:" + t.Name())}
	h.dlq = h.stream + DeadLetterSuffix
	t.Cleanup(func() { rdb.Del(context.Background(), h.stream, h.dlq) })
	return h
}

func (h *harness) Publish(t testing.TB, body []byte, key string) {
	t.Helper()
	vals := []any{FieldJob, string(body)}
	if key != "" {
		vals = append(vals, FieldKey, key)
	}
	if err := h.rdb.XAdd(context.Background(), &redis.XAddArgs{Stream: h.stream, Values: vals}).Err(); err != nil {
		t.Fatalf("XADD: %v", err)
	}
}

func (h *harness) NewSource(t testing.TB) source.Source {
	t.Helper()
	who := fmt.Sprintf("consumer%d", h.n.Add(1))
	s, err := New(context.Background(), Options{
		URL: h.url, Stream: h.stream, Consumer: who,
		Block: 200 * time.Millisecond, ClaimIdle: 400 * time.Millisecond, ShutdownTimeout: 10 * time.Second,
		Logger: testLogger(t, who),
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Crash closes the consumer's connections: it can acknowledge nothing
// more, and its pending entries are claimed by the next consumer after
// ClaimIdle, as those of a dead process would be.
func (h *harness) Crash(t testing.TB, src source.Source) {
	src.(*Source).rdb.Close()
}

func (h *harness) DeadLetters(t testing.TB) []sourcetest.DeadLetter {
	t.Helper()
	msgs, err := h.rdb.XRange(context.Background(), h.dlq, "-", "+").Result()
	if err != nil {
		t.Fatalf("XRANGE %s: %v", h.dlq, err)
	}
	out := make([]sourcetest.DeadLetter, len(msgs))
	for i, m := range msgs {
		out[i] = sourcetest.DeadLetter{Body: []byte(fmt.Sprint(m.Values[FieldJob])), Reason: fmt.Sprint(m.Values[FieldError])}
		if m.Values[FieldSourceStream] != h.stream || m.Values[FieldSourceID] == nil {
			t.Errorf("dead letter %s has source stream %v and ID %v", m.ID, m.Values[FieldSourceStream], m.Values[FieldSourceID])
		}
	}
	return out
}

func (h *harness) Outstanding(t testing.TB) int {
	t.Helper()
	return outstanding(t, h.rdb, h.stream, DefaultGroup)
}

// outstanding is the group's pending entries plus those not yet read.
func outstanding(t testing.TB, rdb *redis.Client, stream, group string) int {
	t.Helper()
	groups, err := rdb.XInfoGroups(context.Background(), stream).Result()
	if err != nil {
		t.Fatalf("XINFO GROUPS %s: %v", stream, err)
	}
	for _, g := range groups {
		if g.Name == group {
			return int(g.Pending + g.Lag)
		}
	}
	t.Fatalf("stream %s has no group %s", stream, group)
	return 0
}

func TestConformance(t *testing.T) {
	t.Parallel()
	sourcetest.Run(t, newHarness)
}

// TestPoisonEntryIsDeadLetteredAfterMaxDeliveries: an entry that every
// consumer takes and then dies on is claimed again and again; once it has
// been delivered more than MaxDeliveries times it goes to the dead-letter
// stream with the count, and is acknowledged.
func TestPoisonEntryIsDeadLetteredAfterMaxDeliveries(t *testing.T) {
	t.Parallel()
	h := newHarness(t).(*harness)
	ctx := context.Background()
	h.Publish(t, sourcetest.Job(t, "poison", "ann"), "")
	// Three consumers each take it and die (they never acknowledge); the
	// live consumer's claim is its fourth delivery.
	if err := h.rdb.XGroupCreateMkStream(ctx, h.stream, DefaultGroup, "0").Err(); err != nil {
		t.Fatal(err)
	}
	res, err := h.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: DefaultGroup, Consumer: "dead0", Streams: []string{h.stream, ">"}, Count: 1}).Result()
	if err != nil {
		t.Fatal(err)
	}
	id := res[0].Messages[0].ID
	for i := 1; i < 3; i++ {
		if err := h.rdb.XClaim(ctx, &redis.XClaimArgs{Stream: h.stream, Group: DefaultGroup, Consumer: fmt.Sprintf("dead%d", i), Messages: []string{id}}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	l := sourcetest.NewLedger(t)
	src, err := New(ctx, Options{URL: h.url, Stream: h.stream, Consumer: "live", MaxDeliveries: 2, Block: 100 * time.Millisecond, ClaimIdle: 100 * time.Millisecond, Logger: testLogger(t, "live")})
	if err != nil {
		t.Fatal(err)
	}
	r := sourcetest.Start(t, src, l)
	sourcetest.Eventually(t, 20*time.Second, "the poison entry dead-lettered", func() (bool, string) {
		return len(h.DeadLetters(t)) == 1, fmt.Sprintf("%+v", src.Stats())
	})
	r.Stop()
	dl := h.DeadLetters(t)[0]
	if !strings.Contains(dl.Reason, "delivered 4 times") || !strings.Contains(dl.Reason, "max_deliveries, 2") {
		t.Errorf("reason %q, want the count and the limit", dl.Reason)
	}
	if n, _ := l.Count(); n != 0 {
		t.Errorf("%d records; the poison entry must not be admitted", n)
	}
	if o := h.Outstanding(t); o != 0 {
		t.Errorf("%d outstanding", o)
	}
}

// TestEntryWithoutJobField: an entry without the "job" field is
// dead-lettered with a reason saying how to add one.
func TestEntryWithoutJobField(t *testing.T) {
	t.Parallel()
	h := newHarness(t).(*harness)
	ctx := context.Background()
	if err := h.rdb.XAdd(ctx, &redis.XAddArgs{Stream: h.stream, Values: []any{"body", "{}"}}).Err(); err != nil {
		t.Fatal(err)
	}
	l := sourcetest.NewLedger(t)
	src := h.NewSource(t)
	r := sourcetest.Start(t, src, l)
	var got []redis.XMessage
	sourcetest.Eventually(t, 20*time.Second, "dead-lettered", func() (bool, string) {
		got, _ = h.rdb.XRange(ctx, h.dlq, "-", "+").Result()
		return len(got) == 1, ""
	})
	r.Stop()
	if reason := fmt.Sprint(got[0].Values[FieldError]); !strings.Contains(reason, `no "job" field (it has body)`) {
		t.Errorf("reason %q", reason)
	}
	if got[0].Values["body"] != "{}" {
		t.Errorf("the dead letter lost the original fields: %v", got[0].Values)
	}
}

func TestOptionsErrors(t *testing.T) {
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{Stream: "s"}, "Options.URL is required"},
		{Options{URL: "redis://127.0.0.1:1"}, "Options.Stream is required"},
		{Options{URL: "redis://127.0.0.1:1", Stream: "s", DeadLetterStream: "s"}, "the stream itself"},
		{Options{URL: "redis://127.0.0.1:1", Stream: "s", BatchSize: -1}, "Options.BatchSize"},
		{Options{URL: "redis://127.0.0.1:1", Stream: "s", ClaimIdle: -time.Second}, "Options.ClaimIdle"},
		{Options{URL: "http://127.0.0.1:1", Stream: "s"}, "Options.URL"},
		{Options{URL: "redis://127.0.0.1:1", Stream: "s"}, "create the consumer group"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := New(ctx, tc.o)
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error saying %q", tc.o, err, tc.want)
		}
	}
}

// privateRedis is a redis-server of one test, on a free port, with an
// append-only file fsynced at every write: killed and started again, it
// keeps the stream, the group and its pending entries.
type privateRedis struct {
	t    testing.TB
	dir  string
	port int
	cmd  *exec.Cmd
}

func startPrivateRedis(t testing.TB) *privateRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		msg := "SKIPPED: redis-server is not installed (apt-get install redis-server); this test runs a private one to kill"
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and %s", msg)
		}
		t.Skip(msg)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	r := &privateRedis{t: t, dir: t.TempDir(), port: port}
	r.start()
	t.Cleanup(r.kill)
	return r
}

func (r *privateRedis) addr() string { return fmt.Sprintf("127.0.0.1:%d", r.port) }

func (r *privateRedis) start() {
	r.t.Helper()
	r.cmd = exec.Command("redis-server", "--port", strconv.Itoa(r.port), "--bind", "127.0.0.1", "--save", "",
		"--appendonly", "yes", "--appendfsync", "always", "--dir", r.dir, "--logfile", filepath.Join(r.dir, "redis.log"))
	if err := r.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	rdb := redis.NewClient(&redis.Options{Addr: r.addr(), MaxRetries: -1})
	defer rdb.Close()
	sourcetest.Eventually(r.t, 20*time.Second, "the private redis-server answers", func() (bool, string) {
		err := rdb.Ping(context.Background()).Err()
		return err == nil, fmt.Sprint(err)
	})
}

// kill ends the server with SIGKILL: no shutdown, no last write.
func (r *privateRedis) kill() {
	if r.cmd != nil && r.cmd.Process != nil {
		r.cmd.Process.Kill()
		r.cmd.Wait()
		r.cmd = nil
	}
}

// TestRedisKilledMidRun: 10,000 jobs; twice in the middle of the run the
// Redis server is killed (SIGKILL) and started again on its append-only
// file. The source backs off while it is gone, and then goes on; entries
// handed to it by a read whose answer was lost are claimed back after
// ClaimIdle. Every job is one email: 10,000 records, nothing pending.
func TestRedisKilledMidRun(t *testing.T) {
	t.Parallel()
	srv := startPrivateRedis(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.addr()})
	defer rdb.Close()
	ctx := context.Background()
	const n = 10000
	stream := "emails"
	began := time.Now()
	for start := 0; start < n; start += 1000 {
		pipe := rdb.Pipeline()
		for i := start; i < start+1000; i++ {
			pipe.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{
				FieldJob, string(sourcetest.Job(t, "", fmt.Sprintf("user%05d", i))),
				FieldKey, fmt.Sprintf("tasks.send_reminder[%05d]", i),
			}})
		}
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("added %d entries in %v", n, time.Since(began).Round(time.Millisecond))
	began = time.Now()

	l := sourcetest.NewLedger(t)
	src, err := New(ctx, Options{URL: "redis://" + srv.addr(), Stream: stream, Consumer: "node1", Concurrency: 4, BatchSize: 50,
		Block: 200 * time.Millisecond, ClaimIdle: time.Second, Logger: testLogger(t, "node1")})
	if err != nil {
		t.Fatal(err)
	}
	r := sourcetest.Start(t, src, l)
	for _, at := range []int{3000, 7000} {
		sourcetest.Eventually(t, 3*time.Minute, fmt.Sprintf("%d records", at), func() (bool, string) {
			got := l.Emails()
			return got >= at, fmt.Sprintf("%d records; %+v", got, src.Stats())
		})
		before := src.Stats().Errors
		srv.kill()
		sourcetest.Eventually(t, 30*time.Second, "the source notices Redis is gone", func() (bool, string) {
			return src.Stats().Errors >= before+2, fmt.Sprintf("%+v", src.Stats())
		})
		srv.start()
	}
	sourcetest.Eventually(t, 3*time.Minute, "every job recorded and acknowledged", func() (bool, string) {
		got := l.Emails()
		o := outstanding(t, rdb, stream, DefaultGroup)
		return got >= n && o == 0, fmt.Sprintf("%d records, %d outstanding; %+v", got, o, src.Stats())
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
	t.Logf("%d records, %d duplicates answered; stats %+v", len(recs), dups, st)
	if len(recs) != n {
		t.Errorf("%d records, want %d", len(recs), n)
	}
	if st.Admitted != n || st.Duplicates != dups || st.DeadLettered != 0 {
		t.Errorf("stats %+v, want %d admitted, %d duplicates, none dead-lettered", st, n, dups)
	}
	if dl, _ := rdb.XLen(ctx, stream+DeadLetterSuffix).Result(); dl != 0 {
		t.Errorf("%d dead letters", dl)
	}
}

// TestGroupDestroyedWhileRunning: the consumer group disappears (XGROUP
// DESTROY, or a Redis restarted without persistence); the source creates
// it again from the stream's first entry, so nothing after it is missed,
// and what it had admitted before is answered as a duplicate.
func TestGroupDestroyedWhileRunning(t *testing.T) {
	t.Parallel()
	h := newHarness(t).(*harness)
	l := sourcetest.NewLedger(t)
	h.Publish(t, sourcetest.Job(t, "before", "ann"), "")
	src := h.NewSource(t)
	r := sourcetest.Start(t, src, l)
	sourcetest.Eventually(t, 20*time.Second, "the first job admitted", func() (bool, string) { return l.Emails() == 1, "" })
	if err := h.rdb.XGroupDestroy(context.Background(), h.stream, DefaultGroup).Err(); err != nil {
		t.Fatal(err)
	}
	h.Publish(t, sourcetest.Job(t, "after", "bob"), "")
	sourcetest.Eventually(t, 20*time.Second, "the second job admitted, the first answered again as a duplicate", func() (bool, string) {
		n, d := l.Count()
		return n == 2 && d == 1, fmt.Sprintf("%d records, %d duplicates; %+v", n, d, src.(*Source).Stats())
	})
	r.Stop()
	if o := h.Outstanding(t); o != 0 {
		t.Errorf("%d outstanding", o)
	}
}
