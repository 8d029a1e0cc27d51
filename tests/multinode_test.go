package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce/transport/transporttest"
)

// cluster is several `sendonce serve` processes on one PostgreSQL ledger.
type cluster struct {
	t     *testing.T
	store string
	sink  *transporttest.Sink
	mu    sync.Mutex
	nodes []*server
	dirs  []string
}

func (c *cluster) start(i int) {
	s := startServerArgs(c.t, c.dirs[i], []string{"--store", c.store, "--transport", c.sink.URL(), "--smtp", "off"},
		"SENDONCE_DISPATCH_LEASE=5s", "SENDONCE_DISPATCH_POLL_INTERVAL=100ms")
	c.mu.Lock()
	c.nodes[i] = s
	c.mu.Unlock()
}

func (c *cluster) node(i int) *server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[i]
}

func newCluster(t *testing.T, storeURL string, sink *transporttest.Sink, n int) *cluster {
	out, err := exec.Command(binary, "migrate", "--postgres", storeURL).CombinedOutput()
	if err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	c := &cluster{t: t, store: storeURL, sink: sink, nodes: make([]*server, n), dirs: make([]string, n)}
	for i := range c.dirs {
		c.dirs[i] = t.TempDir()
		c.start(i)
	}
	return c
}

// submitBatch posts emails to one node's batch endpoint and returns the
// keys it acknowledged (202 or 200).
func submitBatch(base string, keys []string) (map[string]bool, int, error) {
	type item struct {
		Key     string   `json:"key"`
		From    string   `json:"from"`
		To      []string `json:"to"`
		Subject string   `json:"subject"`
		Text    string   `json:"text"`
	}
	var req struct {
		Emails []item `json:"emails"`
	}
	for _, k := range keys {
		req.Emails = append(req.Emails, item{Key: k, From: "noreply@example.org", To: []string{"user@example.com"}, Subject: "multi-node " + k, Text: "hello"})
	}
	b, _ := json.Marshal(req)
	resp, err := http.Post(base+"/v1/emails/batch", "application/json", bytes.NewReader(b))
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, resp.StatusCode, fmt.Errorf("batch: %s", resp.Status)
	}
	var out struct {
		Results []struct {
			Key    string `json:"key"`
			Status int    `json:"status"`
		} `json:"results"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, resp.StatusCode, err
	}
	acked := map[string]bool{}
	for _, r := range out.Results {
		if r.Status == 202 || r.Status == 200 {
			acked[r.Key] = true
		}
	}
	return acked, resp.StatusCode, nil
}

// checkLedger waits until every key is sent or in_doubt, then checks the
// sink: no Message-ID twice, every sent email there once, none lost.
func checkLedger(t *testing.T, storeURL string, sink *transporttest.Sink, n int) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, storeURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	counts := map[string]int{}
	eventually(t, 3*time.Minute, "every email settled", func() (bool, string) {
		rows, err := conn.Query(ctx, "SELECT state, count(*) FROM sendonce_emails GROUP BY state")
		if err != nil {
			return false, err.Error()
		}
		defer rows.Close()
		counts = map[string]int{}
		for rows.Next() {
			var s string
			var c int
			rows.Scan(&s, &c)
			counts[s] = c
		}
		return counts["sent"]+counts["in_doubt"] == n && counts["queued"]+counts["sending"]+counts["failed"] == 0, fmt.Sprint(counts)
	})
	rows, err := conn.Query(ctx, "SELECT message_id, state FROM sendonce_emails")
	if err != nil {
		t.Fatal(err)
	}
	state := map[string]string{}
	for rows.Next() {
		var id, s string
		rows.Scan(&id, &s)
		state[id] = s
	}
	rows.Close()
	atSink := sink.CountByMessageID()
	var inDoubtAtSink int
	for id, c := range atSink {
		if c > 1 {
			t.Errorf("%s reached the sink %d times", id, c)
		}
		if _, ok := state[id]; !ok {
			t.Errorf("the sink received %s, which has no record", id)
		}
	}
	for id, s := range state {
		switch {
		case s == "sent" && atSink[id] != 1:
			t.Errorf("%s is sent but the sink has %d copies (lost)", id, atSink[id])
		case s == "in_doubt" && atSink[id] == 1:
			inDoubtAtSink++
		}
	}
	if len(state) != n {
		t.Errorf("%d records for %d keys", len(state), n)
	}
	t.Logf("%d keys: %v; %d of the in-doubt ones did reach the sink; %d messages at the sink", n, counts, inDoubtAtSink, len(sink.Messages()))
}

// TestMultiNodeWithKills: three nodes on one PostgreSQL; every key is
// submitted to two nodes at once while one node after another is killed
// with SIGKILL and restarted. Each key's message reaches the sink at most
// once, every acknowledged key is recorded, nothing is lost.
func TestMultiNodeWithKills(t *testing.T) {
	storeURL := postgresURL(t)
	n := 20000
	if s := os.Getenv("SENDONCE_MULTINODE_KEYS"); s != "" {
		n, _ = strconv.Atoi(s)
	}
	sink := transporttest.NewSink(t)
	c := newCluster(t, storeURL, sink, 3)

	stopKiller := make(chan struct{})
	killerDone := make(chan struct{})
	var kills atomic.Int64
	go func() {
		defer close(killerDone)
		tick := time.NewTicker(3 * time.Second)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stopKiller:
				return
			case <-tick.C:
			}
			c.node(i % 3).kill()
			kills.Add(1)
			c.start(i % 3)
		}
	}()

	const batch = 200
	keys := make(chan []string)
	go func() {
		for i := 0; i < n; i += batch {
			var ks []string
			for j := i; j < i+batch && j < n; j++ {
				ks = append(ks, fmt.Sprintf("mn/%06d", j))
			}
			keys <- ks
		}
		close(keys)
	}()
	var wg sync.WaitGroup
	var acked sync.Map
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			k := 0
			for ks := range keys {
				// The same batch to two different nodes at once, as two
				// workers handed one redelivered job would.
				pending := ks
				for attempt := 0; len(pending) > 0; attempt++ {
					if attempt > 200 {
						t.Errorf("batch never acknowledged")
						return
					}
					var bwg sync.WaitGroup
					res := make([]map[string]bool, 2)
					for side := 0; side < 2; side++ {
						bwg.Add(1)
						go func(side int) {
							defer bwg.Done()
							res[side], _, _ = submitBatch(c.node((w+k+side)%3).base, pending)
						}(side)
					}
					bwg.Wait()
					k++
					var left []string
					for _, key := range pending {
						if res[0][key] || res[1][key] {
							acked.Store(key, true)
						} else {
							left = append(left, key)
						}
					}
					pending = left
				}
			}
		}(w)
	}
	wg.Wait()
	close(stopKiller)
	<-killerDone
	count := 0
	acked.Range(func(_, _ any) bool { count++; return true })
	if count != n {
		t.Fatalf("%d of %d keys acknowledged", count, n)
	}
	t.Logf("%d kills during the run", kills.Load())
	checkLedger(t, storeURL, sink, n)
}

// TestDatabaseConnectionCut: the database becomes unreachable in the middle
// of a run; the API answers 503 with Retry-After meanwhile, and once the
// database is back every email is delivered once.
func TestDatabaseConnectionCut(t *testing.T) {
	storeURL := postgresURL(t)
	out, err := exec.Command(binary, "migrate", "--postgres", storeURL).CombinedOutput()
	if err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	proxy := newCutProxy(t, "127.0.0.1:5432")
	sink := transporttest.NewSink(t)
	s := startServerArgs(t, filepath.Join(t.TempDir(), "data"), []string{"--store", viaProxy(t, storeURL, proxy.Addr()), "--transport", sink.URL(), "--smtp", "off"},
		"SENDONCE_DISPATCH_LEASE=5s", "SENDONCE_DISPATCH_POLL_INTERVAL=100ms")

	const n = 2000
	submitAll := func(from, to int) {
		for i := from; i < to; i += 100 {
			var ks []string
			for j := i; j < i+100; j++ {
				ks = append(ks, fmt.Sprintf("cut/%05d", j))
			}
			eventually(t, time.Minute, "batch acknowledged", func() (bool, string) {
				acked, code, err := submitBatch(s.base, ks)
				return err == nil && len(acked) == len(ks), fmt.Sprint(code, err)
			})
		}
	}
	submitAll(0, n/2)
	proxy.setCut(true)
	// While the database is away, a submission is refused with 503 and a
	// retry hint, and nothing is acknowledged.
	eventually(t, 30*time.Second, "503 while the database is away", func() (bool, string) {
		// A repeat of an accepted email: 200 while the database answers.
		req, _ := http.NewRequest("POST", s.base+"/v1/emails", bytes.NewReader([]byte(`{"from":"noreply@example.org","to":["user@example.com"],"subject":"multi-node cut/00000","text":"hello"}`)))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", "cut/00000")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == 503 && resp.Header.Get("Retry-After") != "", resp.Status
	})
	proxy.setCut(false)
	submitAll(n/2, n)
	checkLedger(t, storeURL, sink, n)
}
