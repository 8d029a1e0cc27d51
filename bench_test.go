package sendonce

import (
	"bytes"
	"context"
	"fmt"
	"net/mail"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store/sqlitestore"
)

// benchEmail is a receipt with a 4 KiB text body, the shape the bench
// uses: plain ASCII lines, sent as 7bit.
func benchEmail() Email {
	line := strings.Repeat("sendonce bench ", 5)[:74] + ".\n"
	return Email{
		From:    "Bench <bench@example.com>",
		To:      []string{"rcpt@example.com"},
		Subject: "Your receipt",
		Text:    strings.Repeat(line, 4096/len(line)+1)[:4096],
		Tags:    map[string]string{"campaign": "bench"},
	}
}

func BenchmarkFingerprint(b *testing.B) {
	e := benchEmail()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.Fingerprint(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMessageID(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		_ = MessageID("default", "order-1234567/receipt", "example.com")
	}
}

// BenchmarkRender is the MIME build of a 4 KiB email (normalize included).
func BenchmarkRender(b *testing.B) { benchRender(b, benchEmail(), "7bit") }

// BenchmarkRenderQuotedPrintable is the same build for a body whose lines
// end in a space, which 7bit cannot carry: it is quoted-printable encoded.
func BenchmarkRenderQuotedPrintable(b *testing.B) {
	e := benchEmail()
	e.Text = strings.ReplaceAll(e.Text, ".\n", ". \n")
	benchRender(b, e, "quoted-printable")
}

// benchRender measures normalize and render of e, whose body must come out
// in the transfer encoding cte (checked once, outside the measured loop).
func benchRender(b *testing.B, e Email, cte string) {
	now := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	mid := MessageID("default", "k", "example.com")
	build := func() []byte {
		n, err := e.normalize()
		if err != nil {
			b.Fatal(err)
		}
		m, err := n.render(mid, now)
		if err != nil {
			b.Fatal(err)
		}
		return m
	}
	if m := build(); !bytes.Contains(m, []byte("Content-Transfer-Encoding: "+cte)) {
		b.Fatalf("body not %s", cte)
	}
	b.ReportAllocs()
	for b.Loop() {
		build()
	}
}

// BenchmarkContentFingerprint is the fingerprint of a raw (SMTP) message.
func BenchmarkContentFingerprint(b *testing.B) {
	e := benchEmail()
	n, err := e.normalize()
	if err != nil {
		b.Fatal(err)
	}
	raw, err := n.render(MessageID("default", "k", "example.com"), time.Now())
	if err != nil {
		b.Fatal(err)
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		b.Fatal(err)
	}
	body := raw[len(raw)-4096:]
	rcpt := []string{"rcpt@example.com"}
	b.ReportAllocs()
	for b.Loop() {
		_ = ContentFingerprint("bench@example.com", rcpt, msg.Header, body)
	}
}

// BenchmarkSubmitParallel is durable admissions through Client.Submit on
// SQLite by 128×GOMAXPROCS concurrent callers.
func BenchmarkSubmitParallel(b *testing.B) {
	st, err := sqlitestore.Open(context.Background(), b.TempDir(), sqlitestore.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	c, err := New(Config{Store: st})
	if err != nil {
		b.Fatal(err)
	}
	e := benchEmail()
	var n atomic.Int64
	b.SetParallelism(128)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Submit(context.Background(), Submission{Key: fmt.Sprintf("key-%d", n.Add(1)), Email: e}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
