package source

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

const reminder = `{"from": "Difio <noreply@example.org>", "to": ["ann@example.com"], "subject": "Your monthly reminder", "text": "Hello Ann"}`

func TestParseJobErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		hints      KeyHints
		field      string // "" for the body as a whole
		reason     string // a substring of the reason
	}{
		{"empty body", ``, KeyHints{}, "", "empty"},
		{"not JSON", `tasks.cron_monthly_email_reminder[a9e5a73a]`, KeyHints{}, "", "not valid JSON"},
		{"truncated", `{"from": "a@example.org", "to": [`, KeyHints{}, "", ""},
		{"an array", `[` + reminder + `]`, KeyHints{}, "", "not an object"},
		{"a string", `"hello"`, KeyHints{}, "", "not an object"},
		{"trailing data", reminder + `{}`, KeyHints{}, "", "after the JSON object"},
		{"unknown field", `{"from": "a@example.org", "to": ["b@example.com"], "subjet": "x"}`, KeyHints{}, "subjet", "unknown field"},
		{"tenant is not the job's", `{"tenant": "acme", "from": "a@example.org", "to": ["b@example.com"], "subject": "x"}`, KeyHints{}, "tenant", "configuration sets it"},
		{"case matters", `{"From": "a@example.org", "to": ["b@example.com"], "subject": "x"}`, KeyHints{}, "From", `did you mean "from"`},
		{"a field twice", `{"from": "a@example.org", "to": ["b@example.com"], "subject": "x", "subject": "y"}`, KeyHints{}, "subject", "twice"},
		{"wrong type", `{"from": "a@example.org", "to": "b@example.com", "subject": "x"}`, KeyHints{}, "to", "an array of strings"},
		{"wrong map value", `{"from": "a@example.org", "to": ["b@example.com"], "subject": "x", "tags": {"n": 1}}`, KeyHints{}, "tags", "values are strings"},
		{"version 2", `{"version": 2, "from": "a@example.org", "to": ["b@example.com"], "subject": "x"}`, KeyHints{}, "version", "version 2 is not supported"},
		{"version 0", `{"version": 0, "from": "a@example.org", "to": ["b@example.com"], "subject": "x"}`, KeyHints{}, "version", "not supported"},
		{"version as a string", `{"version": "1", "from": "a@example.org", "to": ["b@example.com"], "subject": "x"}`, KeyHints{}, "version", "the number 1"},
		{"nothing", `{}`, KeyHints{}, "from", "no email"},
		{"invalid address", `{"from": "a@example.org", "to": ["b@example.com", "not an address"], "subject": "x"}`, KeyHints{}, "to[1]", "not a valid email address"},
		{"no recipient", `{"from": "a@example.org", "subject": "x"}`, KeyHints{}, "to", "no recipient"},
		{"no subject", `{"from": "a@example.org", "to": ["b@example.com"]}`, KeyHints{}, "subject", "required"},
		{"reserved header", `{"from": "a@example.org", "to": ["b@example.com"], "subject": "x", "headers": {"Message-ID": "<x@y>"}}`, KeyHints{}, "headers.Message-ID", "derives the Message-ID"},
		{"raw with email fields", `{"raw": "RnJvbTogYUBleGFtcGxlLm9yZw0KDQpoaQ0K", "rcpt_to": ["b@example.com"], "subject": "x"}`, KeyHints{}, "subject", "raw job"},
		{"raw not base64", `{"raw": "From: a@example.org", "rcpt_to": ["b@example.com"]}`, KeyHints{}, "raw", "not valid base64"},
		{"raw empty", `{"raw": "", "rcpt_to": ["b@example.com"]}`, KeyHints{}, "raw", "empty"},
		{"raw without envelope", `{"raw": "RnJvbTogYUBleGFtcGxlLm9yZw0KDQpoaQ0K"}`, KeyHints{}, "rcpt_to", "envelope recipients"},
		{"envelope without raw", `{"from": "a@example.org", "rcpt_to": ["b@example.com"], "subject": "x"}`, KeyHints{}, "rcpt_to", "needs \"raw\""},
		{"key with a line break", `{"key": "a\nb", "from": "a@example.org", "to": ["b@example.com"], "subject": "x"}`, KeyHints{}, "key", "0x0a"},
		{"key empty", `{"key": "", "from": "a@example.org", "to": ["b@example.com"], "subject": "x"}`, KeyHints{}, "key", "empty"},
		{"bad attribute key", reminder, KeyHints{Attribute: " padded "}, "idempotency_key", "space"},
		{"bad dedup key", reminder, KeyHints{DedupID: strings.Repeat("x", 300), DedupName: "MessageDeduplicationId"}, "MessageDeduplicationId", "maximum is 255"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseJob([]byte(tc.body), tc.hints)
			var je *JobError
			if !errors.As(err, &je) {
				t.Fatalf("ParseJob(%s) = %v, want a *JobError", tc.body, err)
			}
			if je.Field != tc.field {
				t.Errorf("field %q, want %q (%v)", je.Field, tc.field, err)
			}
			if !strings.Contains(je.Reason, tc.reason) {
				t.Errorf("reason %q does not say %q", je.Reason, tc.reason)
			}
			if !strings.HasPrefix(err.Error(), "job: ") {
				t.Errorf("error %q does not start with \"job: \"", err)
			}
		})
	}
}

func TestParseJobKeyOrder(t *testing.T) {
	withKey := `{"key": "from-the-job", "from": "a@example.org", "to": ["b@example.com"], "subject": "x"}`
	both := KeyHints{Attribute: "from-the-attribute", DedupID: "from-the-dedup-id"}
	for _, tc := range []struct {
		name, body string
		hints      KeyHints
		want       string
	}{
		{"the job's key first", withKey, both, "from-the-job"},
		{"then the attribute", reminder, both, "from-the-attribute"},
		{"then the dedup id", reminder, KeyHints{DedupID: "from-the-dedup-id"}, "from-the-dedup-id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sub, err := ParseJob([]byte(tc.body), tc.hints)
			if err != nil {
				t.Fatal(err)
			}
			if sub.Key != tc.want {
				t.Errorf("key %q, want %q", sub.Key, tc.want)
			}
		})
	}
	t.Run("else the fingerprint", func(t *testing.T) {
		sub, err := ParseJob([]byte(reminder), KeyHints{})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(sub.Key, FingerprintPrefix) || len(sub.Key) != len(FingerprintPrefix)+64 {
			t.Errorf("key %q, want %s and 64 hex digits", sub.Key, FingerprintPrefix)
		}
		if err := sendonce.ValidateKey(sub.Key); err != nil {
			t.Errorf("the fingerprint is not a valid key: %v", err)
		}
	})
}

func TestFingerprintIsCanonical(t *testing.T) {
	key := func(body string) string {
		t.Helper()
		sub, err := ParseJob([]byte(body), KeyHints{})
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		return sub.Key
	}
	base := key(reminder)
	same := []string{
		// Field order, whitespace, map order, empty fields, version.
		`{"subject":"Your monthly reminder","text":"Hello Ann","to":["ann@example.com"],"from":"Difio <noreply@example.org>"}`,
		"{\n\t\"version\": 1,\n\t\"from\": \"Difio <noreply@example.org>\",\n\t\"to\": [ \"ann@example.com\" ],\n\t\"cc\": [],\n\t\"subject\": \"Your monthly reminder\",\n\t\"text\": \"Hello Ann\",\n\t\"tags\": {}\n}\n",
		`{"from":"Difio \u003cnoreply@example.org\u003e","to":["ann@example.com"],"subject":"Your monthly reminder","text":"Hello Ann"}`,
	}
	for _, b := range same {
		if k := key(b); k != base {
			t.Errorf("%s\nhas key %s, want %s (the same job)", b, k, base)
		}
	}
	tagsA := key(`{"from":"a@example.org","to":["b@example.com"],"subject":"x","tags":{"a":"1","b":"2"}}`)
	tagsB := key(`{"from":"a@example.org","to":["b@example.com"],"subject":"x","tags":{"b":"2","a":"1"}}`)
	if tagsA != tagsB {
		t.Errorf("the order of tags changed the key")
	}
	different := []string{
		`{"from": "Difio <noreply@example.org>", "to": ["bob@example.com"], "subject": "Your monthly reminder", "text": "Hello Ann"}`,
		`{"from": "Difio <noreply@example.org>", "to": ["ann@example.com"], "subject": "Your monthly reminder", "text": "Hello Ann!"}`,
		`{"from": "Difio <noreply@example.org>", "cc": ["ann@example.com"], "subject": "Your monthly reminder", "text": "Hello Ann"}`,
	}
	for _, b := range different {
		if key(b) == base {
			t.Errorf("%s\nhas the key of a different job", b)
		}
	}
}

// TestRawJobRoundTrip marshals a raw Job the way a Go producer would,
// parses it back and has a real ledger admit it.
func TestRawJobRoundTrip(t *testing.T) {
	msg := []byte("From: Billing <billing@example.org>\r\nTo: ann@example.com\r\nBcc: audit@example.org\r\nSubject: Invoice\r\n\r\nDear Ann.\r\n")
	body, err := json.Marshal(Job{Raw: msg, MailFrom: "billing@example.org", RcptTo: []string{"ann@example.com", "audit@example.org"}})
	if err != nil {
		t.Fatal(err)
	}
	sub, err := ParseJob(body, KeyHints{})
	if err != nil {
		t.Fatalf("ParseJob(%s): %v", body, err)
	}
	if sub.Raw == nil || !bytes.Equal(sub.Raw.Data, msg) || sub.Raw.From != "billing@example.org" || len(sub.Raw.To) != 2 {
		t.Fatalf("raw submission %+v", sub.Raw)
	}
	if !strings.HasPrefix(sub.Key, FingerprintPrefix) {
		t.Errorf("key %q, want a fingerprint", sub.Key)
	}
	// Line-wrapped base64, as `base64` prints it, is the same job.
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatal(err)
	}
	b64 := m["raw"].(string)
	m["raw"] = b64[:20] + "\n" + b64[20:]
	wrapped, _ := json.Marshal(m)
	sub2, err := ParseJob(wrapped, KeyHints{})
	if err != nil {
		t.Fatalf("wrapped base64: %v", err)
	}
	if sub2.Key != sub.Key {
		t.Errorf("line-wrapped base64 changed the key")
	}

	ctx := context.Background()
	st, err := sqlitestore.Open(ctx, t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	c, err := sendonce.New(sendonce.Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.SubmitBatch(ctx, []sendonce.Submission{sub, sub2})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Err != nil || res[0].Duplicate || res[1].Err != nil || !res[1].Duplicate {
		t.Fatalf("admission: %+v", res)
	}
	if got := res[0].Record.To; len(got) != 2 {
		t.Errorf("recorded recipients %v", got)
	}
}

// TestEmailJobIsTheHTTPEmail: a Go producer's Job marshals to a body that
// parses back into the same email.
func TestEmailJobIsTheHTTPEmail(t *testing.T) {
	e := sendonce.Email{From: "a@example.org", To: []string{"b@example.com"}, Subject: "x", Text: "y", Tags: map[string]string{"k": "v"}}
	body, err := json.Marshal(Job{Version: JobVersion, Key: "k1", Email: e})
	if err != nil {
		t.Fatal(err)
	}
	sub, err := ParseJob(body, KeyHints{DedupID: "ignored"})
	if err != nil {
		t.Fatalf("ParseJob(%s): %v", body, err)
	}
	if sub.Key != "k1" || sub.Raw != nil || sub.Email.From != e.From || sub.Email.Subject != e.Subject || sub.Email.Tags["k"] != "v" {
		t.Errorf("submission %+v", sub)
	}
	if sub.Tenant != "" {
		t.Errorf("ParseJob set the tenant %q; only the source's configuration may", sub.Tenant)
	}
}
