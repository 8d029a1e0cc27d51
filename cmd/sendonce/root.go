package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sendonce/sendonce/internal/config"
	"github.com/sendonce/sendonce/internal/service"
	"github.com/sendonce/sendonce/store/pgstore"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "sendonce",
		Short:         "Send every email exactly once, even when the queue delivers twice",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(newServe(), newMigrate(), newSend(), newStatus(), newList(), newTail(), newResolve(), newVersion(), newBench(), newSchedule())
	return root
}

func newServe() *cobra.Command {
	var cfgFile, data, httpAddr, tr, smtpAddr, storeURL string
	var migrate bool
	var sources []string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the service: HTTP API, dispatcher, ledger",
		Long: `Run the service. With no flags and no configuration it keeps its ledger in
./sendonce-data, serves the API on 127.0.0.1:7070 and SMTP submission on
127.0.0.1:2525, and delivers into the maildir ./sendonce-data/maildir.

--store postgres://... shares one PostgreSQL ledger between many nodes
(apply its schema with "sendonce migrate" or --migrate).

--source sqs:QUEUE_URL consumes email jobs (docs/jobs.md) from Amazon SQS;
--transport ses delivers through Amazon SES. Both take region, credentials
and endpoints from the AWS SDK's standard configuration (AWS_REGION, the
credentials chain, AWS_ENDPOINT_URL_SQS, AWS_ENDPOINT_URL_SESV2).

Settings come from defaults, then --config FILE (YAML), then SENDONCE_*
environment variables (SENDONCE_HTTP_ADDR, SENDONCE_DISPATCH_WORKERS, ...),
then these flags.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			overrides := map[string]string{}
			flagSetting := map[string]string{"data": "data", "http": "http.addr", "transport": "transport", "smtp": "submission.addr", "store": "store", "migrate": "migrate"}
			cmd.Flags().Visit(func(f *pflag.Flag) {
				if name, ok := flagSetting[f.Name]; ok {
					overrides[name] = f.Value.String()
				}
			})
			cfg, warnings, err := config.Load(cfgFile, os.Environ(), overrides, sources...)
			log := newLogger(cmd.ErrOrStderr(), cfg.Log)
			for _, w := range warnings {
				log.Warn(w)
			}
			if err != nil {
				return configError{err}
			}
			svc, err := service.New(cmd.Context(), cfg, log)
			if err != nil {
				return err
			}
			return svc.Run(cmd.Context())
		},
	}
	cmd.Flags().StringVar(&cfgFile, "config", "", "YAML configuration file")
	cmd.Flags().StringVar(&data, "data", "", "data directory (default ./sendonce-data)")
	cmd.Flags().StringVar(&httpAddr, "http", "", "HTTP API address (default 127.0.0.1:7070)")
	cmd.Flags().StringVar(&tr, "transport", "", "maildir, maildir:/dir, smtp[s]://[user:pass@]host:port, or ses (default maildir)")
	cmd.Flags().StringVar(&storeURL, "store", "", "ledger: empty for SQLite in --data, or postgres://... shared by every node")
	cmd.Flags().BoolVar(&migrate, "migrate", false, "apply PostgreSQL schema migrations at start")
	cmd.Flags().StringVar(&smtpAddr, "smtp", "", "SMTP submission address, or off (default 127.0.0.1:2525)")
	cmd.Flags().StringArrayVar(&sources, "source", nil, "consume email jobs from a broker (repeatable): sqs:QUEUE_URL, amqp://...?queue=NAME&dead_letter_exchange=DLX, nats://...?stream=NAME&consumer=NAME, redis://...?stream=NAME&group=NAME (docs/jobs.md)")
	return cmd
}

type configError struct{ err error }

func (e configError) Error() string {
	lines := strings.Split(e.err.Error(), "\n")
	return "invalid configuration:\n  " + strings.Join(lines, "\n  ")
}

func (e configError) Unwrap() error { return e.err }

func newLogger(w io.Writer, c config.Log) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func newMigrate() *cobra.Command {
	var url string
	cmd := &cobra.Command{
		Use:   "migrate --postgres URL",
		Short: "Apply the PostgreSQL schema migrations (safe to run on several nodes at once)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if url == "" {
				url = os.Getenv("SENDONCE_STORE")
			}
			if url == "" {
				return fmt.Errorf("--postgres is required (or SENDONCE_STORE): postgres://user:pass@host:5432/db")
			}
			if err := pgstore.Migrate(cmd.Context(), url, pgstore.Options{}); err != nil {
				return err
			}
			cmd.Printf("schema at version %d\n", pgstore.SchemaVersion())
			return nil
		},
	}
	cmd.Flags().StringVar(&url, "postgres", "", "PostgreSQL URL, postgres://user:pass@host:5432/db (env SENDONCE_STORE)")
	return cmd
}

func newVersion() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			v := version
			if v == "" {
				v = "devel"
				if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
					v = bi.Main.Version
				}
			}
			cmd.Println("sendonce " + v)
		},
	}
}
