package sendonce

import (
	"errors"
	"io"
	"mime"
	"net/mail"
	"strings"
	"testing"
	"time"

	gomail "github.com/emersion/go-message/mail"
)

func validEmail() Email {
	return Email{
		From:    "Difio <noreply@example.org>",
		To:      []string{"ann@example.com"},
		Subject: "Your monthly reminder",
		Text:    "Hello Ann",
	}
}

func TestEmailValidateNamesTheField(t *testing.T) {
	long := strings.Repeat("a", MaxSubjectLen+1)
	cases := []struct {
		name  string
		edit  func(*Email)
		field string
	}{
		{"missing from", func(e *Email) { e.From = "" }, "from"},
		{"invalid from", func(e *Email) { e.From = "not an address" }, "from"},
		{"no recipient", func(e *Email) { e.To = nil }, "to"},
		{"invalid to", func(e *Email) { e.To = []string{"ann@example.com", "bob@"} }, "to[1]"},
		{"invalid cc", func(e *Email) { e.Cc = []string{"@example.com"} }, "cc[0]"},
		{"invalid bcc", func(e *Email) { e.Bcc = []string{"x"} }, "bcc[0]"},
		{"crlf in to", func(e *Email) { e.To = []string{"ann@example.com\r\nBcc: eve@example.com"} }, "to[0]"},
		{"invalid reply_to", func(e *Email) { e.ReplyTo = "nope" }, "reply_to"},
		{"missing subject", func(e *Email) { e.Subject = " " }, "subject"},
		{"crlf in subject", func(e *Email) { e.Subject = "Hi\r\nBcc: eve@example.com" }, "subject"},
		{"lf in subject", func(e *Email) { e.Subject = "Hi\nthere" }, "subject"},
		{"long subject", func(e *Email) { e.Subject = long }, "subject"},
		{"crlf in header", func(e *Email) { e.Headers = map[string]string{"X-Campaign": "a\r\nBcc: eve@example.com"} }, "headers.X-Campaign"},
		{"bad header name", func(e *Email) { e.Headers = map[string]string{"X Campaign": "a"} }, "headers.X Campaign"},
		{"reserved header", func(e *Email) { e.Headers = map[string]string{"Message-ID": "<x@y>"} }, "headers.Message-ID"},
		{"reserved header any case", func(e *Email) { e.Headers = map[string]string{"bcc": "eve@example.com"} }, "headers.bcc"},
		{"invalid utf-8", func(e *Email) { e.Text = "\xff" }, "text"},
		{"bad tag", func(e *Email) { e.Tags = map[string]string{"": "x"} }, "tags."},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := validEmail()
			tc.edit(&e)
			err := e.Validate()
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("Validate() = %v, want a *FieldError", err)
			}
			if fe.Field != tc.field {
				t.Errorf("field = %q, want %q (message: %s)", fe.Field, tc.field, fe.Message)
			}
			if fe.Message == "" {
				t.Error("empty message")
			}
		})
	}
	e := validEmail()
	if err := e.Validate(); err != nil {
		t.Fatalf("valid email: %v", err)
	}
}

func TestValidateKey(t *testing.T) {
	good := []string{"a", "reminder/ann/2013-12", "a9e5a73a-4d4a-4995-a91c-90295e27100a", "monthly reminder", strings.Repeat("k", MaxKeyLen)}
	for _, k := range good {
		if err := ValidateKey(k); err != nil {
			t.Errorf("ValidateKey(%q) = %v, want nil", k, err)
		}
	}
	bad := []string{"", strings.Repeat("k", MaxKeyLen+1), "tab\there", "new\nline", "ümlaut", " lead", "trail ", "nul\x00"}
	for _, k := range bad {
		var fe *FieldError
		if err := ValidateKey(k); !errors.As(err, &fe) || fe.Field != "key" {
			t.Errorf("ValidateKey(%q) = %v, want a FieldError on key", k, err)
		}
	}
}

func TestMessageIDIsDeterministicAndNamespaced(t *testing.T) {
	a := MessageID("default", "k1", "example.org")
	if a != MessageID("default", "k1", "example.org") {
		t.Fatal("same (tenant, key) gave different Message-IDs")
	}
	if a == MessageID("other", "k1", "example.org") {
		t.Fatal("tenants share a Message-ID")
	}
	if a == MessageID("default", "k2", "example.org") {
		t.Fatal("keys share a Message-ID")
	}
	// No ambiguity between tenant and key boundaries.
	if MessageID("ab", "c", "d") == MessageID("a", "bc", "d") {
		t.Fatal("tenant/key boundary is ambiguous")
	}
	if !strings.HasPrefix(a, "<") || !strings.HasSuffix(a, "@example.org>") || len(a) != 1+52+len("@example.org>") {
		t.Fatalf("unexpected shape %q", a)
	}
	if MessageID("t", "k", "") != MessageID("t", "k", DefaultMessageIDDomain) {
		t.Fatal("empty domain does not default")
	}
}

func TestFingerprint(t *testing.T) {
	e1 := validEmail()
	e2 := validEmail()
	e2.To = []string{"<ann@example.com>"} // same address, other spelling
	f1, _ := e1.Fingerprint()
	f2, _ := e2.Fingerprint()
	if f1 != f2 {
		t.Errorf("equivalent emails differ: %s vs %s", f1, f2)
	}
	e3 := validEmail()
	e3.Text = "Hello Bob"
	if f3, _ := e3.Fingerprint(); f3 == f1 {
		t.Error("different bodies share a fingerprint")
	}
	e4 := validEmail()
	e4.Headers = map[string]string{"X-A": "1"}
	e5 := validEmail()
	e5.Headers = map[string]string{"x-a": "1"}
	f4, _ := e4.Fingerprint()
	f5, _ := e5.Fingerprint()
	if f4 != f5 {
		t.Error("header name case changes the fingerprint")
	}
}

func TestRender(t *testing.T) {
	e := validEmail()
	e.Cc = []string{"cc@example.com"}
	e.Bcc = []string{"secret@example.com"}
	e.HTML = "<p>Hello Ann</p>"
	e.Subject = "Grüße"
	e.Headers = map[string]string{"X-Campaign": "monthly"}
	n, err := e.normalize()
	if err != nil {
		t.Fatal(err)
	}
	mid := MessageID("default", "k", "example.org")
	data, err := n.render(mid, time.Date(2013, 12, 6, 10, 13, 6, 0, time.UTC))
	if err != nil {
		t.Fatal(err)
	}
	m, err := mail.ReadMessage(strings.NewReader(string(data)))
	if err != nil {
		t.Fatalf("rendered message does not parse: %v\n%s", err, data)
	}
	if got := m.Header.Get("Message-Id"); got != mid {
		t.Errorf("Message-ID = %q, want %q", got, mid)
	}
	if m.Header.Get("Bcc") != "" || strings.Contains(string(data), "secret@example.com") {
		t.Error("Bcc leaked into the message")
	}
	if m.Header.Get("X-Campaign") != "monthly" {
		t.Error("extra header missing")
	}
	dec := new(mime.WordDecoder)
	if s, _ := dec.DecodeHeader(m.Header.Get("Subject")); s != "Grüße" {
		t.Errorf("subject = %q", s)
	}
	if got := n.recipients(); strings.Join(got, ",") != "ann@example.com,cc@example.com,secret@example.com" {
		t.Errorf("envelope = %v", got)
	}
	str := string(data)
	if !(strings.Index(str, "\r\nDate:") < strings.Index(str, "\r\nFrom:") && strings.Index(str, "\r\nFrom:") < strings.Index(str, "\r\nSubject:")) {
		t.Error("header fields are not in reading order (Date, From, ..., Subject)")
	}
	if !strings.HasSuffix(str, "\r\n") {
		t.Error("the message does not end with CRLF")
	}
	if !strings.Contains(string(data), "multipart/alternative") {
		t.Error("text+html is not multipart/alternative")
	}
}

// TestRenderTransferEncoding: short ASCII lines go as 7bit with CRLF line
// ends; anything 7bit cannot carry unchanged goes quoted-printable; either
// way the body reads back as written.
// render writes a single 7bit part itself; its bytes are exactly those
// go-message's writer would write for the same message, headers and all.
func TestRenderDirectMatchesGoMessage(t *testing.T) {
	for _, text := range []string{
		"Hello Ann,\nyour reminder.\r\nBye",
		strings.Repeat("x", 998),
		"one line, no break",
		strings.Repeat("sendonce bench sendonce bench sendonce bench sendonce bench sendonce.\n", 60),
	} {
		for _, html := range []bool{false, true} {
			e := validEmail()
			e.Text = text
			e.Headers = map[string]string{"X-Campaign": "winter", "List-Unsubscribe": "<mailto:u@example.org>"}
			if html {
				e.Text, e.HTML = "", text
			}
			n, err := e.normalize()
			if err != nil {
				t.Fatal(err)
			}
			render := func(direct bool) string {
				renderDirect = direct
				defer func() { renderDirect = true }()
				data, err := n.render(MessageID("default", "k", "example.org"), time.Unix(1700000000, 0))
				if err != nil {
					t.Fatal(err)
				}
				return string(data)
			}
			direct, viaWriter := render(true), render(false)
			if !strings.Contains(direct, "Content-Transfer-Encoding: 7bit") {
				t.Fatalf("%q: not 7bit:\n%s", text, direct)
			}
			if direct != viaWriter {
				t.Errorf("direct render differs from go-message's:\n%q\n%q", direct, viaWriter)
			}
		}
	}
}

func TestRenderTransferEncoding(t *testing.T) {
	for _, tc := range []struct {
		name, text, cte string
	}{
		{"ascii", "Hello Ann,\nyour reminder.\n\n-- \nDifio", "quoted-printable"}, // "-- " ends in a space
		{"ascii-clean", "Hello Ann,\nyour reminder.\r\nBye", "7bit"},
		{"utf-8", "Grüße, Ann", "quoted-printable"},
		{"long-line", strings.Repeat("x", 999), "quoted-printable"},
		{"998", strings.Repeat("x", 998), "7bit"},
		{"lone-cr", "a\rb", "quoted-printable"},
		{"trailing-space-at-end", "Hello Ann ", "quoted-printable"}, // the line break is added before deciding
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := validEmail()
			e.Text = tc.text
			n, err := e.normalize()
			if err != nil {
				t.Fatal(err)
			}
			data, err := n.render(MessageID("default", "k", "example.org"), time.Unix(0, 0))
			if err != nil {
				t.Fatal(err)
			}
			if i := strings.Index(strings.ReplaceAll(string(data), "\r\n", ""), "\n"); i >= 0 {
				t.Fatalf("a bare LF at %d:\n%q", i, data)
			}
			r, err := gomail.CreateReader(strings.NewReader(string(data)))
			if err != nil {
				t.Fatal(err)
			}
			p, err := r.NextPart()
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Header.Get("Content-Transfer-Encoding"); got != tc.cte {
				t.Errorf("Content-Transfer-Encoding = %q, want %q", got, tc.cte)
			}
			body, _ := io.ReadAll(p.Body)
			want := strings.ReplaceAll(strings.ReplaceAll(tc.text, "\r\n", "\n"), "\n", "\r\n") + "\r\n"
			if tc.cte == "quoted-printable" {
				// quoted-printable carries line breaks as the reader's
				// own; a lone CR is one too.
				lf := strings.NewReplacer("\r\n", "\n", "\r", "\n")
				want = lf.Replace(tc.text) + "\n"
				body = []byte(lf.Replace(string(body)))
			}
			if string(body) != want {
				t.Errorf("body = %q, want %q", body, want)
			}
		})
	}
}
