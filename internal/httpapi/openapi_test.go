package httpapi_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/goccy/go-yaml"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/httpapi"
	"github.com/sendonce/sendonce/internal/schedule"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// openAPIDoc is the part of docs/openapi.yaml the test checks: every
// operation and its response codes.
type openAPIDoc struct {
	OpenAPI string                                                   `yaml:"openapi"`
	Paths   map[string]map[string]struct{ Responses map[string]any } `yaml:"paths"`
}

func loadOpenAPI(t *testing.T) map[string][]string {
	t.Helper()
	b, err := os.ReadFile("../../docs/openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc openAPIDoc
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatalf("docs/openapi.yaml: %v", err)
	}
	if doc.OpenAPI != "3.1.0" {
		t.Fatalf("docs/openapi.yaml is OpenAPI %q, want 3.1.0", doc.OpenAPI)
	}
	ops := map[string][]string{}
	for path, methods := range doc.Paths {
		for method, op := range methods {
			route := strings.ToUpper(method) + " " + path
			for code := range op.Responses {
				ops[route] = append(ops[route], code)
			}
			slices.Sort(ops[route])
		}
	}
	return ops
}

const (
	oaSecret = "openapi-test-secret-1234"
	oaEmail  = `{"from":"app@example.com","to":["ann@example.net"],"subject":"Hello","text":"hi"}`
)

// oaEnv is a real API on a real SQLite ledger, with a token, small limits
// (so 413 is easy to provoke) and one in-doubt email, "doubt".
type oaEnv struct {
	t     *testing.T
	api   *httpapi.API
	store *sqlitestore.Store
}

func newOAEnv(t *testing.T) *oaEnv {
	t.Helper()
	st, err := sqlitestore.Open(context.Background(), t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	c, err := sendonce.New(sendonce.Config{Store: st, MaxMessageBytes: 1500})
	if err != nil {
		t.Fatal(err)
	}
	api, err := httpapi.New(httpapi.Config{Client: c, MaxBodyBytes: 4096, MaxBatch: 2,
		Tokens:         []httpapi.Token{{Name: "ci", Tenant: "t1", Secret: oaSecret}},
		MetricsHandler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "up 1\n") }),
		Schedules:      oaSchedules{st}})
	if err != nil {
		t.Fatal(err)
	}
	e := &oaEnv{t: t, api: api, store: st}
	if _, err := c.Submit(t.Context(), sendonce.Submission{Tenant: "t1", Key: "doubt", Email: sendonce.Email{From: "a@example.com", To: []string{"b@example.net"}, Subject: "x"}}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	recs, err := st.Claim(t.Context(), store.ClaimRequest{Owner: "test", Now: now.Add(time.Hour), Lease: time.Minute, Limit: 1})
	if err != nil || len(recs) != 1 {
		t.Fatalf("claim: %v %d", err, len(recs))
	}
	l := store.Lease{ID: recs[0].ID, Fence: recs[0].Fence}
	if err := st.MarkCommitting(t.Context(), l, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := st.Complete(t.Context(), store.Completion{Lease: l, Result: store.ResultInDoubt, Error: "lost", Now: now.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	return e
}

// oaSchedules is one schedule of tenant t1 whose fires are read from the
// ledger, so a closed store fails the route as it would in service.
type oaSchedules struct{ st *sqlitestore.Store }

func (s oaSchedules) Status(ctx context.Context, next int) ([]schedule.Status, error) {
	fires, err := s.st.ListFires(ctx, store.FireFilter{Schedule: "monthly", Limit: 1})
	if err != nil {
		return nil, err
	}
	cron, err := schedule.ParseCron("0 9 1 * *")
	if err != nil {
		return nil, err
	}
	st := schedule.Status{Schedule: schedule.Schedule{Name: "monthly", Cron: cron, Location: time.UTC, Tenant: "t1", CatchUp: schedule.CatchUpSkip}}
	st.Next = append(st.Next, cron.Next(time.Now(), time.UTC))
	if len(fires) > 0 {
		st.Last = &fires[0]
	}
	return []schedule.Status{st}, nil
}

func (s oaSchedules) Fires(ctx context.Context, f store.FireFilter) ([]store.Fire, error) {
	return s.st.ListFires(ctx, f)
}

type oaCase struct {
	route  string // as in the document: "POST /v1/emails"
	status int
	why    string
	method string
	path   string
	body   string
	hdr    map[string]string // added to the bearer token and JSON content type
	noAuth bool
	setup  func(e *oaEnv)
}

func closeStore(e *oaEnv) { e.store.Close() }

func oaCases() []oaCase {
	big := strings.Repeat("x", 5000)
	key := map[string]string{"Idempotency-Key": "k1"}
	return []oaCase{
		{route: "POST /v1/emails", status: 202, why: "new", path: "/v1/emails", body: oaEmail, hdr: key},
		{route: "POST /v1/emails", status: 200, why: "duplicate", path: "/v1/emails", body: oaEmail, hdr: key,
			setup: func(e *oaEnv) { e.do(oaCase{method: "POST", path: "/v1/emails", body: oaEmail, hdr: key}) }},
		{route: "POST /v1/emails", status: 400, why: "no key", path: "/v1/emails", body: oaEmail},
		{route: "POST /v1/emails", status: 401, why: "no token", path: "/v1/emails", body: oaEmail, hdr: key, noAuth: true},
		{route: "POST /v1/emails", status: 413, why: "rendered message too large", path: "/v1/emails", hdr: key,
			body: `{"from":"a@example.com","to":["b@example.net"],"subject":"x","text":"` + strings.Repeat("y", 3000) + `"}`},
		{route: "POST /v1/emails", status: 415, why: "not JSON", path: "/v1/emails", body: oaEmail, hdr: map[string]string{"Idempotency-Key": "k1", "Content-Type": "text/plain"}},
		{route: "POST /v1/emails", status: 422, why: "key reused", path: "/v1/emails", body: oaEmail, hdr: map[string]string{"Idempotency-Key": "doubt"}},
		{route: "POST /v1/emails", status: 503, why: "store closed", path: "/v1/emails", body: oaEmail, hdr: key, setup: closeStore},

		{route: "GET /v1/emails", status: 200, path: "/v1/emails?state=in_doubt&key_prefix=d&recipient=b@example.net&created_after=2000-01-01T00:00:00Z&created_before=2100-01-01T00:00:00Z&limit=5"},
		{route: "GET /v1/emails", status: 400, why: "bad state", path: "/v1/emails?state=lost"},
		{route: "GET /v1/emails", status: 401, path: "/v1/emails", noAuth: true},
		{route: "GET /v1/emails", status: 503, path: "/v1/emails", setup: closeStore},

		{route: "POST /v1/emails/batch", status: 200, path: "/v1/emails/batch", body: `{"emails":[{"key":"b1","from":"a@example.com","to":["b@example.net"],"subject":"x"}]}`},
		{route: "POST /v1/emails/batch", status: 400, why: "empty", path: "/v1/emails/batch", body: `{"emails":[]}`},
		{route: "POST /v1/emails/batch", status: 401, path: "/v1/emails/batch", body: `{"emails":[]}`, noAuth: true},
		{route: "POST /v1/emails/batch", status: 413, why: "too many", path: "/v1/emails/batch", body: `{"emails":[{"key":"1"},{"key":"2"},{"key":"3"}]}`},
		{route: "POST /v1/emails/batch", status: 415, path: "/v1/emails/batch", body: `{}`, hdr: map[string]string{"Content-Type": "text/csv"}},
		{route: "POST /v1/emails/batch", status: 503, path: "/v1/emails/batch", body: `{"emails":[{"key":"b1","from":"a@example.com","to":["b@example.net"],"subject":"x"}]}`, setup: closeStore},

		{route: "GET /v1/emails/{key}", status: 200, path: "/v1/emails/doubt"},
		{route: "GET /v1/emails/{key}", status: 401, path: "/v1/emails/doubt", noAuth: true},
		{route: "GET /v1/emails/{key}", status: 404, path: "/v1/emails/nothing"},
		{route: "GET /v1/emails/{key}", status: 503, path: "/v1/emails/doubt", setup: closeStore},

		{route: "GET /v1/emails/{key}/message", status: 200, path: "/v1/emails/doubt/message"},
		{route: "GET /v1/emails/{key}/message", status: 401, path: "/v1/emails/doubt/message", noAuth: true},
		{route: "GET /v1/emails/{key}/message", status: 404, path: "/v1/emails/nothing/message"},
		{route: "GET /v1/emails/{key}/message", status: 503, path: "/v1/emails/doubt/message", setup: closeStore},

		{route: "GET /v1/emails/{key}/events", status: 200, path: "/v1/emails/doubt/events"},
		{route: "GET /v1/emails/{key}/events", status: 401, path: "/v1/emails/doubt/events", noAuth: true},
		{route: "GET /v1/emails/{key}/events", status: 404, path: "/v1/emails/nothing/events"},
		{route: "GET /v1/emails/{key}/events", status: 503, path: "/v1/emails/doubt/events", setup: closeStore},

		{route: "GET /v1/stats", status: 200, path: "/v1/stats"},
		{route: "GET /v1/stats", status: 401, path: "/v1/stats", noAuth: true},
		{route: "GET /v1/stats", status: 503, path: "/v1/stats", setup: closeStore},

		{route: "GET /v1/schedules", status: 200, path: "/v1/schedules?fires=5"},
		{route: "GET /v1/schedules", status: 400, why: "bad fires", path: "/v1/schedules?fires=0"},
		{route: "GET /v1/schedules", status: 401, path: "/v1/schedules", noAuth: true},
		{route: "GET /v1/schedules", status: 503, path: "/v1/schedules", setup: closeStore},

		{route: "POST /v1/emails/{key}/resolve", status: 200, path: "/v1/emails/doubt/resolve", body: `{"action":"mark_sent"}`},
		{route: "POST /v1/emails/{key}/resolve", status: 400, path: "/v1/emails/doubt/resolve", body: `{"action":"maybe"}`},
		{route: "POST /v1/emails/{key}/resolve", status: 401, path: "/v1/emails/doubt/resolve", body: `{"action":"fail"}`, noAuth: true},
		{route: "POST /v1/emails/{key}/resolve", status: 404, path: "/v1/emails/nothing/resolve", body: `{"action":"fail"}`},
		{route: "POST /v1/emails/{key}/resolve", status: 409, path: "/v1/emails/doubt/resolve", body: `{"action":"fail"}`,
			setup: func(e *oaEnv) {
				e.do(oaCase{method: "POST", path: "/v1/emails/doubt/resolve", body: `{"action":"fail"}`})
			}},
		{route: "POST /v1/emails/{key}/resolve", status: 413, path: "/v1/emails/doubt/resolve", body: `{"action":"` + big + `"}`},
		{route: "POST /v1/emails/{key}/resolve", status: 415, path: "/v1/emails/doubt/resolve", body: `{}`, hdr: map[string]string{"Content-Type": "text/plain"}},
		{route: "POST /v1/emails/{key}/resolve", status: 503, path: "/v1/emails/doubt/resolve", body: `{"action":"fail"}`, setup: closeStore},

		{route: "GET /healthz", status: 200, path: "/healthz", noAuth: true},
		{route: "GET /healthz", status: 503, path: "/healthz", noAuth: true, setup: closeStore},
		{route: "GET /readyz", status: 200, path: "/readyz", noAuth: true},
		{route: "GET /readyz", status: 503, path: "/readyz", noAuth: true, setup: closeStore},
		{route: "GET /metrics", status: 200, path: "/metrics", noAuth: true},
	}
}

func (e *oaEnv) do(c oaCase) int {
	e.t.Helper()
	method := c.method
	if method == "" {
		method, _, _ = strings.Cut(c.route, " ")
	}
	var body io.Reader
	if c.body != "" {
		body = strings.NewReader(c.body)
	}
	req := httptest.NewRequest(method, c.path, body)
	if c.body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if !c.noAuth {
		req.Header.Set("Authorization", "Bearer "+oaSecret)
	}
	for k, v := range c.hdr {
		req.Header.Set(k, v)
	}
	w := httptest.NewRecorder()
	e.api.ServeHTTP(w, req)
	return w.Code
}

// docs/openapi.yaml describes exactly the routes the API serves, and every
// response code it lists is provoked from the real handlers.
func TestOpenAPIMatchesHandlers(t *testing.T) {
	doc := loadOpenAPI(t)
	e := newOAEnv(t)

	var documented []string
	for route := range doc {
		documented = append(documented, route)
	}
	slices.Sort(documented)
	served := e.api.Routes()
	slices.Sort(served)
	if !slices.Equal(documented, served) {
		t.Errorf("routes in docs/openapi.yaml:\n  %v\nroutes served:\n  %v", documented, served)
	}

	cases := oaCases()
	provoked := map[string][]string{}
	for _, c := range cases {
		code := fmt.Sprint(c.status)
		if !slices.Contains(provoked[c.route], code) {
			provoked[c.route] = append(provoked[c.route], code)
		}
	}
	for route, codes := range doc {
		slices.Sort(provoked[route])
		if !slices.Equal(codes, provoked[route]) {
			t.Errorf("%s: docs/openapi.yaml lists %v; the test provokes %v (add the missing case, or fix the document)", route, codes, provoked[route])
		}
	}
	for route := range provoked {
		if _, ok := doc[route]; !ok {
			t.Errorf("%s is provoked by the test but not in docs/openapi.yaml", route)
		}
	}

	for _, c := range cases {
		t.Run(fmt.Sprintf("%s/%d/%s", c.route, c.status, c.why), func(t *testing.T) {
			e := newOAEnv(t)
			if c.setup != nil {
				c.setup(e)
			}
			e.t = t
			if got := e.do(c); got != c.status {
				t.Errorf("%s %s: status %d, want %d", c.route, c.path, got, c.status)
			}
		})
	}
}
