package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/config"
	"github.com/sendonce/sendonce/internal/schedule"
	"github.com/sendonce/sendonce/internal/service"
	"github.com/sendonce/sendonce/store"
)

func newSchedule() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "schedule",
		Short: "List, run and preview the configured schedules",
		Long: `Work with the schedules of the configuration file (docs/scheduler.md).

These commands open the ledger directly, with the same --config, --data and
--store as serve. A SQLite ledger belongs to one process: stop serve first,
or use a PostgreSQL ledger, which any number of processes share.`,
	}
	cmd.AddCommand(newScheduleList(), newScheduleRun(), newSchedulePreview())
	return cmd
}

// scheduleFlags are the ledger and configuration flags the schedule
// commands share with serve.
type scheduleFlags struct {
	cfgFile, data, storeURL string
}

func (f *scheduleFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.cfgFile, "config", "", "YAML configuration file with the schedules")
	cmd.Flags().StringVar(&f.data, "data", "", "data directory of a SQLite ledger (default ./sendonce-data)")
	cmd.Flags().StringVar(&f.storeURL, "store", "", "postgres://... ledger shared by every node")
}

// open loads the configuration, opens the ledger and builds the scheduler
// (which checks every template). close releases the ledger.
func (f *scheduleFlags) open(cmd *cobra.Command, quiet bool) (sched *schedule.Scheduler, client *sendonce.Client, closeFn func(), err error) {
	overrides := map[string]string{}
	flagSetting := map[string]string{"data": "data", "store": "store"}
	cmd.Flags().Visit(func(fl *pflag.Flag) {
		if name, ok := flagSetting[fl.Name]; ok {
			overrides[name] = fl.Value.String()
		}
	})
	cfg, _, err := config.Load(f.cfgFile, os.Environ(), overrides)
	if err != nil {
		return nil, nil, nil, configError{err}
	}
	if len(cfg.Schedules) == 0 {
		return nil, nil, nil, errors.New("the configuration has no schedules; give --config FILE with a schedules: section")
	}
	log := newLogger(cmd.ErrOrStderr(), cfg.Log)
	if quiet {
		log = slog.New(slog.DiscardHandler)
	}
	st, err := service.OpenStore(cmd.Context(), cfg, log, nil)
	if err != nil {
		return nil, nil, nil, err
	}
	client, err = sendonce.New(sendonce.Config{Store: st, Logger: log, MessageIDDomain: cfg.MessageIDDomain, MaxMessageBytes: cfg.MaxMessageBytes})
	if err != nil {
		st.Close()
		return nil, nil, nil, err
	}
	sched, err = service.NewScheduler(cfg, st, client, log)
	if err != nil {
		st.Close()
		return nil, nil, nil, err
	}
	return sched, client, func() { st.Close() }, nil
}

func newScheduleList() *cobra.Command {
	var f scheduleFlags
	var next int
	cmd := &cobra.Command{
		Use:   "list",
		Short: "Show each schedule's next fire times and its last fire with its progress",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			sched, _, closeFn, err := f.open(cmd, true)
			if err != nil {
				return err
			}
			defer closeFn()
			sts, err := sched.Status(cmd.Context(), next)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "SCHEDULE\tCRON\tZONE\tNEXT\tLAST FIRE\tSTATE\tPROGRESS")
			for _, st := range sts {
				var nexts []string
				for _, t := range st.Next {
					nexts = append(nexts, t.In(st.Schedule.Location).Format("2006-01-02 15:04:05 MST"))
				}
				last, state, progress := "-", "-", "-"
				if l := st.Last; l != nil {
					last, state, progress = l.Key, string(l.State), fireProgress(l)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", st.Schedule.Name, st.Schedule.Cron, st.Schedule.Location,
					strings.Join(nexts, ", "), last, state, progress)
			}
			return w.Flush()
		},
	}
	f.add(cmd)
	cmd.Flags().IntVar(&next, "next", 3, "how many next fire times to show")
	return cmd
}

func fireProgress(f *store.Fire) string {
	s := fmt.Sprintf("%d admitted", f.Admitted)
	if f.Duplicates > 0 {
		s += fmt.Sprintf(", %d duplicates", f.Duplicates)
	}
	if f.Rejected > 0 {
		s += fmt.Sprintf(", %d refused", f.Rejected)
	}
	switch f.State {
	case store.FireRunning:
		s += fmt.Sprintf("; run %d by %s, lease until %s", f.Attempts, f.Owner, f.LeaseExpiry.Format(time.RFC3339))
	case store.FireWaiting:
		s += fmt.Sprintf("; stopped: %s; retry at %s", f.LastError, f.NextAttempt.Format(time.RFC3339))
	case store.FireDone:
		s += "; finished " + f.FinishedAt.Format(time.RFC3339)
	}
	return s
}

func newScheduleRun() *cobra.Command {
	var f scheduleFlags
	var at string
	cmd := &cobra.Command{
		Use:   "run NAME --at TIME",
		Short: "Fire a schedule now for the instant TIME, with the keys of that instant's fire",
		Long: `Fire a schedule for one instant, with the same fire key and email keys the
scheduler uses for that instant: if the fire already ran, or runs later, no
recipient gets a second email. TIME is RFC 3339 (2026-12-01T09:00:00+01:00)
or, in the schedule's time zone, "2026-12-01 09:00". The emails are admitted
to the ledger; the serve nodes deliver them.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if at == "" {
				return errors.New("--at is required: the scheduled instant to fire, e.g. 2026-12-01T09:00:00Z")
			}
			sched, _, closeFn, err := f.open(cmd, false)
			if err != nil {
				return err
			}
			defer closeFn()
			var loc *time.Location
			for _, s := range sched.Schedules() {
				if s.Name == args[0] {
					loc = s.Location
				}
			}
			if loc == nil {
				return fmt.Errorf("no schedule named %q in the configuration", args[0])
			}
			when, err := parseAt(at, loc)
			if err != nil {
				return err
			}
			fire, err := sched.RunFire(cmd.Context(), args[0], when, true)
			switch {
			case errors.Is(err, store.ErrFireDone):
				cmd.Printf("fire %s already done; nothing admitted\n", store.FireKey(args[0], when))
				return nil
			case errors.Is(err, store.ErrFireBusy):
				return fmt.Errorf("fire %s is being run by another node, or waits for its retry time; see \"sendonce schedule list\"", store.FireKey(args[0], when))
			case err != nil:
				return err
			}
			cmd.Printf("fire %s: %s\n", fire.Key, fireProgress(&fire))
			return nil
		},
	}
	f.add(cmd)
	cmd.Flags().StringVar(&at, "at", "", "the scheduled instant: RFC 3339, or \"2006-01-02 15:04\" in the schedule's zone")
	return cmd
}

func parseAt(s string, loc *time.Location) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	for _, layout := range []string{"2006-01-02 15:04:05", "2006-01-02 15:04", "2006-01-02T15:04:05", "2006-01-02T15:04"} {
		if t, err := time.ParseInLocation(layout, s, loc); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("--at %q: use RFC 3339 (2026-12-01T09:00:00Z) or \"2026-12-01 09:00\" in the schedule's time zone", s)
}

func newSchedulePreview() *cobra.Command {
	var f scheduleFlags
	var to string
	cmd := &cobra.Command{
		Use:   "preview NAME --to ADDRESS",
		Short: "Render a schedule's email for one recipient without sending anything",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return errors.New("--to is required: the recipient whose email to render")
			}
			sched, _, closeFn, err := f.open(cmd, true)
			if err != nil {
				return err
			}
			defer closeFn()
			ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Minute)
			defer cancel()
			out, found, err := sched.Preview(ctx, args[0], to)
			if !found {
				fmt.Fprintf(cmd.ErrOrStderr(), "note: %s is not in the recipient source; rendering with only its address as data\n", to)
			}
			if err != nil {
				return err
			}
			cmd.Printf("Subject: %s\n", out.Subject)
			if out.Text != "" {
				cmd.Printf("\n--- text ---\n%s", out.Text)
				if !strings.HasSuffix(out.Text, "\n") {
					cmd.Println()
				}
			}
			if out.HTML != "" {
				cmd.Printf("\n--- html ---\n%s", out.HTML)
				if !strings.HasSuffix(out.HTML, "\n") {
					cmd.Println()
				}
			}
			return nil
		},
	}
	f.add(cmd)
	cmd.Flags().StringVar(&to, "to", "", "the recipient's address")
	return cmd
}
