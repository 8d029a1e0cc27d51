package httpapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/httpapi"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

type env struct {
	t      *testing.T
	srv    *httptest.Server
	store  *sqlitestore.Store
	client *sendonce.Client
}

func newEnv(t *testing.T, tokens ...httpapi.Token) *env {
	t.Helper()
	st, err := sqlitestore.Open(context.Background(), t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	c, err := sendonce.New(sendonce.Config{Store: st, MaxMessageBytes: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	api, err := httpapi.New(httpapi.Config{Client: c, Tokens: tokens, MaxBodyBytes: 256 << 10, MaxBatch: 10})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api)
	t.Cleanup(srv.Close)
	return &env{t: t, srv: srv, store: st, client: c}
}

type resp struct {
	status int
	header http.Header
	body   map[string]any
	raw    string
}

func (e *env) do(method, path string, hdr map[string]string, body string) resp {
	e.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, e.srv.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	r, err := e.srv.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer r.Body.Close()
	raw, _ := io.ReadAll(r.Body)
	out := resp{status: r.StatusCode, header: r.Header, raw: string(raw)}
	_ = json.Unmarshal(raw, &out.body)
	return out
}

func (r resp) errField() (code, field, msg string) {
	e, _ := r.body["error"].(map[string]any)
	code, _ = e["code"].(string)
	field, _ = e["field"].(string)
	msg, _ = e["message"].(string)
	return
}

const emailJSON = `{"from": "Difio <noreply@example.org>", "to": ["ann@example.com"], "cc": [], "bcc": [], "reply_to": "", "subject": "Your monthly reminder", "text": "Hello", "html": "<p>Hello</p>", "headers": {"X-Campaign": "monthly"}, "tags": {"kind": "reminder"}}`

func key(k string) map[string]string { return map[string]string{"Idempotency-Key": k} }

func TestSubmitThenDuplicateThenConflict(t *testing.T) {
	e := newEnv(t)
	r := e.do("POST", "/v1/emails", key("reminder/ann/2013-12"), emailJSON)
	if r.status != http.StatusAccepted {
		t.Fatalf("first submit: %d %s", r.status, r.raw)
	}
	if r.body["state"] != "queued" || r.body["key"] != "reminder/ann/2013-12" || r.body["message_id"] == "" {
		t.Fatalf("unexpected record %s", r.raw)
	}
	mid := r.body["message_id"]

	r = e.do("POST", "/v1/emails", key("reminder/ann/2013-12"), emailJSON)
	if r.status != http.StatusOK || r.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("repeat: %d replayed=%q %s", r.status, r.header.Get("Idempotent-Replayed"), r.raw)
	}
	if r.body["duplicates"] != 1.0 || r.body["message_id"] != mid {
		t.Fatalf("repeat record %s", r.raw)
	}
	// The draft's quoted structured-field form names the same key.
	r = e.do("POST", "/v1/emails", key(`"reminder/ann/2013-12"`), emailJSON)
	if r.status != http.StatusOK {
		t.Fatalf("quoted key: %d %s", r.status, r.raw)
	}

	other := strings.Replace(emailJSON, "Hello", "Goodbye", 1)
	r = e.do("POST", "/v1/emails", key("reminder/ann/2013-12"), other)
	if code, field, _ := r.errField(); r.status != http.StatusUnprocessableEntity || code != "idempotency_key_reused" || field != "Idempotency-Key" {
		t.Fatalf("conflict: %d %s", r.status, r.raw)
	}
	got := e.do("GET", "/v1/emails/reminder%2Fann%2F2013-12", nil, "")
	if got.status != 200 || got.body["duplicates"] != 2.0 {
		t.Fatalf("get after conflict: %d %s", got.status, got.raw)
	}
	recs, err := e.store.Claim(context.Background(), store.ClaimRequest{Owner: "t", Now: time.Now(), Lease: time.Minute, Limit: 1})
	if err != nil || len(recs) != 1 || !bytes.Contains(recs[0].Data, []byte("Hello")) || bytes.Contains(recs[0].Data, []byte("Goodbye")) {
		t.Fatal("the conflicting payload overwrote the stored email")
	}
}

func TestConcurrentSameKeyOneRecord(t *testing.T) {
	e := newEnv(t)
	const n = 50
	var wg sync.WaitGroup
	statuses := make(chan int, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest("POST", e.srv.URL+"/v1/emails", strings.NewReader(emailJSON))
			req.Header.Set("Idempotency-Key", "race")
			r, err := e.srv.Client().Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			r.Body.Close()
			statuses <- r.StatusCode
		}()
	}
	wg.Wait()
	close(statuses)
	count := map[int]int{}
	for s := range statuses {
		count[s]++
	}
	if count[202] != 1 || count[200] != n-1 {
		t.Fatalf("statuses = %v, want one 202 and %d 200", count, n-1)
	}
	rec, err := e.store.Get(context.Background(), sendonce.DefaultTenant, "race")
	if err != nil || rec.Duplicates != n-1 {
		t.Fatalf("record %+v, %v", rec, err)
	}
}

// TestBadInputChangesNothing sends each kind of bad request and checks that
// the answer names the field and that nothing was stored.
func TestBadInputChangesNothing(t *testing.T) {
	e := newEnv(t)
	big := `{"from": "a@example.org", "to": ["b@example.com"], "subject": "s", "text": "` + strings.Repeat("x", 300<<10) + `"}`
	tooBigMessage := `{"from": "a@example.org", "to": ["b@example.com"], "subject": "s", "text": "` + strings.Repeat("x", 100<<10) + `"}`
	cases := []struct {
		name   string
		hdr    map[string]string
		body   string
		status int
		code   string
		field  string
	}{
		{"malformed json", key("k1"), `{"from": "a@example.org",`, 400, "invalid_json", ""},
		{"not an object", key("k1"), `[1,2]`, 400, "invalid_json", ""},
		{"trailing data", key("k1"), emailJSON + `{}`, 400, "invalid_json", ""},
		{"empty body", key("k1"), ``, 400, "invalid_json", ""},
		{"unknown field", key("k1"), `{"from": "a@example.org", "to": ["b@example.com"], "subject": "s", "tracking": true}`, 400, "invalid_json", "tracking"},
		{"wrong type", key("k1"), `{"from": "a@example.org", "to": "b@example.com", "subject": "s"}`, 400, "invalid_json", "to"},
		{"missing from", key("k1"), `{"to": ["b@example.com"], "subject": "s"}`, 400, "invalid_field", "from"},
		{"invalid from", key("k1"), `{"from": "nobody", "to": ["b@example.com"], "subject": "s"}`, 400, "invalid_field", "from"},
		{"missing recipient", key("k1"), `{"from": "a@example.org", "subject": "s"}`, 400, "invalid_field", "to"},
		{"invalid recipient", key("k1"), `{"from": "a@example.org", "to": ["b@example.com", "c@"], "subject": "s"}`, 400, "invalid_field", "to[1]"},
		{"missing subject", key("k1"), `{"from": "a@example.org", "to": ["b@example.com"]}`, 400, "invalid_field", "subject"},
		{"crlf in subject", key("k1"), `{"from": "a@example.org", "to": ["b@example.com"], "subject": "s\r\nBcc: eve@example.com"}`, 400, "invalid_field", "subject"},
		{"crlf in header", key("k1"), `{"from": "a@example.org", "to": ["b@example.com"], "subject": "s", "headers": {"X-A": "v\r\nBcc: eve@example.com"}}`, 400, "invalid_field", "headers.X-A"},
		{"message-id header", key("k1"), `{"from": "a@example.org", "to": ["b@example.com"], "subject": "s", "headers": {"Message-ID": "<x@y>"}}`, 400, "invalid_field", "headers.Message-ID"},
		{"oversized body", key("k1"), big, 413, "body_too_large", ""},
		{"oversized message", key("k1"), tooBigMessage, 413, "message_too_large", ""},
		{"no key", nil, emailJSON, 400, "invalid_field", "Idempotency-Key"},
		{"empty key", key(""), emailJSON, 400, "invalid_field", "Idempotency-Key"},
		{"long key", key(strings.Repeat("k", 256)), emailJSON, 400, "invalid_field", "Idempotency-Key"},
		{"non-ascii key", key("clé"), emailJSON, 400, "invalid_field", "Idempotency-Key"},
		{"wrong content type", map[string]string{"Idempotency-Key": "k1", "Content-Type": "text/plain"}, emailJSON, 415, "unsupported_media_type", "Content-Type"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do("POST", "/v1/emails", tc.hdr, tc.body)
			code, field, msg := r.errField()
			if r.status != tc.status || code != tc.code || field != tc.field {
				t.Fatalf("got %d %s field=%q, want %d %s field=%q: %s", r.status, code, field, tc.status, tc.code, tc.field, r.raw)
			}
			if msg == "" {
				t.Fatal("no message")
			}
		})
	}
	page, err := e.store.List(context.Background(), store.Filter{Tenant: sendonce.DefaultTenant})
	if err != nil || len(page.Records) != 0 {
		t.Fatalf("bad input stored %d records (%v)", len(page.Records), err)
	}
	// A good request still works afterwards, under a key used by the bad ones.
	if r := e.do("POST", "/v1/emails", key("k1"), emailJSON); r.status != 202 {
		t.Fatalf("good request after bad ones: %d %s", r.status, r.raw)
	}
}

func TestTokensAndTenants(t *testing.T) {
	e := newEnv(t,
		httpapi.Token{Name: "billing", Tenant: "acme", Secret: "acme-secret-0123456789"},
		httpapi.Token{Name: "shop", Tenant: "globex", Secret: "globex-secret-0123456789"},
	)
	acme := map[string]string{"Idempotency-Key": "same", "Authorization": "Bearer acme-secret-0123456789"}
	globex := map[string]string{"Idempotency-Key": "same", "Authorization": "Bearer globex-secret-0123456789"}
	for _, hdr := range []map[string]string{
		key("same"),
		{"Idempotency-Key": "same", "Authorization": "Bearer wrong-token-0123456789"},
		{"Idempotency-Key": "same", "Authorization": "Basic YTpi"},
	} {
		r := e.do("POST", "/v1/emails", hdr, emailJSON)
		if code, field, _ := r.errField(); r.status != 401 || code != "unauthorized" || field != "Authorization" {
			t.Fatalf("bad credentials: %d %s", r.status, r.raw)
		}
	}
	if r := e.do("POST", "/v1/emails", acme, emailJSON); r.status != 202 {
		t.Fatalf("acme: %d %s", r.status, r.raw)
	}
	// The same key in another tenant is another email, with its own identity.
	r := e.do("POST", "/v1/emails", globex, emailJSON)
	if r.status != 202 {
		t.Fatalf("globex, same key: %d %s", r.status, r.raw)
	}
	a := e.do("GET", "/v1/emails/same", map[string]string{"Authorization": acme["Authorization"]}, "")
	if a.body["message_id"] == r.body["message_id"] {
		t.Fatal("tenants share a Message-ID")
	}
	for _, tenant := range []string{"acme", "globex"} {
		p, _ := e.store.List(context.Background(), store.Filter{Tenant: tenant})
		if len(p.Records) != 1 {
			t.Fatalf("tenant %s has %d records", tenant, len(p.Records))
		}
	}
	if p, _ := e.store.List(context.Background(), store.Filter{Tenant: sendonce.DefaultTenant}); len(p.Records) != 0 {
		t.Fatal("unauthenticated requests stored something")
	}
}

func TestGetListResolve(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		if r := e.do("POST", "/v1/emails", key(fmt.Sprintf("k/%d", i)), emailJSON); r.status != 202 {
			t.Fatal(r.raw)
		}
	}
	if r := e.do("GET", "/v1/emails/nope", nil, ""); r.status != 404 {
		t.Fatalf("unknown key: %d", r.status)
	}
	if r := e.do("GET", "/v1/emails/k%2F3", nil, ""); r.status != 200 || r.body["key"] != "k/3" {
		t.Fatalf("escaped key: %d %s", r.status, r.raw)
	}
	seen := map[string]bool{}
	cursor := ""
	for pages := 0; ; pages++ {
		path := "/v1/emails?limit=2"
		if cursor != "" {
			path += "&cursor=" + cursor
		}
		r := e.do("GET", path, nil, "")
		if r.status != 200 {
			t.Fatal(r.raw)
		}
		for _, em := range r.body["emails"].([]any) {
			k := em.(map[string]any)["key"].(string)
			if seen[k] {
				t.Fatalf("key %s listed twice", k)
			}
			seen[k] = true
		}
		c, _ := r.body["next_cursor"].(string)
		if c == "" {
			break
		}
		cursor = c
		if pages > 5 {
			t.Fatal("paging does not end")
		}
	}
	if len(seen) != 5 {
		t.Fatalf("listed %d of 5", len(seen))
	}
	for _, q := range []string{"?state=bogus", "?limit=0", "?limit=x", "?cursor=notacursor", "?sort=asc"} {
		if r := e.do("GET", "/v1/emails"+q, nil, ""); r.status != 400 {
			t.Errorf("GET /v1/emails%s = %d, want 400: %s", q, r.status, r.raw)
		}
	}

	// Resolve applies to in-doubt emails only.
	if r := e.do("POST", "/v1/emails/k%2F0/resolve", nil, `{"action": "resend"}`); r.status != 409 {
		t.Fatalf("resolve queued: %d %s", r.status, r.raw)
	}
	if r := e.do("POST", "/v1/emails/k%2F0/resolve", nil, `{"action": "retry"}`); r.status != 400 {
		t.Fatalf("bad action: %d %s", r.status, r.raw)
	}
	if r := e.do("POST", "/v1/emails/nope/resolve", nil, `{"action": "fail"}`); r.status != 404 {
		t.Fatalf("resolve unknown: %d %s", r.status, r.raw)
	}
	now := time.Now()
	recs, err := e.store.Claim(ctx, store.ClaimRequest{Owner: "t", Now: now, Lease: time.Minute, Limit: 10})
	if err != nil || len(recs) != 5 {
		t.Fatalf("claim: %d %v", len(recs), err)
	}
	for _, rec := range recs {
		if rec.Key != "k/0" {
			continue
		}
		l := store.Lease{ID: rec.ID, Fence: rec.Fence}
		if err := e.store.MarkCommitting(ctx, l, now); err != nil {
			t.Fatal(err)
		}
		if err := e.store.Complete(ctx, store.Completion{Lease: l, Result: store.ResultInDoubt, Error: "connection lost after the final dot", Now: now}); err != nil {
			t.Fatal(err)
		}
	}
	if r := e.do("GET", "/v1/emails?state=in_doubt", nil, ""); len(r.body["emails"].([]any)) != 1 {
		t.Fatalf("in_doubt list: %s", r.raw)
	}
	r := e.do("POST", "/v1/emails/k%2F0/resolve", nil, `{"action": "mark_sent"}`)
	if r.status != 200 || r.body["state"] != "sent" || r.body["resolved_by"] == "" {
		t.Fatalf("resolve: %d %s", r.status, r.raw)
	}
}

func TestBatch(t *testing.T) {
	e := newEnv(t)
	if r := e.do("POST", "/v1/emails", key("b1"), `{"from": "a@example.org", "to": ["b@example.com"], "subject": "one"}`); r.status != 202 {
		t.Fatal(r.raw)
	}
	body := `{"emails": [
		{"key": "b1", "from": "a@example.org", "to": ["b@example.com"], "subject": "one"},
		{"key": "b2", "from": "a@example.org", "to": ["b@example.com"], "subject": "two"},
		{"key": "b1", "from": "a@example.org", "to": ["b@example.com"], "subject": "changed"},
		{"key": "", "from": "a@example.org", "to": ["b@example.com"], "subject": "no key"},
		{"key": "b5", "from": "a@example.org", "to": ["bad"], "subject": "bad"},
		{"key": "b2", "from": "a@example.org", "to": ["b@example.com"], "subject": "two"}
	]}`
	r := e.do("POST", "/v1/emails/batch", nil, body)
	if r.status != 200 {
		t.Fatalf("batch: %d %s", r.status, r.raw)
	}
	want := []struct {
		status int
		field  string
	}{{200, ""}, {202, ""}, {422, "emails[2].key"}, {400, "emails[3].key"}, {400, "emails[4].to[0]"}, {200, ""}}
	results := r.body["results"].([]any)
	if len(results) != len(want) {
		t.Fatalf("%d results", len(results))
	}
	for i, w := range want {
		res := results[i].(map[string]any)
		if int(res["status"].(float64)) != w.status {
			t.Errorf("item %d: status %v, want %d: %v", i, res["status"], w.status, res)
		}
		if w.field != "" {
			if f := res["error"].(map[string]any)["field"]; f != w.field {
				t.Errorf("item %d: field %v, want %s", i, f, w.field)
			}
		}
	}
	items := make([]string, 11)
	for i := range items {
		items[i] = fmt.Sprintf(`{"key": "x%d", "from": "a@example.org", "to": ["b@example.com"], "subject": "s"}`, i)
	}
	if r := e.do("POST", "/v1/emails/batch", nil, `{"emails": [`+strings.Join(items, ",")+`]}`); r.status != 413 {
		t.Fatalf("oversized batch: %d %s", r.status, r.raw)
	}
	if r := e.do("POST", "/v1/emails/batch", nil, `{"emails": []}`); r.status != 400 {
		t.Fatalf("empty batch: %d %s", r.status, r.raw)
	}
}

func TestHealthz(t *testing.T) {
	e := newEnv(t)
	if r := e.do("GET", "/healthz", nil, ""); r.status != 200 {
		t.Fatalf("healthz: %d %s", r.status, r.raw)
	}
	e.store.Close()
	if r := e.do("GET", "/healthz", nil, ""); r.status != 503 {
		t.Fatalf("healthz on a closed store: %d %s", r.status, r.raw)
	}
}

// blockingStore holds every Admit until released, to fill the API.
type blockingStore struct {
	store.Store
	entered chan struct{}
	release chan struct{}
}

func (b *blockingStore) Admit(ctx context.Context, batch []store.Admission) ([]store.AdmitResult, error) {
	b.entered <- struct{}{}
	<-b.release
	return b.Store.Admit(ctx, batch)
}

// TestOverloadIsRefusedWith503: past MaxInFlight submissions, the API
// answers 503 with Retry-After at once instead of queueing, and accepts
// again once there is room.
func TestOverloadIsRefusedWith503(t *testing.T) {
	st, err := sqlitestore.Open(context.Background(), t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	bs := &blockingStore{Store: st, entered: make(chan struct{}, 2), release: make(chan struct{})}
	c, _ := sendonce.New(sendonce.Config{Store: bs})
	api, _ := httpapi.New(httpapi.Config{Client: c, MaxInFlight: 2})
	srv := httptest.NewServer(api)
	defer srv.Close()
	e := &env{t: t, srv: srv}

	done := make(chan int, 2)
	for i := 0; i < 2; i++ {
		go func(i int) {
			req, _ := http.NewRequest("POST", srv.URL+"/v1/emails", strings.NewReader(emailJSON))
			req.Header.Set("Idempotency-Key", fmt.Sprintf("held-%d", i))
			r, err := srv.Client().Do(req)
			if err != nil {
				done <- 0
				return
			}
			r.Body.Close()
			done <- r.StatusCode
		}(i)
	}
	<-bs.entered
	<-bs.entered // both slots are taken, inside the store
	r := e.do("POST", "/v1/emails", key("third"), emailJSON)
	if code, _, _ := r.errField(); r.status != 503 || code != "overloaded" || r.header.Get("Retry-After") == "" {
		t.Fatalf("third submission: %d %s", r.status, r.raw)
	}
	close(bs.release)
	for i := 0; i < 2; i++ {
		if s := <-done; s != 202 {
			t.Fatalf("held submission answered %d", s)
		}
	}
	if r := e.do("POST", "/v1/emails", key("third"), emailJSON); r.status != 202 {
		t.Fatalf("after the load: %d %s", r.status, r.raw)
	}
}

// The message view decodes the stored message's parts for the dashboard.
func TestMessageView(t *testing.T) {
	e := newEnv(t)
	body := `{"from":"App <app@example.com>","to":["ann@example.net"],"subject":"Grüße","text":"plain ünïcode","html":"<p>rich</p>"}`
	if r := e.do("POST", "/v1/emails", map[string]string{"Idempotency-Key": "view-1"}, body); r.status != http.StatusAccepted {
		t.Fatalf("submit: %d %s", r.status, r.raw)
	}
	r := e.do("GET", "/v1/emails/view-1/message", nil, "")
	if r.status != http.StatusOK {
		t.Fatalf("message: %d %s", r.status, r.raw)
	}
	if r.body["text"] != "plain ünïcode\r\n" || r.body["html"] != "<p>rich</p>\r\n" || r.body["purged"] != false {
		t.Fatalf("view: %s", r.raw)
	}
	var subject, mid string
	for _, h := range r.body["headers"].([]any) {
		kv := h.([]any)
		switch kv[0] {
		case "Subject":
			subject = kv[1].(string)
		case "Message-Id", "Message-ID":
			mid = kv[1].(string)
		}
	}
	rec := e.do("GET", "/v1/emails/view-1", nil, "")
	if subject != "Grüße" || mid == "" || !strings.Contains(mid, strings.Trim(rec.body["message_id"].(string), "<>")) {
		t.Fatalf("headers: subject %q, Message-ID %q (record %v)", subject, mid, rec.body["message_id"])
	}
}
