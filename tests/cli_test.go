package tests

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func runCLI(t *testing.T, s *server, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), "SENDONCE_SERVER="+s.base)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestQuickStart follows the README: serve on the defaults (maildir), send
// the same email twice with the CLI, and find one message in the maildir.
func TestQuickStart(t *testing.T) {
	data := t.TempDir()
	s := startServer(t, data, "maildir")
	send := []string{"send", "--key", "reminder/bob/2013-12", "--from", "noreply@example.org", "--to", "bob@example.com", "--subject", "Your monthly reminder", "--text", "Hello Bob"}
	out, err := runCLI(t, s, send...)
	if err != nil || !strings.Contains(out, "accepted") {
		t.Fatalf("first send: %v\n%s", err, out)
	}
	out, err = runCLI(t, s, send...)
	if err != nil || !strings.Contains(out, "duplicate") {
		t.Fatalf("second send: %v\n%s", err, out)
	}
	eventually(t, 30*time.Second, "sent", func() (bool, string) {
		out, err := runCLI(t, s, "status", "reminder/bob/2013-12")
		return err == nil && regexp.MustCompile(`state:\s+sent`).MatchString(out), out
	})
	out, err = runCLI(t, s, "list")
	if err != nil || !strings.Contains(out, "reminder/bob/2013-12") {
		t.Fatalf("list: %v\n%s", err, out)
	}
	out, err = runCLI(t, s, "resolve", "reminder/bob/2013-12", "--action", "resend")
	if err == nil || !strings.Contains(out, "409") {
		t.Fatalf("resolving a sent email: %v\n%s", err, out)
	}
	out, err = runCLI(t, s, "status", "no-such-key")
	if err == nil || !strings.Contains(out, "404") {
		t.Fatalf("status of an unknown key: %v\n%s", err, out)
	}
	// The operator's views of the same server: the dashboard, the metrics
	// after this workload, readiness.
	for path, want := range map[string]string{
		"/":        "<title>sendonce</title>",
		"/readyz":  `"status":"ok"`,
		"/metrics": `sendonce_admissions_total{outcome="duplicate",source="http"} 1`,
	} {
		resp, err := http.Get(s.base + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
			t.Fatalf("GET %s: %s, body lacks %q:\n%.2000s", path, resp.Status, want, body)
		}
	}
	s.stop()
	files, _ := filepath.Glob(filepath.Join(data, "maildir", "new", "*"))
	if len(files) != 1 {
		t.Fatalf("maildir/new has %d files, want 1", len(files))
	}
	b, _ := os.ReadFile(files[0])
	if !strings.Contains(string(b), "Hello Bob") {
		t.Fatalf("unexpected message:\n%s", b)
	}
}

// TestDataDirectoryIsLocked: a second process on the same data directory
// fails at once, naming the holder.
func TestDataDirectoryIsLocked(t *testing.T) {
	data := t.TempDir()
	s := startServer(t, data, "maildir")
	cmd := exec.Command(binary, "serve", "--data", data, "--http", "127.0.0.1:0")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("a second serve on the same directory started:\n%s", out)
	}
	if want := fmt.Sprint(s.cmd.Process.Pid); !strings.Contains(string(out), want) {
		t.Fatalf("the error does not name the holder (pid %s):\n%s", want, out)
	}
}

// TestConfigurationErrors: refused settings are named, and a public
// address without tokens is refused.
func TestConfigurationErrors(t *testing.T) {
	cases := []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"serve", "--http", "0.0.0.0:0"}, nil, "http.addr"},
		{[]string{"serve", "--transport", "carrier-pigeon://x"}, nil, "transport"},
		{[]string{"serve", "--http", "127.0.0.1:0"}, []string{"SENDONCE_DISPATCH_IN_DOUBT=maybe"}, "dispatch.in_doubt"},
	}
	for _, c := range cases {
		cmd := exec.Command(binary, append(c.args, "--data", t.TempDir())...)
		cmd.Env = append(os.Environ(), c.env...)
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("%v %v: %v, want an error naming %s:\n%s", c.args, c.env, err, c.want, out)
		}
	}
}
