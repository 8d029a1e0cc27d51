package tests

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/smtp"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
	_ "modernc.org/sqlite"             // database/sql driver "sqlite"

	"github.com/sendonce/sendonce/internal/awslocal"
	"github.com/sendonce/sendonce/transport/transporttest"
)

// The torture run: real `sendonce serve` processes (one on SQLite, or two or
// three on one PostgreSQL), producers that submit every email through the
// HTTP API (single and batch) and the SMTP front door, some of them twice,
// a nemesis that on a seeded schedule SIGKILLs and restarts nodes, cuts
// nodes off PostgreSQL and makes the SMTP sink misbehave, then a quiescent
// phase and a checker (checker_test.go) that compares what producers were
// told, what the ledger says and what the sink received. See
// docs/reliability.md.

// tortureConfig is one run's configuration.
type tortureConfig struct {
	seed      uint64
	emails    int
	nodes     int
	killEvery time.Duration
	// dupShare is the share of keys submitted a second time.
	dupShare float64
	// inDoubt is the nodes' in-doubt policy (hold or resend).
	inDoubt string
	// sqs adds the broker front door: a share of the emails go as jobs
	// through SQS (a local fauxqs), each job sent twice.
	sqs bool
	// broken fixes the sink's faults to drops after the final dot, the
	// window a broken dispatcher mishandles (TestTortureCatchesBrokenDispatcher).
	broken bool
	// produceFor bounds the producing phase; keys not acknowledged by then
	// are reported as unacknowledged.
	produceFor time.Duration
	// settleFor bounds the quiescent phase.
	settleFor time.Duration
	report    string
	// pgRestart runs the nodes on a PostgreSQL server of the test's own
	// (pgcluster_test.go) that the nemesis crashes and restarts.
	pgRestart bool
	// noRace runs a binary built without the race detector: several
	// times faster, for long runs.
	noRace bool
}

func envInt(t *testing.T, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%s=%q: not a number", name, s)
	}
	return n
}

func tortureConfigFromEnv(t *testing.T) tortureConfig {
	c := tortureConfig{
		seed:       uint64(time.Now().UnixNano()),
		nodes:      envInt(t, "SENDONCE_TORTURE_NODES", 1),
		killEvery:  3 * time.Second,
		dupShare:   0.15,
		inDoubt:    "hold",
		produceFor: 30 * time.Minute,
		settleFor:  3 * time.Minute,
		report:     os.Getenv("SENDONCE_TORTURE_REPORT"),
		sqs:        os.Getenv("SENDONCE_TORTURE_SQS") != "0",
		pgRestart:  os.Getenv("SENDONCE_TORTURE_PG_RESTART") == "1",
		noRace:     os.Getenv("SENDONCE_TORTURE_RACE") == "0",
	}
	if s := os.Getenv("SENDONCE_TORTURE_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("SENDONCE_TORTURE_SEED=%q: not a number", s)
		}
		c.seed = n
	}
	if s := os.Getenv("SENDONCE_TORTURE_KILL_EVERY"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			t.Fatalf("SENDONCE_TORTURE_KILL_EVERY=%q: want a duration such as 3s", s)
		}
		c.killEvery = d
	}
	if s := os.Getenv("SENDONCE_TORTURE_IN_DOUBT"); s != "" {
		c.inDoubt = s
	}
	if s := os.Getenv("SENDONCE_TORTURE_DUPLICATES"); s != "" {
		f, err := strconv.ParseFloat(s, 64)
		if err != nil || f < 0 || f > 1 {
			t.Fatalf("SENDONCE_TORTURE_DUPLICATES=%q: want a share between 0 and 1", s)
		}
		c.dupShare = f
	}
	// CI-sized defaults, measured to take about a minute each with the
	// race-built binary on two cores (docs/reliability.md): SQLite's single
	// writer is the slower of the two.
	c.emails = 6000
	if c.nodes > 1 {
		c.emails = 20000
	}
	c.emails = envInt(t, "SENDONCE_TORTURE_EMAILS", c.emails)
	if c.nodes < 1 || c.nodes > 9 {
		t.Fatalf("SENDONCE_TORTURE_NODES=%d: want 1 (SQLite) or 2..9 (PostgreSQL)", c.nodes)
	}
	if c.pgRestart && c.nodes < 2 {
		t.Fatalf("SENDONCE_TORTURE_PG_RESTART=1 needs PostgreSQL: set SENDONCE_TORTURE_NODES to 2..9")
	}
	// Large runs produce and settle longer (about 100-300 emails/s).
	c.produceFor = max(c.produceFor, time.Duration(c.emails)*10*time.Millisecond)
	c.settleFor += time.Duration(c.emails/10000) * time.Minute
	return c
}

// TestTorture is the seeded torture run; configure it with
// SENDONCE_TORTURE_* (docs/reliability.md). It fails on any duplicate at
// the sink that is not an in-doubt resend, and on any loss.
func TestTorture(t *testing.T) {
	cfg := tortureConfigFromEnv(t)
	if cfg.noRace {
		useBinary(t, "")
	}
	r := runTorture(t, cfg)
	if !r.ok() {
		t.Errorf("the promise was broken; replay with SENDONCE_TORTURE_SEED=%d", cfg.seed)
	}
}

// TestTorturePostgresRestart is the CI-sized run on PostgreSQL: two nodes
// on a server of the test's own that the nemesis crashes and restarts, as
// well as killing nodes and cutting them off. TestTorture covers SQLite in
// CI; SENDONCE_TORTURE_* configure only TestTorture.
func TestTorturePostgresRestart(t *testing.T) {
	cfg := tortureConfig{
		seed: uint64(time.Now().UnixNano()), emails: 8000, nodes: 2, killEvery: 3 * time.Second, dupShare: 0.15,
		inDoubt: "hold", produceFor: 10 * time.Minute, settleFor: 4 * time.Minute, pgRestart: true,
		sqs: os.Getenv("SENDONCE_TORTURE_SQS") != "0",
	}
	if s := os.Getenv("SENDONCE_TORTURE_REPORT"); s != "" {
		cfg.report = strings.TrimSuffix(s, ".json") + "-postgres.json"
	}
	r := runTorture(t, cfg)
	if !r.ok() {
		t.Errorf("the promise was broken; replay with SENDONCE_TORTURE_SEED=%d SENDONCE_TORTURE_NODES=2 SENDONCE_TORTURE_EMAILS=8000 SENDONCE_TORTURE_PG_RESTART=1 go test -run 'TestTorture$' ./tests", cfg.seed)
	}
}

// TestTortureCatchesBrokenDispatcher runs a short torture against a binary
// built with -tags sendonce_broken (internal/dispatch/broken.go: outcomes
// after the final dot are retried instead of recorded in_doubt) and checks
// that the checker reports the duplicates.
func TestTortureCatchesBrokenDispatcher(t *testing.T) {
	useBinary(t, "-race", "-tags", "sendonce_broken")

	cfg := tortureConfig{
		seed: 1, emails: 1200, nodes: 1, killEvery: 4 * time.Second, dupShare: 0.1, inDoubt: "hold",
		broken: true, produceFor: 2 * time.Minute, settleFor: 2 * time.Minute,
	}
	if s := os.Getenv("SENDONCE_TORTURE_REPORT"); s != "" {
		cfg.report = strings.TrimSuffix(s, ".json") + "-broken.json"
	}
	r := runTorture(t, cfg)
	if r.RealDuplicates == 0 && r.Lost == 0 {
		t.Fatalf("the checker found neither duplicates nor losses in a broken dispatcher:\n%s", r.summary())
	}
	t.Logf("as it must, the checker caught the broken dispatcher: %d real duplicates, %d lost", r.RealDuplicates, r.Lost)
}

// useBinary builds sendonce with the given flags and makes the rest of the
// test run it instead of TestMain's race-built binary.
func useBinary(t *testing.T, flags ...string) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "sendonce")
	var args []string
	for _, f := range flags {
		if f != "" {
			args = append(args, f)
		}
	}
	build := exec.Command("go", append(append([]string{"build"}, args...), "-o", out, "../cmd/sendonce")...)
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build %v: %v\n%s", args, err, b)
	}
	// startServerArgs runs the binary the global names; tests in this
	// package do not run in parallel.
	good := binary
	binary = out
	t.Cleanup(func() { binary = good })
}

// tortureCluster is the nodes of one run.
type tortureCluster struct {
	t       *testing.T
	args    [][]string // serve flags, per node
	dirs    []string
	env     []string
	proxies []*cutProxy // PostgreSQL only

	mu    sync.Mutex
	nodes []*server
}

func (c *tortureCluster) start(i int) {
	s := startServerArgs(c.t, c.dirs[i], c.args[i], c.env...)
	c.mu.Lock()
	c.nodes[i] = s
	c.mu.Unlock()
}

func (c *tortureCluster) node(i int) *server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[i]
}

func (c *tortureCluster) alive(i int) bool {
	select {
	case <-c.node(i).done:
		return false
	default:
		return true
	}
}

const (
	routeSingle = iota // POST /v1/emails
	routeBatch         // POST /v1/emails/batch
	routeSMTP          // the SMTP front door
	routeSQS           // a job on the SQS queue, sent twice
)

// tortureJob is one submission: one key, or a batch of keys.
type tortureJob struct {
	route int
	keys  []string
	dup   bool
}

// planJobs lays out the run's submissions, deterministically from rng:
// each key is sent by one route, a share of them a second time a little
// later (the broker's redelivery), by the same front door (an SMTP
// message and a JSON email are different payloads) but often as a single
// request after a batch or the other way round.
func planJobs(rng *rand.Rand, prefix string, n int, dupShare float64, sqs bool) ([]tortureJob, int) {
	var jobs []tortureJob
	later := map[int][]tortureJob{}
	window := max(n/10, 50)
	var batch []string
	dups := 0
	flush := func() {
		if len(batch) > 0 {
			jobs = append(jobs, tortureJob{route: routeBatch, keys: batch})
			batch = nil
		}
	}
	for i := 0; i < n; i++ {
		key := fmt.Sprintf("%s/%07d", prefix, i)
		route := routeBatch
		switch p := rng.Float64(); {
		case p < 0.25:
			route = routeSingle
		case p < 0.40:
			route = routeSMTP
		case p < 0.50 && sqs:
			route = routeSQS
		}
		if route == routeBatch {
			batch = append(batch, key)
			if len(batch) >= 10+rng.IntN(90) {
				flush()
			}
		} else {
			jobs = append(jobs, tortureJob{route: route, keys: []string{key}})
		}
		if rng.Float64() < dupShare {
			again := route
			if route == routeSingle || route == routeBatch {
				again = []int{routeSingle, routeBatch}[rng.IntN(2)]
			}
			at := i + 1 + rng.IntN(window)
			later[at] = append(later[at], tortureJob{route: again, keys: []string{key}, dup: true})
			dups++
		}
		for _, j := range later[i] {
			jobs = append(jobs, j)
		}
		delete(later, i)
	}
	flush()
	for i := n; len(later) > 0; i++ {
		jobs = append(jobs, later[i]...)
		delete(later, i)
	}
	return jobs, dups
}

func tortureEmail(key string) map[string]any {
	return map[string]any{"from": "noreply@example.org", "to": []string{"user@example.com"},
		"subject": "torture " + key, "text": "hello " + key}
}

var tortureHTTP = &http.Client{Timeout: 30 * time.Second}

// submitHTTP sends one job through the API and returns the acknowledged
// keys and whether any key was refused as a conflict (422).
func submitHTTP(base string, j tortureJob) (map[string]bool, bool, error) {
	acked := map[string]bool{}
	if j.route == routeSingle {
		b, _ := json.Marshal(tortureEmail(j.keys[0]))
		req, err := http.NewRequest("POST", base+"/v1/emails", bytes.NewReader(b))
		if err != nil {
			return nil, false, err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", j.keys[0])
		resp, err := tortureHTTP.Do(req)
		if err != nil {
			return nil, false, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 202 || resp.StatusCode == 200 {
			acked[j.keys[0]] = true
		}
		return acked, resp.StatusCode == 422, nil
	}
	var body struct {
		Emails []map[string]any `json:"emails"`
	}
	for _, k := range j.keys {
		e := tortureEmail(k)
		e["key"] = k
		body.Emails = append(body.Emails, e)
	}
	b, _ := json.Marshal(body)
	resp, err := tortureHTTP.Post(base+"/v1/emails/batch", "application/json", bytes.NewReader(b))
	if err != nil {
		return nil, false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		io.Copy(io.Discard, resp.Body)
		return nil, false, fmt.Errorf("batch: %s", resp.Status)
	}
	var out struct {
		Results []struct {
			Key    string `json:"key"`
			Status int    `json:"status"`
		} `json:"results"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, false, err
	}
	conflict := false
	for _, r := range out.Results {
		switch r.Status {
		case 202, 200:
			acked[r.Key] = true
		case 422:
			conflict = true
		}
	}
	return acked, conflict, nil
}

// submitSMTP sends one message through the SMTP front door with net/smtp;
// nil means the final dot was answered 250.
func submitSMTP(addr, key string) error {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	c, err := smtp.NewClient(conn, "127.0.0.1")
	if err != nil {
		return err
	}
	if err := c.Hello("torture.example.org"); err != nil {
		return err
	}
	if err := c.Mail("noreply@example.org"); err != nil {
		return err
	}
	if err := c.Rcpt("user@example.com"); err != nil {
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "From: noreply@example.org\r\nTo: user@example.com\r\nSubject: torture %s\r\nX-Idempotency-Key: %s\r\n\r\nhello %s\r\n", key, key, key)
	if err := w.Close(); err != nil { // the reply to the final dot
		return err
	}
	c.Quit()
	return nil
}

// faultPlan draws the sink's misbehaviour for one period of the nemesis.
func faultPlan(rng *rand.Rand) ([]transporttest.Fault, []string) {
	all := []struct {
		kind string
		f    transporttest.Fault
	}{
		{"sink_connect_421", transporttest.Fault{Step: transporttest.StepConnect, Action: transporttest.Reply, Code: 421, Probability: 0.02}},
		{"sink_rcpt_451", transporttest.Fault{Step: transporttest.StepRcpt, Action: transporttest.Reply, Code: 451, Probability: 0.05}},
		{"sink_rcpt_550", transporttest.Fault{Step: transporttest.StepRcpt, Action: transporttest.Reply, Code: 550, Probability: 0.002}},
		{"sink_mail_stall", transporttest.Fault{Step: transporttest.StepMail, Action: transporttest.Stall, Probability: 0.002}},
		{"sink_data_drop", transporttest.Fault{Step: transporttest.StepData, Action: transporttest.Drop, Probability: 0.01}},
		{"sink_final_dot_drop", transporttest.Fault{Step: transporttest.StepFinalDot, Action: transporttest.Drop, Probability: 0.003}},
		{"sink_final_dot_slow", transporttest.Fault{Step: transporttest.StepFinalDot, Action: transporttest.Delay, Delay: 3 * time.Second, Probability: 0.002}},
	}
	var plan []transporttest.Fault
	var kinds []string
	for _, x := range all {
		if rng.Float64() < 0.5 {
			plan = append(plan, x.f)
			kinds = append(kinds, x.kind)
		}
	}
	return plan, kinds
}

// runTorture runs one torture and returns the checker's report, which it
// also logs and writes to cfg.report.
func runTorture(t *testing.T, cfg tortureConfig) *tortureReport {
	began := time.Now()
	rng := rand.New(rand.NewPCG(cfg.seed, cfg.seed^0x70c7))  // the plan
	nrng := rand.New(rand.NewPCG(cfg.seed, cfg.seed^0x4e3e)) // the nemesis
	sink := transporttest.NewSink(t, transporttest.WithSeed(cfg.seed))
	if cfg.broken {
		sink.SetFaults(transporttest.Fault{Step: transporttest.StepFinalDot, Action: transporttest.Drop, Probability: 0.03})
	}
	report := &tortureReport{Seed: cfg.seed, Emails: cfg.emails, Nodes: cfg.nodes, InDoubtPolicy: cfg.inDoubt, Faults: map[string]int{},
		Race: !cfg.noRace}

	c := &tortureCluster{t: t, nodes: make([]*server, cfg.nodes), dirs: make([]string, cfg.nodes), args: make([][]string, cfg.nodes),
		env: []string{
			"SENDONCE_DISPATCH_LEASE=5s", "SENDONCE_DISPATCH_POLL_INTERVAL=100ms",
			"SENDONCE_DISPATCH_BACKOFF_BASE=200ms", "SENDONCE_DISPATCH_BACKOFF_MAX=2s",
			"SENDONCE_SMTP_FINAL_DOT_TIMEOUT=2s", "SENDONCE_SMTP_COMMAND_TIMEOUT=2s",
			"SENDONCE_DISPATCH_IN_DOUBT=" + cfg.inDoubt,
		}}
	var q *awssqs.Client
	var queueURL, dlqURL, sqsConf string
	if cfg.sqs {
		endpoint := awslocal.StartSQS(t)
		q = awssqs.New(awssqs.Options{Region: "us-east-1", BaseEndpoint: aws.String(endpoint),
			Credentials: credentials.NewStaticCredentialsProvider("test", "test", "")})
		mk := func(name string) string {
			out, err := q.CreateQueue(context.Background(), &awssqs.CreateQueueInput{QueueName: aws.String(name),
				Attributes: map[string]string{"VisibilityTimeout": "5"}})
			if err != nil {
				t.Fatalf("create queue %s: %v", name, err)
			}
			return *out.QueueUrl
		}
		queueURL, dlqURL = mk("torture"), mk("torture-dlq")
		conf := filepath.Join(t.TempDir(), "sendonce.yaml")
		if err := os.WriteFile(conf, []byte(fmt.Sprintf("sources:\n  - sqs: %s\n    dead_letter_queue: %s\n    wait_time: 1s\n", queueURL, dlqURL)), 0o600); err != nil {
			t.Fatal(err)
		}
		c.env = append(c.env, "AWS_REGION=us-east-1", "AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test", "AWS_ENDPOINT_URL_SQS="+endpoint)
		sqsConf = conf
	}
	var db *sql.DB
	var pg *pgCluster
	table := "emails"
	if cfg.nodes == 1 {
		report.Store = "sqlite"
		c.dirs[0] = t.TempDir()
		c.args[0] = []string{"--transport", sink.URL()}
	} else {
		report.Store = "postgres"
		pgAddr := "127.0.0.1:5432"
		var storeURL string
		if cfg.pgRestart {
			pg = startPGCluster(t)
			pgAddr = pg.addr()
			storeURL = postgresURLAt(t, pg.url())
		} else {
			storeURL = postgresURL(t)
		}
		if out, err := exec.Command(binary, "migrate", "--postgres", storeURL).CombinedOutput(); err != nil {
			t.Fatalf("migrate: %v\n%s", err, out)
		}
		var err error
		if db, err = sql.Open("pgx", storeURL); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		table = "sendonce_emails"
		for i := range c.dirs {
			p := newCutProxy(t, pgAddr)
			c.proxies = append(c.proxies, p)
			c.dirs[i] = t.TempDir()
			c.args[i] = []string{"--store", viaProxy(t, storeURL, p.Addr()), "--transport", sink.URL()}
		}
	}
	for i := range c.nodes {
		if sqsConf != "" {
			c.args[i] = append(c.args[i], "--config", sqsConf)
		}
		c.start(i)
	}
	if db == nil {
		var err error
		db, err = sql.Open("sqlite", "file:"+filepath.Join(c.dirs[0], "sendonce.db")+"?mode=ro&_pragma=busy_timeout(10000)")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
	}

	// The plan.
	jobs, dups := planJobs(rng, fmt.Sprintf("torture-%d", cfg.seed), cfg.emails, cfg.dupShare, cfg.sqs)
	report.DuplicateSubmit = dups

	// The nemesis.
	var faultsMu sync.Mutex
	fault := func(kind string) {
		faultsMu.Lock()
		report.Faults[kind]++
		faultsMu.Unlock()
	}
	stopNemesis := make(chan struct{})
	nemesisDone := make(chan struct{})
	go func() {
		defer close(nemesisDone)
		tick := time.NewTicker(cfg.killEvery) // the schedule, not a synchronisation
		defer tick.Stop()
		cut := -1
		for {
			select {
			case <-stopNemesis:
				return
			case <-tick.C:
			}
			if cut >= 0 {
				c.proxies[cut].setCut(false)
				cut = -1
			}
			if !cfg.broken {
				plan, kinds := faultPlan(nrng)
				if err := sink.SetFaults(plan...); err != nil {
					t.Errorf("SetFaults: %v", err)
					return
				}
				for _, k := range kinds {
					fault(k)
				}
			}
			i := nrng.IntN(cfg.nodes)
			c.node(i).kill()
			fault("kill")
			c.start(i)
			if cfg.nodes > 1 && nrng.Float64() < 0.5 {
				cut = (i + 1 + nrng.IntN(cfg.nodes-1)) % cfg.nodes
				c.proxies[cut].setCut(true)
				fault("db_cut")
			}
			if pg != nil && nrng.Float64() < 0.2 {
				// A crash of the database server itself, WAL replay
				// and all; every node loses every connection at once.
				if err := pg.crash(); err != nil {
					t.Errorf("crashing PostgreSQL: %v", err)
					return
				}
				if err := pg.start(); err != nil {
					t.Errorf("restarting PostgreSQL: %v", err)
					return
				}
				fault("db_restart")
			}
		}
	}()

	// The producers.
	var acked sync.Map
	var submissions, conflicts atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), cfg.produceFor)
	defer cancel()
	work := make(chan tortureJob)
	go func() {
		defer close(work)
		for _, j := range jobs {
			select {
			case work <- j:
			case <-ctx.Done():
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			prng := rand.New(rand.NewPCG(cfg.seed, uint64(w)))
			for j := range work {
				pending := j.keys
				wait := 20 * time.Millisecond
				for len(pending) > 0 && ctx.Err() == nil {
					n := c.node(prng.IntN(cfg.nodes))
					submissions.Add(1)
					var got map[string]bool
					var conflict bool
					var err error
					if j.route == routeSQS {
						// The broker's redelivery: the same job twice.
						if err = sendJob(ctx, q, queueURL, pending[0]); err == nil {
							err = sendJob(ctx, q, queueURL, pending[0])
						}
						if err == nil {
							got = map[string]bool{pending[0]: true}
						}
					} else if j.route == routeSMTP {
						if err = submitSMTP(n.smtpAddr, pending[0]); err == nil {
							got = map[string]bool{pending[0]: true}
						}
					} else {
						got, conflict, err = submitHTTP(n.base, tortureJob{route: j.route, keys: pending})
					}
					if conflict {
						conflicts.Add(1)
					}
					var left []string
					for _, k := range pending {
						if got[k] {
							acked.Store(k, true)
						} else {
							left = append(left, k)
						}
					}
					if len(left) == len(pending) {
						// Nothing acknowledged (a node down or cut off):
						// the producer backs off before its retry.
						tm := time.NewTimer(wait)
						select {
						case <-tm.C:
						case <-ctx.Done():
							tm.Stop()
						}
						wait = min(2*wait, time.Second)
					}
					pending = left
				}
			}
		}(w)
	}
	wg.Wait()
	produced := time.Since(began)
	close(stopNemesis)
	<-nemesisDone
	report.Submissions = int(submissions.Load())
	if n := conflicts.Load(); n > 0 {
		t.Errorf("%d submissions were refused as conflicts (422): the producer sent a key twice with different payloads", n)
	}

	// The quiescent phase: no more faults; every node up and connected.
	sink.SetFaults()
	for i := range c.proxies {
		c.proxies[i].setCut(false)
	}
	for i := range c.nodes {
		if !c.alive(i) {
			t.Logf("node %d had exited; restarting it for the quiescent phase", i)
			c.start(i)
		}
	}
	ackedKeys := map[string]bool{}
	acked.Range(func(k, _ any) bool { ackedKeys[k.(string)] = true; return true })
	eventually(t, cfg.settleFor, "every email settled (sent, failed or in_doubt)", func() (bool, string) {
		var total, open int
		err := db.QueryRow("SELECT count(*), count(*) FILTER (WHERE state IN ('queued', 'sending')) FROM "+table).Scan(&total, &open)
		if err != nil {
			return false, err.Error()
		}
		if q != nil {
			if left, err := queueLeft(q, queueURL); err != nil || left != "0/0" {
				return false, fmt.Sprintf("SQS queue visible/in flight %s %v", left, err)
			}
		}
		return open == 0 && total >= len(ackedKeys), fmt.Sprintf("%d records, %d queued or sending, %d acknowledged", total, open, len(ackedKeys))
	})
	if q != nil {
		if left, err := queueLeft(q, dlqURL); err != nil || left != "0/0" {
			t.Errorf("the dead-letter queue holds %s jobs (%v): valid jobs were refused", left, err)
		}
	}
	// The sink records a message when it has read its final dot, before
	// any (late, dropped or stalled) reply: Messages is complete now.

	// The checker.
	records := map[string]tortureRecord{}
	report.RecordsBySource = map[string]int{}
	rows, err := db.Query("SELECT idem_key, state, message_id, resolved_by, source FROM " + table)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var r tortureRecord
		var source string
		if err := rows.Scan(&r.Key, &r.State, &r.MessageID, &r.ResolvedBy, &source); err != nil {
			t.Fatal(err)
		}
		report.RecordsBySource[source]++
		records[r.Key] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	rows.Close()
	msgs := sink.Messages()
	for _, m := range msgs {
		if !m.Answered {
			report.Faults["observed_final_dot_unanswered"]++
		}
	}
	var submitted []string
	for _, j := range jobs {
		submitted = append(submitted, j.keys...)
	}
	check(checkInput{Submitted: submitted, Acked: ackedKeys, Records: records, AtSink: sinkDeliveries(msgs)}, report)
	report.DurationSeconds = time.Since(began).Seconds()
	t.Logf("produced in %s, settled in %s; %d messages at the sink", produced.Round(time.Millisecond), (time.Since(began) - produced).Round(time.Millisecond), len(msgs))
	t.Log("\n" + report.summary())
	if cfg.report != "" {
		b, _ := json.MarshalIndent(report, "", "  ")
		if err := os.WriteFile(cfg.report, append(b, '\n'), 0o644); err != nil {
			t.Error(err)
		}
	}
	return report
}

// sendJob puts one email on the queue as a job (docs/jobs.md).
func sendJob(ctx context.Context, q *awssqs.Client, queueURL, key string) error {
	job := tortureEmail(key)
	job["version"], job["key"] = 1, key
	b, _ := json.Marshal(job)
	_, err := q.SendMessage(ctx, &awssqs.SendMessageInput{QueueUrl: aws.String(queueURL), MessageBody: aws.String(string(b))})
	return err
}

// queueLeft returns "visible/in flight" for a queue.
func queueLeft(q *awssqs.Client, queueURL string) (string, error) {
	attrs, err := q.GetQueueAttributes(context.Background(), &awssqs.GetQueueAttributesInput{QueueUrl: aws.String(queueURL),
		AttributeNames: []sqstypes.QueueAttributeName{"ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"}})
	if err != nil {
		return "", err
	}
	return attrs.Attributes["ApproximateNumberOfMessages"] + "/" + attrs.Attributes["ApproximateNumberOfMessagesNotVisible"], nil
}
