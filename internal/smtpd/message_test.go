package smtpd_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/smtpd"
)

// FuzzParseMessage runs the message path of DATA, parsing and key
// derivation, on arbitrary bytes. It must never panic; it either refuses
// the message with a 550 5.6.0 or derives keys the ledger accepts, and the
// fingerprint ignores the trace fields a resend changes.
func FuzzParseMessage(f *testing.F) {
	seeds := []string{
		"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n",
		"",
		"\r\n",
		"\r\n\r\nbody without any header\r\n",
		"no header at all, just text\r\n",
		"From: a@example.com\r\n", // header only, no blank line
		"From: a@example.com\r\nSubject: NUL\x00inside\r\n\r\nb\r\n",
		"From: a@example.com\r\nX-Long: " + strings.Repeat("h", 5000) + "\r\n\r\nb\r\n",
		"From: a@example.com\r\nSubject: bare\rCR\r\n\r\nb\r\n",
		"From: a@example.com\nSubject: lf only\n\nb\n\r\n",
		"From: a@example.com\r\nSubject: mixed\nBcc: x@example.org\r\n\r\nb\r\n",
		"From: a@example.com\r\nSubject: \xff\xfe not utf-8 \xc3\x28\r\n\r\n\xff\r\n",
		"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\nSubject: =?utf-8?b?R3LDvMOfZQ==?= =?iso-8859-1?q?caf=E9?= =?bogus?x?zz?=\r\n\r\nb\r\n",
		"From: a@example.com\r\nX-Idempotency-Key: k\r\nX-Idempotency-Key: k\r\n\r\nb\r\n",
		"From: a@example.com\r\nX-Idempotency-Key:  \r\n\r\nb\r\n",
		"From: a@example.com\r\nX-Idempotency-Key: " + strings.Repeat("k", 300) + "\r\n\r\nb\r\n",
		"From: a@example.com\r\nMessage-ID: <" + strings.Repeat("m", 400) + "@x>\r\n\r\nb\r\n",
		"From: a@example.com\r\nMessage-ID: <b\xc3\xb6se@x>\r\n\r\nb\r\n",
		"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=\"a\"\r\n\r\n--a\r\nContent-Type: multipart/alternative; boundary=ab\r\n\r\n--ab\r\n\r\nx\r\n--ab--\r\n--a--\r\n",
		"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
		"From: a@example.com\r\n folded: continuation first\r\n\r\nb\r\n",
		" leading space\r\nFrom: a@example.com\r\n\r\nb\r\n",
		"From a@example.com Mon Jan  1 00:00:00 2030\r\nFrom: a@example.com\r\n\r\nmbox line\r\n",
		"From: a@example.com\r\nTo: undisclosed-recipients:;\r\nCc: \"odd, name\" <c@example.com>, bad@@x\r\n\r\nb\r\n",
		".\r\n",
		"From: a@example.com\r\n\r\n.\r\n..\r\n",
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		key, fp, midKey, err := smtpd.ParseMessage(data, 1000)
		if err != nil {
			var se *smtp.SMTPError
			if !errors.As(err, &se) || se.Code != 550 || se.EnhancedCode != (smtp.EnhancedCode{5, 6, 0}) {
				t.Fatalf("error is not a 550 5.6.0: %#v", err)
			}
			if strings.ContainsAny(se.Message, "\r\n") {
				t.Fatalf("reply text spans lines: %q", se.Message)
			}
			return
		}
		if key != "" {
			if err := sendonce.ValidateKey(key); err != nil {
				t.Fatalf("header key %q: %v", key, err)
			}
		}
		if midKey != "" {
			if err := sendonce.ValidateKey(midKey); err != nil {
				t.Fatalf("message-id key %q: %v", midKey, err)
			}
		}
		if len(fp) != 64 {
			t.Fatalf("fingerprint %q", fp)
		}
		// A resend with trace fields in front is the same content.
		resent := append([]byte("Received: from relay by here; Mon, 1 Jan 2030 00:00:00 +0000\r\nDate: Tue, 2 Jan 2030 00:00:00 +0000\r\n"), data...)
		if bytes.HasPrefix(data, []byte("\r\n")) || bytes.HasPrefix(data, []byte(" ")) || bytes.HasPrefix(data, []byte("\t")) {
			return // the prefix would change the header's shape
		}
		if bytes.Contains(data, []byte("\n")) && !bytes.Contains(data, []byte("\r\n")) {
			return // LF-only: the CRLF prefix would make it mixed
		}
		_, fp2, _, err := smtpd.ParseMessage(resent, 1000)
		if err == nil && fp2 != fp && !hasHeader(data, "Date") && !hasHeader(data, "Received") {
			t.Fatalf("fingerprint changed by a Received and a Date field")
		}
	})
}

func hasHeader(data []byte, name string) bool {
	return bytes.Contains(bytes.ToLower(data), []byte(strings.ToLower(name)+":"))
}
