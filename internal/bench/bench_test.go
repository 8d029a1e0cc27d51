package bench

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// TestSmoke runs every path briefly with few callers: a functional check
// that each measures something and compares it with its ceiling. It asserts
// no time and no rate beyond "more than zero".
func TestSmoke(t *testing.T) {
	for _, path := range Paths {
		t.Run(path, func(t *testing.T) {
			rep, err := Run(context.Background(), Options{Path: path, Duration: 300 * time.Millisecond, Concurrency: 4, Size: 1024, Dir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Rows) < 2 {
				t.Fatalf("rows = %+v, want the path and its ceiling", rep.Rows)
			}
			for _, r := range rep.Rows {
				if r.Ops <= 0 || r.Throughput <= 0 {
					t.Errorf("row %s measured nothing: %+v", r.Path, r)
				}
			}
			if r := rep.Rows[0]; r.Ceiling == "" || r.Ratio <= 0 {
				t.Errorf("row %s has no ratio to a ceiling: %+v", r.Path, r)
			}
		})
	}
}

// TestSmokePostgres runs the library path on PostgreSQL: sendonce's
// admissions and the bare batched INSERT ceiling, in a fresh schema.
func TestSmokePostgres(t *testing.T) {
	url := os.Getenv("SENDONCE_TEST_POSTGRES")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	conn, err := pgx.Connect(context.Background(), url)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no PostgreSQL at %s (CI=true requires one): %v", url, err)
		}
		t.Skipf("SKIPPED: no PostgreSQL at %s: set SENDONCE_TEST_POSTGRES=postgres://... (%v)", url, err)
	}
	conn.Close(context.Background())
	rep, err := Run(context.Background(), Options{Path: PathLibrary, Store: url, Duration: 300 * time.Millisecond, Concurrency: 4, Size: 1024, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Rows) != 2 || rep.Rows[1].Path != "ceiling-pg-batched-insert" || rep.Rows[1].Ops <= 0 || rep.Rows[0].Ratio <= 0 {
		t.Fatalf("rows = %+v, want sendonce on PostgreSQL and its batched-insert ceiling", rep.Rows)
	}
}

// TestSmokeRateAndProfile: a paced e2e run submits about rate x duration
// emails (never more than its schedule holds) and writes a CPU profile.
func TestSmokeRateAndProfile(t *testing.T) {
	var prof bytes.Buffer
	rep, err := Run(context.Background(), Options{Path: PathE2E, Duration: 500 * time.Millisecond, Concurrency: 8, Size: 1024,
		Dir: t.TempDir(), Rate: 200, Workers: 4, CPUProfile: &prof})
	if err != nil {
		t.Fatal(err)
	}
	if n := rep.Rows[0].Ops; n <= 0 || n > 100 {
		t.Errorf("delivered %d emails at 200/s for 0.5s, want 1..100", n)
	}
	if prof.Len() == 0 {
		t.Error("no CPU profile written")
	}
	if _, err := Run(context.Background(), Options{Path: PathLibrary, Rate: 10}); err == nil {
		t.Error("--rate on the library path was accepted; it applies to e2e only")
	}
}

// TestSmokePrefill: --prefill measures a ledger of that many records
// against one of 10,000, and the prefilled records are really there.
func TestSmokePrefill(t *testing.T) {
	dir := t.TempDir()
	var prof bytes.Buffer
	rep, err := Run(context.Background(), Options{Path: PathLibrary, Prefill: 20_000, Duration: 300 * time.Millisecond, Concurrency: 4, Size: 1024, Dir: dir, CPUProfile: &prof})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Rows) != 2 || rep.Rows[0].Path != "library@20000" || rep.Rows[0].Ceiling != "library@10000" || rep.Rows[0].Ratio <= 0 {
		t.Fatalf("rows = %+v", rep.Rows)
	}
	st, err := sqlitestore.Open(context.Background(), filepath.Join(dir, "scale-20000"), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, err := st.Counts(context.Background(), "default")
	if err != nil {
		t.Fatal(err)
	}
	// One profile (one gzip stream), of the large ledger's phase: two
	// concatenated would not parse.
	zr, err := gzip.NewReader(&prof)
	if err != nil {
		t.Fatalf("the CPU profile is not gzip: %v", err)
	}
	zr.Multistream(false)
	if _, err := io.Copy(io.Discard, zr); err != nil {
		t.Fatal(err)
	}
	if prof.Len() != 0 {
		t.Errorf("%d bytes after the CPU profile: more than one profile was written", prof.Len())
	}
	if c[store.StateSent] != 20_000 {
		t.Errorf("the prefilled ledger has %d sent records, want 20000 (%+v)", c[store.StateSent], c)
	}
}
