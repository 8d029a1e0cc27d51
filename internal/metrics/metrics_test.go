package metrics_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/httpapi"
	"github.com/sendonce/sendonce/internal/metrics"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
	"github.com/sendonce/sendonce/transport"
	"github.com/sendonce/sendonce/transport/maildir"
)

// stack is the HTTP front door, the core and the dispatcher on a real
// SQLite ledger, instrumented as `sendonce serve` instruments them.
type stack struct {
	t      *testing.T
	store  *sqlitestore.Store
	client *sendonce.Client
	srv    *httptest.Server
	now    *clock
	stop   func() // stops the dispatcher and waits for it
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newStack(t *testing.T, tr transport.Transport) *stack {
	t.Helper()
	clk := &clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	var m *metrics.Metrics
	st, err := sqlitestore.Open(t.Context(), t.TempDir(), sqlitestore.Options{OnCommit: func(c sqlitestore.CommitInfo) { m.Committed(c.Requests, c.Sync) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	m = metrics.New(metrics.Config{Store: st, Now: clk.Now, NoRuntime: true})
	c, err := sendonce.New(sendonce.Config{Store: st, Transport: tr, Metrics: m, Now: clk.Now,
		Dispatch: sendonce.DispatchConfig{PollInterval: 20 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	api, err := httpapi.New(httpapi.Config{Client: c, Metrics: m, MetricsHandler: m.Handler()})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api)
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	stop := sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	t.Cleanup(stop)
	return &stack{t: t, store: st, client: c, srv: srv, now: clk, stop: stop}
}

func (s *stack) submit(key, body string) int {
	s.t.Helper()
	req, _ := http.NewRequest(http.MethodPost, s.srv.URL+"/v1/emails", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func email(subject string) string {
	return fmt.Sprintf(`{"from":"app@example.com","to":["user@example.net"],"subject":%q,"text":"hello"}`, subject)
}

// waitCounts polls the ledger until want holds: no sleeping on a guess.
func (s *stack) waitCounts(want store.Counts) {
	s.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got, err := s.store.Counts(s.t.Context(), store.AllTenants)
		if err != nil {
			s.t.Fatal(err)
		}
		ok := true
		for st, n := range want {
			if got[st] != n {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("ledger counts %v, want %v", got, want)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not synchronisation
	}
}

// scrape reads /metrics into series name{labels} -> value.
func (s *stack) scrape() map[string]float64 {
	s.t.Helper()
	resp, err := http.Get(s.srv.URL + "/metrics")
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		s.t.Fatalf("GET /metrics: %s", resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			s.t.Fatalf("bad exposition line %q", line)
		}
		out[line[:i]] = v
	}
	return out
}

func check(t *testing.T, got map[string]float64, want map[string]float64) {
	t.Helper()
	for name, v := range want {
		g, ok := got[name]
		if !ok {
			t.Errorf("%s missing from /metrics", name)
			continue
		}
		if g != v {
			t.Errorf("%s = %v, want %v", name, g, v)
		}
	}
}

// A known workload through the HTTP API (new, duplicate, conflicting and
// rejected submissions, all delivered into a maildir) gives exactly these
// numbers on /metrics.
func TestMetricsAfterKnownWorkload(t *testing.T) {
	tr, err := maildir.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	s := newStack(t, tr)
	const newN, dupM = 6, 4
	for i := range newN {
		if code := s.submit(fmt.Sprintf("order-%d", i), email(fmt.Sprintf("Order %d", i))); code != http.StatusAccepted {
			t.Fatalf("new submission %d: %d", i, code)
		}
	}
	for i := range dupM {
		if code := s.submit(fmt.Sprintf("order-%d", i%2), email(fmt.Sprintf("Order %d", i%2))); code != http.StatusOK {
			t.Fatalf("duplicate %d: %d", i, code)
		}
	}
	if code := s.submit("order-0", email("Another email under an old key")); code != http.StatusUnprocessableEntity {
		t.Fatalf("conflict: %d", code)
	}
	rejected := []struct{ key, body string }{
		{"", email("no key")},                                   // refused by the front door
		{"bad-json", `{"from":`},                                // refused by the front door
		{"no-rcpt", `{"from":"app@example.com","subject":"x"}`}, // refused by the core
	}
	for _, r := range rejected {
		if code := s.submit(r.key, r.body); code != http.StatusBadRequest {
			t.Fatalf("rejected %q: %d", r.key, code)
		}
	}
	s.waitCounts(store.Counts{store.StateSent: newN, store.StateQueued: 0, store.StateSending: 0})
	s.stop() // its polls are writes too: the commit counts must hold still

	got := s.scrape()
	check(t, got, map[string]float64{
		`sendonce_admissions_total{outcome="new",source="http"}`:                       newN,
		`sendonce_admissions_total{outcome="duplicate",source="http"}`:                 dupM,
		`sendonce_admissions_total{outcome="conflict",source="http"}`:                  1,
		`sendonce_admissions_total{outcome="rejected",source="http"}`:                  float64(len(rejected)),
		`sendonce_admission_duration_seconds_count{source="http"}`:                     newN + dupM + 1,
		`sendonce_deliveries_total{outcome="sent",transport="maildir"}`:                newN,
		`sendonce_attempts_total{transport="maildir"}`:                                 newN,
		`sendonce_delivery_duration_seconds_count{outcome="sent",transport="maildir"}`: newN,
		`sendonce_emails{state="sent"}`:                                                newN,
		`sendonce_emails{state="queued"}`:                                              0,
		`sendonce_emails{state="in_doubt"}`:                                            0,
		`sendonce_queue_depth`:                                                         0,
		`sendonce_in_doubt`:                                                            0,
		`sendonce_queue_oldest_age_seconds`:                                            0,
		`sendonce_in_doubt_oldest_age_seconds`:                                         0,
		`sendonce_store_up`:                                                            1,
		`sendonce_store_commit_batch_size_sum`:                                         float64(s.store.Stats().Requests),
		`sendonce_store_commit_duration_seconds_count`:                                 float64(s.store.Stats().Commits),
	})
	for name := range got {
		if strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") {
			t.Errorf("%s: the runtime collectors were asked to stay out", name)
		}
	}
}

// ambiguous commits and then loses the answer: every attempt ends in_doubt.
type ambiguous struct{}

func (ambiguous) Name() string { return "flaky" }
func (ambiguous) Close() error { return nil }
func (ambiguous) Send(ctx context.Context, _ *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
	if err := commit(ctx); err != nil {
		return transport.Receipt{}, err
	}
	return transport.Receipt{}, transport.Errorf(transport.Ambiguous, "final dot", 0, "connection reset before the reply")
}

// In-doubt emails show in the gauges with their age by the injected clock,
// and resolving one is counted by who did it.
func TestMetricsInDoubt(t *testing.T) {
	s := newStack(t, ambiguous{})
	for i := range 3 {
		if code := s.submit(fmt.Sprintf("k%d", i), email("x")); code != http.StatusAccepted {
			t.Fatalf("submit: %d", code)
		}
	}
	s.waitCounts(store.Counts{store.StateInDoubt: 3})
	s.now.Add(90 * time.Minute)
	got := s.scrape()
	check(t, got, map[string]float64{
		`sendonce_in_doubt`:                                               3,
		`sendonce_emails{state="in_doubt"}`:                               3,
		`sendonce_in_doubt_oldest_age_seconds`:                            90 * 60,
		`sendonce_deliveries_total{outcome="in_doubt",transport="flaky"}`: 3,
	})
	if _, err := s.client.Resolve(t.Context(), "", "k0", sendonce.ActionFail, "api:alice"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.Resolve(t.Context(), "", "k1", sendonce.ActionMarkSent, "rule:after-24h"); err != nil {
		t.Fatal(err)
	}
	check(t, s.scrape(), map[string]float64{
		`sendonce_in_doubt`: 1,
		`sendonce_in_doubt_resolutions_total{action="fail",by="operator"}`:  1,
		`sendonce_in_doubt_resolutions_total{action="mark_sent",by="rule"}`: 1,
		`sendonce_in_doubt_oldest_age_seconds`:                              90 * 60,
	})
}

// /readyz answers 503 while the store is unreachable, and the ledger
// gauges say so instead of failing the whole scrape.
func TestReadyzAndStoreDown(t *testing.T) {
	tr, err := maildir.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	s := newStack(t, tr)
	get := func(path string) int {
		resp, err := http.Get(s.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get("/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz with the store up: %d", code)
	}
	s.store.Close()
	if code := get("/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz with the store closed: %d, want 503", code)
	}
	got := s.scrape()
	check(t, got, map[string]float64{`sendonce_store_up`: 0})
	if _, ok := got[`sendonce_queue_depth`]; ok {
		t.Errorf("sendonce_queue_depth exported while the store is down")
	}
}

// The activity history files each event under its minute by the injected
// clock and forgets minutes older than an hour.
func TestActivityPerMinute(t *testing.T) {
	clk := &clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	m := metrics.New(metrics.Config{Now: clk.Now, NoRuntime: true})
	m.Admitted("acme", "http", "new", time.Millisecond)
	m.Admitted("acme", "http", "duplicate", time.Millisecond)
	clk.Add(time.Minute)
	m.Admitted("acme", "smtp", "new", time.Millisecond)
	m.Attempted("acme", "maildir", "sent", time.Millisecond)
	m.Attempted("acme", "maildir", "in_doubt", time.Millisecond)
	m.Attempted("acme", "maildir", "failed", time.Millisecond)
	m.Admitted("other", "http", "new", time.Millisecond)
	for _, x := range m.Activity().LastHour("nobody") {
		if x.Accepted != 0 {
			t.Fatalf("a tenant with no activity sees %+v", x)
		}
	}
	if o := m.Activity().LastHour("other"); o[60].Accepted != 1 || o[59].Accepted != 0 {
		t.Fatalf("other tenant's history: %+v %+v", o[59], o[60])
	}
	h := m.Activity().LastHour("acme")
	if len(h) != 61 {
		t.Fatalf("%d minutes, want 61", len(h))
	}
	prev, cur := h[59], h[60]
	if prev.Accepted != 1 || prev.Duplicates != 1 || !prev.Start.Equal(time.Date(2030, 1, 2, 3, 4, 0, 0, time.UTC)) {
		t.Errorf("previous minute: %+v", prev)
	}
	if cur.Accepted != 1 || cur.Sent != 1 || cur.InDoubt != 1 || cur.Failed != 1 {
		t.Errorf("current minute: %+v", cur)
	}
	clk.Add(61 * time.Minute)
	for _, x := range m.Activity().LastHour("acme") {
		if x.Accepted+x.Duplicates+x.Sent != 0 {
			t.Fatalf("an hour later the history still holds %+v", x)
		}
	}
}
