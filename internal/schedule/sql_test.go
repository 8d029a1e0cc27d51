package schedule

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/pgstore"
)

// postgres returns the URL of the test PostgreSQL (SENDONCE_TEST_POSTGRES,
// default local trust auth) and a fresh schema dropped when the test ends.
// Without a server the test is skipped loudly, or fails under CI=true.
func postgres(t *testing.T) (url, schema string) {
	t.Helper()
	url = os.Getenv("SENDONCE_TEST_POSTGRES")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and no PostgreSQL at %s: %v", url, err)
		}
		t.Skipf("SKIPPED: no PostgreSQL at %s (%v): set SENDONCE_TEST_POSTGRES=postgres://...", url, err)
	}
	defer conn.Close(ctx)
	b := make([]byte, 6)
	rand.Read(b)
	schema = "sendonce_sched_" + hex.EncodeToString(b)
	if _, err := conn.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn, err := pgx.Connect(context.Background(), url)
		if err != nil {
			return
		}
		defer conn.Close(context.Background())
		conn.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+schema+" CASCADE")
	})
	return url, schema
}

// A SQL recipient source: each row is a recipient, every column is
// template data, and a resumed fire continues after the cursor's row.
func TestSQLSource(t *testing.T) {
	url, schema := postgres(t)
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(t.Context(), fmt.Sprintf(`CREATE TABLE %s.users (id int PRIMARY KEY, email text, first_name text, plan text);
		INSERT INTO %s.users SELECT i, 'u' || lpad(i::text, 4, '0') || '@example.com', 'User ' || i, CASE WHEN i %% 2 = 0 THEN 'gold' END
		FROM generate_series(0, 24) i`, schema, schema)); err != nil {
		t.Fatal(err)
	}
	src := &SQLSource{URL: url, Query: fmt.Sprintf("SELECT email, first_name AS name, plan FROM %s.users ORDER BY id;", schema)}
	rd, err := src.Open(t.Context(), "20")
	if err != nil {
		t.Fatal(err)
	}
	rows, cursor, err := rd.Next(t.Context(), 100)
	rd.Close()
	if err != nil || len(rows) != 5 || rows[0].Address != "u0020@example.com" || cursor != "25" || rows[0].Data["name"] != "User 20" {
		t.Fatalf("resumed at row 20: %d rows, cursor %q, %v, first %+v", len(rows), cursor, err, rows)
	}

	e := newEnv(t, utc("2030-05-01T09:00:10Z"))
	sc := e.schedule("sql", "0 9 * * *", e.recipients("unused.jsonl", 1), time.UTC)
	sc.Source = src
	e.scheduler("node-1", sc).Tick(t.Context())
	f := e.fires("sql")[0]
	if f.State != store.FireDone || f.Admitted != 25 || f.Cursor != "25" {
		t.Fatalf("fire from SQL: %+v", f)
	}
	e.wantAllOnce(f.Key, 25)

	bad := &SQLSource{URL: url, Query: "SELECT id FROM " + schema + ".users"}
	rd, err = bad.Open(t.Context(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	if _, _, err := rd.Next(t.Context(), 10); err == nil || err == io.EOF {
		t.Fatalf("rows without an email column: %v", err)
	}
}

// Three scheduler instances, each with its own PostgreSQL store (its own
// pool, as on three nodes), tick one schedule at once over two minutes of
// a fake clock. One instance dies in the middle of a fire (after admitting
// a batch, before recording it); after its lease expires another instance
// resumes the fire. Every fire is done, with every recipient once.
func TestThreeNodesOnPostgres(t *testing.T) {
	url, schema := postgres(t)
	if err := pgstore.Migrate(t.Context(), url, pgstore.Options{Schema: schema}); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, utc("2030-05-01T09:00:00Z"))
	path := e.recipients("r.jsonl", 30)
	var nodes []*Scheduler
	var stores []*pgstore.Store
	for i := range 3 {
		st, err := pgstore.Open(t.Context(), url, pgstore.Options{Schema: schema})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		stores = append(stores, st)
		client, err := sendonce.New(sendonce.Config{Store: st, Now: e.clock.Now})
		if err != nil {
			t.Fatal(err)
		}
		var sub Submitter = client
		var fs store.FireStore = st
		if i == 0 { // dies in the first fire it runs, after admitting its second batch
			d := &deadNode{FireStore: st}
			sub, fs = &crashingSubmitter{next: client, after: 2, crash: func() { d.dead.Store(true) }}, d
		}
		s, err := New(Config{Store: fs, Submitter: sub, Schedules: []Schedule{e.schedule("often", "*/10 * * * * *", path, time.UTC)},
			Owner: fmt.Sprintf("node-%d", i), Clock: e.clock, BatchSize: 7, Lease: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, s)
	}
	for range 12 {
		var wg sync.WaitGroup
		for _, n := range nodes {
			wg.Go(func() { n.Tick(t.Context()) })
		}
		wg.Wait()
		e.clock.Add(10 * time.Second)
	}
	fs, err := stores[1].ListFires(t.Context(), store.FireFilter{Schedule: "often", Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if len(fs) != 18 { // 08:59:00..09:00:00 on time at the first tick, and eleven more
		t.Fatalf("%d fires, want 18", len(fs))
	}
	resumed := 0
	for _, f := range fs {
		if f.State != store.FireDone || f.Admitted+f.Duplicates < 30 {
			t.Fatalf("fire %+v", f)
		}
		if f.Attempts > 1 {
			resumed++
			// The dead node's second batch was admitted, not recorded:
			// the node that took over admitted it again, as duplicates.
			if f.Duplicates != 7 || f.Owner == "node-0" {
				t.Fatalf("resumed fire %+v: want 7 duplicates, finished by another node", f)
			}
		}
		for i := range 30 {
			addr := fmt.Sprintf("u%04d@example.com", i)
			if _, err := stores[2].Get(t.Context(), sendonce.DefaultTenant, EmailKey(f.Key, addr)); err != nil {
				t.Fatalf("fire %s: %s has no email: %v", f.Key, addr, err)
			}
		}
	}
	if resumed != 1 {
		t.Fatalf("%d fires were resumed after the crash, want 1", resumed)
	}
	var n int
	if err := stores[0].Ping(t.Context()); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := conn.QueryRow(t.Context(), "SELECT count(*) FROM "+schema+".sendonce_emails").Scan(&n); err != nil || n != 18*30 {
		t.Fatalf("%d emails in the ledger (%v), want %d: one per recipient per fire", n, err, 18*30)
	}
}

// deadNode is the fire store as a killed node sees it: after the crash,
// nothing it writes arrives. Its fire stays running until the lease
// expires, as after a SIGKILL.
type deadNode struct {
	store.FireStore
	dead atomic.Bool
}

var errDead = errors.New("this node is dead")

func (d *deadNode) ClaimFire(ctx context.Context, c store.FireClaim) (store.Fire, error) {
	if d.dead.Load() {
		return store.Fire{}, errDead
	}
	return d.FireStore.ClaimFire(ctx, c)
}

func (d *deadNode) RenewFire(ctx context.Context, l store.FireLease, now time.Time, dur time.Duration) error {
	if d.dead.Load() {
		return errDead
	}
	return d.FireStore.RenewFire(ctx, l, now, dur)
}

func (d *deadNode) ProgressFire(ctx context.Context, p store.FireProgress) error {
	if d.dead.Load() {
		return errDead
	}
	return d.FireStore.ProgressFire(ctx, p)
}

func (d *deadNode) FinishFire(ctx context.Context, f store.FireFinish) error {
	if d.dead.Load() {
		return errDead
	}
	return d.FireStore.FinishFire(ctx, f)
}
