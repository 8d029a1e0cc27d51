// Package bench is the load generator behind `sendonce bench`: it drives one
// front door (the library, the HTTP API, SMTP submission, or end to end to
// an SMTP sink or maildir) with concurrent callers for a fixed duration, and
// measures in the same run, on the same disk, the ceiling of that path: what
// the bare mechanism underneath (a group-committed SQLite insert loop, fsync'd
// appends, a batched PostgreSQL INSERT, a bare SMTP client-to-sink loop)
// manages with the same callers. The ratio of the two is what sendonce costs.
//
// Everything listens on 127.0.0.1 and stops before Run returns. Nothing here
// asserts a time: the numbers are reported, never checked.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
)

// The paths Run knows.
const (
	PathLibrary   = "library"
	PathHTTP      = "http"
	PathHTTPBatch = "http-batch"
	PathSMTP      = "smtp"
	PathE2E       = "e2e"
)

// Paths lists every path, in the order the help shows them.
var Paths = []string{PathLibrary, PathHTTP, PathHTTPBatch, PathSMTP, PathE2E}

// HTTPBatchSize is how many emails one POST /v1/emails/batch carries.
const HTTPBatchSize = 100

// Options configures one run.
type Options struct {
	Path string
	// Duration caps each measured phase (the path and each ceiling).
	// Default 10s.
	Duration time.Duration
	// Concurrency is the number of concurrent callers. Default 256.
	Concurrency int
	// Store is empty for a fresh SQLite ledger in Dir, or a postgres:// URL
	// (library path only): a fresh schema is created and dropped at the end.
	Store string
	// Dir is where the SQLite ledgers, maildirs and ceiling files go: the
	// disk being measured. Default: a new directory under os.TempDir,
	// removed at the end.
	Dir string
	// Size is the size of each email's body in bytes. Default 4096.
	Size int
	// Sink is where e2e delivers: "smtp" (default, a local SMTP sink the
	// bench starts) or "maildir".
	Sink string
	// Rate (e2e only), when positive, paces the measured path's submissions at this
	// many per second in all (an open loop: a late caller does not slow
	// the schedule), instead of as fast as the callers go. The e2e path
	// with a rate its dispatcher sustains measures the latency that a
	// loaded but not overloaded service gives.
	Rate float64
	// Workers (e2e only) is the dispatcher's number of concurrent deliveries;
	// 0 is the service's default.
	Workers int
	// CPUProfile, when set, receives a pprof CPU profile of the measured
	// path (library and e2e; not of the ceilings).
	CPUProfile io.Writer
	// Prefill (library path, SQLite), when positive, measures admissions
	// into a ledger that already holds that many records, against the
	// same admissions into one that holds 10,000: the cost of the
	// ledger's size. The records are sent emails whose bodies were purged
	// (purge_body_on_send), spread evenly over the key space.
	Prefill int
	// Progress receives a progress bar per phase; nil shows none.
	Progress io.Writer
}

// Row is one measured phase.
type Row struct {
	Path       string  `json:"path"`
	Ops        int64   `json:"ops"`
	Seconds    float64 `json:"seconds"`
	Throughput float64 `json:"throughput_per_s"`
	P50Ms      float64 `json:"p50_ms"`
	P99Ms      float64 `json:"p99_ms"`
	MaxMs      float64 `json:"max_ms"`
	// CPUSeconds is the process's user+system CPU time during the phase.
	CPUSeconds float64 `json:"cpu_seconds"`
	// PeakRSSMiB is the process's peak resident set at the phase's end
	// (getrusage ru_maxrss: monotonic over the process's life, so sendonce's
	// phase always runs first).
	PeakRSSMiB float64 `json:"peak_rss_mib"`
	// StealPct is the share of the machine's CPU time that its hypervisor
	// gave to others during the phase (/proc/stat), -1 where unknown: on a
	// busy host every phase runs slower, which a ratio to a ceiling measured
	// in the same conditions absorbs and an absolute rate does not.
	StealPct float64 `json:"steal_pct"`
	// Ceiling names the row this one is compared with; empty on ceilings.
	Ceiling           string  `json:"ceiling,omitempty"`
	CeilingThroughput float64 `json:"ceiling_throughput_per_s,omitempty"`
	Ratio             float64 `json:"ratio,omitempty"`
	Note              string  `json:"note,omitempty"`
}

// Report is the result of one run: sendonce's row first, then its ceilings.
type Report struct {
	Path        string    `json:"path"`
	Concurrency int       `json:"concurrency"`
	Duration    string    `json:"duration"`
	Size        int       `json:"size"`
	Store       string    `json:"store"`
	Rows        []Row     `json:"rows"`
	Started     time.Time `json:"started"`
}

// Run measures opts.Path and its ceilings.
func Run(ctx context.Context, opts Options) (*Report, error) {
	if opts.Duration <= 0 {
		opts.Duration = 10 * time.Second
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 256
	}
	if opts.Size <= 0 {
		opts.Size = 4096
	}
	if opts.Sink == "" {
		opts.Sink = "smtp"
	}
	if opts.Sink != "smtp" && opts.Sink != "maildir" {
		return nil, fmt.Errorf("bench: sink %q: use smtp or maildir", opts.Sink)
	}
	if opts.Store != "" && !strings.HasPrefix(opts.Store, "postgres://") && !strings.HasPrefix(opts.Store, "postgresql://") {
		return nil, fmt.Errorf("bench: store %q: use empty for SQLite or a postgres:// URL", opts.Store)
	}
	if opts.Store != "" && opts.Path != PathLibrary {
		return nil, fmt.Errorf("bench: --store postgres is supported by the library path only")
	}
	if opts.Rate < 0 || opts.Workers < 0 {
		return nil, fmt.Errorf("bench: --rate and --workers must not be negative")
	}
	if opts.Prefill < 0 {
		return nil, fmt.Errorf("bench: --prefill must not be negative")
	}
	if opts.Prefill > 0 && (opts.Path != PathLibrary || opts.Store != "") {
		return nil, fmt.Errorf("bench: --prefill applies to the library path on SQLite only")
	}
	if (opts.Rate > 0 || opts.Workers > 0) && opts.Path != PathE2E {
		return nil, fmt.Errorf("bench: --rate and --workers apply to the e2e path only")
	}
	if opts.Dir == "" {
		d, err := os.MkdirTemp("", "sendonce-bench-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		opts.Dir = d
	}
	r := &bencher{opts: opts}
	rep := &Report{Path: opts.Path, Concurrency: opts.Concurrency, Duration: opts.Duration.String(), Size: opts.Size, Store: "sqlite", Started: time.Now()}
	if opts.Store != "" {
		rep.Store = "postgres"
	}
	var err error
	switch opts.Path {
	case PathLibrary:
		rep.Rows, err = r.library(ctx)
	case PathHTTP:
		rep.Rows, err = r.http(ctx, false)
	case PathHTTPBatch:
		rep.Rows, err = r.http(ctx, true)
	case PathSMTP:
		rep.Rows, err = r.smtp(ctx)
	case PathE2E:
		rep.Rows, err = r.e2e(ctx)
	default:
		return nil, fmt.Errorf("bench: unknown path %q; use one of %s", opts.Path, strings.Join(Paths, ", "))
	}
	if err != nil {
		return nil, err
	}
	if len(rep.Rows) > 1 && rep.Rows[0].Ceiling != "" {
		for _, c := range rep.Rows[1:] {
			if c.Path == rep.Rows[0].Ceiling && c.Throughput > 0 {
				rep.Rows[0].CeilingThroughput = c.Throughput
				rep.Rows[0].Ratio = rep.Rows[0].Throughput / c.Throughput
			}
		}
	}
	return rep, nil
}

type bencher struct {
	opts Options
	seq  atomic.Int64 // unique keys across phases
	// paced is set while the measured path runs, so that Rate applies to
	// it and not to its ceilings.
	paced bool
	// profiled is set once the CPU profile has been taken.
	profiled bool
}

// profile starts the CPU profile of the measured path, if one is wanted,
// and returns the function that stops it.
func (b *bencher) profile() (stop func(), err error) {
	// One profile a run: of the first measured phase (with --prefill, the
	// large ledger), since a second would be appended to the same file.
	if b.opts.CPUProfile == nil || b.profiled {
		return func() {}, nil
	}
	b.profiled = true
	if err := pprof.StartCPUProfile(b.opts.CPUProfile); err != nil {
		return nil, fmt.Errorf("bench: cpu profile: %w", err)
	}
	var once sync.Once
	return func() { once.Do(pprof.StopCPUProfile) }, nil
}

// key returns a unique key that lands at a random place in the ledger's
// key index, as real keys (UUIDs, order numbers hashed by the caller) do:
// a sequence scrambled by a multiplication by an odd constant, which is a
// bijection of 64-bit integers, keeping 63 bits (a collision would need two
// sequence numbers about 2^63 apart). Sequential keys would only ever
// append to the index and flatter the ledger at scale.
func (b *bencher) key(prefix string) string {
	return fmt.Sprintf("%s%016x", prefix, scramble(uint64(b.seq.Add(1))))
}

func scramble(n uint64) uint64 { return (n * 0x9E3779B97F4A7C15) >> 1 }

// op does one unit of work and returns how many emails it carried.
type op func(ctx context.Context, worker int) (int, error)

// phase measures one path: the process's resources and every op's latency.
type phase struct {
	name  string
	start time.Time
	ru    syscall.Rusage
	steal stealMeter
	mu    sync.Mutex
	lats  []time.Duration
	ops   atomic.Int64
	bar   *progressbar.ProgressBar
	stop  chan struct{}
	done  chan struct{}
}

func (b *bencher) begin(name string) *phase {
	p := &phase{name: name, start: time.Now(), stop: make(chan struct{}), done: make(chan struct{})}
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &p.ru)
	p.steal = startSteal()
	if b.opts.Progress == nil {
		close(p.done)
		return p
	}
	total := int64(b.opts.Duration / time.Millisecond)
	p.bar = progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(b.opts.Progress),
		progressbar.OptionSetDescription(fmt.Sprintf("%-22s", name)),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionShowElapsedTimeOnFinish(),
		progressbar.OptionSetPredictTime(false),
		progressbar.OptionClearOnFinish(),
	)
	go func() {
		defer close(p.done)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				el := time.Since(p.start)
				_ = p.bar.Set64(min(total, int64(el/time.Millisecond)))
				p.bar.Describe(fmt.Sprintf("%-22s %9d ops %8.0f/s", p.name, p.ops.Load(), float64(p.ops.Load())/el.Seconds()))
			}
		}
	}()
	return p
}

// end closes the phase over ops emails in elapsed time.
func (p *phase) end(ops int64, elapsed time.Duration) Row {
	close(p.stop)
	<-p.done
	if p.bar != nil {
		_ = p.bar.Finish()
	}
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	cpu := tv(ru.Utime) + tv(ru.Stime) - tv(p.ru.Utime) - tv(p.ru.Stime)
	row := Row{Path: p.name, Ops: ops, Seconds: elapsed.Seconds(), CPUSeconds: cpu, PeakRSSMiB: float64(ru.Maxrss) / 1024, StealPct: p.steal.pct()}
	if elapsed > 0 {
		row.Throughput = float64(ops) / elapsed.Seconds()
	}
	p.mu.Lock()
	lats := p.lats
	p.mu.Unlock()
	if len(lats) > 0 {
		slices.Sort(lats)
		row.P50Ms = ms(lats[len(lats)*50/100])
		row.P99Ms = ms(lats[min(len(lats)-1, len(lats)*99/100)])
		row.MaxMs = ms(lats[len(lats)-1])
	}
	return row
}

func tv(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// drive runs conc workers calling f until the duration passes, and
// returns the phase's row. The first error stops every worker.
func (b *bencher) drive(ctx context.Context, name string, conc int, f op) (Row, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	p := b.begin(name)
	deadline := p.start.Add(b.opts.Duration)
	var slot atomic.Int64
	var interval time.Duration
	if b.paced && b.opts.Rate > 0 {
		interval = time.Duration(float64(time.Second) / b.opts.Rate)
	}
	// wait holds a caller until its slot of the schedule; false when the
	// slot falls after the deadline.
	wait := func() bool {
		if interval == 0 {
			return true
		}
		at := p.start.Add(time.Duration(slot.Add(1)-1) * interval)
		if !at.Before(deadline) {
			return false
		}
		if d := time.Until(at); d > 0 {
			t := time.NewTimer(d) // pacing, not synchronisation
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
				return false
			}
		}
		return true
	}
	var wg sync.WaitGroup
	var firstErr error
	var errOnce sync.Once
	for w := range conc {
		wg.Go(func() {
			lats := make([]time.Duration, 0, 1024)
			defer func() {
				p.mu.Lock()
				p.lats = append(p.lats, lats...)
				p.mu.Unlock()
			}()
			for ctx.Err() == nil && time.Now().Before(deadline) {
				if !wait() {
					return
				}
				t0 := time.Now()
				n, err := f(ctx, w)
				if err != nil {
					if ctx.Err() == nil {
						errOnce.Do(func() { firstErr = fmt.Errorf("%s: %w", name, err) })
					}
					cancel()
					return
				}
				lats = append(lats, time.Since(t0))
				p.ops.Add(int64(n))
			}
		})
	}
	wg.Wait()
	row := p.end(p.ops.Load(), time.Since(p.start))
	if firstErr != nil {
		return row, firstErr
	}
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return row, err
	}
	return row, nil
}

// body is a text body of size bytes in 76-character lines of plain
// ASCII, as most text email is: no line ends in a space, so the message is
// sent as 7bit, not quoted-printable.
func body(size int) string {
	line := strings.Repeat("sendonce bench ", 5)[:74] + ".\n"
	var sb strings.Builder
	for sb.Len() < size {
		sb.WriteString(line)
	}
	b := []byte(sb.String()[:size])
	if n := len(b); n > 0 && b[n-1] == ' ' {
		b[n-1] = '.'
	}
	return string(b)
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
