package bench

import (
	"context"
	"testing"
	"time"
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
