// Package httpapi is the HTTP front door: a JSON API that follows the IETF
// Idempotency-Key header draft (draft-ietf-httpapi-idempotency-key-header).
//
// It acknowledges a submission (202) only after the ledger has recorded it
// durably, answers a repeat from the record (200, Idempotent-Replayed: true),
// and refuses the same key with another payload (422). Invalid input is
// refused with an error naming the field, before anything is stored.
package httpapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store"
)

// Token authenticates one caller as a tenant.
type Token struct {
	Name   string // who, for the audit trail ("ci", "billing-app")
	Tenant string
	Secret string
}

// Config configures the API handler.
type Config struct {
	Client *sendonce.Client
	// Tokens, when not empty, are required as "Authorization: Bearer ...".
	// When empty, every caller is the default tenant.
	Tokens []Token
	// MaxBodyBytes limits a request body. Default 32 MiB.
	MaxBodyBytes int64
	// MaxBatch limits the items of one batch request. Default 1000.
	MaxBatch int
	// MaxInFlight bounds the submissions being read or recorded at once.
	// Past it a submission is refused at once with 503 and Retry-After,
	// before its body is read, so overload costs no memory. Default 1024.
	MaxInFlight int
	Logger      *slog.Logger
	// Metrics, when set, counts submissions refused before they reached
	// the Client (no Idempotency-Key, malformed JSON) as rejected.
	Metrics sendonce.Metrics
	// MetricsHandler, when set, is served on GET /metrics without
	// authentication (scrapers rarely carry tokens; it shows counts, never
	// emails).
	MetricsHandler http.Handler
	// Activity, when set, is the per-minute history GET /v1/stats returns
	// for the dashboard's chart.
	Activity Activity
	// Schedules, when set, are listed with their fires' progress on GET
	// /v1/schedules (an empty list without them).
	Schedules Schedules
}

// API serves the HTTP API.
type API struct {
	cfg      Config
	log      *slog.Logger
	tokens   []hashedToken
	mux      *http.ServeMux
	inFlight chan struct{} // a slot per submission being served
	routes   []string
}

type hashedToken struct {
	sum [32]byte
	Token
}

// New returns the API handler.
func New(cfg Config) (*API, error) {
	if cfg.Client == nil {
		return nil, errors.New("httpapi: Config.Client is nil")
	}
	if cfg.MaxBodyBytes == 0 {
		cfg.MaxBodyBytes = 32 << 20
	}
	if cfg.MaxBatch == 0 {
		cfg.MaxBatch = 1000
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = 1024
	}
	a := &API{cfg: cfg, log: cfg.Logger, mux: http.NewServeMux(), inFlight: make(chan struct{}, cfg.MaxInFlight)}
	for i, t := range cfg.Tokens {
		if t.Secret == "" || t.Tenant == "" {
			return nil, fmt.Errorf("httpapi: token %d (%q) needs a secret and a tenant", i, t.Name)
		}
		a.tokens = append(a.tokens, hashedToken{sha256.Sum256([]byte(t.Secret)), t})
	}
	a.handle("POST /v1/emails", a.auth(a.bounded(a.submit)))
	a.handle("POST /v1/emails/batch", a.auth(a.bounded(a.batch)))
	a.handle("GET /v1/emails", a.auth(a.list))
	a.handle("GET /v1/emails/{key}", a.auth(a.get))
	a.handle("GET /v1/emails/{key}/message", a.auth(a.message))
	a.handle("GET /v1/emails/{key}/events", a.auth(a.events))
	a.handle("POST /v1/emails/{key}/resolve", a.auth(a.resolve))
	a.handle("GET /v1/stats", a.auth(a.stats))
	a.handle("GET /v1/schedules", a.auth(a.schedules))
	a.handle("GET /healthz", a.healthz)
	a.handle("GET /readyz", a.healthz)
	if cfg.MetricsHandler != nil {
		a.handle("GET /metrics", cfg.MetricsHandler.ServeHTTP)
	}
	a.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", "", fmt.Sprintf("no route for %s %s; see docs/api.md", r.Method, r.URL.Path))
	})
	return a, nil
}

func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.mux.ServeHTTP(w, r) }

// handle registers a route and remembers its pattern, so the OpenAPI
// description can be checked against what is really served.
func (a *API) handle(pattern string, h http.HandlerFunc) {
	a.routes = append(a.routes, pattern)
	a.mux.HandleFunc(pattern, h)
}

// Routes returns the patterns served ("METHOD /path/{param}"), in the
// order they were registered.
func (a *API) Routes() []string { return slices.Clone(a.routes) }

type caller struct{ tenant, name string }

type ctxKey struct{}

// auth resolves the caller's tenant. Every token is compared, each in
// constant time over equal-length hashes, so neither the match nor its
// position leaks through timing.
func (a *API) auth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		c := caller{tenant: sendonce.DefaultTenant, name: "anonymous"}
		if len(a.tokens) > 0 {
			raw, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || raw == "" {
				w.Header().Set("WWW-Authenticate", `Bearer realm="sendonce"`)
				writeError(w, http.StatusUnauthorized, "unauthorized", "Authorization", "send \"Authorization: Bearer <token>\" with a token from the configuration")
				return
			}
			sum := sha256.Sum256([]byte(strings.TrimSpace(raw)))
			found := -1
			for i := range a.tokens {
				if subtle.ConstantTimeCompare(sum[:], a.tokens[i].sum[:]) == 1 {
					found = i
				}
			}
			if found < 0 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="sendonce", error="invalid_token"`)
				writeError(w, http.StatusUnauthorized, "unauthorized", "Authorization", "the bearer token is not valid; check SENDONCE_TOKEN or the tokens in the configuration")
				return
			}
			c = caller{tenant: a.tokens[found].Tenant, name: a.tokens[found].Name}
		}
		h(w, r.WithContext(context.WithValue(r.Context(), ctxKey{}, c)))
	}
}

// bounded refuses a submission when MaxInFlight are already being served:
// queueing without limit would hold every waiting body in memory, and an
// honest 503 lets the sender retry with the same key later.
func (a *API) bounded(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		select {
		case a.inFlight <- struct{}{}:
			defer func() { <-a.inFlight }()
			h(w, r)
		default:
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "overloaded", "", fmt.Sprintf("%d submissions are already being recorded; nothing was accepted, retry with the same key", a.cfg.MaxInFlight))
		}
	}
}

func callerOf(r *http.Request) caller { return r.Context().Value(ctxKey{}).(caller) }

// ErrorBody is the shape of every error answer.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail says what went wrong, which field, and how to fix it.
type ErrorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, field, msg string) {
	writeJSON(w, status, ErrorBody{ErrorDetail{Code: code, Message: msg, Field: field}})
}

// RecordJSON is a record as the API shows it.
type RecordJSON struct {
	Key        string            `json:"key"`
	State      string            `json:"state"`
	MessageID  string            `json:"message_id"`
	From       string            `json:"from"`
	To         []string          `json:"to"`
	Subject    string            `json:"subject"`
	Tags       map[string]string `json:"tags,omitempty"`
	Source     string            `json:"source"`
	Attempts   int               `json:"attempts"`
	Duplicates int64             `json:"duplicates"`
	LastError  string            `json:"last_error"`
	Reply      string            `json:"reply,omitempty"`
	ResolvedBy string            `json:"resolved_by,omitempty"`
	CreatedAt  time.Time         `json:"created_at"`
	UpdatedAt  time.Time         `json:"updated_at"`
	NextAt     *time.Time        `json:"next_attempt_at,omitempty"`
	SentAt     *time.Time        `json:"sent_at,omitempty"`
}

func recordJSON(r store.Record) RecordJSON {
	opt := func(t time.Time) *time.Time {
		if t.IsZero() {
			return nil
		}
		u := t.UTC()
		return &u
	}
	j := RecordJSON{
		Key: r.Key, State: string(r.State), MessageID: r.MessageID, From: r.From, To: r.To,
		Subject: r.Subject, Tags: r.Tags, Source: r.Source, Attempts: r.Attempts, Duplicates: r.Duplicates,
		LastError: r.LastError, Reply: r.Reply, ResolvedBy: r.ResolvedBy,
		CreatedAt: r.CreatedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC(), SentAt: opt(r.SentAt),
	}
	if j.To == nil {
		j.To = []string{}
	}
	if r.State == store.StateQueued {
		j.NextAt = opt(r.NextAttempt)
	}
	return j
}

// decode reads one JSON value into v, refusing unknown fields, trailing
// data and bodies over the limit, and answers the error itself.
func (a *API) decode(w http.ResponseWriter, r *http.Request, v any) bool {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		writeError(w, http.StatusUnsupportedMediaType, "unsupported_media_type", "Content-Type", fmt.Sprintf("the body is %q; send application/json", ct))
		return false
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, a.cfg.MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, http.StatusRequestEntityTooLarge, "body_too_large", "", fmt.Sprintf("the request body exceeds %d bytes; send smaller emails or fewer per batch", mbe.Limit))
			return false
		}
		writeError(w, http.StatusBadRequest, "bad_body", "", "reading the body failed: "+err.Error())
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		field, msg := describeJSONError(err)
		writeError(w, http.StatusBadRequest, "invalid_json", field, msg)
		return false
	}
	if dec.More() {
		writeError(w, http.StatusBadRequest, "invalid_json", "", "the body has data after the JSON object; send exactly one object")
		return false
	}
	return true
}

func describeJSONError(err error) (field, msg string) {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return "", fmt.Sprintf("malformed JSON at byte %d: %v", se.Offset, err)
	case errors.As(err, &te):
		return te.Field, fmt.Sprintf("%s must be %s, not %s", te.Field, jsonKind(te.Type.Kind().String()), te.Value)
	case errors.Is(err, io.EOF):
		return "", "the body is empty; send a JSON object"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "", "the JSON body ends too early; check the brackets and quotes"
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		name = strings.Trim(name, `"`)
		return name, fmt.Sprintf("unknown field %q; see docs/api.md for the fields of an email", name)
	}
	return "", "invalid JSON: " + err.Error()
}

func jsonKind(k string) string {
	switch k {
	case "slice":
		return "an array"
	case "map", "struct":
		return "an object"
	case "string":
		return "a string"
	}
	return "a " + k
}

// idempotencyKey reads the header. The draft makes it a structured-field
// string (quoted); a bare token is accepted too.
func idempotencyKey(r *http.Request) (string, error) {
	vals := r.Header.Values("Idempotency-Key")
	if len(vals) == 0 {
		return "", &sendonce.FieldError{Field: "Idempotency-Key", Message: "the Idempotency-Key header is required: give every email a key that stays the same when the request is repeated, such as a job ID"}
	}
	if len(vals) > 1 {
		return "", &sendonce.FieldError{Field: "Idempotency-Key", Message: "send the Idempotency-Key header once"}
	}
	v := strings.TrimSpace(vals[0])
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		var b strings.Builder
		for i := 1; i < len(v)-1; i++ {
			c := v[i]
			if c == '\\' && i+1 < len(v)-1 {
				i++
				c = v[i]
			} else if c == '"' || c == '\\' {
				return "", &sendonce.FieldError{Field: "Idempotency-Key", Message: "the quoted key has an unescaped quote or backslash"}
			}
			b.WriteByte(c)
		}
		v = b.String()
	}
	if err := sendonce.ValidateKey(v); err != nil {
		var fe *sendonce.FieldError
		if errors.As(err, &fe) {
			return "", &sendonce.FieldError{Field: "Idempotency-Key", Message: fe.Message}
		}
		return "", err
	}
	return v, nil
}

// submitError answers a failed submission.
func (a *API) submitError(w http.ResponseWriter, err error, key string, rec store.Record) {
	status, body := submitErrorBody(err, key, rec)
	if status == http.StatusInternalServerError {
		a.log.Error("submit failed", "key", key, "message_id", rec.MessageID, "err", err)
	}
	if status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	writeJSON(w, status, body)
}

func submitErrorBody(err error, key string, rec store.Record) (int, ErrorBody) {
	var fe *sendonce.FieldError
	switch {
	case errors.As(err, &fe):
		return http.StatusBadRequest, ErrorBody{ErrorDetail{Code: "invalid_field", Field: fe.Field, Message: fe.Error()}}
	case errors.Is(err, sendonce.ErrKeyReused):
		return http.StatusUnprocessableEntity, ErrorBody{ErrorDetail{Code: "idempotency_key_reused", Field: "Idempotency-Key",
			Message: fmt.Sprintf("key %q was already used for a different email (message %s); the stored email is kept. Use a new key for a new email", key, rec.MessageID)}}
	case errors.Is(err, sendonce.ErrTooLarge):
		return http.StatusRequestEntityTooLarge, ErrorBody{ErrorDetail{Code: "message_too_large", Message: err.Error()}}
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return http.StatusServiceUnavailable, ErrorBody{ErrorDetail{Code: "unavailable", Message: "the request ended before the email was recorded; retry with the same key"}}
	}
	return http.StatusServiceUnavailable, ErrorBody{ErrorDetail{Code: "store_unavailable", Message: "the email could not be recorded; nothing was accepted. Retry with the same key"}}
}

func (a *API) submit(w http.ResponseWriter, r *http.Request) {
	key, err := idempotencyKey(r)
	if err != nil {
		a.rejected(r)
		a.submitError(w, err, "", store.Record{})
		return
	}
	var e sendonce.Email
	if !a.decode(w, r, &e) {
		a.rejected(r)
		return
	}
	c := callerOf(r)
	rc, err := a.cfg.Client.Submit(r.Context(), sendonce.Submission{Tenant: c.tenant, Key: key, Email: e, Source: "http"})
	if err != nil {
		a.submitError(w, err, key, rc.Record)
		return
	}
	w.Header().Set("Location", "/v1/emails/"+escapeKey(key))
	if rc.Duplicate {
		w.Header().Set("Idempotent-Replayed", "true")
		writeJSON(w, http.StatusOK, recordJSON(rc.Record))
		return
	}
	writeJSON(w, http.StatusAccepted, recordJSON(rc.Record))
}

// rejected counts a submission refused before it reached the Client.
func (a *API) rejected(r *http.Request) {
	if a.cfg.Metrics != nil {
		a.cfg.Metrics.Admitted(callerOf(r).tenant, "http", "rejected", 0)
	}
}

func escapeKey(k string) string {
	var b strings.Builder
	for i := 0; i < len(k); i++ {
		c := k[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// BatchItem is one email of a batch, with its own key.
type BatchItem struct {
	Key string `json:"key"`
	sendonce.Email
}

// BatchRequest is the body of POST /v1/emails/batch.
type BatchRequest struct {
	Emails []BatchItem `json:"emails"`
}

// BatchResult answers one item.
type BatchResult struct {
	Key      string       `json:"key"`
	Status   int          `json:"status"`
	Replayed bool         `json:"replayed,omitempty"`
	Record   *RecordJSON  `json:"record,omitempty"`
	Error    *ErrorDetail `json:"error,omitempty"`
}

func (a *API) batch(w http.ResponseWriter, r *http.Request) {
	var req BatchRequest
	if !a.decode(w, r, &req) {
		return
	}
	if len(req.Emails) == 0 {
		writeError(w, http.StatusBadRequest, "invalid_field", "emails", "the batch is empty; send 1 to "+strconv.Itoa(a.cfg.MaxBatch)+" emails")
		return
	}
	if len(req.Emails) > a.cfg.MaxBatch {
		writeError(w, http.StatusRequestEntityTooLarge, "batch_too_large", "emails", fmt.Sprintf("the batch has %d emails; the maximum is %d, split it", len(req.Emails), a.cfg.MaxBatch))
		return
	}
	c := callerOf(r)
	subs := make([]sendonce.Submission, len(req.Emails))
	for i, it := range req.Emails {
		subs[i] = sendonce.Submission{Tenant: c.tenant, Key: it.Key, Email: it.Email, Source: "http"}
	}
	res, err := a.cfg.Client.SubmitBatch(r.Context(), subs)
	if err != nil {
		a.submitError(w, err, "", store.Record{})
		return
	}
	out := struct {
		Results []BatchResult `json:"results"`
	}{make([]BatchResult, len(res))}
	for i, br := range res {
		item := BatchResult{Key: req.Emails[i].Key}
		if br.Err != nil {
			status, body := submitErrorBody(br.Err, item.Key, br.Record)
			switch f := body.Error.Field; f {
			case "":
			case "Idempotency-Key":
				body.Error.Field = fmt.Sprintf("emails[%d].key", i)
			default:
				body.Error.Field = fmt.Sprintf("emails[%d].%s", i, f)
			}
			item.Status, item.Error = status, &body.Error
		} else {
			rj := recordJSON(br.Record)
			item.Record = &rj
			item.Status = http.StatusAccepted
			if br.Duplicate {
				item.Status, item.Replayed = http.StatusOK, true
			}
		}
		out.Results[i] = item
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) get(w http.ResponseWriter, r *http.Request) {
	key := r.PathValue("key")
	rec, err := a.cfg.Client.Get(r.Context(), callerOf(r).tenant, key)
	if err != nil {
		a.lookupError(w, err, key)
		return
	}
	writeJSON(w, http.StatusOK, recordJSON(rec))
}

func (a *API) lookupError(w http.ResponseWriter, err error, key string) {
	switch {
	case errors.Is(err, store.ErrNotFound):
		writeError(w, http.StatusNotFound, "not_found", "key", fmt.Sprintf("no email has the key %q; keys are exact and case-sensitive, and a key with / must be percent-encoded in the path (%%2F)", key))
	case errors.Is(err, store.ErrInvalidState):
		writeError(w, http.StatusConflict, "invalid_state", "action", fmt.Sprintf("email %q is not in_doubt; only in-doubt emails can be resolved", key))
	default:
		a.log.Error("lookup failed", "key", key, "err", err)
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "store_unavailable", "", "the ledger could not be read; retry")
	}
}

func (a *API) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	for name := range q {
		switch name {
		case "state", "limit", "cursor", "key_prefix", "recipient", "created_after", "created_before":
		default:
			writeError(w, http.StatusBadRequest, "invalid_field", name, fmt.Sprintf("unknown query parameter %q; use state, key_prefix, recipient, created_after, created_before, limit and cursor", name))
			return
		}
	}
	opts := sendonce.ListOptions{State: store.State(q.Get("state")), Cursor: q.Get("cursor"), KeyPrefix: q.Get("key_prefix"), Recipient: q.Get("recipient")}
	if opts.State != "" && !opts.State.Valid() {
		writeError(w, http.StatusBadRequest, "invalid_field", "state", fmt.Sprintf("%q is not a state; use queued, sending, sent, failed or in_doubt", opts.State))
		return
	}
	for name, at := range map[string]*time.Time{"created_after": &opts.CreatedFrom, "created_before": &opts.CreatedBefore} {
		if v := q.Get(name); v != "" {
			t, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				writeError(w, http.StatusBadRequest, "invalid_field", name, fmt.Sprintf("%q is not an RFC 3339 time; write it like 2026-12-04T20:10:24Z", v))
				return
			}
			*at = t
		}
	}
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > store.MaxListLimit {
			writeError(w, http.StatusBadRequest, "invalid_field", "limit", fmt.Sprintf("limit must be a number from 1 to %d", store.MaxListLimit))
			return
		}
		opts.Limit = n
	}
	page, err := a.cfg.Client.List(r.Context(), callerOf(r).tenant, opts)
	if err != nil {
		if errors.Is(err, store.ErrBadCursor) {
			writeError(w, http.StatusBadRequest, "invalid_field", "cursor", "the cursor is not one this server gave out; start again without it")
			return
		}
		a.lookupError(w, err, "")
		return
	}
	out := struct {
		Emails     []RecordJSON `json:"emails"`
		NextCursor string       `json:"next_cursor,omitempty"`
	}{Emails: make([]RecordJSON, len(page.Records)), NextCursor: page.Next}
	for i, rec := range page.Records {
		out.Emails[i] = recordJSON(rec)
	}
	writeJSON(w, http.StatusOK, out)
}

// ResolveRequest is the body of POST /v1/emails/{key}/resolve.
type ResolveRequest struct {
	Action string `json:"action"`
}

func (a *API) resolve(w http.ResponseWriter, r *http.Request) {
	key := r.PathValue("key")
	var req ResolveRequest
	if !a.decode(w, r, &req) {
		return
	}
	act := store.Action(req.Action)
	if !act.Valid() {
		writeError(w, http.StatusBadRequest, "invalid_field", "action", fmt.Sprintf("%q is not an action; use resend, mark_sent or fail", req.Action))
		return
	}
	c := callerOf(r)
	rec, err := a.cfg.Client.Resolve(r.Context(), c.tenant, key, act, "api:"+c.name)
	if err != nil {
		a.lookupError(w, err, key)
		return
	}
	writeJSON(w, http.StatusOK, recordJSON(rec))
}

// healthz answers /healthz and /readyz: 200 while the store answers, 503
// while it does not, so a load balancer stops sending submissions that
// could not be recorded.
func (a *API) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := a.cfg.Client.Ping(ctx); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "unavailable", "error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}
