// Package metrics is sendonce's Prometheus instrumentation: what was
// admitted and delivered, how long it took, how the store's group commit
// behaves, and, computed from the ledger at each scrape, how much is queued
// or in doubt and for how long.
//
// Everything is registered on the registry of one Metrics value, never on
// the global one, so tests and several services in one process do not
// share counters.
package metrics

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sendonce/sendonce/store"
)

// Config configures Metrics.
type Config struct {
	// Store is read at every scrape for the ledger gauges (queue depth,
	// in-doubt count and ages). Optional: without it those are not exported.
	Store store.Store
	// Now is the clock the ages are measured with. Default time.Now.
	Now func() time.Time
	// ScrapeTimeout bounds the ledger queries of one scrape. Default 5s.
	ScrapeTimeout time.Duration
	// LagTimeout bounds the broker queries of one scrape's source lag
	// gauges (see AddSources). Default DefaultLagTimeout.
	LagTimeout time.Duration
	// NoRuntime leaves out the Go runtime and process collectors (tests that
	// compare whole expositions).
	NoRuntime bool
}

// Metrics holds sendonce's collectors and their registry. Its methods are
// safe for concurrent use and return at once.
type Metrics struct {
	cfg Config
	reg *prometheus.Registry

	admissions      *prometheus.CounterVec
	admitLatency    *prometheus.HistogramVec
	deliveries      *prometheus.CounterVec
	attempts        *prometheus.CounterVec
	deliveryLatency *prometheus.HistogramVec
	commitBatch     prometheus.Histogram
	commitSync      prometheus.Histogram
	resolutions     *prometheus.CounterVec
	activity        *Activity
}

// New returns Metrics with every collector registered on a new registry.
func New(cfg Config) *Metrics {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ScrapeTimeout == 0 {
		cfg.ScrapeTimeout = 5 * time.Second
	}
	m := &Metrics{
		cfg:      cfg,
		reg:      prometheus.NewRegistry(),
		activity: newActivity(cfg.Now),
		admissions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sendonce_admissions_total",
			Help: "Submissions by front door (source) and outcome: new, duplicate (suppressed), conflict (same key, other email), rejected (invalid, never reached the ledger), error (the ledger failed; nothing accepted).",
		}, []string{"source", "outcome"}),
		admitLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "sendonce_admission_duration_seconds",
			Help:    "Time from a submission reaching the core to its durable answer (new, duplicate or conflict), by front door.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"source"}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sendonce_deliveries_total",
			Help: "Finished delivery attempts by transport and outcome: sent, failed, retry, in_doubt, release (handed back unstarted at shutdown), abandoned (lease lost, or the outcome could not be recorded).",
		}, []string{"transport", "outcome"}),
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sendonce_attempts_total",
			Help: "Delivery attempts started, by transport (releases at shutdown are not counted).",
		}, []string{"transport"}),
		deliveryLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "sendonce_delivery_duration_seconds",
			Help:    "Time of one delivery attempt, from the claim to the recorded outcome, by transport and outcome.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 17),
		}, []string{"transport", "outcome"}),
		commitBatch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sendonce_store_commit_batch_size",
			Help:    "Write requests that shared one durable commit: of every write of the SQLite store (its group commit), of the admissions of the PostgreSQL store (its admission batches).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11),
		}),
		commitSync: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sendonce_store_commit_duration_seconds",
			Help:    "Time of one COMMIT counted in sendonce_store_commit_batch_size: mostly the fsync of the write-ahead log (SQLite), or the round trip and the server's WAL flush (PostgreSQL).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		resolutions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sendonce_in_doubt_resolutions_total",
			Help: "In-doubt emails resolved, by action (resend, mark_sent, fail) and by whom: operator (API, dashboard, CLI), rule (an automatic in-doubt rule) or policy (dispatch.in_doubt: resend).",
		}, []string{"action", "by"}),
	}
	m.reg.MustRegister(m.admissions, m.admitLatency, m.deliveries, m.attempts, m.deliveryLatency,
		m.commitBatch, m.commitSync, m.resolutions)
	if cfg.Store != nil {
		m.reg.MustRegister(newLedgerCollector(cfg))
	}
	if !cfg.NoRuntime {
		m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	return m
}

// Registry is the registry every collector is on.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// Activity is the per-minute history of the last hour, for the dashboard.
func (m *Metrics) Activity() *Activity { return m.activity }

// Admitted counts one submission. The tenant only files it in the
// dashboard's per-tenant history; it is not a label. The latency is observed only for
// submissions that reached the ledger (rejected ones cost nothing there).
func (m *Metrics) Admitted(tenant, source, outcome string, elapsed time.Duration) {
	m.admissions.WithLabelValues(source, outcome).Inc()
	switch outcome {
	case "new":
		m.activity.add(tenant, func(x *Minute) { x.Accepted++ })
	case "duplicate":
		m.activity.add(tenant, func(x *Minute) { x.Duplicates++ })
	}
	if outcome != "rejected" {
		m.admitLatency.WithLabelValues(source).Observe(elapsed.Seconds())
	}
}

// Attempted counts one finished delivery attempt.
func (m *Metrics) Attempted(tenant, transport, outcome string, elapsed time.Duration) {
	m.deliveries.WithLabelValues(transport, outcome).Inc()
	switch outcome {
	case "sent":
		m.activity.add(tenant, func(x *Minute) { x.Sent++ })
	case "failed":
		m.activity.add(tenant, func(x *Minute) { x.Failed++ })
	case "in_doubt":
		m.activity.add(tenant, func(x *Minute) { x.InDoubt++ })
	}
	if outcome != "release" {
		m.attempts.WithLabelValues(transport).Inc()
	}
	m.deliveryLatency.WithLabelValues(transport, outcome).Observe(elapsed.Seconds())
}

// Resolved counts one resolution of an in-doubt email; by is operator,
// rule or policy. The tenant is not a label: tenants are many, series
// should be few.
func (m *Metrics) Resolved(_, action, by string) {
	m.resolutions.WithLabelValues(action, by).Inc()
}

// Committed observes one commit of the store: a group commit of the
// SQLite store, or an admission batch of the PostgreSQL store.
func (m *Metrics) Committed(requests int, sync time.Duration) {
	m.commitBatch.Observe(float64(requests))
	m.commitSync.Observe(sync.Seconds())
}

// ledgerCollector reads the ledger at scrape time, so the gauges are the
// truth of the store shared by every node, not this process's view.
type ledgerCollector struct {
	cfg                         Config
	up, emails, queued, inDoubt *prometheus.Desc
	queueOldest, inDoubtOldest  *prometheus.Desc
}

func newLedgerCollector(cfg Config) *ledgerCollector {
	return &ledgerCollector{
		cfg:           cfg,
		up:            prometheus.NewDesc("sendonce_store_up", "1 when the ledger answered this scrape's queries, 0 when it did not (the ledger gauges are then missing).", nil, nil),
		emails:        prometheus.NewDesc("sendonce_emails", "Emails in the ledger by state, all tenants.", []string{"state"}, nil),
		queued:        prometheus.NewDesc("sendonce_queue_depth", "Emails queued for delivery (due now or later), all tenants.", nil, nil),
		inDoubt:       prometheus.NewDesc("sendonce_in_doubt", "Emails whose delivery outcome is unknown, waiting for an operator or a rule.", nil, nil),
		queueOldest:   prometheus.NewDesc("sendonce_queue_oldest_age_seconds", "Age of the oldest email still queued, since its admission; 0 when none is queued.", nil, nil),
		inDoubtOldest: prometheus.NewDesc("sendonce_in_doubt_oldest_age_seconds", "How long the oldest unresolved in-doubt email has been in doubt; 0 when none is. Alert on it.", nil, nil),
	}
}

func (c *ledgerCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.up, c.emails, c.queued, c.inDoubt, c.queueOldest, c.inDoubtOldest} {
		ch <- d
	}
}

func (c *ledgerCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ScrapeTimeout)
	defer cancel()
	counts, err := c.cfg.Store.Counts(ctx, store.AllTenants)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	qAge, err1 := c.oldest(ctx, store.StateQueued, func(r store.Record) time.Time { return r.CreatedAt })
	dAge, err2 := c.oldest(ctx, store.StateInDoubt, func(r store.Record) time.Time { return r.UpdatedAt })
	if err1 != nil || err2 != nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	for _, st := range []store.State{store.StateQueued, store.StateSending, store.StateSent, store.StateFailed, store.StateInDoubt} {
		ch <- prometheus.MustNewConstMetric(c.emails, prometheus.GaugeValue, float64(counts[st]), string(st))
	}
	ch <- prometheus.MustNewConstMetric(c.queued, prometheus.GaugeValue, float64(counts[store.StateQueued]))
	ch <- prometheus.MustNewConstMetric(c.inDoubt, prometheus.GaugeValue, float64(counts[store.StateInDoubt]))
	ch <- prometheus.MustNewConstMetric(c.queueOldest, prometheus.GaugeValue, qAge.Seconds())
	ch <- prometheus.MustNewConstMetric(c.inDoubtOldest, prometheus.GaugeValue, dAge.Seconds())
}

// oldest is the age, by since, of the first-admitted record in state: one
// row read from the (state, id) index.
func (c *ledgerCollector) oldest(ctx context.Context, st store.State, since func(store.Record) time.Time) (time.Duration, error) {
	p, err := c.cfg.Store.List(ctx, store.Filter{Tenant: store.AllTenants, State: st, Oldest: true, Limit: 1})
	if err != nil || len(p.Records) == 0 {
		return 0, err
	}
	return max(c.cfg.Now().Sub(since(p.Records[0])), 0), nil
}
