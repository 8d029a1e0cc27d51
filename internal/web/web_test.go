package web_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/httpapi"
	"github.com/sendonce/sendonce/internal/metrics"
	"github.com/sendonce/sendonce/internal/schedule"
	"github.com/sendonce/sendonce/internal/web"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
	"github.com/sendonce/sendonce/transport"
)

const secret = "dashboard-test-token-0123456789"

// upstream accepts every email except those whose key starts with "doubt",
// whose answer it loses after the message was handed over.
type upstream struct{}

func (upstream) Name() string { return "upstream" }
func (upstream) Close() error { return nil }
func (upstream) Send(ctx context.Context, msg *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
	if err := commit(ctx); err != nil {
		return transport.Receipt{}, err
	}
	if strings.HasPrefix(msg.Key, "doubt") {
		return transport.Receipt{}, transport.Errorf(transport.Ambiguous, "final dot", 0, "connection reset before the reply")
	}
	return transport.Receipt{Reply: "250 2.0.0 Ok: queued"}, nil
}

// server is `sendonce serve`'s HTTP side on a real SQLite ledger: the
// dashboard in front of the API, with a token, and one schedule of the
// token's tenant (its fires are run by the test).
func server(t *testing.T) (*httptest.Server, *sendonce.Client, *schedule.Scheduler) {
	t.Helper()
	var m *metrics.Metrics
	st, err := sqlitestore.Open(t.Context(), t.TempDir(), sqlitestore.Options{OnCommit: func(c sqlitestore.CommitInfo) { m.Committed(c.Requests, c.Sync) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	m = metrics.New(metrics.Config{Store: st})
	c, err := sendonce.New(sendonce.Config{Store: st, Transport: upstream{}, Metrics: m,
		Dispatch: sendonce.DispatchConfig{PollInterval: 50 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	sched := newScheduler(t, st, c)
	m.AddSchedules(sched)
	api, err := httpapi.New(httpapi.Config{Client: c, Metrics: m, MetricsHandler: m.Handler(), Activity: m.Activity(),
		Tokens: []httpapi.Token{{Name: "ops", Tenant: "acme", Secret: secret}}, Schedules: sched})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(web.Handler(web.Config{API: api, AuthRequired: true}))
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return srv, c, sched
}

// newScheduler has one monthly schedule of tenant acme, "newsletter", to
// three recipients of a JSON Lines file, admitting in batches of two.
func newScheduler(t *testing.T, st *sqlitestore.Store, c *sendonce.Client) *schedule.Scheduler {
	t.Helper()
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	src, err := schedule.NewFileSource(write("people.jsonl", `{"email":"ann@example.net","name":"Ann"}
{"email":"bob@example.net","name":"Bob"}
{"email":"carol@example.net","name":"Carol"}
`))
	if err != nil {
		t.Fatal(err)
	}
	cron, err := schedule.ParseCron("0 9 1 * *")
	if err != nil {
		t.Fatal(err)
	}
	sched, err := schedule.New(schedule.Config{Store: st, Submitter: c, BatchSize: 2, Schedules: []schedule.Schedule{{
		Name: "newsletter", Cron: cron, Source: src, From: "news@example.com", Tenant: "acme",
		Templates: schedule.TemplateFiles{Subject: write("s.tmpl", "News for {{.name}}"), Text: write("t.tmpl", "Hello {{.name}}")},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	return sched
}

func submit(t *testing.T, srv *httptest.Server, key string, want int) {
	t.Helper()
	body := fmt.Sprintf(`{"from":"App <app@example.com>","to":["ann@example.net"],"subject":"About %s","text":"Hello from %s"}`, key, key)
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/emails", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+secret)
	req.Header.Set("Idempotency-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != want {
		t.Fatalf("submit %s: %d, want %d", key, resp.StatusCode, want)
	}
}

// chromium finds the browser, or skips loudly (fails under CI=true).
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	msg := "SKIPPING the dashboard's browser tests: no chromium on PATH; install it (Debian: apt-get install -y chromium)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

func artifacts(t *testing.T) string {
	dir := os.Getenv("SENDONCE_ARTIFACTS")
	if dir == "" {
		return t.TempDir()
	}
	dir = filepath.Join(dir, "dashboard")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

type browser struct {
	t    *testing.T
	ctx  context.Context
	dir  string
	mu   sync.Mutex
	errs []string
}

func newBrowser(t *testing.T) *browser {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	b := &browser{t: t, ctx: ctx, dir: artifacts(t)}
	// Start the browser with a first action, then watch its console.
	if err := chromedp.Do(ctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
	msgs := chromedp.Console(ctx)
	go func() {
		for m, err := range msgs {
			if err != nil {
				return
			}
			if m.Type == chromedp.ConsoleError || m.IsException() {
				b.mu.Lock()
				b.errs = append(b.errs, m.String())
				b.mu.Unlock()
			}
		}
	}()
	t.Logf("screenshots in %s", b.dir)
	return b
}

func (b *browser) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		b.t.Fatalf("%s: %v", what, err)
	}
}

// until waits for a JavaScript condition on the page (no sleeping).
func (b *browser) until(what, js string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	if _, err := chromedp.Run(ctx, chromedp.Poll[chromedp.Void](js, chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(25*time.Second))); err != nil {
		text, _ := chromedp.Run(b.ctx, chromedp.Evaluate[string](`document.getElementById("main").innerText`))
		b.t.Fatalf("waiting for %s (%s): %v\npage: %s", what, js, err, text)
	}
}

func (b *browser) screenshot(name string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(b.dir, name+".png"), png, 0o644); err != nil {
		b.t.Fatal(err)
	}
}

// rendered is true once the page shows no JavaScript value by mistake.
const rendered = `!/\[object |\bnull\b|\bundefined\b|NaN/.test(document.getElementById("main").innerText)`

func counter(id, want string) string {
	return fmt.Sprintf(`(document.getElementById(%q) || {}).textContent === %q`, id, want)
}

// The dashboard, driven in headless Chromium: sign in, counters that move
// with submissions and a duplicate, search, an email's page, and an
// in-doubt email resolved from the browser and seen resolved in the API.
func TestDashboardInChromium(t *testing.T) {
	srv, client, sched := server(t)
	b := newBrowser(t)

	b.do("open the dashboard", chromedp.Navigate(srv.URL+"/"))
	b.do("the sign-in form", chromedp.WaitVisible(chromedp.CSS("#login-token")))
	b.screenshot("01-sign-in")
	b.do("sign in", chromedp.SendKeys(chromedp.CSS("#login-token"), secret), chromedp.Click(chromedp.CSS("#login-form button[type=submit]")))
	b.until("the overview's counters", counter("c-total", "0"))

	for _, k := range []string{"welcome-ann", "welcome-bob", "invoice-7"} {
		submit(t, srv, k, http.StatusAccepted)
	}
	b.until("3 accepted", counter("c-total", "3"))
	b.until("3 sent", counter("c-sent", "3"))
	b.until("nothing suppressed yet", counter("c-duplicates", "0"))
	submit(t, srv, "welcome-ann", http.StatusOK) // the queue delivered it twice
	b.until("the duplicate counted as suppressed", counter("c-duplicates", "1"))
	b.until("still 3 accepted", counter("c-total", "3"))
	submit(t, srv, "doubt-carol", http.StatusAccepted)
	b.until("one in doubt", counter("c-in_doubt", "1"))
	b.until("the chart drawn", `document.querySelectorAll("#chart polyline").length === 5`)
	b.until("a clean overview", rendered)
	b.screenshot("02-overview")

	b.do("search", chromedp.Navigate(srv.URL+"/#/emails?key_prefix=welcome-"))
	b.until("two welcome emails listed", `document.querySelectorAll("#email-rows tr").length === 2 && document.body.dataset.ready === "emails"`)
	b.until("a clean list", rendered)
	b.screenshot("03-emails-search")

	b.do("open an email", chromedp.Click(chromedp.CSS(`#email-rows tr[data-key="welcome-ann"] a`)))
	b.until("its timeline and body", `!!document.getElementById("timeline") && (document.getElementById("body-text") || {}).textContent.includes("Hello from welcome-ann")`)
	b.until("its events on the timeline", `[...document.querySelectorAll("#timeline li")].map(li => li.dataset.kind).join(" ") === "accepted attempt committing sent duplicate"`)
	b.until("a clean email page", rendered)
	b.screenshot("04-email")

	b.do("the in-doubt queue", chromedp.Navigate(srv.URL+"/#/in-doubt"))
	b.do("its mark-sent button", chromedp.Click(chromedp.CSS(`#doubt-rows tr[data-key="doubt-carol"] button[data-action="mark_sent"]`)))
	b.do("the confirmation", chromedp.WaitVisible(chromedp.CSS("#confirm-ok")))
	b.screenshot("05-in-doubt-confirm")
	b.do("confirm", chromedp.Click(chromedp.CSS("#confirm-ok")))
	b.until("the queue emptied", `(document.getElementById("doubt-info") || {}).textContent === "Nothing is in doubt."`)
	b.until("a clean in-doubt page", rendered)
	b.screenshot("06-in-doubt-resolved")

	rec, err := client.Get(t.Context(), "acme", "doubt-carol")
	if err != nil {
		t.Fatal(err)
	}
	if rec.State != store.StateSent || rec.ResolvedBy != "mark_sent by api:ops" {
		t.Fatalf("after the dashboard's decision the API says %s, resolved by %q", rec.State, rec.ResolvedBy)
	}

	b.do("back to the overview", chromedp.Navigate(srv.URL+"/#/"))
	b.until("nothing in doubt", counter("c-in_doubt", "0"))
	b.until("4 sent", counter("c-sent", "4"))

	b.do("the schedules", chromedp.Navigate(srv.URL+"/#/schedules"))
	b.until("the schedule without fires", `!!document.querySelector('section[data-schedule="newsletter"] .no-fires') && document.body.dataset.ready === "schedules"`)
	at := time.Date(2030, 1, 1, 9, 0, 0, 0, time.UTC)
	if _, err := sched.RunFire(t.Context(), "newsletter", at, true); err != nil {
		t.Fatal(err)
	}
	key := store.FireKey("newsletter", at)
	row := fmt.Sprintf(`document.querySelector('tr[data-fire=%q]')`, key)
	b.until("the fire done with its counts", fmt.Sprintf(`!!%[1]s && %[1]s.dataset.state === "done" && %[1]s.querySelector('[data-count="admitted"]').textContent === "3" && %[1]s.querySelector('[data-count="duplicates"]').textContent === "0"`, row))
	b.until("a clean schedules page", rendered)
	b.screenshot("07-schedules")

	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.errs) > 0 {
		t.Fatalf("errors in the browser console:\n  %s", strings.Join(b.errs, "\n  "))
	}
}
