package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sendonce/sendonce/internal/bench"
)

func newBench() *cobra.Command {
	var o bench.Options
	var asJSON bool
	var cpuProfile string
	cmd := &cobra.Command{
		Use:   "bench --path " + strings.Join(bench.Paths, "|"),
		Short: "Measure throughput and latency of a path against its ceiling, on loopback",
		Long: `Drive one path with concurrent callers for --duration and measure, in the
same run on the same disk, the ceiling of that path; print both and the ratio.

  library     Client.Submit into a fresh ledger (SQLite in a temp dir, or a
              fresh schema of --store postgres://...); ceilings: a bare
              group-committed SQLite insert loop (PostgreSQL: a bare batched
              INSERT ... ON CONFLICT) and bare fsync'd appends
  http        POST /v1/emails to the service started in-process; ceiling:
              the library path in the same run
  http-batch  POST /v1/emails/batch of 100 emails; ceiling: the library path
  smtp        SMTP submission, one reused connection per caller; ceiling: a
              bare SMTP client-to-sink loop
  e2e         submit through the library until every email reached a local
              SMTP sink (or --sink maildir); ceiling: the bare SMTP loop

Everything listens on 127.0.0.1. The progress bar goes to stderr.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Progress = cmd.ErrOrStderr()
			if cpuProfile != "" {
				f, err := os.Create(cpuProfile)
				if err != nil {
					return err
				}
				defer f.Close()
				o.CPUProfile = f
			}
			rep, err := bench.Run(cmd.Context(), o)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(rep)
			}
			return printBench(cmd.OutOrStdout(), rep)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Path, "path", bench.PathLibrary, "what to measure: "+strings.Join(bench.Paths, ", "))
	f.DurationVar(&o.Duration, "duration", 10*time.Second, "length of each measured phase (the path and each ceiling)")
	f.IntVar(&o.Concurrency, "concurrency", 256, "concurrent callers")
	f.StringVar(&o.Store, "store", "", "ledger: empty for SQLite in a temp dir, or postgres://... (library path; a fresh schema, dropped at the end)")
	f.StringVar(&o.Dir, "dir", "", "directory on the disk to measure (default: a new temp dir, removed at the end)")
	f.IntVar(&o.Size, "size", 4096, "body size of each email in bytes")
	f.StringVar(&o.Sink, "sink", "smtp", "e2e destination: smtp (a local sink) or maildir")
	f.Float64Var(&o.Rate, "rate", 0, "e2e: submit at this many emails per second in all (open loop) instead of as fast as the callers go")
	f.IntVar(&o.Workers, "workers", 0, "e2e: the dispatcher's concurrent deliveries (0: the service's default)")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the measured path (library, e2e) to this file (go tool pprof)")
	f.IntVar(&o.Prefill, "prefill", 0, "library on SQLite: measure admissions into a ledger of this many records against one of 10,000")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

func printBench(w io.Writer, rep *bench.Report) error {
	fmt.Fprintf(w, "sendonce bench: path %s, %d callers, %s per phase, %d-byte bodies, %s ledger\n\n",
		rep.Path, rep.Concurrency, rep.Duration, rep.Size, rep.Store)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "path\tops\tthroughput/s\tp50 ms\tp99 ms\tmax ms\tCPU s\tsteal %\tpeak RSS MiB\tceiling\tceiling/s\tratio\t")
	for _, r := range rep.Rows {
		ceil, cps, ratio := "", "", ""
		if r.Ceiling != "" {
			ceil, cps, ratio = r.Ceiling, fmt.Sprintf("%.0f", r.CeilingThroughput), fmt.Sprintf("%.2f", r.Ratio)
		}
		steal := "-"
		if r.StealPct >= 0 {
			steal = fmt.Sprintf("%.0f", r.StealPct)
		}
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%.0f\t%s\t%s\t%s\t\n",
			r.Path, r.Ops, r.Throughput, r.P50Ms, r.P99Ms, r.MaxMs, r.CPUSeconds, steal, r.PeakRSSMiB, ceil, cps, ratio)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, r := range rep.Rows {
		if r.Note != "" {
			fmt.Fprintf(w, "%s: %s\n", r.Path, r.Note)
		}
	}
	return nil
}
