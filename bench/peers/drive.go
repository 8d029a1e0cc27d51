package main

import (
	"bufio"
	"context"
	"errors"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Row is one measured phase: one system, one mode.
type Row struct {
	System string `json:"system"`
	Store  string `json:"store"`
	Mode   string `json:"mode"`
	// Ops counts acknowledged items (a batch of 100 is 100 ops), new or
	// duplicate.
	Ops        int64   `json:"ops"`
	Seconds    float64 `json:"seconds"`
	Throughput float64 `json:"ops_per_s"`
	// Latencies are per call: one item, or one batch in batch modes.
	P50Ms float64 `json:"p50_ms"`
	P99Ms float64 `json:"p99_ms"`
	MaxMs float64 `json:"max_ms"`
	// CPUSeconds is this process's user+system CPU during the phase (the
	// client side only: the servers run in their own processes).
	CPUSeconds float64 `json:"cpu_s"`
	// HostCPUSeconds is the busy CPU time of the whole machine during the
	// phase (/proc/stat): client, server and anything else running.
	HostCPUSeconds float64 `json:"host_cpu_s"`
	// Dups counts the items the system answered as duplicates; Expected is
	// how many of the submitted items repeated a key already acknowledged.
	Dups     int64 `json:"dups"`
	Expected int64 `json:"expected_dups"`
	// Stored counts the jobs or emails found in the store after the phase
	// (-1 when not counted): it must equal Ops - Dups.
	Stored  int64  `json:"stored"`
	Durable bool   `json:"durable"`
	Note    string `json:"note,omitempty"`
	Err     string `json:"error,omitempty"`
}

// op does one call for worker w: it submits the items keys names and
// returns how many of them the system answered as duplicates.
type op func(ctx context.Context, keys []string) (dups int, err error)

// keyer hands out the phase's keys. With dup set, every worker submits each
// of its keys twice in a row: once new, then again right after the first
// was acknowledged, as a broker's redelivery would.
type keyer struct {
	prefix string
	dup    bool
	seq    atomic.Int64
	last   []string // per worker: the key to repeat next, in dup mode
}

func newKeyer(prefix string, workers int, dup bool) *keyer {
	return &keyer{prefix: prefix, dup: dup, last: make([]string, workers)}
}

// next fills keys for worker w and returns how many of them repeat a key.
func (k *keyer) next(w int, keys []string) (repeats int) {
	if k.dup && len(keys) == 1 {
		if k.last[w] != "" {
			keys[0], k.last[w] = k.last[w], ""
			return 1
		}
		keys[0] = k.prefix + strconv.FormatInt(k.seq.Add(1), 10)
		k.last[w] = keys[0]
		return 0
	}
	end := k.seq.Add(int64(len(keys)))
	for i := range keys {
		keys[i] = k.prefix + strconv.FormatInt(end-int64(len(keys))+int64(i)+1, 10)
	}
	return 0
}

// drive runs conc workers, each calling f with batch keys at a time until
// d has passed, and measures the phase. The first error stops every worker.
func drive(ctx context.Context, conc, batch int, d time.Duration, k *keyer, f op) (Row, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var ru0 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	host0 := hostBusy()
	start := time.Now()
	deadline := start.Add(d)
	var (
		mu        sync.Mutex
		lats      []time.Duration
		ops, dups atomic.Int64
		expected  atomic.Int64
		firstErr  error
		errOnce   sync.Once
		wg        sync.WaitGroup
	)
	for w := range conc {
		wg.Go(func() {
			mine := make([]time.Duration, 0, 4096)
			defer func() {
				mu.Lock()
				lats = append(lats, mine...)
				mu.Unlock()
			}()
			keys := make([]string, batch)
			for ctx.Err() == nil && time.Now().Before(deadline) {
				reps := k.next(w, keys)
				t0 := time.Now()
				n, err := f(ctx, keys)
				if err != nil {
					if ctx.Err() == nil {
						errOnce.Do(func() { firstErr = err })
					}
					cancel()
					return
				}
				mine = append(mine, time.Since(t0))
				ops.Add(int64(len(keys)))
				dups.Add(int64(n))
				expected.Add(int64(reps))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	row := Row{
		Ops:            ops.Load(),
		Dups:           dups.Load(),
		Expected:       expected.Load(),
		Seconds:        elapsed.Seconds(),
		Throughput:     float64(ops.Load()) / elapsed.Seconds(),
		CPUSeconds:     tv(ru.Utime) + tv(ru.Stime) - tv(ru0.Utime) - tv(ru0.Stime),
		HostCPUSeconds: hostBusy() - host0,
		Stored:         -1,
	}
	if len(lats) > 0 {
		slices.Sort(lats)
		row.P50Ms = ms(lats[len(lats)*50/100])
		row.P99Ms = ms(lats[min(len(lats)-1, len(lats)*99/100)])
		row.MaxMs = ms(lats[len(lats)-1])
	}
	if firstErr != nil {
		return row, firstErr
	}
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return row, err
	}
	return row, nil
}

func tv(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// hostBusy returns the machine's busy CPU seconds since boot: every state
// of /proc/stat's cpu line but idle and iowait, in USER_HZ (100 on Linux).
// 0 where /proc/stat cannot be read.
func hostBusy() float64 {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return 0
	}
	fields := strings.Fields(sc.Text())
	if len(fields) < 5 || fields[0] != "cpu" {
		return 0
	}
	var busy int64
	for i, s := range fields[1:] {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0
		}
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i >= 8 { // guest time is already counted in user
			break
		}
		busy += v
	}
	return float64(busy) / 100
}
