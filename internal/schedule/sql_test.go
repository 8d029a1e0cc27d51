package schedule

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce/store"
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
