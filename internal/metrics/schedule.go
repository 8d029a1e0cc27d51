package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sendonce/sendonce/internal/schedule"
	"github.com/sendonce/sendonce/store"
)

// ScheduleStatus is what the schedule gauges read: each schedule's next
// instant and latest recorded fire. *schedule.Scheduler satisfies it.
type ScheduleStatus interface {
	Status(ctx context.Context, next int) ([]schedule.Status, error)
}

// AddSchedules exports, read from the fire records at each scrape, the
// progress of each schedule's latest fire and its next instant. Like the
// ledger gauges they are the shared truth of every node, not this
// process's view: a fire resumed by another node shows its progress here.
func (m *Metrics) AddSchedules(s ScheduleStatus) {
	m.reg.MustRegister(&scheduleCollector{
		status:  s,
		timeout: m.cfg.ScrapeTimeout,
		up:      prometheus.NewDesc("sendonce_schedule_up", "1 when the fire records answered this scrape, 0 when they did not (the schedule gauges are then missing).", nil, nil),
		next:    prometheus.NewDesc("sendonce_schedule_next_fire_timestamp_seconds", "When the schedule fires next (Unix time).", []string{"schedule"}, nil),
		at:      prometheus.NewDesc("sendonce_schedule_last_fire_timestamp_seconds", "The scheduled instant of the schedule's latest recorded fire (Unix time).", []string{"schedule"}, nil),
		state:   prometheus.NewDesc("sendonce_schedule_last_fire_state", "1 for the state of the schedule's latest fire (running, waiting: stopped by an error until its retry, done), 0 for the others.", []string{"schedule", "state"}, nil),
		emails:  prometheus.NewDesc("sendonce_schedule_last_fire_emails", "Recipients of the schedule's latest fire so far, by outcome: admitted (new emails), duplicate (already admitted by an earlier run of the fire), rejected (refused, each logged).", []string{"schedule", "outcome"}, nil),
		tries:   prometheus.NewDesc("sendonce_schedule_last_fire_attempts", "Runs started of the schedule's latest fire (more than 1: it was retried or taken over).", []string{"schedule"}, nil),
	})
}

type scheduleCollector struct {
	status                             ScheduleStatus
	timeout                            time.Duration
	up, next, at, state, emails, tries *prometheus.Desc
}

func (c *scheduleCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.up, c.next, c.at, c.state, c.emails, c.tries} {
		ch <- d
	}
}

func (c *scheduleCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	statuses, err := c.status.Status(ctx, 1)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	unix := func(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }
	for _, st := range statuses {
		name := st.Schedule.Name
		if len(st.Next) > 0 {
			ch <- prometheus.MustNewConstMetric(c.next, prometheus.GaugeValue, unix(st.Next[0]), name)
		}
		f := st.Last
		if f == nil {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.at, prometheus.GaugeValue, unix(f.ScheduledAt), name)
		for _, s := range []store.FireState{store.FireRunning, store.FireWaiting, store.FireDone} {
			v := 0.0
			if f.State == s {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(c.state, prometheus.GaugeValue, v, name, string(s))
		}
		ch <- prometheus.MustNewConstMetric(c.emails, prometheus.GaugeValue, float64(f.Admitted), name, "admitted")
		ch <- prometheus.MustNewConstMetric(c.emails, prometheus.GaugeValue, float64(f.Duplicates), name, "duplicate")
		ch <- prometheus.MustNewConstMetric(c.emails, prometheus.GaugeValue, float64(f.Rejected), name, "rejected")
		ch <- prometheus.MustNewConstMetric(c.tries, prometheus.GaugeValue, float64(f.Attempts), name)
	}
}
