package schedule

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// fakeClock is moved by the test; After never fires, since tests drive the
// scheduler with Tick.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}
func (c *fakeClock) After(time.Duration) <-chan time.Time { return nil }
func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.now = t
	c.mu.Unlock()
}
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// syncBuffer collects log output from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type env struct {
	t      *testing.T
	dir    string
	store  *sqlitestore.Store
	client *sendonce.Client
	clock  *fakeClock
	logs   *syncBuffer
}

func newEnv(t *testing.T, now time.Time) *env {
	t.Helper()
	dir := t.TempDir()
	st, err := sqlitestore.Open(t.Context(), filepath.Join(dir, "data"), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	clock := &fakeClock{now: now}
	c, err := sendonce.New(sendonce.Config{Store: st, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, dir: dir, store: st, client: c, clock: clock, logs: &syncBuffer{}}
}

func (e *env) write(name, content string) string {
	e.t.Helper()
	p := filepath.Join(e.dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// recipients writes a JSON Lines file of n recipients u0000@example.com...
func (e *env) recipients(name string, n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, `{"email": "u%04d@example.com", "name": "User %d"}`+"\n", i, i)
	}
	return e.write(name, b.String())
}

func (e *env) templates(prefix string) TemplateFiles {
	return TemplateFiles{
		Subject: e.write(prefix+"-subject.tmpl", "Your reminder for {{.Fire.At.Format \"January 2006\"}}\n"),
		Text:    e.write(prefix+"-text.tmpl", "Hello {{.name}},\nthis is your monthly reminder.\n"),
		HTML:    e.write(prefix+"-html.tmpl", "<p>Hello {{.name}}</p>\n"),
	}
}

func (e *env) schedule(name, cron, rcpts string, tz *time.Location) Schedule {
	e.t.Helper()
	src, err := NewFileSource(rcpts)
	if err != nil {
		e.t.Fatal(err)
	}
	return Schedule{Name: name, Cron: mustCron(e.t, cron), Location: tz, Source: src, Templates: e.templates(name),
		From: "Reminders <noreply@example.org>"}
}

func (e *env) scheduler(owner string, scheds ...Schedule) *Scheduler {
	e.t.Helper()
	s, err := New(Config{Store: e.store, Submitter: e.client, Schedules: scheds, Owner: owner, Clock: e.clock,
		Logger: slog.New(slog.NewTextHandler(e.logs, nil)), BatchSize: 7})
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

func (e *env) fires(name string) []store.Fire {
	e.t.Helper()
	fs, err := e.store.ListFires(e.t.Context(), store.FireFilter{Schedule: name, Limit: 1000})
	if err != nil {
		e.t.Fatal(err)
	}
	return fs
}

func fireTimes(fs []store.Fire) []string {
	var out []string
	for i := len(fs) - 1; i >= 0; i-- {
		out = append(out, fs[i].ScheduledAt.Format(time.RFC3339))
	}
	return out
}

// emails returns every email of a fire key in the ledger, by recipient.
func (e *env) emails(fireKey string) map[string]int {
	e.t.Helper()
	out := map[string]int{}
	cursor := ""
	for {
		p, err := e.store.List(e.t.Context(), store.Filter{Tenant: sendonce.DefaultTenant, Limit: store.MaxListLimit, Cursor: cursor})
		if err != nil {
			e.t.Fatal(err)
		}
		for _, r := range p.Records {
			if r.Tags["fire"] == fireKey {
				out[r.To[0]]++
			}
		}
		if p.Next == "" {
			return out
		}
		cursor = p.Next
	}
}

func (e *env) wantAllOnce(fireKey string, n int) {
	e.t.Helper()
	got := e.emails(fireKey)
	if len(got) != n {
		e.t.Fatalf("fire %s: %d recipients in the ledger, want %d", fireKey, len(got), n)
	}
	for i := range n {
		if a := fmt.Sprintf("u%04d@example.com", i); got[a] != 1 {
			e.t.Fatalf("fire %s: %s has %d emails, want 1", fireKey, a, got[a])
		}
	}
}

// A whole fire: every recipient admitted once, with its rendered content,
// the key derived from the fire key and the address, the record done.
func TestFireAdmitsEveryRecipientOnce(t *testing.T) {
	e := newEnv(t, utc("2030-05-01T07:00:10Z")) // 09:00:10 in Berlin
	s := e.scheduler("node-1", e.schedule("monthly", "0 9 1 * *", e.recipients("r.jsonl", 20), mustLoc(t, "Europe/Berlin")))
	s.Tick(t.Context())
	fs := e.fires("monthly")
	if len(fs) != 1 || fs[0].State != store.FireDone || fs[0].Admitted != 20 || fs[0].Key != "monthly@2030-05-01T07:00:00Z" {
		t.Fatalf("fires: %+v", fs)
	}
	e.wantAllOnce(fs[0].Key, 20)
	r, err := e.client.Get(t.Context(), "", "monthly@2030-05-01T07:00:00Z/u0003@example.com")
	if err != nil {
		t.Fatal(err)
	}
	if r.Subject != "Your reminder for May 2030" || r.Source != "schedule" {
		t.Fatalf("record: subject %q source %q", r.Subject, r.Source)
	}
	// Ticking again, on this node or another, admits nothing more.
	e.scheduler("node-2", e.schedule("monthly", "0 9 1 * *", filepath.Join(e.dir, "r.jsonl"), mustLoc(t, "Europe/Berlin"))).Tick(t.Context())
	s.Tick(t.Context())
	if fs := e.fires("monthly"); len(fs) != 1 || fs[0].Attempts != 1 {
		t.Fatalf("after more ticks: %+v", fs)
	}
}

// Keys are a pure function of (schedule, instant, address): stable across
// runs and nodes, and always valid idempotency keys.
func TestKeysStable(t *testing.T) {
	at := utc("2030-12-01T08:00:00Z")
	fk := store.FireKey("cron_monthly_email_reminder", at)
	if fk != "cron_monthly_email_reminder@2030-12-01T08:00:00Z" {
		t.Fatalf("fire key %q", fk)
	}
	if got := store.FireKey("cron_monthly_email_reminder", at.In(mustLoc(t, "America/New_York"))); got != fk {
		t.Fatalf("the fire key depends on the zone of the instant: %q", got)
	}
	if k := EmailKey(fk, "Ann@Example.COM"); k != fk+"/Ann@example.com" {
		t.Fatalf("email key %q", k)
	}
	long := strings.Repeat("a", 240) + "@example.com"
	k1, k2 := EmailKey(fk, long), EmailKey(fk, long)
	if k1 != k2 || sendonce.ValidateKey(k1) != nil || !strings.HasPrefix(k1, fk+"/sha256:") {
		t.Fatalf("long address key %q (valid: %v)", k1, sendonce.ValidateKey(k1))
	}
	if EmailKey(fk, "a@example.com") == EmailKey(store.FireKey("other", at), "a@example.com") {
		t.Fatal("two schedules share an email key")
	}
}

// A fire that dies after admitting a batch but before recording it is
// resumed from the last recorded cursor; the batch admitted twice is
// answered as duplicates, so every recipient has one email.
func TestResumeAfterCrashAdmitsEachOnce(t *testing.T) {
	e := newEnv(t, utc("2030-05-01T09:00:10Z"))
	sc := e.schedule("monthly", "0 9 1 * *", e.recipients("r.jsonl", 40), time.UTC)
	crash := &crashingSubmitter{next: e.client, after: 3}
	s, err := New(Config{Store: e.store, Submitter: crash, Schedules: []Schedule{sc}, Owner: "node-1", Clock: e.clock, BatchSize: 7,
		Logger: slog.New(slog.NewTextHandler(e.logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	s.Tick(t.Context())
	f := e.fires("monthly")[0]
	if f.State != store.FireWaiting || f.Cursor == "" || f.Admitted != 14 {
		t.Fatalf("after the crash: %+v", f)
	}
	// Another node takes it after the backoff and finishes it.
	e.clock.Add(time.Hour)
	e.scheduler("node-2", sc).Tick(t.Context())
	f = e.fires("monthly")[0]
	// The third batch was admitted by the dead run and again by this one:
	// 14 recorded + 19 new after the cursor, and 7 duplicates.
	if f.State != store.FireDone || f.Admitted != 33 || f.Duplicates != 7 || f.Owner != "node-2" {
		t.Fatalf("resumed fire: %+v", f)
	}
	e.wantAllOnce(f.Key, 40)
}

// crashingSubmitter admits batches, and after `after` of them fails as if
// the node died between admitting a batch and recording its cursor.
type crashingSubmitter struct {
	next  Submitter
	after int
	crash func() // called at the crash, if set
	n     atomic.Int64
}

func (c *crashingSubmitter) SubmitBatch(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
	res, err := c.next.SubmitBatch(ctx, subs)
	if err == nil && c.n.Add(1) == int64(c.after) {
		if c.crash != nil {
			c.crash()
		}
		return nil, errors.New("node died after admitting")
	}
	return res, err
}

// A template error stops only its fire: the other schedule's fire of the
// same instant completes, the error names the file and line in the log and
// the fire record, and after the file is fixed the retry finishes the fire
// without admitting anyone twice.
func TestTemplateErrorStopsOnlyThatFireAndIsRetried(t *testing.T) {
	e := newEnv(t, utc("2030-05-01T09:00:10Z"))
	good := e.schedule("good", "0 9 * * *", e.recipients("good.jsonl", 10), time.UTC)
	bad := e.schedule("bad", "0 9 * * *", e.recipients("bad.jsonl", 10), time.UTC)
	s := e.scheduler("node-1", good, bad)
	// Broken after the start-up check, as an operator's edit would.
	e.write("bad-text.tmpl", "Hello {{.name}},\n\n{{.name | nosuchfunc}}\n")
	s.Tick(t.Context())
	g, b := e.fires("good")[0], e.fires("bad")[0]
	if g.State != store.FireDone || g.Admitted != 10 {
		t.Fatalf("the good schedule's fire: %+v", g)
	}
	if b.State != store.FireWaiting || !strings.Contains(b.LastError, "bad-text.tmpl:3") || b.NextAttempt.IsZero() {
		t.Fatalf("the bad schedule's fire: %+v", b)
	}
	if !strings.Contains(e.logs.String(), "bad-text.tmpl:3") || !strings.Contains(e.logs.String(), "fire stopped by an error") {
		t.Fatalf("the log does not name the template error:\n%s", e.logs)
	}
	// Not retried before its time.
	s.Tick(t.Context())
	if f := e.fires("bad")[0]; f.Attempts != 1 {
		t.Fatalf("retried before the backoff: %+v", f)
	}
	e.write("bad-text.tmpl", "Hello {{.name}}\n")
	e.clock.Set(b.NextAttempt)
	s.Tick(t.Context())
	b = e.fires("bad")[0]
	if b.State != store.FireDone || b.Admitted != 10 || b.Attempts != 2 || b.LastError != "" {
		t.Fatalf("the retried fire: %+v", b)
	}
	e.wantAllOnce(b.Key, 10)
}

// A template that fails for one recipient's data stops the fire at that
// batch: earlier batches stay admitted, and the retry resumes from there.
func TestTemplateDataErrorResumesFromCursor(t *testing.T) {
	e := newEnv(t, utc("2030-05-01T09:00:10Z"))
	var b strings.Builder
	for i := range 20 {
		if i == 15 {
			fmt.Fprintf(&b, `{"email": "u%04d@example.com"}`+"\n", i) // no name: missingkey=error
			continue
		}
		fmt.Fprintf(&b, `{"email": "u%04d@example.com", "name": "User %d"}`+"\n", i, i)
	}
	path := e.write("r.jsonl", b.String())
	s := e.scheduler("node-1", e.schedule("daily", "0 9 * * *", path, time.UTC))
	s.Tick(t.Context())
	f := e.fires("daily")[0]
	if f.State != store.FireWaiting || f.Admitted != 14 || !strings.Contains(f.LastError, "u0015@example.com") || !strings.Contains(f.LastError, "text.tmpl:1") {
		t.Fatalf("fire after the data error: %+v", f)
	}
	e.write("r.jsonl", strings.Replace(b.String(), `{"email": "u0015@example.com"}`, `{"email": "u0015@example.com", "name": "Fixed"}`, 1))
	e.clock.Set(f.NextAttempt)
	s.Tick(t.Context())
	f = e.fires("daily")[0]
	if f.State != store.FireDone || f.Admitted != 20 || f.Duplicates != 0 {
		t.Fatalf("resumed fire: %+v", f)
	}
	e.wantAllOnce(f.Key, 20)
}

// A recipient source that fails (an HTTP endpoint answering 500) stops only
// its fire, which is retried with backoff until the source answers.
func TestRecipientSourceErrorIsRetried(t *testing.T) {
	e := newEnv(t, utc("2030-05-01T09:00:10Z"))
	var failing atomic.Bool
	failing.Store(true)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() {
			http.Error(w, "database is down", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		for i := range 12 {
			fmt.Fprintf(w, `{"email": "u%04d@example.com", "name": "User %d"}`+"\n", i, i)
		}
	}))
	t.Cleanup(srv.Close)
	web := e.schedule("web", "0 9 * * *", e.recipients("unused.jsonl", 1), time.UTC)
	web.Source = &HTTPSource{URL: srv.URL + "/recipients"}
	file := e.schedule("file", "0 9 * * *", e.recipients("file.jsonl", 5), time.UTC)
	s := e.scheduler("node-1", web, file)
	s.Tick(t.Context())
	if f := e.fires("file")[0]; f.State != store.FireDone {
		t.Fatalf("the other schedule's fire: %+v", f)
	}
	w := e.fires("web")[0]
	if w.State != store.FireWaiting || !strings.Contains(w.LastError, "500") || !strings.Contains(w.LastError, "database is down") {
		t.Fatalf("the failing source's fire: %+v", w)
	}
	first := w.NextAttempt
	e.clock.Set(first)
	s.Tick(t.Context()) // still failing: the backoff doubles
	w = e.fires("web")[0]
	if w.State != store.FireWaiting || w.Attempts != 2 || w.NextAttempt.Sub(first) != 2*DefaultBackoffBase {
		t.Fatalf("second failure: %+v (backoff %v)", w, w.NextAttempt.Sub(first))
	}
	failing.Store(false)
	e.clock.Set(w.NextAttempt)
	s.Tick(t.Context())
	w = e.fires("web")[0]
	if w.State != store.FireDone || w.Admitted != 12 {
		t.Fatalf("after the source recovered: %+v", w)
	}
	e.wantAllOnce(w.Key, 12)
	if !strings.Contains(e.logs.String(), "database is down") {
		t.Fatalf("the log does not report the source error:\n%s", e.logs)
	}
}

// Catch-up after downtime, one case per policy. An hourly schedule fires
// at 10:00; the nodes are down until 15:30; max_lag is 3h.
func TestCatchUp(t *testing.T) {
	for _, tc := range []struct {
		policy CatchUp
		want   []string
	}{
		{CatchUpSkip, []string{"2030-05-01T10:00:00Z"}},
		{CatchUpLatest, []string{"2030-05-01T10:00:00Z", "2030-05-01T15:00:00Z"}},
		{CatchUpAll, []string{"2030-05-01T10:00:00Z", "2030-05-01T13:00:00Z", "2030-05-01T14:00:00Z", "2030-05-01T15:00:00Z"}},
	} {
		t.Run(string(tc.policy), func(t *testing.T) {
			e := newEnv(t, utc("2030-05-01T10:00:30Z"))
			sc := e.schedule("hourly", "0 * * * *", e.recipients("r.jsonl", 3), time.UTC)
			sc.CatchUp, sc.MaxLag = tc.policy, 3*time.Hour
			s := e.scheduler("node-1", sc)
			s.Tick(t.Context())
			e.clock.Set(utc("2030-05-01T15:30:00Z"))
			s.Tick(t.Context())
			s.Tick(t.Context()) // a second tick changes nothing
			fs := e.fires("hourly")
			wantFires(t, "fires", fireTimes(fs), tc.want...)
			for _, f := range fs {
				if f.State != store.FireDone {
					t.Fatalf("fire %s: %s", f.Key, f.State)
				}
			}
			// Back on time: the 16:00 fire runs under every policy.
			e.clock.Set(utc("2030-05-01T16:00:05Z"))
			s.Tick(t.Context())
			if got := fireTimes(e.fires("hourly")); got[len(got)-1] != "2030-05-01T16:00:00Z" {
				t.Fatalf("the on-time fire after catch-up did not run: %v", got)
			}
		})
	}
}

// A schedule with no fire recorded yet does not catch up on instants from
// before it existed, whatever its policy.
func TestNewScheduleDoesNotCatchUp(t *testing.T) {
	e := newEnv(t, utc("2030-05-01T15:30:00Z"))
	sc := e.schedule("hourly", "0 * * * *", e.recipients("r.jsonl", 3), time.UTC)
	sc.CatchUp, sc.MaxLag = CatchUpAll, 24*time.Hour
	e.scheduler("node-1", sc).Tick(t.Context())
	if fs := e.fires("hourly"); len(fs) != 0 {
		t.Fatalf("a new schedule caught up: %v", fireTimes(fs))
	}
}

// Daylight saving end to end: a node ticking every minute through both
// transition nights of Europe/Berlin fires the 02:30 schedule once per
// night: at the end of the gap in spring, at the first 02:30 in autumn.
func TestSchedulerDST(t *testing.T) {
	berlin := mustLoc(t, "Europe/Berlin")
	for _, tc := range []struct {
		name, from, to string
		want           []string
	}{
		{"spring", "2030-03-30T22:00:00Z", "2030-03-31T04:00:00Z", []string{"2030-03-31T01:00:00Z"}},
		{"autumn", "2030-10-26T22:00:00Z", "2030-10-27T04:00:00Z", []string{"2030-10-27T00:30:00Z"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, utc(tc.from))
			s := e.scheduler("node-1", e.schedule("night", "30 2 * * *", e.recipients("r.jsonl", 2), berlin))
			for e.clock.Now().Before(utc(tc.to)) {
				s.Tick(t.Context())
				e.clock.Add(time.Minute)
			}
			wantFires(t, "fires", fireTimes(e.fires("night")), tc.want...)
			e.wantAllOnce(e.fires("night")[0].Key, 2)
		})
	}
}

// Three scheduler instances on one store, ticking the same clock at once:
// each instant fires once and each recipient gets one email per fire.
func TestThreeInstancesFireOnce(t *testing.T) {
	e := newEnv(t, utc("2030-05-01T09:00:00Z"))
	path := e.recipients("r.jsonl", 10)
	var nodes []*Scheduler
	for i := range 3 {
		nodes = append(nodes, e.scheduler(fmt.Sprintf("node-%d", i), e.schedule("often", "*/10 * * * * *", path, time.UTC)))
	}
	for range 12 { // two minutes in 10s steps
		var wg sync.WaitGroup
		for _, n := range nodes {
			wg.Go(func() { n.Tick(t.Context()) })
		}
		wg.Wait()
		e.clock.Add(10 * time.Second)
	}
	// The first tick at 09:00:00 also runs the instants of the minute
	// before, which are still on time (OnTime 1m): 6 + 12 fires.
	fs := e.fires("often")
	if len(fs) != 18 || fireTimes(fs)[0] != "2030-05-01T08:59:00Z" {
		t.Fatalf("%d fires, want 18 from 08:59:00: %v", len(fs), fireTimes(fs))
	}
	for _, f := range fs {
		if f.State != store.FireDone || f.Admitted != 10 || f.Attempts != 1 {
			t.Fatalf("fire %+v", f)
		}
		e.wantAllOnce(f.Key, 10)
	}
}

// A manual fire uses the fire's own key: running it again, or letting the
// scheduler reach the same instant, admits nothing twice.
func TestManualRunSameKeys(t *testing.T) {
	e := newEnv(t, utc("2030-05-01T08:00:00Z"))
	s := e.scheduler("node-1", e.schedule("monthly", "0 9 1 * *", e.recipients("r.jsonl", 5), time.UTC))
	at := utc("2030-05-01T09:00:00Z")
	f, err := s.RunFire(t.Context(), "monthly", at, true)
	if err != nil || f.State != store.FireDone || f.Admitted != 5 {
		t.Fatalf("manual run: %+v, %v", f, err)
	}
	if _, err := s.RunFire(t.Context(), "monthly", at, true); !errors.Is(err, store.ErrFireDone) {
		t.Fatalf("second manual run: %v, want ErrFireDone", err)
	}
	e.clock.Set(at.Add(time.Second))
	s.Tick(t.Context())
	fs := e.fires("monthly")
	if len(fs) != 1 || !fs[0].Manual {
		t.Fatalf("fires: %+v", fs)
	}
	e.wantAllOnce(fs[0].Key, 5)
}

func TestPreview(t *testing.T) {
	e := newEnv(t, utc("2030-05-01T08:00:00Z"))
	sc := e.schedule("monthly", "0 9 1 * *", e.recipients("r.jsonl", 5), time.UTC)
	sc.Templates.HTML = e.write("x.html", `<p>Hello {{.name}}</p>`)
	e.write("r.jsonl", `{"email": "ann@example.com", "name": "<Ann & Bob>"}`+"\n")
	s := e.scheduler("node-1", sc)
	out, found, err := s.Preview(t.Context(), "monthly", "ann@example.com")
	if err != nil || !found {
		t.Fatalf("Preview: %v (found %v)", err, found)
	}
	if out.Subject != "Your reminder for May 2030" || out.Text != "Hello <Ann & Bob>,\nthis is your monthly reminder.\n" ||
		out.HTML != "<p>Hello &lt;Ann &amp; Bob&gt;</p>" {
		t.Fatalf("preview: %+v", out)
	}
	if fs := e.fires("monthly"); len(fs) != 0 {
		t.Fatalf("preview recorded a fire: %+v", fs)
	}
	if _, found, _ := s.Preview(t.Context(), "monthly", "nobody@example.com"); found {
		t.Fatal("preview found a recipient who is not in the source")
	}
}

func TestTemplateParseErrorNamesFileAndLine(t *testing.T) {
	e := newEnv(t, time.Now())
	sc := e.schedule("monthly", "0 9 1 * *", e.recipients("r.jsonl", 1), time.UTC)
	e.write("monthly-html.tmpl", "<p>\n{{.name}\n</p>")
	_, err := New(Config{Store: e.store, Submitter: e.client, Schedules: []Schedule{sc}})
	if err == nil || !strings.Contains(err.Error(), "monthly-html.tmpl:2") || !strings.Contains(err.Error(), "schedules[0]") {
		t.Fatalf("New with a broken template: %v", err)
	}
}

func TestFileSourcesResume(t *testing.T) {
	e := newEnv(t, time.Now())
	csvPath := e.write("r.csv", "name,email,plan\nAnn,ann@example.com,gold\n\"Bob, Jr.\",bob@example.com,silver\nCy,cy@example.com,\n")
	var jl strings.Builder
	jl.WriteString(`{"email":"ann@example.com","name":"Ann"}` + "\n\n")
	jl.WriteString(`{"address":"bob@example.com","name":"Bob"}` + "\n")
	jl.WriteString(`{"email":"cy@example.com","n":1}`) // no final newline
	jlPath := e.write("r.jsonl", jl.String())
	for _, path := range []string{csvPath, jlPath} {
		src, err := NewFileSource(path)
		if err != nil {
			t.Fatal(err)
		}
		var all []string
		cursor := ""
		for {
			rd, err := src.Open(t.Context(), cursor)
			if err != nil {
				t.Fatal(err)
			}
			rows, next, err := rd.Next(t.Context(), 1)
			rd.Close()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, rows[0].Address)
			cursor = next
		}
		if strings.Join(all, " ") != "ann@example.com bob@example.com cy@example.com" {
			t.Fatalf("%s read one row per open: %v", path, all)
		}
	}
	bad := e.write("bad.csv", "name,mail\nAnn,ann@example.com\n")
	src, _ := NewFileSource(bad)
	if _, err := src.Open(t.Context(), ""); err == nil || !strings.Contains(err.Error(), "no email or address column") {
		t.Fatalf("CSV without an email column: %v", err)
	}
	if _, err := NewFileSource(e.write("r.txt", "")); err == nil || !strings.Contains(err.Error(), ".csv") {
		t.Fatalf("unknown extension: %v", err)
	}
}
