package smtp_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sendonce/sendonce/transport"
	"github.com/sendonce/sendonce/transport/smtp"
	"github.com/sendonce/sendonce/transport/transporttest"
)

// quick keeps a broken test from hanging while staying far above what a
// loopback exchange needs.
var quick = smtp.Options{DialTimeout: 5 * time.Second, CommandTimeout: 5 * time.Second, FinalDotTimeout: 5 * time.Second}

func TestConformance(t *testing.T) {
	transporttest.RunTransport(t, func(t *testing.T, sink *transporttest.Sink) transport.Transport {
		tr, err := smtp.New(sink.URL(), quick)
		if err != nil {
			t.Fatal(err)
		}
		return tr
	})
}

// The same suite, every fault at every step, with MAIL, RCPT and DATA
// sent one at a time as to a server without PIPELINING.
func TestConformanceWithoutPipelining(t *testing.T) {
	transporttest.RunTransport(t, func(t *testing.T, sink *transporttest.Sink) transport.Transport {
		opts := quick
		opts.NoPipelining = true
		tr, err := smtp.New(sink.URL(), opts)
		if err != nil {
			t.Fatal(err)
		}
		return tr
	})
}

// rawServer is a scripted SMTP server: it greets, answers EHLO with exts,
// then hands each client write it reads to check and writes back what
// check returns. It records every read, one string per read call.
func rawServer(t *testing.T, exts []string, check func(read string) string) (url string, reads func() []string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var (
		mu  sync.Mutex
		got []string
	)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		nc.Write([]byte("220 raw ESMTP\r\n"))
		buf := make([]byte, 64<<10)
		ehlo := true
		for {
			nc.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := nc.Read(buf)
			if err != nil {
				return
			}
			r := string(buf[:n])
			mu.Lock()
			got = append(got, r)
			mu.Unlock()
			if ehlo {
				ehlo = false
				reply := "250-raw"
				for _, e := range exts {
					reply += "\r\n250-" + e
				}
				nc.Write([]byte(reply + "\r\n250 OK\r\n"))
				continue
			}
			if out := check(r); out != "" {
				nc.Write([]byte(out))
			}
		}
	}()
	return "smtp://" + ln.Addr().String(), func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(got)
	}
}

// To a server that advertises PIPELINING, MAIL, every RCPT and DATA
// leave in one write, before any reply is read.
func TestPipelinesEnvelope(t *testing.T) {
	url, reads := rawServer(t, []string{"PIPELINING", "SIZE 100000"}, func(r string) string {
		switch {
		case strings.HasPrefix(r, "MAIL FROM:"):
			return "250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"
		case strings.HasSuffix(r, "\r\n.\r\n") || r == ".\r\n":
			return "250 2.0.0 queued as 42\r\n"
		}
		return ""
	})
	tr := newTransport(t, url, quick)
	msg := transporttest.NewMessage("pipelined")
	msg.To = []string{"a@example.org", "b@example.org"}
	rcpt, err := tr.Send(ctxFor(t), msg, noCommit)
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	if !strings.Contains(rcpt.Reply, "queued as 42") {
		t.Errorf("reply %q", rcpt.Reply)
	}
	envelope := reads()[1]
	want := fmt.Sprintf("MAIL FROM:<%s> SIZE=%d\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n", msg.From, len(msg.Data))
	if envelope != want {
		t.Errorf("first write after EHLO = %q, want the whole envelope and DATA in one: %q", envelope, want)
	}
}

// A recipient refused in a pipelined envelope fails the send before any
// byte of the message: DATA's 354 is never answered with a body, and the
// connection is dropped so the server discards the open transaction.
func TestPipelinedRecipientRefusedSendsNoBody(t *testing.T) {
	url, reads := rawServer(t, []string{"PIPELINING"}, func(r string) string {
		if strings.HasPrefix(r, "MAIL FROM:") {
			return "250 ok\r\n550 5.1.1 no such user\r\n250 ok\r\n354 go ahead\r\n"
		}
		return ""
	})
	tr := newTransport(t, url, quick)
	msg := transporttest.NewMessage("refused")
	msg.To = []string{"gone@example.org", "b@example.org"}
	committed := false
	_, err := tr.Send(ctxFor(t), msg, func(context.Context) error { committed = true; return nil })
	var te *transport.Error
	if !errors.As(err, &te) || te.Kind != transport.Permanent || !strings.Contains(err.Error(), "gone@example.org") {
		t.Fatalf("Send: %v, want a permanent error naming the refused recipient", err)
	}
	if committed {
		t.Error("commit called for a refused envelope")
	}
	for _, r := range reads() {
		if strings.Contains(r, "Subject:") {
			t.Errorf("the message was written after a refused recipient: %q", r)
		}
	}
}

func newTransport(t *testing.T, url string, opts smtp.Options) *smtp.Transport {
	t.Helper()
	tr, err := smtp.New(url, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func noCommit(context.Context) error { return nil }

func send(t *testing.T, tr transport.Transport, key string) transport.Receipt {
	t.Helper()
	r, err := tr.Send(ctxFor(t), transporttest.NewMessage(key), noCommit)
	if err != nil {
		t.Fatalf("Send %s: %v", key, err)
	}
	return r
}

func TestReusesOneConnection(t *testing.T) {
	sink := transporttest.NewSink(t)
	tr := newTransport(t, sink.URL(), quick)
	for i := range 20 {
		send(t, tr, fmt.Sprintf("reuse-%d", i))
	}
	if n := sink.Connections(); n != 1 {
		t.Errorf("20 sequential sends used %d connections, want 1", n)
	}
	if n := len(sink.Messages()); n != 20 {
		t.Errorf("sink received %d messages, want 20", n)
	}
}

func TestMaxMessagesPerConn(t *testing.T) {
	sink := transporttest.NewSink(t)
	opts := quick
	opts.MaxMessagesPerConn = 2
	tr := newTransport(t, sink.URL(), opts)
	for i := range 5 {
		send(t, tr, fmt.Sprintf("max-%d", i))
	}
	if n := sink.Connections(); n != 3 {
		t.Errorf("5 sends at 2 per connection used %d connections, want 3", n)
	}
}

func TestRedialsWhenPooledConnectionDied(t *testing.T) {
	sink := transporttest.NewSink(t)
	tr := newTransport(t, sink.URL(), quick)
	send(t, tr, "before")
	sink.CloseConnections() // as a server does with idle clients
	send(t, tr, "after")
	if n := sink.Connections(); n != 2 {
		t.Errorf("used %d connections, want 2", n)
	}
	if n := len(sink.Messages()); n != 2 {
		t.Errorf("sink received %d messages, want 2", n)
	}
}

func TestConcurrentSends(t *testing.T) {
	sink := transporttest.NewSink(t)
	opts := quick
	opts.MaxIdleConns = 4
	tr := newTransport(t, sink.URL(), opts)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for g := range 10 {
		wg.Go(func() {
			for i := range 10 {
				if _, err := tr.Send(ctxFor(t), transporttest.NewMessage(fmt.Sprintf("c-%d-%d", g, i)), noCommit); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	counts := sink.CountByMessageID()
	if len(counts) != 100 {
		t.Errorf("sink has %d distinct messages, want 100", len(counts))
	}
	for id, n := range counts {
		if n != 1 {
			t.Errorf("%s received %d times", id, n)
		}
	}
}

func TestStartTLSAndAuth(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []transporttest.SinkOption
	}{
		{"starttls", []transporttest.SinkOption{transporttest.WithStartTLS()}},
		{"implicit tls", []transporttest.SinkOption{transporttest.WithImplicitTLS()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sink := transporttest.NewSink(t, append(tc.opts, transporttest.WithAuth("alice", "s3cret:/@"))...)
			opts := quick
			opts.TLSConfig = &tls.Config{RootCAs: sink.CertPool()}
			url := strings.Replace(sink.URL(), "://", "://alice:s3cret%3A%2F%40@", 1)
			tr := newTransport(t, url, opts)
			send(t, tr, "tls-auth")
			got := sink.Messages()
			if len(got) != 1 {
				t.Fatalf("sink received %d messages, want 1", len(got))
			}
			if !got[0].TLS || got[0].User != "alice" {
				t.Errorf("received with TLS=%v user=%q, want TLS as alice", got[0].TLS, got[0].User)
			}
		})
	}
}

func TestWrongPasswordIsTemporary(t *testing.T) {
	sink := transporttest.NewSink(t, transporttest.WithStartTLS(), transporttest.WithAuth("alice", "right"))
	opts := quick
	opts.TLSConfig = &tls.Config{RootCAs: sink.CertPool()}
	tr := newTransport(t, "smtp://alice:wrong@"+sink.Addr(), opts)
	_, err := tr.Send(ctxFor(t), transporttest.NewMessage("wrong"), noCommit)
	var e *transport.Error
	if !errors.As(err, &e) || e.Kind != transport.Temporary || e.Step != "auth" || e.Code != 535 {
		t.Fatalf("Send = %v, want a temporary error at auth with code 535", err)
	}
}

func TestUntrustedCertificate(t *testing.T) {
	sink := transporttest.NewSink(t, transporttest.WithStartTLS())
	tr := newTransport(t, sink.URL(), quick) // system roots do not know the sink
	_, err := tr.Send(ctxFor(t), transporttest.NewMessage("untrusted"), noCommit)
	if k := transport.KindOf(err); err == nil || k != transport.Temporary {
		t.Fatalf("Send = %v (%v), want a temporary TLS error", err, k)
	}
	if len(sink.Messages()) != 0 {
		t.Error("message delivered over an unverified connection")
	}
}

func TestRefusesAuthInClear(t *testing.T) {
	// The sink would accept AUTH without TLS; the transport must not try.
	sink := transporttest.NewSink(t, transporttest.WithAuth("alice", "pw"), transporttest.WithAllowInsecureAuth())
	tr := newTransport(t, "smtp://alice:pw@"+sink.Addr(), quick)
	_, err := tr.Send(ctxFor(t), transporttest.NewMessage("clear"), noCommit)
	if err == nil || transport.KindOf(err) != transport.Temporary || !strings.Contains(err.Error(), "STARTTLS") {
		t.Fatalf("Send = %v, want a temporary error about STARTTLS", err)
	}

	opts := quick
	opts.AllowInsecureAuth = true // loopback only
	tr = newTransport(t, "smtp://alice:pw@"+sink.Addr(), opts)
	send(t, tr, "clear-allowed")
	if got := sink.Messages(); len(got) != 1 || got[0].User != "alice" {
		t.Fatalf("with AllowInsecureAuth on loopback: received %+v", got)
	}
}

func TestAllowInsecureAuthOnlyForLoopback(t *testing.T) {
	_, err := smtp.New("smtp://u:p@mail.example.com:587", smtp.Options{AllowInsecureAuth: true})
	if err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Fatalf("New = %v, want an error naming loopback", err)
	}
}

func TestFinalDotTimeoutIsAmbiguous(t *testing.T) {
	sink := transporttest.NewSink(t, transporttest.WithFaults(transporttest.Fault{Step: transporttest.StepFinalDot, Action: transporttest.Stall}))
	opts := quick
	opts.FinalDotTimeout = 200 * time.Millisecond
	tr := newTransport(t, sink.URL(), opts)
	_, err := tr.Send(context.Background(), transporttest.NewMessage("slow"), noCommit)
	var e *transport.Error
	if !errors.As(err, &e) || e.Kind != transport.Ambiguous || e.Step != "final-dot" {
		t.Fatalf("Send = %v, want ambiguous at final-dot", err)
	}
}

func TestBodyWithoutFinalCRLF(t *testing.T) {
	sink := transporttest.NewSink(t)
	tr := newTransport(t, sink.URL(), quick)
	msg := transporttest.NewMessage("no-crlf")
	msg.Data = append(msg.Data, "no line break at the end"...)
	if _, err := tr.Send(ctxFor(t), msg, noCommit); err != nil {
		t.Fatal(err)
	}
	got := sink.Messages()
	if len(got) != 1 || string(got[0].Data) != string(msg.Data)+"\r\n" {
		t.Fatalf("sink received %d messages (%+v), want the data with CRLF appended", len(got), got)
	}
}

func TestURLErrors(t *testing.T) {
	for _, tc := range []struct {
		url, want string
	}{
		{"smtp://host", `URL "smtp://host": missing port; use smtp://host:587`},
		{"smtps://mail.example.com", `missing port; use smtps://mail.example.com:465`},
		{"smtp://host:", "empty port"},
		{"http://host:25", `unsupported scheme "http"`},
		{"host:25", `unsupported scheme "host"`},
		{"//host:25", "missing scheme"},
		{"smtp://:25", "missing host"},
		{"smtp://host:25/path", `unexpected path "/path"`},
		{"smtp://host:25?tls=no", "unexpected query"},
		{"smtp://user@host:25", `user "user" has no password`},
		{"smtp://user:hunter2@host:25x", `URL "smtp://user:xxxxx@host:25x"`},
		{"smtp:host:25", `missing "//"`},
	} {
		_, err := smtp.New(tc.url, smtp.Options{})
		if err == nil {
			t.Errorf("New(%q) succeeded", tc.url)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%q) = %q, want it to contain %q", tc.url, err, tc.want)
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("New(%q) error reveals the password: %v", tc.url, err)
		}
	}
	for _, ok := range []string{"smtp://127.0.0.1:25", "smtps://u:p@[::1]:465", "smtp://u:p%40x@host:587/"} {
		if _, err := smtp.New(ok, smtp.Options{}); err != nil {
			t.Errorf("New(%q) = %v", ok, err)
		}
	}
}
