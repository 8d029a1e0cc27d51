package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/httpapi"
	"github.com/sendonce/sendonce/store/sqlitestore"
	"github.com/sendonce/sendonce/transport/maildir"
)

// lockedBuffer lets the test read what a running command has written.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}
func (l *lockedBuffer) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

// apiServer is the HTTP API on a real SQLite ledger, delivering into a
// maildir.
func apiServer(t *testing.T) (*httptest.Server, *sendonce.Client) {
	t.Helper()
	t.Setenv("SENDONCE_TOKEN", "")
	st, err := sqlitestore.Open(t.Context(), t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	tr, err := maildir.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c, err := sendonce.New(sendonce.Config{Store: st, Transport: tr, Dispatch: sendonce.DispatchConfig{PollInterval: 10 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	api, err := httpapi.New(httpapi.Config{Client: c})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api)
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return srv, c
}

func submitLib(t *testing.T, c *sendonce.Client, key string) {
	t.Helper()
	if _, err := c.Submit(t.Context(), sendonce.Submission{Key: key, Email: sendonce.Email{From: "app@example.com", To: []string{"ann@example.net"}, Subject: "About " + key, Text: "hi"}}); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, out *lockedBuffer, wants ...string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		s := out.String()
		missing := ""
		for _, w := range wants {
			if !strings.Contains(s, w) {
				missing = w
				break
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("output lacks %q:\n%s", missing, s)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not synchronisation
	}
}

// tail prints new emails, their delivery and suppressed duplicates as
// they happen, and nothing about the emails already there.
func TestTailFollowsLive(t *testing.T) {
	srv, c := apiServer(t)
	submitLib(t, c, "before-tail")
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) { // polling, not synchronisation
		if r, err := c.Get(t.Context(), "", "before-tail"); err == nil && r.State == sendonce.StateSent {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("before-tail was not sent")
		}
	}
	var out, errb lockedBuffer
	root := newRoot(&out, &errb)
	root.SetArgs([]string{"tail", "--server", srv.URL, "--interval", "10ms"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()

	waitFor(t, &errb, "following the 200 most recent emails (1 now)")
	submitLib(t, c, "welcome-ann")
	waitFor(t, &out, "welcome-ann", "accepted", "sent (attempt 1)")
	submitLib(t, c, "welcome-ann")
	waitFor(t, &out, "duplicate #1 suppressed")
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("tail: %v\n%s", err, errb.String())
	}
	if strings.Contains(out.String(), "before-tail") {
		t.Errorf("tail printed an email that was there before it started:\n%s", out.String())
	}
}

// list prints an aligned table, or JSON with --json; filters pass through.
func TestListTableAndJSON(t *testing.T) {
	srv, c := apiServer(t)
	for _, k := range []string{"a-1", "a-22", "b-333"} {
		submitLib(t, c, k)
	}
	run := func(args ...string) string {
		var out, errb bytes.Buffer
		root := newRoot(&out, &errb)
		root.SetArgs(append(args, "--server", srv.URL))
		if err := root.ExecuteContext(context.Background()); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, errb.String())
		}
		return out.String()
	}
	table := run("list", "--key-prefix", "a-")
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "KEY") {
		t.Fatalf("table:\n%s", table)
	}
	col := strings.Index(lines[0], "STATE")
	for _, l := range lines[1:] {
		if len(l) <= col || l[col-1] != ' ' || l[col] == ' ' {
			t.Fatalf("STATE column not aligned at %d:\n%s", col, table)
		}
	}
	var recs []record
	if err := json.Unmarshal([]byte(run("list", "--json")), &recs); err != nil || len(recs) != 3 || recs[0].Key != "b-333" {
		t.Fatalf("list --json: %v %+v", err, recs)
	}
	var one record
	if err := json.Unmarshal([]byte(run("status", "a-1", "--json")), &one); err != nil || one.Key != "a-1" {
		t.Fatalf("status --json: %v %+v", err, one)
	}
}
