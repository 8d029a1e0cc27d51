package sim

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// openStore opens a fresh store on /dev/shm when it exists (fsync is cheap
// there), else in a temporary directory. dispose closes and removes it; it
// also runs at the end of the test.
func openStore(t testing.TB) (st *sqlitestore.Store, dispose func()) {
	base := ""
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		base = "/dev/shm"
	}
	dir, err := os.MkdirTemp(base, "sendonce-sim-test-")
	if err != nil {
		t.Fatal(err)
	}
	st, err = sqlitestore.Open(context.Background(), filepath.Join(dir, "db"), sqlitestore.Options{})
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	var once sync.Once
	dispose = func() {
		once.Do(func() {
			st.Close()
			os.RemoveAll(dir)
		})
	}
	t.Cleanup(dispose)
	return st, dispose
}

func envUint(t *testing.T, name string) (uint64, bool) {
	v := os.Getenv(name)
	if v == "" {
		return 0, false
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return n, true
}

func TestSimulationSeeds(t *testing.T) {
	if seed, ok := envUint(t, "SENDONCE_SIM_SEED"); ok {
		rep, err := Run(seed, Config{Trace: func(l string) { t.Log(l) }})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s", rep)
		return
	}
	n := uint64(defaultSeeds)
	if v, ok := envUint(t, "SENDONCE_SIM_SEEDS"); ok {
		n = v
	}
	first, _ := envUint(t, "SENDONCE_SIM_FIRST")
	// One store for many seeds, each seed with a tenant of its own: opening
	// a store per seed costs more than the run. Seeds run one after the
	// other: running two side by side on two cores measured slower (the
	// simulation already hands off to the store's writer goroutine).
	// The store is replaced every storeSeeds seeds: a store that grows
	// (records, WAL) slows every seed down.
	const storeSeeds = 100
	var (
		st      *sqlitestore.Store
		dispose = func() {}
	)
	defer func() { dispose() }()
	start := time.Now()
	var tot Report
	for seed := first; seed < first+n; seed++ {
		if (seed-first)%storeSeeds == 0 {
			dispose()
			st, dispose = openStore(t)
		}
		rep, err := Run(seed, Config{Store: st})
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		tot.add(rep)
		if done := seed - first + 1; done%10000 == 0 {
			t.Logf("%d seeds in %s", done, time.Since(start).Round(time.Millisecond))
		}
	}
	t.Logf("%d seeds (%d..%d) in %s; totals: %s", n, first, first+n-1, time.Since(start).Round(time.Millisecond), tot)
}

func TestDeterministic(t *testing.T) {
	st, _ := openStore(t)
	for _, seed := range []uint64{1, 42} {
		var t1, t2 []string
		r1, err1 := Run(seed, Config{Store: st, Trace: func(l string) { t1 = append(t1, l) }})
		r2, err2 := Run(seed, Config{Store: st, Trace: func(l string) { t2 = append(t2, l) }})
		if err1 != nil || err2 != nil {
			t.Fatalf("seed %d: %v / %v", seed, err1, err2)
		}
		for i := range min(len(t1), len(t2)) {
			if t1[i] != t2[i] {
				t.Fatalf("seed %d: traces differ at line %d:\n%s\n%s", seed, i, t1[i], t2[i])
			}
		}
		if len(t1) != len(t2) {
			t.Fatalf("seed %d: traces have %d and %d lines", seed, len(t1), len(t2))
		}
		if r1 != r2 {
			t.Fatalf("seed %d: reports differ:\n%+v\n%+v", seed, r1, r2)
		}
	}
	// A fresh store gives the same run as a shared one.
	r3, err := Run(7, Config{})
	if err != nil {
		t.Fatal(err)
	}
	r4, _ := Run(7, Config{Store: st})
	if r3 != r4 {
		t.Fatalf("fresh and shared store differ:\n%s\n%s", r3, r4)
	}
}

// TestBrokenWorkersAreCaught shows the simulation can fail: deliberately
// wrong workers must be caught within a few seeds, by the invariant named.
func TestBrokenWorkersAreCaught(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string // in the violation
	}{
		{"send despite refused marker", Config{broken: sendDespiteMarker}, "without an accepted marker"},
		// The same bug with the direct check off: the sink catches it.
		{"send despite refused marker, judged by the sink", Config{broken: sendDespiteMarker, noMarkerCheck: true}, "delivered 2 times"},
		{"retry ambiguous without resolution", Config{broken: retryAmbiguous}, "delivered 2 times"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const limit = 20
			for seed := uint64(0); seed < limit; seed++ {
				// A fresh store per seed (cfg.Store nil): a failed run
				// leaves records behind that a shared store's next run
				// would claim.
				_, err := Run(seed, tc.cfg)
				var f *Failure
				if errors.As(err, &f) {
					t.Logf("caught at seed %d step %d: %s", seed, f.Step, f.Msg)
					if !strings.Contains(f.Msg, tc.want) {
						t.Errorf("caught by another invariant than expected (%q)", tc.want)
					}
					if f.Seed != seed || len(f.Trace) == 0 || !strings.Contains(err.Error(), "SENDONCE_SIM_SEED=") {
						t.Errorf("failure lacks its seed, trace or replay line: %v", err)
					}
					return
				}
				if err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
			}
			t.Fatalf("the broken worker was not caught in %d seeds", limit)
		})
	}
}

// lyingStore reports success for refused completions: the simulation must
// notice that a write under a stale fence was "accepted".
type lyingStore struct{ *sqlitestore.Store }

func (s lyingStore) Complete(ctx context.Context, c store.Completion) error {
	if err := s.Store.Complete(ctx, c); err != nil && !errors.Is(err, store.ErrLeaseLost) {
		return err
	}
	return nil
}

func TestBrokenStoreIsCaught(t *testing.T) {
	for seed := uint64(0); seed < 20; seed++ {
		st, dispose := openStore(t)
		_, err := Run(seed, Config{Store: lyingStore{st}})
		dispose()
		var f *Failure
		if errors.As(err, &f) {
			t.Logf("caught at seed %d step %d: %s", seed, f.Step, f.Msg)
			if !strings.Contains(f.Msg, "stale fence") {
				t.Errorf("caught by another invariant than expected: %s", f.Msg)
			}
			return
		}
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
	}
	t.Fatal("a store accepting stale completions was not caught in 20 seeds")
}
