package sqlitestore

import (
	"bufio"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return mustOpen(t, t.TempDir()) })
}

func TestDurability(t *testing.T) {
	storetest.RunDurability(t, func(t *testing.T) func() store.Store {
		dir := t.TempDir()
		return func() store.Store { return mustOpen(t, dir) }
	})
}

func mustOpen(t testing.TB, dir string) *Store {
	t.Helper()
	s, err := Open(context.Background(), dir, Options{})
	if err != nil {
		t.Fatalf("Open(%q): %v", dir, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// The helper process is this test binary re-executed with helperEnv set:
// "lock" opens the store and holds it; "admit" admits keys until killed.
const (
	helperEnv    = "SQLITESTORE_TEST_HELPER"
	helperDirEnv = "SQLITESTORE_TEST_DIR"
)

func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		t.Skip("helper process for the multi-process tests; runs only when re-executed")
	}
	dir := os.Getenv(helperDirEnv)
	s, err := Open(context.Background(), dir, Options{})
	if err != nil {
		fmt.Printf("open failed: %v\n", err)
		os.Exit(2)
	}
	switch mode {
	case "lock":
		fmt.Printf("locked %d\n", os.Getpid())
		select {} // hold the lock until killed
	case "admit":
		var mu sync.Mutex
		var next atomic.Int64
		var wg sync.WaitGroup
		for range 8 { // concurrent callers, so acknowledgements come from group commits
			wg.Go(func() {
				for {
					i := next.Add(1)
					key := fmt.Sprintf("key-%06d", i)
					_, err := s.Admit(context.Background(), []store.Admission{crashAdmission(key)})
					if err != nil {
						fmt.Printf("error %v\n", err)
						os.Exit(3)
					}
					mu.Lock()
					fmt.Printf("admitted %s\n", key) // only after Admit returned: acknowledged
					mu.Unlock()
				}
			})
		}
		wg.Wait()
	}
	os.Exit(4)
}

func crashAdmission(key string) store.Admission {
	return store.Admission{Tenant: "t", Key: key, Fingerprint: "fp", MessageID: "<" + key + "@x>", To: []string{"a@b"},
		Data: []byte("data of " + key), Now: storetest.Epoch}
}

// startHelper runs the helper in mode on dir and returns its stdout lines.
func startHelper(t *testing.T, mode, dir string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, helperDirEnv+"="+dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill() // by its pid; harmless if it already exited
		cmd.Wait()
	})
	return cmd, bufio.NewScanner(out)
}

func TestLockHeldByAnotherProcess(t *testing.T) {
	dir := t.TempDir()
	cmd, lines := startHelper(t, "lock", dir)
	if !lines.Scan() {
		t.Fatalf("helper exited without signalling: %v", lines.Err())
	}
	if want := fmt.Sprintf("locked %d", cmd.Process.Pid); lines.Text() != want {
		t.Fatalf("helper said %q, want %q", lines.Text(), want)
	}
	_, err := Open(context.Background(), dir, Options{})
	if !errors.Is(err, store.ErrLocked) {
		t.Fatalf("Open of a locked directory: %v, want ErrLocked", err)
	}
	t.Logf("second Open: %v", err)
	for _, want := range []string{strconv.Quote(dir), "process " + strconv.Itoa(cmd.Process.Pid), filepath.Join(dir, LockFile)} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	// Once the holder is gone, however it went, the directory is free.
	cmd.Process.Kill()
	cmd.Wait()
	mustOpen(t, dir)
}

func TestLockHeldInSameProcess(t *testing.T) {
	dir := t.TempDir()
	s := mustOpen(t, dir)
	_, err := Open(context.Background(), dir, Options{})
	if !errors.Is(err, store.ErrLocked) || !strings.Contains(err.Error(), "process "+strconv.Itoa(os.Getpid())) {
		t.Fatalf("second Open in the same process: %v; want ErrLocked naming pid %d", err, os.Getpid())
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	mustOpen(t, dir) // released by Close
}

func TestPragmas(t *testing.T) {
	s := mustOpen(t, t.TempDir())
	check := func(what string, db interface {
		QueryRowContext(context.Context, string, ...any) *sql.Row
	}) {
		var sync int
		var mode string
		var busy int
		if err := db.QueryRowContext(t.Context(), "PRAGMA synchronous").Scan(&sync); err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRowContext(t.Context(), "PRAGMA journal_mode").Scan(&mode); err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRowContext(t.Context(), "PRAGMA busy_timeout").Scan(&busy); err != nil {
			t.Fatal(err)
		}
		if sync != 2 || mode != "wal" || busy != int(DefaultBusyTimeout.Milliseconds()) {
			t.Errorf("%s: synchronous=%d journal_mode=%s busy_timeout=%d; want 2 (FULL), wal, %d", what, sync, mode, busy, DefaultBusyTimeout.Milliseconds())
		}
	}
	// Every connection of the read pool, not only the first one.
	var conns []*sql.Conn
	for i := range 3 {
		c, err := s.rdb.Conn(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		check(fmt.Sprintf("read connection %d", i), c)
	}
	for _, c := range conns {
		c.Close()
	}
	// The writer's connection, through the writer.
	_, err := s.write(t.Context(), func(ctx context.Context, tx *wtx) (answer, error) {
		check("write connection", tx)
		return answer{}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var v int
	if err := s.rdb.QueryRowContext(t.Context(), "PRAGMA user_version").Scan(&v); err != nil || v != schemaVersion {
		t.Fatalf("user_version %d (%v), want %d", v, err, schemaVersion)
	}
}

// A ledger written by schema 5, with the message inside the record, opens
// under schema 6 with every message moved to email_bodies: the queued
// record is claimed with its message, the purged one stays empty, and the
// record's columns are unchanged.
func TestMigrateMessagesOutOfTheRecord(t *testing.T) {
	dir := t.TempDir()
	db, err := sql.Open("sqlite", dsn(filepath.Join(dir, DBFile), time.Second, false))
	if err != nil {
		t.Fatal(err)
	}
	for _, ddl := range []string{schemaV1, schemaV2, schemaV3, schemaV4, schemaV5, "PRAGMA user_version = 5"} {
		if _, err := db.Exec(ddl); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []struct{ key, state, data string }{{"queued", "queued", "Subject: kept\r\n\r\nbody\r\n"}, {"purged", "sent", ""}} {
		if _, err := db.Exec(`INSERT INTO emails (tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags,
			source, state, next_attempt, created_at, updated_at, data)
			VALUES ('t', ?, 'fp', '<'||?||'@x>', 'a@example.com', '["b@example.com"]', 's', '{}', 'api', ?, 1, 1, 1, ?)`,
			r.key, r.key, r.state, []byte(r.data)); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()

	s := mustOpen(t, dir)
	for key, want := range map[string]string{"queued": "Subject: kept\r\n\r\nbody\r\n", "purged": ""} {
		got, err := s.Message(t.Context(), "t", key)
		if err != nil || string(got) != want {
			t.Errorf("Message(%s) = %q, %v; want %q", key, got, err, want)
		}
	}
	recs, err := s.Claim(t.Context(), store.ClaimRequest{Owner: "n", Now: time.Unix(0, 2), Lease: time.Minute, Limit: 10})
	if err != nil || len(recs) != 1 || recs[0].Key != "queued" || string(recs[0].Data) != "Subject: kept\r\n\r\nbody\r\n" || recs[0].From != "a@example.com" {
		t.Fatalf("claim after migration: %+v, %v; want the queued record with its message", recs, err)
	}
	var cols int
	if err := s.rdb.QueryRow("SELECT count(*) FROM pragma_table_info('emails') WHERE name = 'data'").Scan(&cols); err != nil || cols != 0 {
		t.Errorf("emails.data still there after migration (%d, %v)", cols, err)
	}
}

// Purging a final record's message deletes its row in email_bodies, and
// the sweeper's deletion of a record takes its message along.
func TestBodiesFollowTheirRecords(t *testing.T) {
	s := mustOpen(t, t.TempDir())
	ctx := t.Context()
	now := time.Unix(100, 0)
	for _, k := range []string{"a", "b"} {
		if _, err := s.Admit(ctx, []store.Admission{{Tenant: "t", Key: k, Fingerprint: "f", MessageID: "<" + k + "@x>",
			From: "a@example.com", To: []string{"b@example.com"}, Data: []byte("body " + k), Now: now}}); err != nil {
			t.Fatal(err)
		}
	}
	bodies := func() int {
		var n int
		if err := s.rdb.QueryRow("SELECT count(*) FROM email_bodies").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := bodies(); n != 2 {
		t.Fatalf("%d bodies after two admissions, want 2", n)
	}
	recs, err := s.Claim(ctx, store.ClaimRequest{Owner: "n", Now: now, Lease: time.Minute, Limit: 2})
	if err != nil || len(recs) != 2 {
		t.Fatalf("claim: %d, %v", len(recs), err)
	}
	for _, r := range recs {
		l := store.Lease{ID: r.ID, Fence: r.Fence}
		if err := s.MarkCommitting(ctx, l, now); err != nil {
			t.Fatal(err)
		}
		if err := s.Complete(ctx, store.Completion{Lease: l, Result: store.ResultSent, Now: now, PurgeData: r.Key == "a"}); err != nil {
			t.Fatal(err)
		}
	}
	if n := bodies(); n != 1 {
		t.Fatalf("%d bodies after purging one, want 1", n)
	}
	if n, err := s.Sweep(ctx, now.Add(time.Hour), 10); err != nil || n != 2 {
		t.Fatalf("sweep: %d, %v; want 2", n, err)
	}
	if n := bodies(); n != 0 {
		t.Fatalf("%d bodies after the sweep, want 0", n)
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	dir := t.TempDir()
	s := mustOpen(t, dir)
	_, err := s.write(t.Context(), func(ctx context.Context, tx *wtx) (answer, error) {
		_, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", schemaVersion+1))
		return answer{}, err
	})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err = Open(context.Background(), dir, Options{})
	if err == nil || !strings.Contains(err.Error(), "schema version") {
		t.Fatalf("Open of a newer schema: %v, want a schema version error", err)
	}
	// The failed Open released the lock: a second try fails the same way.
	if s2, err := Open(context.Background(), dir, Options{}); err == nil || errors.Is(err, store.ErrLocked) {
		if s2 != nil {
			s2.Close()
		}
		t.Fatalf("second Open of the newer schema: %v, want the schema error again, not a lock", err)
	}
}

func TestGroupCommitBatches(t *testing.T) {
	s := mustOpen(t, t.TempDir())
	const n = 500
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			<-start
			_, err := s.Admit(t.Context(), []store.Admission{crashAdmission(fmt.Sprintf("k%d", i))})
			if err != nil {
				errs <- err
			}
		})
	}
	before := s.Stats()
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := s.Stats()
	commits, reqs := st.Commits-before.Commits, st.Requests-before.Requests
	t.Logf("%d admissions, %d commits, %d batches", reqs, commits, st.Batches-before.Batches)
	if reqs != n {
		t.Fatalf("%d requests served, want %d", reqs, n)
	}
	if commits >= n {
		t.Fatalf("%d commits for %d concurrent admissions: the writer does not group commits", commits, n)
	}
}

// A request that breaks the database transaction must fail alone: the
// batch is re-run one request at a time.
func TestBadRequestDoesNotFailBatch(t *testing.T) {
	s := mustOpen(t, t.TempDir())
	// Hold the writer so the requests below queue up and share a batch.
	release := make(chan struct{})
	held := make(chan struct{})
	go s.write(t.Context(), func(ctx context.Context, tx *wtx) (answer, error) {
		close(held)
		<-release
		return answer{}, nil
	})
	<-held
	var wg sync.WaitGroup
	var badErr error
	goodErrs := make([]error, 10)
	wg.Go(func() {
		_, badErr = s.write(t.Context(), func(ctx context.Context, tx *wtx) (answer, error) {
			_, err := tx.ExecContext(ctx, "INSERT INTO no_such_table VALUES (1)")
			return answer{}, err
		})
	})
	for i := range goodErrs {
		wg.Go(func() {
			_, goodErrs[i] = s.Admit(t.Context(), []store.Admission{crashAdmission(fmt.Sprintf("k%d", i))})
		})
	}
	// Wait until all 11 requests are queued behind the held one.
	for len(s.reqs) < 11 {
		runtimeGosched()
	}
	close(release)
	wg.Wait()
	if badErr == nil {
		t.Fatal("the bad request succeeded")
	}
	for i, err := range goodErrs {
		if err != nil {
			t.Errorf("good request %d failed with the bad one: %v", i, err)
		}
	}
	if s.Stats().Reruns == 0 {
		t.Error("no batch was re-run: the requests did not share a batch")
	}
	for i := range goodErrs {
		if _, err := s.Get(t.Context(), "t", fmt.Sprintf("k%d", i)); err != nil {
			t.Errorf("k%d after the re-run: %v", i, err)
		}
	}
}

func TestCloseAnswersQueuedCallers(t *testing.T) {
	s, err := Open(context.Background(), t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	held := make(chan struct{})
	go s.write(t.Context(), func(ctx context.Context, tx *wtx) (answer, error) {
		close(held)
		<-release
		return answer{}, nil
	})
	<-held
	errs := make(chan error, 5)
	for i := range 5 {
		go func() {
			_, err := s.Admit(t.Context(), []store.Admission{crashAdmission(fmt.Sprintf("k%d", i))})
			errs <- err
		}()
	}
	for len(s.reqs) < 5 {
		runtimeGosched()
	}
	closed := make(chan error)
	go func() { closed <- s.Close() }()
	for !s.closed.Load() {
		runtimeGosched()
	}
	close(release)
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	for range 5 {
		// Each queued caller is either served (the writer took it before
		// seeing Close) or told ErrClosed; none hangs.
		if err := <-errs; err != nil && !errors.Is(err, store.ErrClosed) {
			t.Errorf("queued caller: %v", err)
		}
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestCrashKeepsAcknowledgedAdmissions(t *testing.T) {
	dir := t.TempDir()
	cmd, lines := startHelper(t, "admit", dir)
	acked := map[string]bool{}
	for lines.Scan() {
		line := lines.Text()
		key, ok := strings.CutPrefix(line, "admitted ")
		if !ok {
			t.Fatalf("helper: %s", line)
		}
		acked[key] = true
		if len(acked) == 300 {
			// SIGKILL mid-stream: no chance to close or flush anything.
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
	}
	cmd.Wait() // the lines read after the kill were printed before it: acknowledged too
	if len(acked) < 300 {
		t.Fatalf("helper acknowledged only %d admissions", len(acked))
	}
	s := mustOpen(t, dir)
	for key := range acked {
		if _, err := s.Get(t.Context(), "t", key); err != nil {
			t.Errorf("acknowledged %s lost after the crash: %v", key, err)
		}
	}
	t.Logf("%d acknowledged admissions all found after SIGKILL", len(acked))
}

func TestOptionsValidated(t *testing.T) {
	_, err := Open(context.Background(), t.TempDir(), Options{MaxBatch: -1})
	if err == nil || !strings.Contains(err.Error(), "MaxBatch") {
		t.Fatalf("Open with MaxBatch -1: %v, want an error naming MaxBatch", err)
	}
}

// OnCommit sees every commit with the number of requests it carried, so
// the metrics' batch-size histogram adds up to the requests served.
func TestOnCommitSeesEveryCommit(t *testing.T) {
	var mu sync.Mutex
	var commits, reqs int
	s, err := Open(t.Context(), t.TempDir(), Options{OnCommit: func(c CommitInfo) {
		mu.Lock()
		defer mu.Unlock()
		commits++
		reqs += c.Requests
		if c.Sync < 0 {
			t.Errorf("negative commit duration %v", c.Sync)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	before := s.Stats()
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			if _, err := s.Admit(t.Context(), []store.Admission{crashAdmission(fmt.Sprintf("k%d", i))}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	st := s.Stats()
	mu.Lock()
	defer mu.Unlock()
	if int64(commits) != st.Commits-before.Commits || int64(reqs) != st.Requests-before.Requests || reqs != 50 {
		t.Fatalf("OnCommit saw %d commits of %d requests; the writer counted %d commits of %d requests (want 50)",
			commits, reqs, st.Commits-before.Commits, st.Requests-before.Requests)
	}
}
