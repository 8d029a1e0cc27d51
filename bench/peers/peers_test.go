package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestKeyerDupRepeatsEachKeyOnceRightAfter(t *testing.T) {
	k := newKeyer("k-", 2, true)
	keys := make([]string, 1)
	var got []string
	var reps int
	for range 4 {
		reps += k.next(0, keys)
		got = append(got, keys[0])
	}
	want := []string{"k-1", "k-1", "k-2", "k-2"}
	if strings.Join(got, ",") != strings.Join(want, ",") || reps != 2 {
		t.Fatalf("worker 0 got %v with %d repeats; want %v with 2", got, reps, want)
	}
	if k.next(1, keys); keys[0] != "k-3" {
		t.Fatalf("worker 1's first key is %q; want a new key k-3", keys[0])
	}
}

func TestKeyerBatchesAreUnique(t *testing.T) {
	k := newKeyer("k-", 1, false)
	seen := map[string]bool{}
	keys := make([]string, 3)
	for range 3 {
		if reps := k.next(0, keys); reps != 0 {
			t.Fatalf("unique mode reported %d repeats", reps)
		}
		for _, key := range keys {
			if seen[key] {
				t.Fatalf("key %q handed out twice", key)
			}
			seen[key] = true
		}
	}
}

func TestBadFlagsNameTheFlag(t *testing.T) {
	for _, tc := range []struct{ args, want string }{
		{"-concurrency 0", "-concurrency"},
		{"-batch -1", "-batch"},
		{"-only rabbit", "-only"},
		{"-asynq-unique maybe", "-asynq-unique"},
		{"-pg mysql://x", "-pg"},
		{"-modes single,twice", "-modes"},
	} {
		var out, errw bytes.Buffer
		err := run(strings.Fields(tc.args), &out, &errw)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v; want one naming %s", tc.args, err, tc.want)
		}
	}
}

// TestSmokeSQLite runs the program end to end on the one system that needs
// no server, briefly, and checks its JSON report.
func TestSmokeSQLite(t *testing.T) {
	var out, errw bytes.Buffer
	args := []string{"-only", "sendonce-sqlite", "-duration", "200ms", "-concurrency", "4", "-batch", "3", "-size", "512", "-dir", t.TempDir(), "-json"}
	if err := run(args, &out, &errw); err != nil {
		t.Fatalf("run: %v\n%s", err, errw.String())
	}
	var rep Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out.String())
	}
	if len(rep.Rows) != 3 {
		t.Fatalf("got %d rows; want single, batch and dup: %+v", len(rep.Rows), rep.Rows)
	}
	for _, r := range rep.Rows {
		if r.Err != "" || r.Ops == 0 {
			t.Errorf("%s: %d ops, error %q", r.Mode, r.Ops, r.Err)
		}
		if c := check(r); c != "" {
			t.Errorf("%s:%s", r.Mode, c)
		}
	}
	if rep.Rows[2].Dups == 0 {
		t.Errorf("dup mode answered no duplicates: %+v", rep.Rows[2])
	}
}
