package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSMTPSubmissionToTheBinary points an unchanged Python application
// (smtplib) at the binary's SMTP port: the same message sent three times
// with one X-Idempotency-Key is accepted once, answered as a duplicate
// twice, and delivered once.
func TestSMTPSubmissionToTheBinary(t *testing.T) {
	if _, err := exec.LookPath("python3"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("python3 is required under CI=true")
		}
		t.Skip("SKIPPED: python3 is not installed")
	}
	data := t.TempDir()
	s := startServer(t, data, "maildir")
	host, port, _ := strings.Cut(s.smtpAddr, ":")
	// Each attempt builds the message anew, as a retried task would.
	script := `
import smtplib, sys
from email.message import EmailMessage
for attempt in range(3):
    m = EmailMessage()
    m["From"] = "Difio <noreply@example.org>"
    m["To"] = "ann@example.com"
    m["Subject"] = "Your monthly reminder"
    m["X-Idempotency-Key"] = "reminder/ann/2013-12"
    m.set_content("Hello Ann")
    with smtplib.SMTP(sys.argv[1], int(sys.argv[2])) as c:
        c.ehlo()
        c.mail("noreply@example.org")
        c.rcpt("ann@example.com")
        code, reply = c.data(m.as_bytes())
        print(code, reply.decode())
`
	out, err := exec.Command("python3", "-c", script, host, port).CombinedOutput()
	if err != nil {
		t.Fatalf("smtplib: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 3 || !strings.Contains(lines[0], "250") || !strings.Contains(lines[0], "queued as") ||
		!strings.Contains(lines[1], "duplicate of") || !strings.Contains(lines[2], "duplicate of") {
		t.Fatalf("replies:\n%s", out)
	}
	var rec record
	eventually(t, 30*time.Second, "sent", func() (bool, string) {
		r, err := s.get("reminder/ann/2013-12")
		rec = r
		return err == nil && r.State == "sent", r.State
	})
	if rec.Duplicates != 2 {
		t.Errorf("duplicates = %d, want 2", rec.Duplicates)
	}
	s.stop()
	files, _ := filepath.Glob(filepath.Join(data, "maildir", "new", "*"))
	if len(files) != 1 {
		t.Fatalf("maildir/new has %d files, want 1", len(files))
	}
}
