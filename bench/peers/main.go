// Command peers measures, in one run on one machine, how fast sendonce
// admits unique emails next to how fast the job queues people would
// otherwise put in front of a mailer insert unique jobs: River on the same
// PostgreSQL, asynq on the same Redis. Every system gets the same callers,
// the same duration, the same payload and unique keys; each its own fresh
// database schema or queue; all durability settings at their defaults.
//
// It lives in its own module (bench/go.mod) so that sendonce itself does
// not depend on its peers; the module replaces sendonce with the working
// tree it sits in, so the numbers are those of the code beside it.
//
//	cd bench && go run ./peers [-duration 10s] [-concurrency 256] [-json]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

// options are the run's flags.
type options struct {
	Concurrency   int           `json:"concurrency"`
	Duration      time.Duration `json:"-"`
	DurationText  string        `json:"duration"`
	Size          int           `json:"size"`
	Batch         int           `json:"batch"`
	PG            string        `json:"-"`
	Redis         string        `json:"redis"`
	Dir           string        `json:"-"`
	Modes         string        `json:"modes"`
	Only          string        `json:"only,omitempty"`
	RiverConns    int32         `json:"river_max_conns"`
	AdmitWorkers  int           `json:"sendonce_admit_workers,omitempty"`
	SendonceConns int32         `json:"sendonce_max_conns,omitempty"`
	AsynqUnique   string        `json:"asynq_unique"`
	JSON          bool          `json:"-"`
	Out           string        `json:"-"`
	systems       map[string]bool
	modes         map[string]bool
	redisDurable  bool
	redisSettings string
}

// The systems, as -only names them.
const (
	sysSendoncePG     = "sendonce-pg"
	sysSendonceSQLite = "sendonce-sqlite"
	sysRiver          = "river"
	sysAsynq          = "asynq"
)

var allSystems = []string{sysSendoncePG, sysRiver, sysAsynq, sysSendonceSQLite}

// Ratio compares sendonce's rate with River's in one mode.
type Ratio struct {
	Name     string  `json:"name"`
	Sendonce float64 `json:"sendonce_ops_per_s"`
	River    float64 `json:"river_ops_per_s"`
	Value    float64 `json:"ratio"`
}

// Report is the whole run.
type Report struct {
	Started time.Time `json:"started"`
	Host    string    `json:"host"`
	CPUs    int       `json:"cpus"`
	Go      string    `json:"go"`
	// LoadAvg is /proc/loadavg at the start: the machine may be shared,
	// and every phase's host CPU includes whatever else runs.
	LoadAvg  string  `json:"loadavg"`
	Options  options `json:"options"`
	Database string  `json:"database"`
	// Servers describes the servers' versions and durability settings.
	Servers []string `json:"servers"`
	Rows    []Row    `json:"rows"`
	Ratios  []Ratio  `json:"ratios"`
}

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "peers:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	var o options
	fs := flag.NewFlagSet("peers", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&o.Concurrency, "concurrency", 256, "concurrent callers in every phase")
	fs.DurationVar(&o.Duration, "duration", 10*time.Second, "length of every phase")
	fs.IntVar(&o.Size, "size", 4096, "payload (email body, job args, task payload) in bytes")
	fs.IntVar(&o.Batch, "batch", 100, "items per call in the batch modes (SubmitBatch, InsertMany)")
	fs.StringVar(&o.PG, "pg", "postgres://postgres@127.0.0.1:5432/postgres", "PostgreSQL URL with the right to create a database: the run creates its own and drops it at the end")
	fs.StringVar(&o.Redis, "redis", "127.0.0.1:6379", "Redis address for asynq; the run uses its own queue names and deletes their keys at the end")
	fs.StringVar(&o.Dir, "dir", "", "directory for the SQLite ledgers (the disk measured); default a new directory under $TMPDIR, removed at the end")
	fs.StringVar(&o.Modes, "modes", "single,batch,dup", "comma-separated modes: single (one item per call), batch (-batch items per call), dup (one per call, every key submitted twice)")
	fs.StringVar(&o.Only, "only", "", "comma-separated systems to measure: "+strings.Join(allSystems, ", ")+" (default all)")
	var riverConns int
	fs.IntVar(&riverConns, "river-max-conns", 32, "River's pgx pool size (pgx's default of 4 would make the pool, not PostgreSQL, River's limit at 256 callers)")
	fs.IntVar(&o.AdmitWorkers, "sendonce-admit-workers", 0, "pgstore's Options.AdmitWorkers (0: the store's default)")
	var sendonceConns int
	fs.IntVar(&sendonceConns, "sendonce-max-conns", 0, "pgstore's Options.MaxConns (0: pgx's default)")
	fs.StringVar(&o.AsynqUnique, "asynq-unique", "taskid", "asynq's uniqueness: taskid (asynq.TaskID(key)) or unique (asynq.Unique(24h) over queue, type and payload)")
	fs.BoolVar(&o.JSON, "json", false, "print the report as JSON instead of a table")
	fs.StringVar(&o.Out, "out", "", "also write the report as JSON to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o.RiverConns = int32(riverConns)
	o.SendonceConns = int32(sendonceConns)
	if err := o.validate(); err != nil {
		return err
	}
	o.DurationText = o.Duration.String()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if o.Dir == "" {
		d, err := os.MkdirTemp("", "sendonce-peers-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		o.Dir = d
	}
	host, _ := os.Hostname()
	rep := &Report{Started: time.Now().UTC(), Host: host, CPUs: runtime.NumCPU(), Go: runtime.Version(), Options: o, LoadAvg: loadAvg()}
	b := &bench{o: o, log: stderr, tag: fmt.Sprintf("%d_%d", os.Getpid(), time.Now().UnixNano())}

	needPG := o.systems[sysSendoncePG] || o.systems[sysRiver]
	if needPG {
		db, cleanup, err := b.createDatabase(ctx)
		if err != nil {
			return err
		}
		defer cleanup()
		rep.Database = db
		rep.Servers = append(rep.Servers, b.pgSettings)
	}
	if o.systems[sysAsynq] {
		b.o.redisDurable, b.o.redisSettings = redisDurability(ctx, o.Redis)
		defer b.cleanupRedis()
		rep.Servers = append(rep.Servers, "Redis "+b.o.redisSettings)
	}

	type phase struct {
		system string
		mode   string
		run    func(context.Context, string) (Row, error)
	}
	var phases []phase
	add := func(system, mode string, f func(context.Context, string) (Row, error)) {
		if o.systems[system] {
			phases = append(phases, phase{system, mode, f})
		}
	}
	single, batch, dup := "single", fmt.Sprintf("batch-%d", o.Batch), "dup"
	// Interleaved by mode, so that a change in the machine's load during the
	// run falls on every system alike.
	if o.modes["single"] {
		add(sysSendoncePG, single, b.sendoncePG)
		add(sysRiver, single, b.river)
		add(sysAsynq, single, b.asynq)
		add(sysSendonceSQLite, single, b.sendonceSQLite)
	}
	if o.modes["batch"] { // asynq has no batch enqueue
		add(sysSendoncePG, batch, b.sendoncePG)
		add(sysRiver, batch, b.river)
		add(sysSendonceSQLite, batch, b.sendonceSQLite)
	}
	if o.modes["dup"] {
		add(sysSendoncePG, dup, b.sendoncePG)
		add(sysRiver, dup, b.river)
		add(sysAsynq, dup, b.asynq)
		add(sysSendonceSQLite, dup, b.sendonceSQLite)
	}
	for i, p := range phases {
		if ctx.Err() != nil {
			break
		}
		fmt.Fprintf(stderr, "[%d/%d] %-16s %-9s running for %v with %d callers...\n", i+1, len(phases), p.system, p.mode, o.Duration, o.Concurrency)
		row, err := p.run(ctx, p.mode)
		row.Mode = p.mode
		if err != nil {
			row.Err = err.Error()
			fmt.Fprintf(stderr, "[%d/%d] %-16s %-9s FAILED: %v\n", i+1, len(phases), p.system, p.mode, err)
		} else {
			fmt.Fprintf(stderr, "[%d/%d] %-16s %-9s %9d ops  %9.0f ops/s  p99 %6.1f ms%s\n", i+1, len(phases), p.system, p.mode, row.Ops, row.Throughput, row.P99Ms, check(row))
		}
		rep.Rows = append(rep.Rows, row)
	}
	rep.Ratios = ratios(rep.Rows, single, batch, dup)
	if ctx.Err() != nil {
		fmt.Fprintln(stderr, "interrupted: the report covers the phases that ran")
	}
	if o.Out != "" {
		data, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(o.Out, append(data, '\n'), 0o644); err != nil {
			return err
		}
	}
	if o.JSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	printTable(stdout, rep)
	return nil
}

func (o *options) validate() error {
	switch {
	case o.Concurrency <= 0:
		return fmt.Errorf("-concurrency is %d; use a positive number of callers", o.Concurrency)
	case o.Duration <= 0:
		return fmt.Errorf("-duration is %v; use a positive duration such as 10s", o.Duration)
	case o.Size <= 0:
		return fmt.Errorf("-size is %d; use a positive number of bytes such as 4096", o.Size)
	case o.Batch <= 0:
		return fmt.Errorf("-batch is %d; use a positive number of items per call such as 100", o.Batch)
	case o.RiverConns <= 0:
		return fmt.Errorf("-river-max-conns is %d; use a positive pool size such as 32", o.RiverConns)
	case o.AdmitWorkers < 0 || o.SendonceConns < 0:
		return fmt.Errorf("-sendonce-admit-workers and -sendonce-max-conns are %d and %d; use positive numbers, or 0 for the store's defaults", o.AdmitWorkers, o.SendonceConns)
	case o.AsynqUnique != "taskid" && o.AsynqUnique != "unique":
		return fmt.Errorf("-asynq-unique is %q; use taskid or unique", o.AsynqUnique)
	}
	if u, err := url.Parse(o.PG); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return fmt.Errorf("-pg is not a postgres:// URL; use one such as postgres://postgres@127.0.0.1:5432/postgres")
	}
	o.modes = map[string]bool{}
	for m := range strings.SplitSeq(o.Modes, ",") {
		m = strings.TrimSpace(m)
		if m != "single" && m != "batch" && m != "dup" {
			return fmt.Errorf("-modes names %q; use a comma-separated list of single, batch, dup", m)
		}
		o.modes[m] = true
	}
	o.systems = map[string]bool{}
	if o.Only == "" {
		for _, s := range allSystems {
			o.systems[s] = true
		}
		return nil
	}
	for s := range strings.SplitSeq(o.Only, ",") {
		s = strings.TrimSpace(s)
		known := false
		for _, k := range allSystems {
			known = known || k == s
		}
		if !known {
			return fmt.Errorf("-only names %q; use a comma-separated list of %s", s, strings.Join(allSystems, ", "))
		}
		o.systems[s] = true
	}
	return nil
}

// check says whether the phase's duplicates and stored count are what its
// keys call for: a system that lost or doubled a job shows here.
func check(r Row) string {
	var bad []string
	if r.Dups != r.Expected {
		bad = append(bad, fmt.Sprintf("%d duplicates answered, %d expected", r.Dups, r.Expected))
	}
	if r.Stored >= 0 && r.Stored != r.Ops-r.Dups {
		bad = append(bad, fmt.Sprintf("%d stored, %d expected", r.Stored, r.Ops-r.Dups))
	}
	if len(bad) == 0 {
		return ""
	}
	return "  MISMATCH: " + strings.Join(bad, "; ")
}

func ratios(rows []Row, modes ...string) []Ratio {
	find := func(system, mode string) *Row {
		for i := range rows {
			if rows[i].System == system && rows[i].Store == "postgres" && rows[i].Mode == mode && rows[i].Err == "" {
				return &rows[i]
			}
		}
		return nil
	}
	var out []Ratio
	for _, m := range modes {
		s, r := find("sendonce", m), find("river", m)
		if s == nil || r == nil || r.Throughput == 0 {
			continue
		}
		out = append(out, Ratio{Name: m, Sendonce: s.Throughput, River: r.Throughput, Value: s.Throughput / r.Throughput})
	}
	return out
}

func printTable(w io.Writer, rep *Report) {
	o := rep.Options
	fmt.Fprintf(w, "peers: %d callers, %s per phase, %d-byte payloads, batches of %d; %d CPUs, load average %s at the start, %s; started %s\n\n",
		o.Concurrency, o.DurationText, o.Size, o.Batch, rep.CPUs, rep.LoadAvg, rep.Go, rep.Started.Format(time.RFC3339))
	for _, s := range rep.Servers {
		fmt.Fprintln(w, s)
	}
	if len(rep.Servers) > 0 {
		fmt.Fprintln(w)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "system\tstore\tmode\tops\tops/s\tp50 ms\tp99 ms\tCPU s\thost CPU s\tdups\tstored\tdurable\t")
	for _, r := range rep.Rows {
		if r.Err != "" {
			fmt.Fprintf(tw, "%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t\n", r.System, r.Store, r.Mode)
			continue
		}
		stored := "-"
		if r.Stored >= 0 {
			stored = fmt.Sprint(r.Stored)
		}
		durable := "yes"
		if !r.Durable {
			durable = "NO"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%.0f\t%.2f\t%.2f\t%.1f\t%.1f\t%d\t%s\t%s\t\n",
			r.System, r.Store, r.Mode, r.Ops, r.Throughput, r.P50Ms, r.P99Ms, r.CPUSeconds, r.HostCPUSeconds, r.Dups, stored, durable)
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, r := range rep.Ratios {
		fmt.Fprintf(w, "sendonce/River (PostgreSQL, %s): %.0f / %.0f = %.2f\n", r.Name, r.Sendonce, r.River, r.Value)
	}
	for _, r := range rep.Rows {
		if r.Note != "" {
			fmt.Fprintf(w, "note: %s/%s %s: %s\n", r.System, r.Store, r.Mode, r.Note)
		}
		if r.Err != "" {
			fmt.Fprintf(w, "error: %s/%s %s: %s\n", r.System, r.Store, r.Mode, r.Err)
		}
		if c := check(r); c != "" && r.Err == "" {
			fmt.Fprintf(w, "check: %s/%s %s:%s\n", r.System, r.Store, r.Mode, c)
		}
	}
}

// loadAvg returns the 1, 5 and 15 minute load averages, or "?".
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "?"
}
