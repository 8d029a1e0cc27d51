// Package service is the one place where concrete backends are chosen and
// wired together: the store, the transport, the front doors and the
// dispatcher of one `sendonce serve` process.
package service

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/config"
	"github.com/sendonce/sendonce/internal/httpapi"
	"github.com/sendonce/sendonce/internal/metrics"
	"github.com/sendonce/sendonce/internal/schedule"
	"github.com/sendonce/sendonce/internal/smtpd"
	"github.com/sendonce/sendonce/internal/web"
	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/pgstore"
	"github.com/sendonce/sendonce/store/sqlitestore"
	"github.com/sendonce/sendonce/transport"
	"github.com/sendonce/sendonce/transport/maildir"
	"github.com/sendonce/sendonce/transport/ses"
	smtptransport "github.com/sendonce/sendonce/transport/smtp"
)

// Service is one running sendonce node.
type Service struct {
	cfg       config.Config
	log       *slog.Logger
	store     store.Store
	transport transport.Transport
	client    *sendonce.Client
	http      *http.Server
	listener  net.Listener
	smtp      *smtpd.Server
	smtpLn    net.Listener
	sources   []source.Source
	scheduler *schedule.Scheduler
	metrics   *metrics.Metrics
}

// New opens the store, builds the transport and binds the listeners. On
// error, everything opened so far is closed again.
func New(ctx context.Context, cfg config.Config, log *slog.Logger) (_ *Service, err error) {
	s := &Service{cfg: cfg, log: log}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	// The store's commit hook needs the metrics and the metrics' ledger
	// gauges need the store: the hook reads s.metrics, set just below,
	// before the first write.
	s.store, err = OpenStore(ctx, cfg, log, func(requests int, commit time.Duration) { s.metrics.Committed(requests, commit) })
	if err != nil {
		return nil, err
	}
	s.metrics = metrics.New(metrics.Config{Store: s.store})
	s.transport, err = NewTransport(ctx, cfg)
	if err != nil {
		return nil, err
	}
	maxBytes := cfg.MaxMessageBytes
	if maxBytes == 0 {
		maxBytes = sendonce.DefaultMaxMessageBytes
	}
	if cfg.Submission.Addr != "off" {
		// An SMTP submission may gain a Date and a Message-ID.
		maxBytes = max(maxBytes, int(submissionMax(cfg))+4096)
	}
	s.client, err = sendonce.New(sendonce.Config{
		Store:           s.store,
		Transport:       s.transport,
		Logger:          log,
		Metrics:         s.metrics,
		MessageIDDomain: cfg.MessageIDDomain,
		MaxMessageBytes: maxBytes,
		Dispatch: sendonce.DispatchConfig{
			Workers:         cfg.Dispatch.Workers,
			PollInterval:    time.Duration(cfg.Dispatch.PollInterval),
			Lease:           time.Duration(cfg.Dispatch.Lease),
			LeaseMargin:     time.Duration(cfg.Dispatch.LeaseMargin),
			MaxAttempts:     cfg.Dispatch.MaxAttempts,
			BackoffBase:     time.Duration(cfg.Dispatch.BackoffBase),
			BackoffMax:      time.Duration(cfg.Dispatch.BackoffMax),
			InDoubt:         sendonce.InDoubtPolicy(cfg.Dispatch.InDoubt),
			ShutdownTimeout: time.Duration(cfg.Dispatch.ShutdownTimeout),
			PurgeBody:       cfg.PurgeBodyOnSend,
			Retention:       time.Duration(cfg.Retention),
			InDoubtRules:    inDoubtRules(cfg.Dispatch.InDoubtRules),
			RulesEvery:      time.Duration(cfg.Dispatch.RulesInterval),
		},
	})
	if err != nil {
		return nil, err
	}
	if len(cfg.Schedules) > 0 {
		s.scheduler, err = NewScheduler(cfg, s.store, s.client, log)
		if err != nil {
			return nil, err
		}
		s.metrics.AddSchedules(s.scheduler)
	}
	var schedules httpapi.Schedules
	if s.scheduler != nil {
		schedules = s.scheduler // not a typed nil: the API tests the interface
	}
	tokens := make([]httpapi.Token, len(cfg.Tokens))
	for i, t := range cfg.Tokens {
		tokens[i] = httpapi.Token{Name: t.Name, Tenant: t.Tenant, Secret: t.Secret}
	}
	api, err := httpapi.New(httpapi.Config{Client: s.client, Tokens: tokens, MaxBodyBytes: cfg.HTTP.MaxBodyBytes, MaxInFlight: cfg.HTTP.MaxInFlight, Logger: log,
		Metrics: s.metrics, MetricsHandler: s.metrics.Handler(), Activity: s.metrics.Activity(), Schedules: schedules})
	if err != nil {
		return nil, err
	}
	s.listener, err = net.Listen("tcp", cfg.HTTP.Addr)
	if err != nil {
		return nil, fmt.Errorf("http.addr %s: %w", cfg.HTTP.Addr, err)
	}
	if err := s.newSMTP(cfg, log); err != nil {
		return nil, err
	}
	for i, src := range cfg.Sources {
		built, err := newSource(ctx, src, log)
		if err != nil {
			return nil, fmt.Errorf("sources[%d]: %w", i, err)
		}
		s.sources = append(s.sources, built)
	}
	if err := s.metrics.AddSources(s.sources); err != nil {
		return nil, err
	}
	s.http = &http.Server{
		Handler:           web.Handler(web.Config{API: api, AuthRequired: len(cfg.Tokens) > 0}),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       2 * time.Minute,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return s, nil
}

// NewScheduler builds the scheduler of the configured schedules on st,
// admitting through sub. It loads and checks every template, so a template
// that does not parse stops the start with its file and line.
func NewScheduler(cfg config.Config, st store.Store, sub schedule.Submitter, log *slog.Logger) (*schedule.Scheduler, error) {
	fs, ok := st.(store.FireStore)
	if !ok {
		return nil, fmt.Errorf("schedules: the store %T cannot record fires", st)
	}
	var scheds []schedule.Schedule
	for i, c := range cfg.Schedules {
		at := fmt.Sprintf("schedules[%d]", i)
		cron, err := schedule.ParseCron(c.Cron)
		if err != nil {
			return nil, fmt.Errorf("%s.cron: %w", at, err)
		}
		loc, err := time.LoadLocation(c.TimeZone)
		if err != nil {
			return nil, fmt.Errorf("%s.time_zone: %w", at, err)
		}
		var src schedule.Source
		switch r := c.Recipients; {
		case r.File != "":
			if src, err = schedule.NewFileSource(r.File); err != nil {
				return nil, fmt.Errorf("%s.recipients.file: %w", at, err)
			}
		case r.URL != "":
			src = &schedule.HTTPSource{URL: r.URL, Headers: r.Headers}
		default:
			u := r.Postgres
			if u == "" {
				u = cfg.Store
			}
			src = &schedule.SQLSource{URL: u, Query: r.SQL}
		}
		scheds = append(scheds, schedule.Schedule{
			Name:      c.Name,
			Cron:      cron,
			Location:  loc,
			Source:    src,
			Templates: schedule.TemplateFiles{Subject: c.Template.Subject, Text: c.Template.Text, HTML: c.Template.HTML},
			From:      c.From,
			ReplyTo:   c.ReplyTo,
			Tenant:    c.Tenant,
			CatchUp:   schedule.CatchUp(c.CatchUp),
			MaxLag:    time.Duration(c.MaxLag),
		})
	}
	sc := cfg.Scheduler
	return schedule.New(schedule.Config{
		Store:        fs,
		Submitter:    sub,
		Schedules:    scheds,
		Logger:       log,
		Lease:        time.Duration(sc.Lease),
		PollInterval: time.Duration(sc.PollInterval),
		BatchSize:    sc.BatchSize,
		OnTime:       time.Duration(sc.OnTime),
		BackoffBase:  time.Duration(sc.BackoffBase),
		BackoffMax:   time.Duration(sc.BackoffMax),
	})
}

func inDoubtRules(rules []config.InDoubtRule) []sendonce.InDoubtRule {
	out := make([]sendonce.InDoubtRule, len(rules))
	for i, r := range rules {
		out[i] = sendonce.InDoubtRule{After: time.Duration(r.After), Action: sendonce.Action(r.Action), Tenant: r.Tenant, MaxAttempts: r.MaxAttempts}
	}
	return out
}

// OpenStore opens the ledger the configuration names: SQLite in the data
// directory, or a shared PostgreSQL database. onCommit, when not nil, sees
// every commit of the SQLite store's writer (its group commit of every
// write), or of the PostgreSQL store's batched admissions: how many
// requests shared it and how long the COMMIT took.
func OpenStore(ctx context.Context, cfg config.Config, log *slog.Logger, onCommit func(requests int, commit time.Duration)) (store.Store, error) {
	if cfg.Store == "" {
		var opts sqlitestore.Options
		if onCommit != nil {
			opts.OnCommit = func(c sqlitestore.CommitInfo) { onCommit(c.Requests, c.Sync) }
		}
		st, err := sqlitestore.Open(ctx, cfg.Data, opts)
		if err != nil {
			return nil, err // not a typed nil: close() tests the interface
		}
		return st, nil
	}
	opts := pgstore.Options{Migrate: cfg.Migrate, Logger: log}
	if onCommit != nil {
		opts.OnCommit = func(c pgstore.CommitInfo) { onCommit(c.Requests, c.Commit) }
	}
	st, err := pgstore.Open(ctx, cfg.Store, opts)
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", RedactURL(cfg.Store), err)
	}
	return st, nil
}

func submissionMax(cfg config.Config) int64 {
	if cfg.Submission.MaxMessageBytes > 0 {
		return cfg.Submission.MaxMessageBytes
	}
	return smtpd.DefaultMaxMessageBytes
}

// newSMTP builds and binds the SMTP submission server, unless it is off.
func (s *Service) newSMTP(cfg config.Config, log *slog.Logger) error {
	sub := cfg.Submission
	if sub.Addr == "off" {
		return nil
	}
	sc := smtpd.Config{
		Addr:            sub.Addr,
		ImplicitTLS:     sub.ImplicitTLS,
		MaxMessageBytes: submissionMax(cfg),
		MaxRecipients:   sub.MaxRecipients,
		MaxConnsPerIP:   sub.MaxConnsPerIP,
		Client:          s.client,
		Logger:          log,
		Tenants:         map[string]smtpd.KeyModes{},
	}
	if sub.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(sub.TLSCert, sub.TLSKey)
		if err != nil {
			return fmt.Errorf("submission.tls_cert: %w", err)
		}
		sc.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	for _, u := range sub.Users {
		sc.Users = append(sc.Users, smtpd.User{Name: u.Name, Tenant: u.Tenant, PasswordHash: u.PasswordHash})
	}
	for name, t := range cfg.Tenants {
		sc.Tenants[name] = smtpd.KeyModes{
			IgnoreHeader:      t.KeyFromHeader != nil && !*t.KeyFromHeader,
			MessageID:         t.KeyFromMessageID,
			FingerprintWindow: time.Duration(t.FingerprintWindow),
		}
	}
	srv, err := smtpd.New(sc)
	if err != nil {
		return fmt.Errorf("submission: %w", err)
	}
	ln, err := srv.Listen()
	if err != nil {
		return fmt.Errorf("submission.addr %s: %w", sub.Addr, err)
	}
	s.smtp, s.smtpLn = srv, ln
	return nil
}

// NewTransport builds the transport the configuration names.
func NewTransport(ctx context.Context, cfg config.Config) (transport.Transport, error) {
	switch t := cfg.Transport; {
	case t == "ses":
		tr, err := ses.New(ctx, ses.Options{
			Region:           cfg.SES.Region,
			Endpoint:         cfg.SES.Endpoint,
			ConfigurationSet: cfg.SES.ConfigurationSet,
			Tags:             cfg.SES.Tags,
			RatePerSecond:    cfg.SES.RatePerSecond,
			RequestTimeout:   time.Duration(cfg.SES.RequestTimeout),
		})
		if err != nil {
			return nil, fmt.Errorf("transport ses: %w", err)
		}
		return tr, nil
	case t == "maildir":
		return maildir.New(filepath.Join(cfg.Data, "maildir"))
	case strings.HasPrefix(t, "maildir:"):
		return maildir.New(strings.TrimPrefix(t, "maildir:"))
	default:
		idle := cfg.SMTP.MaxIdleConns
		if idle == 0 {
			// one pooled connection per concurrent delivery
			idle = cfg.Dispatch.Workers
		}
		opts := smtptransport.Options{
			HelloName:          cfg.SMTP.Helo,
			MaxIdleConns:       idle,
			MaxMessagesPerConn: cfg.SMTP.MaxMessagesPerConn,
			DialTimeout:        time.Duration(cfg.SMTP.DialTimeout),
			CommandTimeout:     time.Duration(cfg.SMTP.CommandTimeout),
			FinalDotTimeout:    time.Duration(cfg.SMTP.FinalDotTimeout),
			AllowInsecureAuth:  cfg.SMTP.AllowInsecureAuth,
			NoPipelining:       cfg.SMTP.NoPipelining,
		}
		if cfg.SMTP.InsecureSkipVerify {
			opts.TLSConfig = &tls.Config{InsecureSkipVerify: true}
		}
		tr, err := smtptransport.New(t, opts)
		if err != nil {
			return nil, fmt.Errorf("transport: %w", err)
		}
		return tr, nil
	}
}

// HTTPAddr is the address the API listens on (useful with port 0).
func (s *Service) HTTPAddr() string { return s.listener.Addr().String() }

// Metrics is the service's instrumentation (served on GET /metrics).
func (s *Service) Metrics() *metrics.Metrics { return s.metrics }

// Client is the library client the front doors use.
func (s *Service) Client() *sendonce.Client { return s.client }

// Run serves until ctx ends, then shuts down in order: stop accepting
// requests and finish those in flight, stop the dispatcher (it finishes or
// releases its attempts), close the transport and the store.
func (s *Service) Run(ctx context.Context) error {
	smtpAddr := "off"
	if s.smtp != nil {
		smtpAddr = "smtp://" + s.smtpLn.Addr().String()
	}
	var names []string
	for _, src := range s.sources {
		names = append(names, src.Name())
	}
	var scheds []string
	for _, sc := range s.cfg.Schedules {
		scheds = append(scheds, sc.Name)
	}
	s.log.Info("sendonce serving",
		"http", "http://"+s.HTTPAddr(),
		"smtp", smtpAddr,
		"sources", strings.Join(names, ","),
		"schedules", strings.Join(scheds, ","),
		"ledger", describeStore(s.cfg),
		"transport", describeTransport(s.cfg),
		"auth", authMode(s.cfg))

	var wg sync.WaitGroup
	errc := make(chan error, 4+len(s.sources))
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	if s.smtp != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.smtp.Serve(s.smtpLn); err != nil && runCtx.Err() == nil {
				errc <- fmt.Errorf("smtp: %w", err)
				stop()
			}
		}()
	}
	for _, src := range s.sources {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := src.Run(runCtx, s.client); err != nil {
				errc <- fmt.Errorf("%s: %w", src.Name(), err)
				stop()
			}
		}()
	}
	if s.scheduler != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.scheduler.Run(runCtx); err != nil {
				errc <- fmt.Errorf("scheduler: %w", err)
				stop()
			}
		}()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := s.http.Serve(s.listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("http: %w", err)
			stop()
		}
	}()
	go func() {
		defer wg.Done()
		if err := s.client.Run(runCtx); err != nil {
			errc <- err
			stop()
		}
	}()
	<-runCtx.Done()
	s.log.Info("shutting down")
	shutCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := s.http.Shutdown(shutCtx); err != nil {
		s.log.Warn("http shutdown", "err", err)
	}
	if s.smtp != nil {
		if err := s.smtp.Shutdown(shutCtx); err != nil {
			s.log.Warn("smtp shutdown", "err", err)
		}
	}
	wg.Wait()
	s.close()
	s.log.Info("stopped")
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

func (s *Service) close() {
	if s.listener != nil {
		s.listener.Close()
	}
	if s.smtpLn != nil {
		s.smtpLn.Close()
	}
	if s.transport != nil {
		if err := s.transport.Close(); err != nil {
			s.log.Warn("closing transport", "err", err)
		}
	}
	if s.store != nil {
		if err := s.store.Close(); err != nil {
			s.log.Warn("closing store", "err", err)
		}
	}
}

func describeStore(cfg config.Config) string {
	if cfg.Store != "" {
		return RedactURL(cfg.Store)
	}
	return "sqlite " + filepath.Join(cfg.Data, sqlitestore.DBFile)
}

func describeTransport(cfg config.Config) string {
	switch t := cfg.Transport; {
	case t == "ses":
		return "ses"
	case t == "maildir":
		return "maildir " + filepath.Join(cfg.Data, "maildir")
	case strings.HasPrefix(t, "maildir:"):
		return "maildir " + strings.TrimPrefix(t, "maildir:")
	default:
		return RedactURL(t)
	}
}

// RedactURL hides the password of an smtp:// URL for logs.
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}

func authMode(cfg config.Config) string {
	if len(cfg.Tokens) == 0 {
		return "none (loopback only, default tenant)"
	}
	return fmt.Sprintf("%d bearer tokens", len(cfg.Tokens))
}
