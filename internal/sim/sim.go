// Package sim is a deterministic, seed-replayable simulation of the
// dispatcher protocol (claim → renew → commit marker → irreversible step →
// outcome, and the operator's resolve of in-doubt emails) against a real
// store.Store (sqlitestore).
//
// Unlike storetest's simulation, which compares one store with a model of the
// store contract, this one simulates the protocol around it: several workers,
// each a small explicit state machine mirroring internal/dispatch's attempt,
// with their own skewed clocks, GC-like pauses and crashes; a fake global
// clock the scheduler advances; a simulated upstream (the sink) that records
// what it actually received, with answers drawn from a seeded distribution
// (250, 4xx/5xx before or after the final dot, a drop after the dot, no reply,
// slow replies); interleaved admissions and duplicate submissions; and an
// operator who resolves in-doubt emails. Everything runs on one goroutine
// and draws from one seeded generator, so a seed replays exactly.
//
// Invariants, checked after every step:
//
//  1. At most one delivery per key at the sink, plus at most one more per
//     resend of that key after it was in_doubt (the only allowed duplicate).
//  2. No write with a stale fence is accepted: a write under a fence that is
//     no longer the record's returns store.ErrLeaseLost and leaves the record
//     unchanged; and no worker performs the irreversible step without an
//     accepted marker under its fence.
//  3. A record is sent only if the sink has it, failed only after a permanent
//     answer or exhausted retries, and never leaves a final state.
//  4. After a quiescence phase (no faults, clock past every lease, the queue
//     drained, the operator resolving every in-doubt email) every admitted key
//     is sent or failed, and every sent key is at the sink.
//
// Two more checks ride along: a claimed record always carries the
// Message-ID and bytes it was admitted with (a conflicting resubmission is
// answered as a conflict, never an overwrite), and a record changes only
// through a call that may change it.
//
// go test runs a fixed range of seeds: 500 (about 15 s of CPU), or 30 under
// -race (the pure-Go SQLite store is about 20 times slower there; about 15 s
// on two idle cores):
//
//	go test -race -run TestSimulationSeeds ./internal/sim
//
// Millions of seeds on demand (SENDONCE_SIM_FIRST moves the range, to split
// a long run across machines):
//
//	SENDONCE_SIM_SEEDS=1000000 go test -run TestSimulationSeeds -timeout 0 ./internal/sim
//
// A failure names its seed and step and shows the last 50 trace lines.
// Replay one seed verbosely, printing its whole trace:
//
//	SENDONCE_SIM_SEED=1234 go test -v -run TestSimulationSeeds ./internal/sim
//
// A seed replays identically whether it runs on a fresh store or on one
// shared with other runs (each run has a tenant of its own), and the
// simulation can fail: TestBrokenWorkersAreCaught runs deliberately wrong
// workers (one that performs the irreversible step after a refused marker,
// one that retries an ambiguous outcome instead of holding it in_doubt) and
// TestBrokenStoreIsCaught a store that accepts stale completions; each must
// be caught within 20 seeds.
package sim

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// Config shapes one run. Zero fields take the defaults noted.
type Config struct {
	Workers     int           // simulated workers, default 3
	Keys        int           // distinct keys admitted, default 8
	Steps       int           // scheduler steps before quiescence, default 200
	CrashRate   float64       // chance a step crashes a worker, default 0.03
	PauseRate   float64       // chance a step pauses a worker, default 0.04
	DupRate     float64       // chance an admission resubmits an existing key, default 0.3
	Lease       time.Duration // default 30s
	LeaseMargin time.Duration // default Lease/4
	MaxSkew     time.Duration // per-worker wall-clock offset bound, default Lease/20
	MaxAttempts int           // default 4
	BackoffBase time.Duration // default 5s
	BackoffMax  time.Duration // default 1m

	// Store, if set, is used instead of a fresh sqlitestore; the run uses a
	// tenant of its own. Records of other tenants must all be final (Claim
	// is not per tenant).
	Store store.Store
	// Dir is where a fresh store is opened when Store is nil: default a
	// temporary directory on /dev/shm if it exists. The run removes it.
	Dir string
	// Trace, if set, receives every trace line.
	Trace func(string)

	broken brokenMode // test-only: a deliberately wrong worker
	// noMarkerCheck (test-only) drops the direct check that the
	// irreversible step follows an accepted marker, so that only what the
	// sink and the records show can catch a broken worker.
	noMarkerCheck bool
}

// brokenMode selects a deliberately wrong worker, to show the invariants
// catch it.
type brokenMode int

const (
	correct brokenMode = iota
	// sendDespiteMarker performs the irreversible step even when the commit
	// marker was refused.
	sendDespiteMarker
	// retryAmbiguous treats an ambiguous outcome as temporary and retries
	// it without any resolution.
	retryAmbiguous
)

func (c Config) withDefaults() Config {
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	defD := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	def(&c.Workers, 3)
	def(&c.Keys, 8)
	def(&c.Steps, 200)
	def(&c.MaxAttempts, 4)
	if c.CrashRate == 0 {
		c.CrashRate = 0.03
	}
	if c.PauseRate == 0 {
		c.PauseRate = 0.04
	}
	if c.DupRate == 0 {
		c.DupRate = 0.3
	}
	defD(&c.Lease, 30*time.Second)
	defD(&c.LeaseMargin, c.Lease/4)
	defD(&c.MaxSkew, c.Lease/20)
	defD(&c.BackoffBase, 5*time.Second)
	defD(&c.BackoffMax, time.Minute)
	return c
}

// Report summarizes one run.
type Report struct {
	Seed                uint64
	Steps               int // scheduler steps, quiescence included
	Admitted            int // distinct keys
	DuplicateAdmits     int // resubmissions answered as duplicates
	Claims              int
	Markers             int // commit markers accepted
	Deliveries          int // messages the sink received
	AllowedDuplicates   int // deliveries beyond the first, each after a resend of an in-doubt key
	InDoubt             int // Complete(InDoubt) accepted, plus in_doubt found by the operator
	Resends             int // operator resend actions
	ResendsOfDelivered  int // resends of a key the sink already had
	MarkSent            int // operator mark_sent actions
	Sent, Failed        int // final states at the end
	Crashes, Pauses     int
	StaleWritesRejected int // writes under a stale fence refused with ErrLeaseLost
	MarkersRefused      int // MarkCommitting refused: the irreversible step was skipped
	LateAnswers         int // a definite answer recorded on a record the lease expiry put in_doubt
	TraceHash           uint64
}

func (r Report) String() string {
	return fmt.Sprintf("seed=%d steps=%d admitted=%d dupAdmits=%d claims=%d markers=%d deliveries=%d allowedDup=%d inDoubt=%d resends=%d (of delivered %d) markSent=%d sent=%d failed=%d crashes=%d pauses=%d staleRejected=%d markersRefused=%d late=%d",
		r.Seed, r.Steps, r.Admitted, r.DuplicateAdmits, r.Claims, r.Markers, r.Deliveries, r.AllowedDuplicates, r.InDoubt, r.Resends, r.ResendsOfDelivered, r.MarkSent, r.Sent, r.Failed, r.Crashes, r.Pauses, r.StaleWritesRejected, r.MarkersRefused, r.LateAnswers)
}

// Failure is the error Run returns when an invariant breaks.
type Failure struct {
	Seed  uint64
	Step  int
	Msg   string
	Trace []string // the last steps, oldest first
}

func (f *Failure) Error() string {
	return fmt.Sprintf("sim: seed %d step %d: %s\nreplay: SENDONCE_SIM_SEED=%d go test -v -run TestSimulationSeeds ./internal/sim\nlast %d trace lines:\n  %s",
		f.Seed, f.Step, f.Msg, f.Seed, len(f.Trace), strings.Join(f.Trace, "\n  "))
}

// Epoch is the simulated clock's start.
var Epoch = time.Date(2031, time.January, 2, 3, 4, 5, 0, time.UTC)

const traceKeep = 50

// tenantSeq makes every run's tenant unique within a process, so runs can
// share a store. It does not appear in traces.
var tenantSeq atomic.Int64

// Run simulates seed under cfg. It returns a *Failure when an invariant
// breaks, another error when the store itself fails.
func Run(seed uint64, cfg Config) (Report, error) {
	cfg = cfg.withDefaults()
	ctx := context.Background()
	st := cfg.Store
	if st == nil {
		dir := cfg.Dir
		if dir == "" {
			base := ""
			if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
				base = "/dev/shm"
			}
			d, err := os.MkdirTemp(base, "sendonce-sim-")
			if err != nil {
				return Report{}, err
			}
			dir = d
		}
		defer os.RemoveAll(dir)
		s, err := sqlitestore.Open(ctx, filepath.Join(dir, "db"), sqlitestore.Options{})
		if err != nil {
			return Report{}, err
		}
		defer s.Close()
		st = s
	}
	s := &sim{
		cfg:    cfg,
		ctx:    ctx,
		st:     st,
		rng:    rand.New(rand.NewPCG(seed, seed^0x5e4d0ce5)),
		now:    Epoch,
		tenant: fmt.Sprintf("sim-%d-%d", seed, tenantSeq.Add(1)),
		keys:   map[string]*keyInfo{},
		snap:   map[string]store.Record{},
		hash:   fnv.New64a(),
	}
	s.rep.Seed = seed
	for i := 0; i < cfg.Workers; i++ {
		s.workers = append(s.workers, s.newWorker(i))
	}
	err := s.run()
	s.rep.Steps = s.step
	s.rep.TraceHash = s.hash.Sum64()
	var f *Failure
	if errors.As(err, &f) {
		f.Seed = seed
	}
	return s.rep, err
}

// add sums the counters of r into t (for totals over many seeds).
func (t *Report) add(r Report) {
	t.Steps += r.Steps
	t.Admitted += r.Admitted
	t.DuplicateAdmits += r.DuplicateAdmits
	t.Claims += r.Claims
	t.Markers += r.Markers
	t.Deliveries += r.Deliveries
	t.AllowedDuplicates += r.AllowedDuplicates
	t.InDoubt += r.InDoubt
	t.Resends += r.Resends
	t.ResendsOfDelivered += r.ResendsOfDelivered
	t.MarkSent += r.MarkSent
	t.Sent += r.Sent
	t.Failed += r.Failed
	t.Crashes += r.Crashes
	t.Pauses += r.Pauses
	t.StaleWritesRejected += r.StaleWritesRejected
	t.MarkersRefused += r.MarkersRefused
	t.LateAnswers += r.LateAnswers
}
