package pgstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/storetest"
)

// The tests run against a real PostgreSQL: the server named by
// SENDONCE_TEST_POSTGRES (default: local, trust auth), in its database
// sendonce_test (created if missing), each test in a schema of its own
// that is dropped when it ends, so tests run in parallel.
const (
	urlEnv     = "SENDONCE_TEST_POSTGRES"
	defaultURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	testDB     = "sendonce_test"
)

// testURL is the URL of the test database, or "" with the reason in
// skipReason. Set once by TestMain, read-only afterwards.
var testURL, skipReason string

func TestMain(m *testing.M) {
	testURL, skipReason = prepareDatabase()
	os.Exit(m.Run())
}

func prepareDatabase() (url, skip string) {
	base := os.Getenv(urlEnv)
	if base == "" {
		base = defaultURL
	}
	cfg, err := pgx.ParseConfig(base)
	if err != nil {
		return "", fmt.Sprintf("%s=%q is not a PostgreSQL URL: %v", urlEnv, base, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return "", fmt.Sprintf("no PostgreSQL at %s:%d (%v): set %s=postgres://...", cfg.Host, cfg.Port, err, urlEnv)
	}
	defer conn.Close(ctx)
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", testDB).Scan(&exists); err != nil {
		return "", fmt.Sprintf("PostgreSQL at %s:%d: %v", cfg.Host, cfg.Port, err)
	}
	if !exists {
		_, err := conn.Exec(ctx, "CREATE DATABASE "+testDB)
		var pe *pgconn.PgError
		if err != nil && !(errors.As(err, &pe) && pe.Code == "42P04") { // created meanwhile by another test binary
			return "", fmt.Sprintf("cannot create database %s at %s:%d: %v", testDB, cfg.Host, cfg.Port, err)
		}
	}
	// The same server and credentials, another database.
	u := cfg.ConnString()
	if strings.Contains(u, "://") {
		return replaceDB(u, cfg.Database), ""
	}
	return u + " dbname=" + testDB, ""
}

func replaceDB(url, from string) string {
	head, query, _ := strings.Cut(url, "?")
	if i := strings.LastIndex(head, "/"); i > strings.Index(head, "://")+2 {
		head = head[:i]
	}
	head += "/" + testDB
	if query != "" {
		head += "?" + query
	}
	return head
}

// needDB skips the test when there is no database, loudly; under CI it
// fails instead, so a CI without its database cannot pass green.
func needDB(t testing.TB) {
	t.Helper()
	if testURL != "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and %s", skipReason)
	}
	t.Skipf("SKIPPED: %s", skipReason)
}

// newSchema returns the name of a fresh schema (not yet created) that is
// dropped when the test ends.
func newSchema(t testing.TB) string {
	t.Helper()
	needDB(t)
	b := make([]byte, 6)
	rand.Read(b)
	name := "sendonce_test_" + hex.EncodeToString(b)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, testURL)
		if err != nil {
			t.Errorf("drop schema %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{name}.Sanitize()+" CASCADE"); err != nil {
			t.Errorf("drop schema %s: %v", name, err)
		}
	})
	return name
}

func mustOpen(t testing.TB, schema string, opts Options) *Store {
	t.Helper()
	opts.Schema = schema
	s, err := Open(context.Background(), testURL, opts)
	if err != nil {
		t.Fatalf("Open(schema %s): %v", schema, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// openFresh opens a store on a new, migrated schema.
func openFresh(t testing.TB) *Store {
	t.Helper()
	return mustOpen(t, newSchema(t), Options{Migrate: true})
}

func TestConformance(t *testing.T) {
	needDB(t)
	t.Parallel()
	storetest.Run(t, func(t *testing.T) store.Store { return openFresh(t) })
}

func TestDurability(t *testing.T) {
	needDB(t)
	t.Parallel()
	storetest.RunDurability(t, func(t *testing.T) func() store.Store {
		schema := newSchema(t)
		if err := Migrate(t.Context(), testURL, Options{Schema: schema}); err != nil {
			t.Fatal(err)
		}
		// Each call is a new Store on the same schema: a restarted node.
		return func() store.Store { return mustOpen(t, schema, Options{}) }
	})
}

func testAdmission(tenant, key string) store.Admission {
	return store.Admission{Tenant: tenant, Key: key, Fingerprint: "fp", MessageID: "<" + key + "@x>", To: []string{"a@b"},
		Data: []byte("data of " + key), Now: storetest.Epoch}
}

func TestMigrateConcurrently(t *testing.T) {
	t.Parallel()
	schema := newSchema(t) // does not exist yet: the migrators also race to create it
	const n = 8
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			<-start
			errs[i] = Migrate(t.Context(), testURL, Options{Schema: schema})
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("migrator %d: %v", i, err)
		}
	}
	s := mustOpen(t, schema, Options{})
	var versions []int
	rows, err := s.pool.Query(t.Context(), "SELECT version FROM "+s.q.migrations+" ORDER BY version")
	if err != nil {
		t.Fatal(err)
	}
	versions, err = pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		t.Fatal(err)
	}
	want := make([]int, SchemaVersion())
	for i := range want {
		want[i] = i + 1
	}
	if !slices.Equal(versions, want) {
		t.Fatalf("migrations recorded %v, want each of %v once", versions, want)
	}
	// Migrating an up-to-date schema is a no-op.
	if err := Migrate(t.Context(), testURL, Options{Schema: schema}); err != nil {
		t.Fatalf("second Migrate: %v", err)
	}
}

func TestNotMigratedRefused(t *testing.T) {
	t.Parallel()
	schema := newSchema(t)
	_, err := Open(t.Context(), testURL, Options{Schema: schema})
	if err == nil || !strings.Contains(err.Error(), "sendonce migrate --postgres") || !strings.Contains(err.Error(), "serve --migrate") {
		t.Fatalf("Open of an unmigrated schema: %v; want an error naming sendonce migrate and serve --migrate", err)
	}
	t.Logf("Open: %v", err)
	// With Migrate set, the same Open succeeds.
	mustOpen(t, schema, Options{Migrate: true})
}

func TestNewerSchemaRefused(t *testing.T) {
	t.Parallel()
	s := openFresh(t)
	newer := SchemaVersion() + 1
	if _, err := s.pool.Exec(t.Context(), "INSERT INTO "+s.q.migrations+" (version, name) VALUES ($1, 'from the future')", newer); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("database schema version %d is newer than this sendonce (%d): upgrade sendonce", newer, SchemaVersion())
	schema := s.opts.Schema
	s.Close()
	for _, migrate := range []bool{false, true} {
		_, err := Open(t.Context(), testURL, Options{Schema: schema, Migrate: migrate})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Open(Migrate: %v) of a newer schema: %v; want %q", migrate, err, want)
		}
	}
	if err := Migrate(t.Context(), testURL, Options{Schema: schema}); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("Migrate of a newer schema: %v; want %q", err, want)
	}
}

func TestOptionsValidated(t *testing.T) {
	for _, o := range []Options{{MaxBatch: -1}, {AdmitWorkers: -1}, {MaxConns: -1}, {WriteTimeout: -time.Second}} {
		_, err := Open(context.Background(), "postgres://nowhere.invalid/x", o)
		if err == nil || !strings.Contains(err.Error(), "Options.") {
			t.Errorf("Open(%+v): %v, want an error naming the field", o, err)
		}
	}
}

func TestAdmitTxExistsIffCommitted(t *testing.T) {
	t.Parallel()
	s := openFresh(t)
	ctx := t.Context()
	// The caller's own pool and transaction, as an application would have.
	app, err := pgxpool.New(ctx, testURL)
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()

	tx, err := app.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.AdmitTx(ctx, tx, []store.Admission{testAdmission("t", "rolled-back")})
	if err != nil || res[0].Outcome != store.OutcomeNew {
		t.Fatalf("AdmitTx: %v, %v; want new", res, err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "t", "rolled-back"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after rollback: %v, want ErrNotFound", err)
	}

	tx, err = app.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res, err = s.AdmitTx(ctx, tx, []store.Admission{testAdmission("t", "committed")})
	if err != nil || res[0].Outcome != store.OutcomeNew {
		t.Fatalf("AdmitTx: %v, %v; want new", res, err)
	}
	// Invisible to everyone else, and unclaimable, until the commit.
	if _, err := s.Get(ctx, "t", "committed"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get before commit: %v, want ErrNotFound", err)
	}
	if recs, err := s.Claim(ctx, store.ClaimRequest{Owner: "w", Now: storetest.Epoch, Lease: time.Minute, Limit: 10}); err != nil || len(recs) != 0 {
		t.Fatalf("Claim before commit: %d records, %v; want none", len(recs), err)
	}
	// A duplicate inside the caller's transaction sees its own admission.
	res, err = s.AdmitTx(ctx, tx, []store.Admission{testAdmission("t", "committed")})
	if err != nil || res[0].Outcome != store.OutcomeDuplicate || res[0].Record.Duplicates != 1 {
		t.Fatalf("second AdmitTx in the same transaction: %+v, %v; want a duplicate with 1 duplicate", res, err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	g, err := s.Get(ctx, "t", "committed")
	if err != nil || g.Duplicates != 1 {
		t.Fatalf("Get after commit: %+v, %v; want the record with 1 duplicate", g, err)
	}
	recs, err := s.Claim(ctx, store.ClaimRequest{Owner: "w", Now: storetest.Epoch, Lease: time.Minute, Limit: 10})
	if err != nil || len(recs) != 1 || recs[0].Key != "committed" {
		t.Fatalf("Claim after commit: %v, %v; want the committed record", recs, err)
	}
	// Admit (the batcher) and AdmitTx share one ledger.
	if r, err := s.Admit(ctx, []store.Admission{testAdmission("t", "committed")}); err != nil || r[0].Outcome != store.OutcomeDuplicate {
		t.Fatalf("Admit after AdmitTx: %v, %v; want duplicate", r, err)
	}
	// The events trigger found its table in our schema through the
	// application's connection, whose search_path does not name it.
	evs, err := s.Events(ctx, "t", "committed")
	var kinds []store.EventKind
	for _, e := range evs {
		kinds = append(kinds, e.Kind)
	}
	if err != nil || fmt.Sprint(kinds) != "[accepted duplicate attempt duplicate]" {
		t.Fatalf("Events after AdmitTx: %v, %v", kinds, err)
	}
}

// A concurrent duplicate in another transaction waits on the unique index
// for the first one, then reports a duplicate.
func TestAdmitTxConcurrentDuplicateWaitsForCommit(t *testing.T) {
	t.Parallel()
	s := openFresh(t)
	ctx := t.Context()
	tx1, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx1.Rollback(ctx)
	if _, err := s.AdmitTx(ctx, tx1, []store.Admission{testAdmission("t", "k")}); err != nil {
		t.Fatal(err)
	}
	conn2, err := s.pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Release()
	var pid2 uint32 = conn2.Conn().PgConn().PID()
	type answer struct {
		res []store.AdmitResult
		err error
	}
	second := make(chan answer, 1)
	go func() {
		var a answer
		a.err = pgx.BeginFunc(ctx, conn2, func(tx pgx.Tx) error {
			var err error
			a.res, err = s.AdmitTx(ctx, tx, []store.Admission{testAdmission("t", "k")})
			return err
		})
		second <- a
	}()
	// Wait until the second transaction is blocked on the first one's lock.
	for {
		var waiting bool
		err := s.pool.QueryRow(ctx, "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1", pid2).Scan(&waiting)
		if err != nil {
			t.Fatal(err)
		}
		if waiting {
			break
		}
		select {
		case a := <-second:
			t.Fatalf("second AdmitTx returned %+v, %v while the first transaction was open", a.res, a.err)
		default:
			runtime.Gosched()
		}
	}
	if err := tx1.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	a := <-second
	if a.err != nil || a.res[0].Outcome != store.OutcomeDuplicate {
		t.Fatalf("second AdmitTx after the first committed: %+v, %v; want duplicate", a.res, a.err)
	}
}

// Four Stores on one schema are four nodes: every record is claimed by
// exactly one of them.
func TestClaimAcrossNodes(t *testing.T) {
	t.Parallel()
	schema := newSchema(t)
	const nodes, perNode, n = 4, 3, 500
	var ss []*Store
	for range nodes {
		ss = append(ss, mustOpen(t, schema, Options{Migrate: true}))
	}
	var batch []store.Admission
	for i := range n {
		batch = append(batch, testAdmission("t", fmt.Sprintf("k%03d", i)))
	}
	if _, err := ss[0].Admit(t.Context(), batch); err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		claimed = map[int64][]string{}
		wg      sync.WaitGroup
		start   = make(chan struct{})
		errs    = make(chan error, nodes*perNode)
	)
	for i, s := range ss {
		for w := range perNode {
			owner := fmt.Sprintf("node%d/w%d", i, w)
			wg.Go(func() {
				<-start
				for {
					recs, err := s.Claim(t.Context(), store.ClaimRequest{Owner: owner, Now: storetest.Epoch, Lease: time.Minute, Limit: 7})
					if err != nil {
						errs <- err
						return
					}
					if len(recs) == 0 {
						return
					}
					mu.Lock()
					for _, r := range recs {
						claimed[r.ID] = append(claimed[r.ID], owner)
					}
					mu.Unlock()
				}
			})
		}
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if len(claimed) != n {
		t.Errorf("%d records claimed, want %d", len(claimed), n)
	}
	byNode := map[string]int{}
	for id, owners := range claimed {
		if len(owners) != 1 {
			t.Errorf("record %d claimed by %v", id, owners)
		}
		byNode[strings.Split(owners[0], "/")[0]]++
	}
	t.Logf("claims per node: %v", byNode)
	c, err := ss[1].Counts(t.Context(), "*")
	if err != nil || c[store.StateSending] != n {
		t.Fatalf("Counts: %v, %v; want %d sending", c, err, n)
	}
}

// The same keys submitted to four nodes at once, in four different orders:
// exactly one new per key, no error (no deadlock), every duplicate counted.
func TestAdmitSameKeysAcrossNodes(t *testing.T) {
	t.Parallel()
	schema := newSchema(t)
	const nodes, keys, callers = 4, 300, 8
	var ss []*Store
	for range nodes {
		ss = append(ss, mustOpen(t, schema, Options{Migrate: true}))
	}
	type outcome struct {
		key string
		res store.AdmitResult
	}
	var (
		mu   sync.Mutex
		outs []outcome
		wg   sync.WaitGroup
		errs = make(chan error, nodes*callers)
	)
	start := make(chan struct{})
	for i, s := range ss {
		for c := range callers {
			wg.Go(func() {
				<-start
				// Each caller sends batches of 5 keys, in an order of its own.
				for j := range keys / 5 {
					var b []store.Admission
					for m := range 5 {
						k := (j*5 + m + i*37 + c*11) % keys
						if i%2 == 1 {
							k = keys - 1 - k
						}
						b = append(b, testAdmission("t", fmt.Sprintf("k%03d", k)))
					}
					res, err := s.Admit(t.Context(), b)
					if err != nil {
						errs <- err
						return
					}
					mu.Lock()
					for m, r := range res {
						outs = append(outs, outcome{b[m].Key, r})
					}
					mu.Unlock()
				}
			})
		}
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	news := map[string]int{}
	for _, o := range outs {
		if o.res.Outcome == store.OutcomeNew {
			news[o.key]++
		} else if o.res.Outcome != store.OutcomeDuplicate {
			t.Fatalf("key %s: outcome %v", o.key, o.res.Outcome)
		}
	}
	if len(news) != keys {
		t.Errorf("%d keys had a new outcome, want %d", len(news), keys)
	}
	for k, n := range news {
		if n != 1 {
			t.Errorf("key %s new %d times", k, n)
		}
	}
	var dups int64
	for i := range keys {
		g, err := ss[0].Get(t.Context(), "t", fmt.Sprintf("k%03d", i))
		if err != nil {
			t.Fatal(err)
		}
		dups += g.Duplicates
	}
	if want := int64(len(outs) - keys); dups != want {
		t.Errorf("%d duplicates counted, want %d", dups, want)
	}
	var st Stats
	for _, s := range ss {
		x := s.Stats()
		st.Retries += x.Retries
		st.Commits += x.Commits
	}
	t.Logf("%d admissions on %d nodes: %d commits, %d retried batches", len(outs), nodes, st.Commits, st.Retries)
}

// holdInserts locks the ledger against inserts until the returned function
// is called, so that requests queue up behind the batchers.
func holdInserts(t *testing.T, s *Store) (release func()) {
	t.Helper()
	tx, err := s.pool.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(t.Context(), "LOCK TABLE "+s.q.emails+" IN EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := tx.Rollback(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
}

// waitQueued waits until n requests since before are queued or taken.
func waitQueued(s *Store, before Stats, n int) {
	for len(s.admits)+int(s.Stats().Requests-before.Requests) < n {
		runtime.Gosched()
	}
}

func TestBatcherBatches(t *testing.T) {
	t.Parallel()
	s := openFresh(t)
	const n = 500
	before := s.Stats()
	release := holdInserts(t, s)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			if _, err := s.Admit(t.Context(), []store.Admission{testAdmission("t", fmt.Sprintf("k%d", i))}); err != nil {
				errs <- err
			}
		})
	}
	waitQueued(s, before, n)
	release()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := s.Stats()
	commits, reqs := st.Commits-before.Commits, st.Requests-before.Requests
	t.Logf("%d concurrent admissions: %d commits in %d batches", reqs, commits, st.Batches-before.Batches)
	if reqs != n {
		t.Fatalf("%d requests served, want %d", reqs, n)
	}
	// The batchers each took what was waiting when the lock stopped them,
	// then the rest in batches of up to MaxBatch.
	if limit := int64(2*DefaultAdmitWorkers + 2); commits > limit {
		t.Fatalf("%d commits for %d concurrent admissions, want at most %d: the batcher does not batch", commits, n, limit)
	}
	c, err := s.Counts(t.Context(), "t")
	if err != nil || c[store.StateQueued] != n {
		t.Fatalf("Counts: %v, %v; want %d queued", c, err, n)
	}
}

// A request that the database refuses must fail alone: the batch is re-run
// one request at a time.
func TestBadRequestDoesNotFailBatch(t *testing.T) {
	t.Parallel()
	s := mustOpen(t, newSchema(t), Options{Migrate: true, AdmitWorkers: 1})
	before := s.Stats()
	release := holdInserts(t, s)
	var wg sync.WaitGroup
	goodErrs := make([]error, 10)
	admitGood := func(i int) {
		_, goodErrs[i] = s.Admit(t.Context(), []store.Admission{testAdmission("t", fmt.Sprintf("k%d", i))})
	}
	// The one batcher takes a first request and blocks on the lock...
	wg.Go(func() { admitGood(0) })
	for s.Stats().Requests == before.Requests {
		runtime.Gosched()
	}
	// ...so the bad request and the other good ones queue up for one batch.
	var badErr error
	wg.Go(func() {
		// PostgreSQL text cannot hold a NUL byte.
		_, badErr = s.Admit(t.Context(), []store.Admission{testAdmission("t", "bad\x00key")})
	})
	for i := 1; i < len(goodErrs); i++ {
		wg.Go(func() { admitGood(i) })
	}
	for len(s.admits) < len(goodErrs) {
		runtime.Gosched()
	}
	release()
	wg.Wait()
	if badErr == nil {
		t.Fatal("the bad request succeeded")
	}
	t.Logf("bad request: %v", badErr)
	for i, err := range goodErrs {
		if err != nil {
			t.Errorf("good request %d failed with the bad one: %v", i, err)
		}
	}
	if st := s.Stats(); st.Reruns-before.Reruns != 1 {
		t.Errorf("%d batches re-run, want 1", st.Reruns-before.Reruns)
	}
	for i := range goodErrs {
		if _, err := s.Get(t.Context(), "t", fmt.Sprintf("k%d", i)); err != nil {
			t.Errorf("k%d: %v", i, err)
		}
	}
}

// IDs grow in admission order inside one batch, although rows are inserted
// in key order.
func TestAdmitIDsFollowAdmissionOrder(t *testing.T) {
	t.Parallel()
	s := openFresh(t)
	keys := []string{"zulu", "alpha", "mike", "bravo", "yankee"}
	var b []store.Admission
	for _, k := range keys {
		b = append(b, testAdmission("t", k))
	}
	res, err := s.Admit(t.Context(), b)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(res); i++ {
		if res[i].Record.ID <= res[i-1].Record.ID {
			t.Fatalf("ids %v do not follow admission order %v", []int64{res[i-1].Record.ID, res[i].Record.ID}, keys)
		}
	}
}

func TestClosedPoolIsErrClosed(t *testing.T) {
	t.Parallel()
	s := openFresh(t)
	r, err := s.Admit(t.Context(), []store.Admission{testAdmission("t", "k")})
	if err != nil {
		t.Fatal(err)
	}
	// The pool goes away under the store (as if closed by another owner):
	// every call reports store.ErrClosed, not pgx's "closed pool".
	s.pool.Close()
	ctx := t.Context()
	l := store.Lease{ID: r[0].Record.ID, Fence: 1}
	_, err = s.Get(ctx, "t", "k")
	wantIs(t, "Get", err, store.ErrClosed)
	_, err = s.List(ctx, store.Filter{Tenant: "t"})
	wantIs(t, "List", err, store.ErrClosed)
	_, err = s.Counts(ctx, "t")
	wantIs(t, "Counts", err, store.ErrClosed)
	_, err = s.Claim(ctx, store.ClaimRequest{Owner: "w", Now: storetest.Epoch, Lease: time.Minute, Limit: 1})
	wantIs(t, "Claim", err, store.ErrClosed)
	wantIs(t, "Renew", s.Renew(ctx, l, storetest.Epoch, time.Minute), store.ErrClosed)
	wantIs(t, "MarkCommitting", s.MarkCommitting(ctx, l, storetest.Epoch), store.ErrClosed)
	wantIs(t, "Complete", s.Complete(ctx, store.Completion{Lease: l, Result: store.ResultSent, Now: storetest.Epoch}), store.ErrClosed)
	_, err = s.Resolve(ctx, store.Resolution{Tenant: "t", Key: "k", Action: store.ActionFail, Now: storetest.Epoch})
	wantIs(t, "Resolve", err, store.ErrClosed)
	_, err = s.Admit(ctx, []store.Admission{testAdmission("t", "k2")})
	wantIs(t, "Admit", err, store.ErrClosed)
	wantIs(t, "Ping", s.Ping(ctx), store.ErrClosed)
	if err := s.Close(); err != nil {
		t.Fatalf("Close after the pool closed: %v", err)
	}
}

func wantIs(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Errorf("%s: %v, want %v", what, err, want)
	}
}

func TestInterpretError(t *testing.T) {
	s := &Store{}
	for _, c := range []struct {
		err  error
		is   error
		text string
	}{
		{pgx.ErrNoRows, store.ErrNotFound, ""},
		{&pgconn.PgError{Code: "42P01", Message: `relation "x" does not exist`}, nil, "sendonce migrate --postgres URL"},
		{&pgconn.PgError{Code: "22021", Message: "invalid byte sequence"}, nil, "without NUL bytes"},
		{&pgconn.PgError{Code: "57P01", Message: "terminating connection due to administrator command"}, nil, "retry later"},
		{context.Canceled, context.Canceled, ""},
	} {
		got := s.interpretError("op", c.err)
		if c.is != nil && !errors.Is(got, c.is) {
			t.Errorf("interpretError(%v) = %v, want errors.Is %v", c.err, got, c.is)
		}
		if !strings.Contains(got.Error(), c.text) || !strings.HasPrefix(got.Error(), "pgstore: op: ") {
			t.Errorf("interpretError(%v) = %q, want %q in it", c.err, got, c.text)
		}
	}
	if s.interpretError("op", nil) != nil {
		t.Error("interpretError(nil) is not nil")
	}
}

func TestQueriesNameTheSchema(t *testing.T) {
	q := newQueries(`we"ird`)
	if q.emails != `"we""ird"."sendonce_emails"` || q.seq != `'"we""ird"."sendonce_emails_id_seq"'` {
		t.Fatalf("queries: %q %q", q.emails, q.seq)
	}
	if q := newQueries(""); q.emails != "sendonce_emails" {
		t.Fatalf("no schema: %q", q.emails)
	}
}

// finalRecord admits key at now and completes it as sent.
func finalRecord(t *testing.T, s *Store, key string, purge bool) store.Record {
	t.Helper()
	a := testAdmission("t", key)
	if _, err := s.Admit(t.Context(), []store.Admission{a}); err != nil {
		t.Fatal(err)
	}
	recs, err := s.Claim(t.Context(), store.ClaimRequest{Owner: "w", Now: a.Now, Lease: time.Minute, Limit: 1})
	if err != nil || len(recs) != 1 {
		t.Fatalf("Claim: %v, %v", recs, err)
	}
	l := store.Lease{ID: recs[0].ID, Fence: recs[0].Fence}
	if err := s.Complete(t.Context(), store.Completion{Lease: l, Result: store.ResultSent, Now: a.Now, PurgeData: purge}); err != nil {
		t.Fatal(err)
	}
	return recs[0]
}

func TestPurgeDataOnSend(t *testing.T) {
	t.Parallel()
	s := openFresh(t)
	for _, purge := range []bool{false, true} {
		key := fmt.Sprintf("purge-%v", purge)
		r := finalRecord(t, s, key, purge)
		var n int
		if err := s.pool.QueryRow(t.Context(), "SELECT length(data) FROM "+s.q.emails+" WHERE id = $1", r.ID).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if want := len(testAdmission("t", key).Data); purge && n != 0 || !purge && n != want {
			t.Errorf("PurgeData %v: %d bytes of data kept", purge, n)
		}
	}
}

// Sweepers of several nodes at once delete each record once and skip rows
// another sweeper holds, never waiting for each other.
func TestSweepAcrossNodes(t *testing.T) {
	t.Parallel()
	schema := newSchema(t)
	a := mustOpen(t, schema, Options{Migrate: true})
	b := mustOpen(t, schema, Options{})
	const n = 60
	for i := range n {
		finalRecord(t, a, fmt.Sprintf("k%02d", i), true)
	}
	var total atomic.Int64
	var wg sync.WaitGroup
	for _, s := range []*Store{a, b, a, b} {
		wg.Go(func() {
			for {
				d, err := s.Sweep(t.Context(), storetest.Epoch.Add(time.Hour), 7)
				if err != nil {
					t.Error(err)
					return
				}
				if d == 0 {
					return
				}
				total.Add(int64(d))
			}
		})
	}
	wg.Wait()
	if got := total.Load(); got != n {
		t.Fatalf("sweepers deleted %d records, want %d", got, n)
	}
	if c, err := a.Counts(t.Context(), "*"); err != nil || c[store.StateSent] != 0 {
		t.Fatalf("after the sweep: %v, %v", c, err)
	}
}

// A key swept between the admission's insert (which found it taken) and
// its read of the existing record: the batch is re-run and the key is new.
func TestAdmitRacingSweepIsRetried(t *testing.T) {
	t.Parallel()
	s := openFresh(t)
	ctx := t.Context()
	old := finalRecord(t, s, "k", false)
	// A sweeper holds the row it is about to delete.
	sweeper, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sweeper.Rollback(ctx)
	if _, err := sweeper.Exec(ctx, "SELECT 1 FROM "+s.q.emails+" WHERE id = $1 FOR UPDATE", old.ID); err != nil {
		t.Fatal(err)
	}
	before := s.Stats()
	done := make(chan error, 1)
	var res []store.AdmitResult
	go func() {
		var err error
		res, err = s.Admit(ctx, []store.Admission{testAdmission("t", "k")})
		done <- err
	}()
	// Wait until the admission found the key taken and waits for the row.
	for {
		var waiting bool
		err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE%' AND query LIKE '%' || $1 || '%')`, s.opts.Schema).Scan(&waiting)
		if err != nil {
			t.Fatal(err)
		}
		if waiting {
			break
		}
		runtime.Gosched()
	}
	if _, err := sweeper.Exec(ctx, "DELETE FROM "+s.q.emails+" WHERE id = $1", old.ID); err != nil {
		t.Fatal(err)
	}
	if err := sweeper.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Admit racing the sweep: %v", err)
	}
	if res[0].Outcome != store.OutcomeNew || res[0].Record.ID == old.ID {
		t.Fatalf("Admit after the sweep: %v record %d, want a new record", res[0].Outcome, res[0].Record.ID)
	}
	if r := s.Stats().Retries - before.Retries; r != 1 {
		t.Errorf("%d batch retries, want 1", r)
	}
}

// Messages are compressed with lz4 when the server has it, and a message
// that compresses still reads back byte for byte.
func TestMessagesCompressedWithLZ4(t *testing.T) {
	t.Parallel()
	s := openFresh(t)
	ctx := t.Context()
	var lz4 bool
	if err := s.pool.QueryRow(ctx, "SELECT count(*) > 0 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)").Scan(&lz4); err != nil {
		t.Fatal(err)
	}
	var method string
	if err := s.pool.QueryRow(ctx, `SELECT coalesce(attcompression::text, '') FROM pg_attribute
		WHERE attrelid = $1::regclass AND attname = 'data'`, s.q.emails).Scan(&method); err != nil {
		t.Fatal(err)
	}
	if want := map[bool]string{true: "l", false: ""}[lz4]; method != want {
		t.Errorf("data's compression method %q, want %q (server has lz4: %v)", method, want, lz4)
	}
	a := testAdmission("t", "compressible")
	a.Data = []byte(strings.Repeat("Subject: the same line again and again\r\n", 200))
	if _, err := s.Admit(ctx, []store.Admission{a}); err != nil {
		t.Fatal(err)
	}
	var stored int
	if err := s.pool.QueryRow(ctx, "SELECT pg_column_size(data) FROM "+s.q.emails+" WHERE idem_key = 'compressible'").Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if stored >= len(a.Data)/2 {
		t.Errorf("%d bytes stored for a message of %d that compresses well", stored, len(a.Data))
	}
	got, err := s.Message(ctx, "t", "compressible")
	if err != nil || string(got) != string(a.Data) {
		t.Fatalf("Message: %d bytes, %v; want the %d bytes admitted", len(got), err, len(a.Data))
	}
}
