package smtpd_test

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/smtpd"
	"github.com/sendonce/sendonce/store"
)

func TestHeaderKeyThreeTimesIsOneRecord(t *testing.T) {
	e := start(t, smtpd.Config{})
	m := msg("Your invoice", "Hello Ann.", "X-Idempotency-Key: invoice-42")
	c := e.dial()
	c.hello()
	want := []string{"2.0.0 queued as invoice-42", "2.0.0 duplicate of invoice-42, not sent again", "2.0.0 duplicate of invoice-42, not sent again"}
	for i, w := range want {
		code, text := c.submit("app@example.com", []string{"ann@example.net"}, m)
		if code != 250 || text != w {
			t.Fatalf("send %d: got %d %q, want 250 %q", i+1, code, text, w)
		}
	}
	c.expect("QUIT", 221)
	recs := e.records(sendonce.DefaultTenant)
	if len(recs) != 1 {
		t.Fatalf("%d records, want 1", len(recs))
	}
	r := e.get(sendonce.DefaultTenant, "invoice-42")
	if r.Duplicates != 2 || r.Source != "smtp" || r.From != "app@example.com" || len(r.To) != 1 || r.To[0] != "ann@example.net" {
		t.Fatalf("record: duplicates %d, source %q, from %q, to %q", r.Duplicates, r.Source, r.From, r.To)
	}
	if n, d := e.count(smtpd.EventNew, smtpd.KeyHeader), e.count(smtpd.EventDuplicate, smtpd.KeyHeader); n != 1 || d != 2 {
		t.Fatalf("events: %d new, %d duplicate; want 1 and 2", n, d)
	}
}

// The bytes are stored as received; a Message-ID derived from the key and
// a Date are added because the message has neither, and the envelope, not
// the To header, decides the recipients.
func TestMessageKeptAsReceived(t *testing.T) {
	e := start(t, smtpd.Config{})
	body := "Gr\xc3\xbc\xc3\x9fe, 8-bit body.\r\n.leading dot\r\n"
	m := "X-Idempotency-Key: k1\r\nFrom: app@example.com\r\nTo: someone-else@example.org\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\n" + body
	c := e.dial()
	c.hello()
	c.expect("MAIL FROM:<app@example.com> BODY=8BITMIME SMTPUTF8", 250)
	c.expect("RCPT TO:<ann@example.net>", 250)
	if code, text := c.data(m); code != 250 {
		t.Fatalf("got %d %s", code, text)
	}
	recs, err := e.store.Claim(context.Background(), store.ClaimRequest{Owner: "test", Now: e.clock.Now(), Lease: time.Minute, Limit: 10})
	if err != nil || len(recs) != 1 {
		t.Fatalf("claim: %v, %d records", err, len(recs))
	}
	got := string(recs[0].Data)
	if !strings.HasSuffix(got, m) {
		t.Fatalf("stored message does not end with the message as received:\n%q", got)
	}
	wantID := sendonce.MessageID(sendonce.DefaultTenant, "k1", "example.com")
	if !strings.HasPrefix(got, "Message-ID: "+wantID+"\r\nDate: ") {
		t.Fatalf("stored message does not start with the derived Message-ID and a Date:\n%q", got)
	}
	if len(recs[0].To) != 1 || recs[0].To[0] != "ann@example.net" || recs[0].Subject != "Grüße" {
		t.Fatalf("record to %q subject %q", recs[0].To, recs[0].Subject)
	}
}

func TestEHLOAdvertises(t *testing.T) {
	tlsCfg, _ := selfSigned(t)
	e := start(t, smtpd.Config{MaxMessageBytes: 12345, TLSConfig: tlsCfg, Users: []smtpd.User{{Name: "u", Tenant: "t", PasswordHash: hash(t, "p")}}})
	c := e.dial()
	ehlo := c.hello()
	for _, w := range []string{"PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 12345", "STARTTLS", "AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES"} {
		if !strings.Contains(ehlo, w) {
			t.Errorf("EHLO reply lacks %q:\n%s", w, ehlo)
		}
	}
}

// A pipelining client sends a whole transaction in one write.
func TestPipelining(t *testing.T) {
	e := start(t, smtpd.Config{})
	c := e.dial()
	c.hello()
	c.send("MAIL FROM:<app@example.com>\r\nRCPT TO:<ann@example.net>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
	for _, want := range []int{250, 250, 250, 354} {
		if code, text := c.reply(); code != want {
			t.Fatalf("got %d %s, want %d", code, text, want)
		}
	}
	c.send(msg("s", "b", "X-Idempotency-Key: p1") + ".\r\nQUIT\r\n")
	if code, text := c.reply(); code != 250 || !strings.Contains(text, "queued as p1") {
		t.Fatalf("got %d %s", code, text)
	}
	if code, _ := c.reply(); code != 221 {
		t.Fatalf("QUIT: %d", code)
	}
	if r := e.get(sendonce.DefaultTenant, "p1"); len(r.To) != 2 {
		t.Fatalf("recipients %q", r.To)
	}
}

// Every malformed input gets its reply and leaves the ledger empty.
func TestMalformedInputStoresNothing(t *testing.T) {
	long := strings.Repeat("x", 999) // 999 + CRLF > 1000
	type step struct {
		cmd  string // a command, or "DATA:" + message
		code int
		text string // a part of the reply text
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{"MAIL without @", []step{{"MAIL FROM:<no-at-sign>", 501, ""}}},
		{"MAIL double dot", []step{{"MAIL FROM:<a..b@example.com>", 553, "5.1.7 bad sender address"}}},
		{"MAIL garbage", []step{{"MAIL FROM:<<>>", 501, ""}}},
		{"RCPT empty domain", []step{{"MAIL FROM:<app@example.com>", 250, ""}, {"RCPT TO:<ann@>", 501, ""}}},
		{"RCPT double dot", []step{{"MAIL FROM:<app@example.com>", 250, ""}, {"RCPT TO:<a..b@example.net>", 553, "5.1.3 bad recipient address"}}},
		{"RCPT postmaster without domain", []step{{"MAIL FROM:<app@example.com>", 250, ""}, {"RCPT TO:<postmaster>", 553, "5.1.3"}}},
		{"RCPT non-ASCII", []step{{"MAIL FROM:<app@example.com> SMTPUTF8", 250, ""}, {"RCPT TO:<björn@example.net>", 553, "5.6.7"}}},
		{"SIZE too big", []step{{"MAIL FROM:<app@example.com> SIZE=999999", 552, "5.3.4"}}},
		{"too many recipients", []step{{"MAIL FROM:<app@example.com>", 250, ""}, {"RCPT TO:<a@example.net>", 250, ""}, {"RCPT TO:<b@example.net>", 250, ""}, {"RCPT TO:<c@example.net>", 452, "4.5.3"}}},
		{"DATA without RCPT", []step{{"MAIL FROM:<app@example.com>", 250, ""}, {"DATA", 502, ""}}},
		{"message too large", []step{{"DATA:" + msg("big", strings.Repeat("0123456789abcdef\r\n", 300), "X-Idempotency-Key: big"), 552, "5.3.4 the message exceeds the size limit of 4096 bytes"}}},
		{"not RFC 5322", []step{{"DATA:just some text\r\nwith no header at all\r\n", 550, "5.6.0 this is not an RFC 5322 message"}}},
		{"no From", []step{{"DATA:Subject: hi\r\nX-Idempotency-Key: nofrom\r\n\r\nbody\r\n", 550, "5.6.0 the message has no From"}}},
		{"bare LF among CRLF", []step{{"DATA:X-Idempotency-Key: lf\r\nFrom: app@example.com\nBcc: victim@example.org\r\nSubject: hi\r\n\r\nbody\r\n", 550, "5.6.0 line 2 ends with a bare LF among lines that end with CRLF"}}},
		{"CR injection in a header", []step{{"DATA:X-Idempotency-Key: cr\r\nFrom: app@example.com\r\nSubject: hi\rBcc: victim@example.org\r\n\r\nbody\r\n", 550, "5.6.0 line 3 has a bare CR"}}},
		{"NUL byte", []step{{"DATA:" + msg("nul", "a\x00b", "X-Idempotency-Key: nul"), 550, "5.6.0 line 6 has a NUL byte"}}},
		{"line too long", []step{{"DATA:" + msg("long", long, "X-Idempotency-Key: long"), 550, "5.6.0"}}},
		{"key too long", []step{{"DATA:" + msg("s", "b", "X-Idempotency-Key: "+strings.Repeat("k", 256)), 550, "5.6.0 X-Idempotency-Key: the idempotency key is 256 bytes long"}}},
		{"key not ASCII", []step{{"DATA:" + msg("s", "b", "X-Idempotency-Key: cl\xc3\xa9"), 550, "5.6.0 X-Idempotency-Key: the idempotency key has a byte 0xc3"}}},
		{"key empty", []step{{"DATA:" + msg("s", "b", "X-Idempotency-Key: "), 550, "5.6.0 X-Idempotency-Key: the idempotency key is empty"}}},
		{"key twice", []step{{"DATA:" + msg("s", "b", "X-Idempotency-Key: a", "X-Idempotency-Key: b"), 550, "appears 2 times"}}},
		{"malformed Message-ID", []step{{"DATA:" + msg("s", "b", "X-Idempotency-Key: mid", "Message-ID: not-an-id"), 550, "5.6.0 the Message-ID \"not-an-id\" is not of the form"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := start(t, smtpd.Config{MaxMessageBytes: 4096, MaxRecipients: 2})
			c := e.dial()
			c.hello()
			for _, s := range tc.steps {
				var code int
				var text string
				if m, ok := strings.CutPrefix(s.cmd, "DATA:"); ok {
					c.expect("MAIL FROM:<app@example.com>", 250)
					c.expect("RCPT TO:<ann@example.net>", 250)
					code, text = c.data(m)
				} else {
					code, text = c.cmd(s.cmd)
				}
				if code != s.code || !strings.Contains(text, s.text) {
					t.Fatalf("%.60q: got %d %q, want %d containing %q", s.cmd, code, text, s.code, s.text)
				}
			}
			if recs := e.records(sendonce.DefaultTenant); len(recs) != 0 {
				t.Fatalf("%d records stored, want none", len(recs))
			}
			if n := e.count(smtpd.EventNew, ""); n != 0 {
				t.Fatalf("%d new events", n)
			}
		})
	}
}

// The longest line RFC 5322 allows passes; one byte more does not.
func TestLineLengthBoundary(t *testing.T) {
	e := start(t, smtpd.Config{})
	c := e.dial()
	c.hello()
	if code, text := c.submit("app@example.com", []string{"ann@example.net"}, msg("s", strings.Repeat("y", 998), "X-Idempotency-Key: ok998")); code != 250 {
		t.Fatalf("998 characters: got %d %s", code, text)
	}
	code, text := c.submit("app@example.com", []string{"ann@example.net"}, msg("s", strings.Repeat("y", 999), "X-Idempotency-Key: no999"))
	if code != 550 || !strings.Contains(text, "5.6.0 line 6 is 1001 bytes long; the limit is 1000") {
		t.Fatalf("999 characters: got %d %s", code, text)
	}
	// The session goes on after a line somewhat too long...
	c.expect("NOOP", 250)
	// ...but not after one far beyond any limit: the server stops reading it.
	code, text = c.submit("app@example.com", []string{"ann@example.net"}, msg("s", strings.Repeat("z", 5000), "X-Idempotency-Key: no5000"))
	if code != 550 || !strings.Contains(text, "5.6.0 a line is far longer than 1000 bytes") {
		t.Fatalf("5000 characters: got %d %s", code, text)
	}
	if !c.closed() {
		t.Fatal("the connection stays open after an endless line")
	}
	if recs := e.records(sendonce.DefaultTenant); len(recs) != 1 {
		t.Fatalf("%d records, want 1", len(recs))
	}
}

func TestKeyReusedWithOtherContent(t *testing.T) {
	e := start(t, smtpd.Config{})
	c := e.dial()
	c.hello()
	if code, text := c.submit("app@example.com", []string{"ann@example.net"}, msg("First", "one", "X-Idempotency-Key: same")); code != 250 {
		t.Fatalf("got %d %s", code, text)
	}
	before := e.get(sendonce.DefaultTenant, "same")
	code, text := c.submit("app@example.com", []string{"ann@example.net"}, msg("Second", "two", "X-Idempotency-Key: same"))
	if code != 554 || !strings.HasPrefix(text, "5.7.0 X-Idempotency-Key \"same\" was already used for a message with another subject (\"First\")") {
		t.Fatalf("got %d %q", code, text)
	}
	after := e.get(sendonce.DefaultTenant, "same")
	if after.Subject != "First" || after.Duplicates != 0 || after.Fingerprint != before.Fingerprint || len(e.records(sendonce.DefaultTenant)) != 1 {
		t.Fatalf("record changed: %+v", after)
	}
}

func TestStoreFailureIsTemporary(t *testing.T) {
	e := start(t, smtpd.Config{})
	c := e.dial()
	c.hello()
	c.expect("MAIL FROM:<app@example.com>", 250)
	c.expect("RCPT TO:<ann@example.net>", 250)
	e.store.Close()
	code, text := c.data(msg("s", "b", "X-Idempotency-Key: down"))
	if code != 451 || !strings.HasPrefix(text, "4.3.0") {
		t.Fatalf("got %d %s, want 451 4.3.0", code, text)
	}
}

func TestNoKeyIsAcceptedWithoutDedup(t *testing.T) {
	e := start(t, smtpd.Config{})
	c := e.dial()
	c.hello()
	for i := 0; i < 3; i++ {
		code, text := c.submit("app@example.com", []string{"ann@example.net"}, msg("Same", "same body"))
		if code != 250 || !strings.HasPrefix(text, "2.0.0 queued as nokey:") {
			t.Fatalf("got %d %s", code, text)
		}
	}
	if n := len(e.records(sendonce.DefaultTenant)); n != 3 {
		t.Fatalf("%d records, want 3", n)
	}
	if n := e.count(smtpd.EventNew, smtpd.KeyNone); n != 3 {
		t.Fatalf("%d no-key events, want 3", n)
	}
}

func fingerprintMsg(id, date, body string) string {
	return "Message-ID: <" + id + "@app.example.com>\r\nDate: " + date + "\r\nReceived: from x by y; " + date + "\r\n" +
		"From: App <app@example.com>\r\nTo: ann@example.net\r\nSubject: =?utf-8?q?Your_order?=  \r\n\tshipped\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b-" + id + "\"\r\n\r\n" +
		"--b-" + id + "\r\nContent-Type: text/plain\r\n\r\n" + body + "\r\n--b-" + id + "--\r\n"
}

func TestFingerprint(t *testing.T) {
	const window = 10 * time.Minute
	e := start(t, smtpd.Config{Tenants: map[string]smtpd.KeyModes{sendonce.DefaultTenant: {FingerprintWindow: window}}})
	// The first copy comes late in its window, so that a repeat a minute
	// later falls in the next one.
	e.clock.Advance(9 * time.Minute)
	c := e.dial()
	c.hello()
	send := func(id string, rcpt string, body string) (int, string) {
		return c.submit("app@example.com", []string{rcpt}, fingerprintMsg(id, e.clock.Now().Format(time.RFC1123Z), body))
	}
	// A repeat with a new Message-ID, Date, Received and MIME boundary.
	code, first := send("id1", "ann@example.net", "Shipped.")
	if code != 250 || !strings.HasPrefix(first, "2.0.0 queued as fingerprint:") {
		t.Fatalf("got %d %s", code, first)
	}
	key := strings.TrimPrefix(first, "2.0.0 queued as ")
	for i, id := range []string{"id2", "id3"} {
		e.clock.Advance(time.Second)
		if code, text := send(id, "ann@example.net", "Shipped."); code != 250 || text != "2.0.0 duplicate of "+key+", not sent again" {
			t.Fatalf("repeat %d: got %d %s", i+1, code, text)
		}
	}
	if n := len(e.records(sendonce.DefaultTenant)); n != 1 {
		t.Fatalf("%d records after three sends, want 1", n)
	}
	// Other envelope recipients (a Bcc batch), other body: new emails.
	if code, text := send("id4", "bob@example.net", "Shipped."); code != 250 || !strings.Contains(text, "queued as") {
		t.Fatalf("other recipient: got %d %s", code, text)
	}
	if code, text := send("id5", "ann@example.net", "Shipped again."); code != 250 || !strings.Contains(text, "queued as") {
		t.Fatalf("other body: got %d %s", code, text)
	}
	// Into the next window, less than a window after the first: still a
	// duplicate, found under the previous window's key.
	created := e.get(sendonce.DefaultTenant, key).CreatedAt
	e.clock.Advance(time.Minute)
	if e.clock.Now().Truncate(window) == created.Truncate(window) {
		t.Fatal("test bug: still in the first window")
	}
	if code, text := send("id6", "ann@example.net", "Shipped."); code != 250 || text != "2.0.0 duplicate of "+key+", not sent again" {
		t.Fatalf("next window: got %d %s", code, text)
	}
	// A window after the first: a new email.
	e.clock.Advance(created.Add(window).Sub(e.clock.Now()))
	if code, text := send("id7", "ann@example.net", "Shipped."); code != 250 || !strings.Contains(text, "queued as") || strings.Contains(text, key) {
		t.Fatalf("after the window: got %d %s", code, text)
	}
	if n := len(e.records(sendonce.DefaultTenant)); n != 4 {
		t.Fatalf("%d records, want 4", n)
	}
	if d := e.count(smtpd.EventDuplicate, smtpd.KeyFingerprint); d != 3 {
		t.Fatalf("%d fingerprint duplicates, want 3", d)
	}
}

func TestFingerprintOffSendsEveryCopy(t *testing.T) {
	e := start(t, smtpd.Config{Tenants: map[string]smtpd.KeyModes{"other": {FingerprintWindow: time.Hour}}})
	c := e.dial()
	c.hello()
	for _, id := range []string{"a", "b", "c"} {
		if code, text := c.submit("app@example.com", []string{"ann@example.net"}, fingerprintMsg(id, "Mon, 1 Jan 2030 00:00:00 +0000", "x")); code != 250 || !strings.Contains(text, "queued as nokey:") {
			t.Fatalf("got %d %s", code, text)
		}
	}
	if n := len(e.records(sendonce.DefaultTenant)); n != 3 {
		t.Fatalf("%d records, want 3", n)
	}
}

func TestMessageIDMode(t *testing.T) {
	e := start(t, smtpd.Config{Tenants: map[string]smtpd.KeyModes{sendonce.DefaultTenant: {MessageID: true}}})
	c := e.dial()
	c.hello()
	m := func(date string) string { return msg("s", "b", "Message-ID: <m1@app.example.com>", "Date: "+date) }
	if code, text := c.submit("app@example.com", []string{"ann@example.net"}, m("Mon, 1 Jan 2030 00:00:00 +0000")); code != 250 || text != "2.0.0 queued as message-id:<m1@app.example.com>" {
		t.Fatalf("got %d %s", code, text)
	}
	// The sender's library rebuilt the message with a new Date: the same message.
	if code, text := c.submit("app@example.com", []string{"ann@example.net"}, m("Mon, 1 Jan 2030 00:05:00 +0000")); code != 250 || !strings.Contains(text, "duplicate of message-id:<m1@app.example.com>") {
		t.Fatalf("got %d %s", code, text)
	}
	// The same Message-ID for other recipients is refused, not dropped.
	if code, text := c.submit("app@example.com", []string{"bob@example.net"}, m("Mon, 1 Jan 2030 00:05:00 +0000")); code != 554 || !strings.Contains(text, "other envelope recipients") {
		t.Fatalf("got %d %s", code, text)
	}
	// The header still comes first.
	if code, text := c.submit("app@example.com", []string{"ann@example.net"}, msg("s", "b", "Message-ID: <m1@app.example.com>", "X-Idempotency-Key: explicit")); code != 250 || text != "2.0.0 queued as explicit" {
		t.Fatalf("got %d %s", code, text)
	}
}

func TestUnauthenticatedRelayRefused(t *testing.T) {
	e := start(t, smtpd.Config{Users: []smtpd.User{{Name: "app", Tenant: "acme", PasswordHash: hash(t, "secret")}}})
	c := e.dial()
	c.hello()
	if code, text := c.cmd("MAIL FROM:<app@example.com>"); code != 530 || !strings.HasPrefix(text, "5.7.0") {
		t.Fatalf("MAIL: got %d %s, want 530 5.7.0", code, text)
	}
	if code, _ := c.cmd("RCPT TO:<ann@example.net>"); code/100 != 5 {
		t.Fatalf("RCPT: got %d, want a refusal", code)
	}
	if code, _ := c.cmd("DATA"); code/100 != 5 {
		t.Fatalf("DATA: got %d, want a refusal", code)
	}
	if n := len(e.records("acme")) + len(e.records(sendonce.DefaultTenant)); n != 0 {
		t.Fatalf("%d records", n)
	}
}

func TestAuthNeedsTLSOffLoopback(t *testing.T) {
	tlsCfg, pool := selfSigned(t)
	cfg := smtpd.Config{TLSConfig: tlsCfg, Users: []smtpd.User{{Name: "app", Tenant: "acme", PasswordHash: hash(t, "secret")}}}
	smtpd.SetIsLocal(&cfg, func(net.Addr) bool { return false })
	e := start(t, cfg)
	c := e.dial()
	ehlo := c.hello()
	if strings.Contains(ehlo, "AUTH") || !strings.Contains(ehlo, "STARTTLS") {
		t.Fatalf("plaintext EHLO offers AUTH or lacks STARTTLS:\n%s", ehlo)
	}
	if code, text := c.login("app", "secret"); code != 538 || !strings.Contains(text, "STARTTLS") {
		t.Fatalf("AUTH before STARTTLS: got %d %s", code, text)
	}
	if code, _ := c.cmd("AUTH LOGIN"); code != 538 {
		t.Fatalf("AUTH LOGIN before STARTTLS: got %d", code)
	}
	tc := c.starttls(pool)
	ehlo = tc.expect("EHLO client.test", 250)
	if !strings.Contains(ehlo, "AUTH PLAIN LOGIN") {
		t.Fatalf("EHLO over TLS lacks AUTH:\n%s", ehlo)
	}
	if code, text := tc.login("app", "secret"); code != 235 {
		t.Fatalf("AUTH over TLS: got %d %s", code, text)
	}
	if code, text := tc.submit("app@example.com", []string{"ann@example.net"}, msg("s", "b", "X-Idempotency-Key: tls1")); code != 250 {
		t.Fatalf("got %d %s", code, text)
	}
	e.get("acme", "tls1")
}

func TestImplicitTLS(t *testing.T) {
	tlsCfg, pool := selfSigned(t)
	cfg := smtpd.Config{TLSConfig: tlsCfg, ImplicitTLS: true, Users: []smtpd.User{{Name: "app", Tenant: "acme", PasswordHash: hash(t, "secret")}}}
	smtpd.SetIsLocal(&cfg, func(net.Addr) bool { return false })
	e := start(t, cfg)
	nc, err := tls.Dial("tcp", e.addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	c := newConn(t, nc)
	if ehlo := c.hello(); strings.Contains(ehlo, "STARTTLS") || !strings.Contains(ehlo, "AUTH PLAIN LOGIN") {
		t.Fatalf("EHLO:\n%s", ehlo)
	}
	if code, text := c.login("app", "secret"); code != 235 {
		t.Fatalf("got %d %s", code, text)
	}
}

// AUTH LOGIN, the mechanism older clients use, on a loopback connection
// where AUTH needs no TLS.
func TestAuthLoginOnLoopback(t *testing.T) {
	e := start(t, smtpd.Config{Users: []smtpd.User{{Name: "app", Tenant: "acme", PasswordHash: hash(t, "secret")}}})
	c := e.dial()
	if ehlo := c.hello(); !strings.Contains(ehlo, "AUTH PLAIN LOGIN") {
		t.Fatalf("EHLO on loopback lacks AUTH:\n%s", ehlo)
	}
	c.expect("AUTH LOGIN", 334)
	c.expect(base64.StdEncoding.EncodeToString([]byte("app")), 334)
	c.expect(base64.StdEncoding.EncodeToString([]byte("secret")), 235)
	if code, text := c.submit("app@example.com", []string{"ann@example.net"}, msg("s", "b", "X-Idempotency-Key: l1")); code != 250 {
		t.Fatalf("got %d %s", code, text)
	}
	e.get("acme", "l1")
}

func TestWrongPasswordIsRateLimited(t *testing.T) {
	e := start(t, smtpd.Config{AuthFailuresPerMinute: 3, Users: []smtpd.User{{Name: "app", Tenant: "acme", PasswordHash: hash(t, "secret")}}})
	c := e.dial()
	c.hello()
	for i, u := range []string{"app", "nobody", "app"} {
		if code, text := c.login(u, "guess"); code != 535 || !strings.HasPrefix(text, "5.7.8") {
			t.Fatalf("failure %d: got %d %s, want 535 5.7.8", i+1, code, text)
		}
	}
	code, text := c.login("app", "secret")
	if code != 421 || !strings.HasPrefix(text, "4.7.0 too many failed logins") {
		t.Fatalf("after 3 failures: got %d %s, want 421 4.7.0", code, text)
	}
	if !c.closed() {
		t.Fatal("connection not closed after 421")
	}
	// A new connection from the same address is refused too, even with
	// the right password, until the oldest failure is a minute old.
	c = e.dial()
	c.hello()
	if code, _ := c.login("app", "secret"); code != 421 {
		t.Fatalf("new connection: got %d, want 421", code)
	}
	e.clock.Advance(time.Minute)
	c = e.dial()
	c.hello()
	if code, text := c.login("app", "secret"); code != 235 {
		t.Fatalf("a minute later: got %d %s", code, text)
	}
	if n := e.count(smtpd.EventAuthFailed, ""); n != 5 {
		t.Fatalf("%d auth_failed events, want 5", n)
	}
}

func TestTenantsAreIsolated(t *testing.T) {
	e := start(t, smtpd.Config{Users: []smtpd.User{
		{Name: "a", Tenant: "tenant-a", PasswordHash: hash(t, "pa")},
		{Name: "b", Tenant: "tenant-b", PasswordHash: hash(t, "pb")},
	}})
	for _, u := range []struct{ name, pass, subject string }{{"a", "pa", "From A"}, {"b", "pb", "From B"}} {
		c := e.dial()
		c.hello()
		if code, text := c.login(u.name, u.pass); code != 235 {
			t.Fatalf("%s: %d %s", u.name, code, text)
		}
		if code, text := c.submit("app@example.com", []string{"ann@example.net"}, msg(u.subject, "b", "X-Idempotency-Key: shared-key")); code != 250 || text != "2.0.0 queued as shared-key" {
			t.Fatalf("%s: got %d %s", u.name, code, text)
		}
	}
	if a, b := e.get("tenant-a", "shared-key"), e.get("tenant-b", "shared-key"); a.Subject != "From A" || b.Subject != "From B" || a.MessageID == b.MessageID {
		t.Fatalf("records: %q %q, %s %s", a.Subject, b.Subject, a.MessageID, b.MessageID)
	}
}

func TestAuthWithoutUsers(t *testing.T) {
	e := start(t, smtpd.Config{})
	c := e.dial()
	if ehlo := c.hello(); strings.Contains(ehlo, "AUTH") {
		t.Fatalf("EHLO offers AUTH without users:\n%s", ehlo)
	}
	if code, _ := c.login("x", "y"); code != 502 {
		t.Fatalf("got %d, want 502", code)
	}
}

func TestNoUsersServesOnlyLoopback(t *testing.T) {
	cfg := smtpd.Config{}
	smtpd.SetIsLocal(&cfg, func(a net.Addr) bool { return !strings.HasPrefix(a.String(), "127.0.0.1:") })
	e := start(t, cfg) // the listener is on 127.0.0.1; its clients are "remote"
	c := e.dial()
	if code, text := c.reply(); code != 554 || !strings.Contains(text, "loopback") {
		t.Fatalf("got %d %s, want 554", code, text)
	}
}

func TestNewRefuses(t *testing.T) {
	st := start(t, smtpd.Config{})
	tlsCfg, _ := selfSigned(t)
	user := []smtpd.User{{Name: "u", Tenant: "t", PasswordHash: hash(t, "p")}}
	cases := []struct {
		name string
		cfg  smtpd.Config
		want string
	}{
		{"no client", smtpd.Config{}, "Config.Client is nil"},
		{"open relay", smtpd.Config{Client: st.client, Addr: "0.0.0.0:2525"}, "not a loopback address and no users are configured"},
		{"all interfaces", smtpd.Config{Client: st.client, Addr: ":2525"}, "not a loopback address and no users are configured"},
		{"remote users without TLS", smtpd.Config{Client: st.client, Addr: "192.0.2.1:587", Users: user}, "no TLS certificate"},
		{"implicit TLS without certificate", smtpd.Config{Client: st.client, ImplicitTLS: true}, "ImplicitTLS needs Config.TLSConfig"},
		{"bad hash", smtpd.Config{Client: st.client, Users: []smtpd.User{{Name: "u", Tenant: "t", PasswordHash: "plaintext"}}}, "not a bcrypt hash"},
		{"user without tenant", smtpd.Config{Client: st.client, Users: []smtpd.User{{Name: "u", PasswordHash: hash(t, "p")}}}, "has no Tenant"},
		{"user twice", smtpd.Config{Client: st.client, Users: append(user, user[0])}, "listed twice"},
		{"tiny window", smtpd.Config{Client: st.client, Tenants: map[string]smtpd.KeyModes{"t": {FingerprintWindow: time.Millisecond}}}, "FingerprintWindow"},
		{"negative size", smtpd.Config{Client: st.client, MaxMessageBytes: -1}, "MaxMessageBytes"},
		{"too many recipients", smtpd.Config{Client: st.client, MaxRecipients: 5000}, "MaxRecipients"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := smtpd.New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
	// Remote with users and TLS is fine; so is localhost without users.
	if _, err := smtpd.New(smtpd.Config{Client: st.client, Addr: "192.0.2.1:587", Users: user, TLSConfig: tlsCfg}); err != nil {
		t.Fatal(err)
	}
	if _, err := smtpd.New(smtpd.Config{Client: st.client, Addr: "localhost:2525"}); err != nil {
		t.Fatal(err)
	}
}

func TestConnectionsPerClient(t *testing.T) {
	e := start(t, smtpd.Config{MaxConnsPerIP: 2})
	a, b := e.dial(), e.dial()
	a.hello()
	b.hello()
	c := e.dial()
	if code, text := c.reply(); code != 421 || !strings.HasPrefix(text, "4.7.0 too many connections") {
		t.Fatalf("third connection: got %d %s", code, text)
	}
	if !c.closed() {
		t.Fatal("third connection left open")
	}
	a.expect("QUIT", 221)
	if !a.closed() {
		t.Fatal("QUIT did not close")
	}
	// The server frees the slot before it closes the connection.
	if code, text := e.dial().reply(); code != 220 {
		t.Fatalf("after QUIT: got %d %s", code, text)
	}
}

func TestIdleTimeout(t *testing.T) {
	e := start(t, smtpd.Config{ReadTimeout: 100 * time.Millisecond})
	c := e.dial()
	c.reply() // greeting; then say nothing
	if code, text := c.reply(); code != 421 || !strings.HasPrefix(text, "4.4.2") {
		t.Fatalf("got %d %s", code, text)
	}
}

func TestDataTimeout(t *testing.T) {
	e := start(t, smtpd.Config{DataTimeout: 100 * time.Millisecond})
	c := e.dial()
	c.hello()
	c.expect("MAIL FROM:<app@example.com>", 250)
	c.expect("RCPT TO:<ann@example.net>", 250)
	c.expect("DATA", 354)
	c.send("From: app@example.com\r\nSubject: half\r\n") // and never the end
	if code, text := c.reply(); code != 421 || !strings.HasPrefix(text, "4.4.2") {
		t.Fatalf("got %d %s", code, text)
	}
	if !c.closed() {
		t.Fatal("connection left open")
	}
	if n := len(e.records(sendonce.DefaultTenant)); n != 0 {
		t.Fatalf("%d records", n)
	}
}

func TestShutdownLetsTheMessageFinish(t *testing.T) {
	e := start(t, smtpd.Config{})
	idle, busy := e.dial(), e.dial()
	idle.hello()
	busy.hello()
	busy.expect("MAIL FROM:<app@example.com>", 250)
	busy.expect("RCPT TO:<ann@example.net>", 250)
	busy.expect("DATA", 354)
	done := make(chan error, 1)
	go func() { done <- e.srv.Shutdown(context.Background()) }()
	if !idle.closed() {
		t.Fatal("idle connection not closed by Shutdown")
	}
	busy.send(msg("s", "b", "X-Idempotency-Key: during-shutdown") + ".\r\n")
	if code, text := busy.reply(); code != 250 || !strings.Contains(text, "queued as during-shutdown") {
		t.Fatalf("got %d %s", code, text)
	}
	if !busy.closed() {
		t.Fatal("connection left open after its transaction")
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	e.get(sendonce.DefaultTenant, "during-shutdown")
}

// A client that writes bare LF line endings throughout (Python's smtplib
// given bytes does) is served, and the message is stored with CRLF.
func TestLFOnlyMessageIsNormalized(t *testing.T) {
	e := start(t, smtpd.Config{})
	c := e.dial()
	c.hello()
	c.expect("MAIL FROM:<app@example.com>", 250)
	c.expect("RCPT TO:<ann@example.net>", 250)
	c.expect("DATA", 354)
	c.send("X-Idempotency-Key: lf-only\nFrom: app@example.com\nSubject: hi\n\nline one\nline two\n\r\n.\r\n")
	if code, text := c.reply(); code != 250 || text != "2.0.0 queued as lf-only" {
		t.Fatalf("got %d %s", code, text)
	}
	recs, err := e.store.Claim(context.Background(), store.ClaimRequest{Owner: "test", Now: e.clock.Now(), Lease: time.Minute, Limit: 1})
	if err != nil || len(recs) != 1 {
		t.Fatalf("claim: %v", err)
	}
	if got := string(recs[0].Data); !strings.HasSuffix(got, "Subject: hi\r\n\r\nline one\r\nline two\r\n\r\n") || strings.Contains(strings.ReplaceAll(got, "\r\n", ""), "\n") {
		t.Fatalf("stored %q", got)
	}
}

// BDAT (CHUNKING, which go-smtp always offers) takes the same path.
func TestBDAT(t *testing.T) {
	e := start(t, smtpd.Config{})
	c := e.dial()
	c.hello()
	m := msg("s", "b", "X-Idempotency-Key: chunked")
	c.expect("MAIL FROM:<app@example.com>", 250)
	c.expect("RCPT TO:<ann@example.net>", 250)
	c.send("BDAT 10\r\n" + m[:10])
	if code, _ := c.reply(); code != 250 {
		t.Fatalf("first chunk: %d", code)
	}
	c.send(fmt.Sprintf("BDAT %d LAST\r\n", len(m)-10) + m[10:])
	if code, text := c.reply(); code != 250 || text != "2.0.0 queued as chunked" {
		t.Fatalf("got %d %s", code, text)
	}
	long := msg("s", strings.Repeat("x", 1500), "X-Idempotency-Key: chunked-long")
	c.expect("MAIL FROM:<app@example.com>", 250)
	c.expect("RCPT TO:<ann@example.net>", 250)
	c.send(fmt.Sprintf("BDAT %d LAST\r\n", len(long)) + long)
	if code, text := c.reply(); code != 550 || !strings.Contains(text, "is 1502 bytes long") {
		t.Fatalf("long line: got %d %s", code, text)
	}
}
