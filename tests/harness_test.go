// Package tests holds black-box tests of the built sendonce binary: real
// processes, real HTTP, real SMTP on 127.0.0.1, real kill -9.
package tests

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sendonce-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "sendonce")
	build := exec.Command("go", "build", "-race", "-o", binary, "../cmd/sendonce")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building sendonce:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// server is one running `sendonce serve` process.
type server struct {
	t        *testing.T
	cmd      *exec.Cmd
	base     string // the API, http://127.0.0.1:port
	smtpAddr string // the SMTP submission server, 127.0.0.1:port
	done     chan struct{}

	mu  sync.Mutex
	log bytes.Buffer
}

var (
	servingRE = regexp.MustCompile(`http=http://(127\.0\.0\.1:\d+)`)
	smtpRE    = regexp.MustCompile(`smtp=smtp://(127\.0\.0\.1:\d+)`)
)

// startServer runs `sendonce serve` on dataDir with the API on a free
// loopback port and waits for its "serving" log line.
func startServer(t *testing.T, dataDir, transportURL string, env ...string) *server {
	t.Helper()
	return startServerArgs(t, dataDir, []string{"--transport", transportURL}, env...)
}

// startServerArgs is startServer with any further serve flags.
func startServerArgs(t *testing.T, dataDir string, args []string, env ...string) *server {
	t.Helper()
	args = append([]string{"serve", "--data", dataDir, "--http", "127.0.0.1:0", "--smtp", "127.0.0.1:0"}, args...)
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{t: t, cmd: cmd, done: make(chan struct{})}
	ready := make(chan [2]string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			s.mu.Lock()
			s.log.WriteString(line + "\n")
			s.mu.Unlock()
			if m := servingRE.FindStringSubmatch(line); m != nil && strings.Contains(line, "sendonce serving") {
				var smtp string
				if sm := smtpRE.FindStringSubmatch(line); sm != nil {
					smtp = sm[1]
				}
				select {
				case ready <- [2]string{m[1], smtp}:
				default:
				}
			}
		}
		io.Copy(io.Discard, stderr)
		cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			t.Logf("server log:\n%s", s.logs())
		}
	})
	select {
	case addrs := <-ready:
		s.base = "http://" + addrs[0]
		s.smtpAddr = addrs[1]
	case <-s.done:
		t.Fatalf("sendonce serve exited before serving:\n%s", s.logs())
	case <-time.After(60 * time.Second):
		t.Fatalf("sendonce serve did not start within 60s:\n%s", s.logs())
	}
	return s
}

func (s *server) logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.String()
}

// kill sends SIGKILL (a crash: no shutdown code runs) and waits for exit.
func (s *server) kill() {
	if s.cmd.Process != nil {
		s.cmd.Process.Signal(syscall.SIGKILL)
	}
	<-s.done
}

// stop sends SIGTERM and waits for a graceful exit.
func (s *server) stop() {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(60 * time.Second):
		s.t.Fatalf("sendonce did not stop within 60s of SIGTERM:\n%s", s.logs())
	}
	if code := s.cmd.ProcessState.ExitCode(); code != 0 {
		s.t.Fatalf("sendonce exited with %d after SIGTERM:\n%s", code, s.logs())
	}
}

type record struct {
	Key        string `json:"key"`
	State      string `json:"state"`
	MessageID  string `json:"message_id"`
	Attempts   int    `json:"attempts"`
	Duplicates int    `json:"duplicates"`
	LastError  string `json:"last_error"`
}

func (s *server) submit(key, body string) (int, error) {
	req, err := http.NewRequest("POST", s.base+"/v1/emails", strings.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

func (s *server) get(key string) (record, error) {
	var r record
	resp, err := http.Get(s.base + "/v1/emails/" + url.PathEscape(key))
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return r, fmt.Errorf("GET %s: %d %s", key, resp.StatusCode, b)
	}
	return r, json.NewDecoder(resp.Body).Decode(&r)
}

// eventually checks cond until it holds or the deadline passes. It waits
// for an observable condition, never for a fixed time.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	last := ""
	for {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		select {
		case <-ctx.Done():
			t.Fatalf("%s: not reached within %s (last: %s)", what, timeout, last)
		case <-tick.C:
		}
	}
}

func emailJSON(to, subject string) string {
	return fmt.Sprintf(`{"from": "Difio <noreply@example.org>", "to": [%q], "subject": %q, "text": "Your monthly reminder."}`, to, subject)
}
