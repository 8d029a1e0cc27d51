package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/sendonce/sendonce/internal/bench"
)

// TestBenchCommand checks the command's table and JSON output; it asserts
// no time.
func TestBenchCommand(t *testing.T) {
	for _, asJSON := range []bool{false, true} {
		var out, errb bytes.Buffer
		root := newRoot(&out, &errb)
		args := []string{"bench", "--path", "library", "--duration", "200ms", "--concurrency", "4", "--size", "512", "--dir", t.TempDir()}
		if asJSON {
			args = append(args, "--json")
		}
		root.SetArgs(args)
		if err := root.ExecuteContext(context.Background()); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, errb.String())
		}
		if !asJSON {
			for _, want := range []string{"throughput/s", "ceiling-sqlite-insert", "ceiling-fsync-append", "ratio"} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("table lacks %q:\n%s", want, out.String())
				}
			}
			continue
		}
		var rep bench.Report
		if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
			t.Fatalf("%v\n%s", err, out.String())
		}
		if len(rep.Rows) != 3 || rep.Rows[0].Throughput <= 0 || rep.Rows[0].Ratio <= 0 {
			t.Errorf("report = %+v", rep)
		}
	}
}
