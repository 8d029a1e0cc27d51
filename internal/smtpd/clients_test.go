package smtpd_test

import (
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/smtpd"
)

// need skips the test loudly when a client program is missing, except in
// CI, where a missing client is a broken setup.
func need(t *testing.T, program, install string) string {
	t.Helper()
	p, err := exec.LookPath(program)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is required in CI (%s): %v", program, install, err)
	}
	t.Skipf("SKIPPED: %s is not installed (%s); this test of a real client did not run", program, install)
	return ""
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func port(e *env) string { return e.addr[strings.LastIndexByte(e.addr, ':')+1:] }

// replyLines returns the lines of out holding a final reply to DATA.
func replyLines(out string) []string {
	var r []string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "queued as") || strings.Contains(l, "duplicate of") {
			r = append(r, strings.TrimSpace(l))
		}
	}
	return r
}

func TestPythonSmtplib(t *testing.T) {
	py := need(t, "python3", "install Python 3")
	cases := []struct {
		name       string
		modes      smtpd.KeyModes
		mode       string
		records    int
		duplicates int
	}{
		{"same key", smtpd.KeyModes{}, "key", 1, 2},
		{"same key rebuilt", smtpd.KeyModes{}, "rebuilt", 1, 2},
		{"fingerprint on", smtpd.KeyModes{FingerprintWindow: time.Hour}, "plain", 1, 2},
		{"fingerprint off", smtpd.KeyModes{}, "plain", 3, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := start(t, smtpd.Config{Tenants: map[string]smtpd.KeyModes{sendonce.DefaultTenant: tc.modes}})
			out := run(t, py, "testdata/send.py", port(e), tc.mode)
			lines := replyLines(out)
			if len(lines) != 3 {
				t.Fatalf("want 3 replies, got:\n%s", out)
			}
			for i, l := range lines {
				dup := strings.Contains(l, "duplicate of")
				if !strings.HasPrefix(l, "250 2.0.0 ") || dup != (i > 0 && tc.duplicates > 0) {
					t.Fatalf("reply %d: %q\n%s", i+1, l, out)
				}
			}
			if n := len(e.records(sendonce.DefaultTenant)); n != tc.records {
				t.Fatalf("%d records, want %d", n, tc.records)
			}
			if d := e.count(smtpd.EventDuplicate, ""); d != tc.duplicates {
				t.Fatalf("%d duplicates, want %d", d, tc.duplicates)
			}
			// The ledger counts repeats of the same bytes; a rebuilt
			// message is answered as a duplicate here, and only the
			// Observer counts it (see docs/smtp.md).
			if tc.mode == "key" {
				if r := e.get(sendonce.DefaultTenant, "order-1001-shipped"); r.Duplicates != 2 {
					t.Fatalf("record counts %d duplicates, want 2", r.Duplicates)
				}
			}
		})
	}
}

// Python's smtplib logs in with AUTH PLAIN over STARTTLS... on loopback it
// may skip TLS, and a wrong password fails the way smtplib expects.
func TestPythonSmtplibLogin(t *testing.T) {
	py := need(t, "python3", "install Python 3")
	e := start(t, smtpd.Config{Users: []smtpd.User{{Name: "shop", Tenant: "shop", PasswordHash: hash(t, "s3cret")}}})
	out := run(t, py, "testdata/send.py", port(e), "key", "shop", "s3cret")
	if lines := replyLines(out); len(lines) != 3 {
		t.Fatalf("want 3 replies, got:\n%s", out)
	}
	if r := e.get("shop", "order-1001-shipped"); r.Duplicates != 2 || r.Subject != "Ihre Bestellung ist unterwegs – Grüße aus dem Shop, diesmal mit einer recht langen Betreffzeile" {
		t.Fatalf("record: %d duplicates, subject %q", r.Duplicates, r.Subject)
	}
	cmd := exec.Command(py, "testdata/send.py", port(e), "key", "shop", "wrong")
	out2, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out2), "SMTPAuthenticationError") || !strings.Contains(string(out2), "535") {
		t.Fatalf("wrong password: err %v\n%s", err, out2)
	}
}

func swaks(t *testing.T, e *env, extra ...string) string {
	t.Helper()
	p := need(t, "swaks", "apt-get install swaks")
	args := append([]string{"--server", "127.0.0.1", "--port", port(e), "--helo", "swaks.test",
		"--from", "shop@example.com", "--to", "ann@example.net",
		"--header", "Subject: Your order has shipped", "--body", "Order 1001 has shipped."}, extra...)
	return run(t, p, args...)
}

func TestSwaks(t *testing.T) {
	need(t, "swaks", "apt-get install swaks")
	cases := []struct {
		name       string
		modes      smtpd.KeyModes
		extra      []string
		records    int
		duplicates int
	}{
		{"same key", smtpd.KeyModes{}, []string{"--header", "X-Idempotency-Key: order-1001-shipped",
			"--header", "Message-Id: <order-1001@shop.example.com>", "--header", "Date: Mon, 1 Jan 2030 00:00:00 +0000"}, 1, 2},
		// swaks writes a new Message-Id and Date per run.
		{"same key rebuilt", smtpd.KeyModes{}, []string{"--header", "X-Idempotency-Key: order-1001-shipped"}, 1, 2},
		// swaks writes a new Message-Id and Date per run.
		{"fingerprint on", smtpd.KeyModes{FingerprintWindow: time.Hour}, nil, 1, 2},
		{"fingerprint off", smtpd.KeyModes{}, nil, 3, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := start(t, smtpd.Config{Tenants: map[string]smtpd.KeyModes{sendonce.DefaultTenant: tc.modes}})
			for i := 0; i < 3; i++ {
				out := swaks(t, e, tc.extra...)
				lines := replyLines(out)
				if len(lines) != 1 {
					t.Fatalf("send %d: no final reply in:\n%s", i+1, out)
				}
				dup := strings.Contains(lines[0], "duplicate of")
				if !strings.Contains(lines[0], "250 2.0.0 ") || dup != (i > 0 && tc.duplicates > 0) {
					t.Fatalf("send %d: %q", i+1, lines[0])
				}
				// Each run is its own process, with a new Date and
				// Message-ID: a queue's redelivery.
				e.clock.Advance(time.Second)
			}
			if n := len(e.records(sendonce.DefaultTenant)); n != tc.records {
				t.Fatalf("%d records, want %d", n, tc.records)
			}
			if d := e.count(smtpd.EventDuplicate, ""); d != tc.duplicates {
				t.Fatalf("%d duplicates, want %d", d, tc.duplicates)
			}
			if tc.name == "same key" {
				if r := e.get(sendonce.DefaultTenant, "order-1001-shipped"); r.Duplicates != 2 {
					t.Fatalf("record counts %d duplicates, want 2", r.Duplicates)
				}
			}
		})
	}
}

// swaks over STARTTLS with AUTH, as a client off loopback must do it.
func TestSwaksStartTLSAuth(t *testing.T) {
	tlsCfg, _ := selfSigned(t)
	cfg := smtpd.Config{TLSConfig: tlsCfg, Users: []smtpd.User{{Name: "shop", Tenant: "shop", PasswordHash: hash(t, "s3cret")}}}
	smtpd.SetIsLocal(&cfg, func(a net.Addr) bool { return false })
	e := start(t, cfg)
	out := swaks(t, e, "--tls", "--auth", "PLAIN", "--auth-user", "shop", "--auth-password", "s3cret",
		"--header", "X-Idempotency-Key: tls-1")
	if lines := replyLines(out); len(lines) != 1 || !strings.Contains(lines[0], "250 2.0.0 queued as tls-1") {
		t.Fatalf("swaks:\n%s", out)
	}
	e.get("shop", "tls-1")
}
