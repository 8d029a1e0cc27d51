package metrics

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sendonce/sendonce/source"
)

// DefaultLagTimeout bounds the broker round trips of one scrape's lag
// gauges.
const DefaultLagTimeout = 2 * time.Second

// AddSources exports the broker sources: the counts of each one that keeps
// them (source.StatsReporter) and the lag of each one whose broker can
// tell it (source.LagReporter), both read at scrape time, labelled with
// the source's name. Call it once, after the sources are built. Two
// sources of the same name (two groups on one stream) are told apart by a
// "#2", "#3" suffix, so their series never collide.
func (m *Metrics) AddSources(srcs []source.Source) error {
	c := newSourceCollector(m.cfg, srcs)
	if len(c.srcs) == 0 {
		return nil
	}
	if err := m.reg.Register(c); err != nil {
		return fmt.Errorf("metrics: sources: %w", err)
	}
	return nil
}

type watchedSource struct {
	name  string
	stats source.StatsReporter
	lag   source.LagReporter
	// busy is set while a Lag call runs: a broker slower than the scrape
	// interval gets one call at a time, not one more per scrape.
	busy atomic.Bool
}

// sourceCollector reads the sources at scrape time: counters from their
// own counts, gauges from their brokers.
type sourceCollector struct {
	now     func() time.Time
	timeout time.Duration
	srcs    []*watchedSource

	messages, lagUp, lagMessages, unacked, lagAge *prometheus.Desc
}

func newSourceCollector(cfg Config, srcs []source.Source) *sourceCollector {
	c := &sourceCollector{
		now:         cfg.Now,
		timeout:     cfg.LagTimeout,
		messages:    prometheus.NewDesc("sendonce_source_messages_total", "Messages of a broker source by outcome: received (taken from the broker, redeliveries included), admitted (new emails recorded), duplicate (the ledger had them; acknowledged, not sent again), dead_lettered, error (left unacknowledged for a redelivery or a retry).", []string{"source", "outcome"}, nil),
		lagUp:       prometheus.NewDesc("sendonce_source_lag_up", "1 when the source's broker answered this scrape's lag query in time, 0 when it did not (the lag gauges of that source are then missing).", []string{"source"}, nil),
		lagMessages: prometheus.NewDesc("sendonce_source_lag_messages", "Messages the broker holds for the source and it has not acknowledged: waiting for delivery plus delivered and unacknowledged (as far as the broker tells).", []string{"source"}, nil),
		unacked:     prometheus.NewDesc("sendonce_source_unacked_messages", "Of sendonce_source_lag_messages, those delivered to a consumer and not yet acknowledged (in flight, or held by a dead consumer until redelivered).", []string{"source"}, nil),
		lagAge:      prometheus.NewDesc("sendonce_source_lag_seconds", "Age of the oldest message waiting for delivery, for brokers that tell it (Redis Streams); 0 when none waits.", []string{"source"}, nil),
	}
	if c.timeout == 0 {
		c.timeout = DefaultLagTimeout
	}
	seen := map[string]int{}
	for _, s := range srcs {
		w := &watchedSource{name: s.Name()}
		w.stats, _ = s.(source.StatsReporter)
		w.lag, _ = s.(source.LagReporter)
		if w.stats == nil && w.lag == nil {
			continue
		}
		if seen[w.name]++; seen[w.name] > 1 {
			w.name = fmt.Sprintf("%s#%d", w.name, seen[w.name])
		}
		c.srcs = append(c.srcs, w)
	}
	return c
}

func (c *sourceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.messages, c.lagUp, c.lagMessages, c.unacked, c.lagAge} {
		ch <- d
	}
}

func (c *sourceCollector) Collect(ch chan<- prometheus.Metric) {
	for _, w := range c.srcs {
		if w.stats == nil {
			continue
		}
		st := w.stats.Stats()
		for _, v := range []struct {
			outcome string
			n       int64
		}{{"received", st.Received}, {"admitted", st.Admitted}, {"duplicate", st.Duplicates}, {"dead_lettered", st.DeadLettered}, {"error", st.Errors}} {
			ch <- prometheus.MustNewConstMetric(c.messages, prometheus.CounterValue, float64(v.n), w.name, v.outcome)
		}
	}
	c.collectLag(ch)
}

// collectLag asks every broker at once and waits at most the timeout:
// a broker that has not answered by then is reported down for this
// scrape, and its call, which sees the same deadline, ends on its own.
func (c *sourceCollector) collectLag(ch chan<- prometheus.Metric) {
	type answer struct {
		w   *watchedSource
		lag source.Lag
		err error
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	answers := make(chan answer, len(c.srcs))
	pending := map[*watchedSource]bool{}
	for _, w := range c.srcs {
		if w.lag == nil {
			continue
		}
		if !w.busy.CompareAndSwap(false, true) {
			ch <- prometheus.MustNewConstMetric(c.lagUp, prometheus.GaugeValue, 0, w.name)
			continue
		}
		pending[w] = true
		go func() {
			lag, err := w.lag.Lag(ctx)
			// Free the source before answering: the next scrape may start
			// the moment this one has its answers, and must not find the
			// source still busy with a call that has ended.
			w.busy.Store(false)
			answers <- answer{w, lag, err}
		}()
	}
	for len(pending) > 0 {
		select {
		case a := <-answers:
			delete(pending, a.w)
			if a.err != nil {
				ch <- prometheus.MustNewConstMetric(c.lagUp, prometheus.GaugeValue, 0, a.w.name)
				continue
			}
			ch <- prometheus.MustNewConstMetric(c.lagUp, prometheus.GaugeValue, 1, a.w.name)
			ch <- prometheus.MustNewConstMetric(c.lagMessages, prometheus.GaugeValue, float64(a.lag.Waiting+a.lag.Unacked), a.w.name)
			ch <- prometheus.MustNewConstMetric(c.unacked, prometheus.GaugeValue, float64(a.lag.Unacked), a.w.name)
			switch {
			case a.lag.Waiting == 0:
				ch <- prometheus.MustNewConstMetric(c.lagAge, prometheus.GaugeValue, 0, a.w.name)
			case !a.lag.Oldest.IsZero():
				ch <- prometheus.MustNewConstMetric(c.lagAge, prometheus.GaugeValue, max(c.now().Sub(a.lag.Oldest), 0).Seconds(), a.w.name)
			}
		case <-ctx.Done():
			for w := range pending {
				ch <- prometheus.MustNewConstMetric(c.lagUp, prometheus.GaugeValue, 0, w.name)
			}
			return
		}
	}
}
