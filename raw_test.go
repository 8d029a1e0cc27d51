package sendonce

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestPrepareRaw(t *testing.T) {
	now := time.Date(2013, 12, 6, 10, 13, 6, 0, time.UTC)
	msg := "From: Difio <noreply@example.org>\nTo: ann@example.com\nBcc: secret@example.com,\n other@example.com\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n\nHello\n.\n"
	p, err := prepareRaw(&Raw{From: "bounce@example.org", To: []string{"ann@example.com", "ANN@example.com", "secret@example.com"}, Data: []byte(msg)}, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.to) != 2 {
		t.Errorf("envelope %v: duplicates not removed", p.to)
	}
	data, mid := p.render("<derived@example.org>", now)
	s := string(data)
	if mid != "<derived@example.org>" || !strings.HasPrefix(s, "Message-ID: <derived@example.org>\r\n") {
		t.Errorf("derived Message-ID not added: %q", s)
	}
	if !strings.Contains(s, "Date: Fri, 06 Dec 2013 10:13:06 +0000\r\n") {
		t.Errorf("Date not added: %q", s)
	}
	if strings.Contains(s, "secret@") || strings.Contains(s, "other@") {
		t.Errorf("Bcc (with its continuation line) not removed: %q", s)
	}
	if strings.Contains(strings.ReplaceAll(s, "\r\n", ""), "\n") || !strings.HasSuffix(s, "\r\nHello\r\n.\r\n") {
		t.Errorf("line endings not normalized: %q", s)
	}
	if p.subject() != "Grüße" {
		t.Errorf("subject %q", p.subject())
	}

	own := "Message-ID: <app-123@example.org>\r\nDate: Thu, 05 Dec 2013 10:00:00 +0000\r\nFrom: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"
	p2, err := prepareRaw(&Raw{To: []string{"b@example.com"}, Data: []byte(own)}, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	data, mid = p2.render("<derived@example.org>", now)
	if mid != "<app-123@example.org>" || string(data) != own {
		t.Errorf("a complete message was changed: %s %q", mid, data)
	}
	// Same content with other line endings is the same email.
	p3, _ := prepareRaw(&Raw{To: []string{"b@example.com"}, Data: []byte(strings.ReplaceAll(own, "\r\n", "\n"))}, 1<<20)
	if p3.fingerprint != p2.fingerprint {
		t.Error("line endings change the fingerprint")
	}
}

func TestPrepareRawErrors(t *testing.T) {
	cases := []struct {
		name  string
		raw   Raw
		field string
	}{
		{"no recipients", Raw{Data: []byte("From: a@example.org\r\n\r\nx")}, "rcpt_to"},
		{"bad recipient", Raw{To: []string{"x"}, Data: []byte("From: a@example.org\r\n\r\nx")}, "rcpt_to[0]"},
		{"display name in envelope", Raw{From: "A <a@example.org>", To: []string{"b@example.com"}, Data: []byte("From: a@example.org\r\n\r\nx")}, "mail_from"},
		{"empty", Raw{To: []string{"b@example.com"}}, "raw"},
		{"not a message", Raw{To: []string{"b@example.com"}, Data: []byte("just text without headers")}, "raw"},
		{"no From", Raw{To: []string{"b@example.com"}, Data: []byte("Subject: s\r\n\r\nx")}, "raw"},
		{"bad Message-ID", Raw{To: []string{"b@example.com"}, Data: []byte("From: a@example.org\r\nMessage-ID: nope\r\n\r\nx")}, "raw"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := prepareRaw(&tc.raw, 1<<20)
			var fe *FieldError
			if !errors.As(err, &fe) || fe.Field != tc.field {
				t.Fatalf("error %v, want a FieldError on %s", err, tc.field)
			}
		})
	}
	if _, err := prepareRaw(&Raw{To: []string{"b@example.com"}, Data: []byte(strings.Repeat("x", 100))}, 10); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized: %v", err)
	}
}

// TestRawFingerprintIsContent: a message built again for a retry (new
// Date, Message-ID and MIME boundary) is the same email; another body, or
// other recipients, are not.
func TestRawFingerprintIsContent(t *testing.T) {
	build := func(date, id, boundary, text string, to ...string) *Raw {
		data := "Date: " + date + "\r\nMessage-ID: <" + id + "@example.org>\r\nFrom: a@example.org\r\nTo: b@example.com\r\nSubject: s\r\n" +
			"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"" + boundary + "\"\r\n\r\n" +
			"--" + boundary + "\r\nContent-Type: text/plain\r\n\r\n" + text + "\r\n--" + boundary + "--\r\n"
		return &Raw{From: "a@example.org", To: to, Data: []byte(data)}
	}
	fp := func(r *Raw) string {
		p, err := prepareRaw(r, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		return p.fingerprint
	}
	first := fp(build("Fri, 06 Dec 2013 10:13:06 +0000", "a9e5", "b1111", "Hello", "b@example.com"))
	if again := fp(build("Fri, 06 Dec 2013 10:18:09 +0000", "77f0", "b2222", "Hello", "b@example.com")); again != first {
		t.Error("a rebuilt message has another fingerprint")
	}
	if other := fp(build("Fri, 06 Dec 2013 10:13:06 +0000", "a9e5", "b1111", "Goodbye", "b@example.com")); other == first {
		t.Error("another body has the same fingerprint")
	}
	if other := fp(build("Fri, 06 Dec 2013 10:13:06 +0000", "a9e5", "b1111", "Hello", "c@example.com")); other == first {
		t.Error("other envelope recipients have the same fingerprint")
	}
}
