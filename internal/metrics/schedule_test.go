package metrics_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/metrics"
	"github.com/sendonce/sendonce/internal/schedule"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// The schedule gauges show the latest fire's state and counts as recorded
// in the ledger: nothing before the first fire, then its progress.
func TestScheduleGauges(t *testing.T) {
	dir := t.TempDir()
	st, err := sqlitestore.Open(t.Context(), filepath.Join(dir, "data"), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, err := sendonce.New(sendonce.Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	src, err := schedule.NewFileSource(write("r.jsonl", "{\"email\":\"a@example.net\"}\n{\"email\":\"b@example.net\"}\n{\"email\":\"not an address\"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	cron, err := schedule.ParseCron("0 9 1 * *")
	if err != nil {
		t.Fatal(err)
	}
	sched, err := schedule.New(schedule.Config{Store: st, Submitter: c, Schedules: []schedule.Schedule{{
		Name: "monthly", Cron: cron, Source: src, From: "news@example.com",
		Templates: schedule.TemplateFiles{Subject: write("s.tmpl", "News"), Text: write("t.tmpl", "Hello")},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New(metrics.Config{NoRuntime: true})
	m.AddSchedules(sched)

	got := scrapeHandler(t, m.Handler())
	check(t, got, map[string]float64{"sendonce_schedule_up": 1})
	if _, ok := got[`sendonce_schedule_next_fire_timestamp_seconds{schedule="monthly"}`]; !ok {
		t.Error("no next fire time")
	}
	if _, ok := got[`sendonce_schedule_last_fire_attempts{schedule="monthly"}`]; ok {
		t.Error("a last fire exported before any fire")
	}

	at := time.Date(2030, 3, 1, 9, 0, 0, 0, time.UTC)
	if _, err := sched.RunFire(t.Context(), "monthly", at, true); err != nil {
		t.Fatal(err)
	}
	check(t, scrapeHandler(t, m.Handler()), map[string]float64{
		"sendonce_schedule_up": 1,
		`sendonce_schedule_last_fire_timestamp_seconds{schedule="monthly"}`:          float64(at.Unix()),
		`sendonce_schedule_last_fire_state{schedule="monthly",state="done"}`:         1,
		`sendonce_schedule_last_fire_state{schedule="monthly",state="running"}`:      0,
		`sendonce_schedule_last_fire_state{schedule="monthly",state="waiting"}`:      0,
		`sendonce_schedule_last_fire_emails{outcome="admitted",schedule="monthly"}`:  2,
		`sendonce_schedule_last_fire_emails{outcome="duplicate",schedule="monthly"}`: 0,
		`sendonce_schedule_last_fire_emails{outcome="rejected",schedule="monthly"}`:  1,
		`sendonce_schedule_last_fire_attempts{schedule="monthly"}`:                   1,
	})

	st.Close()
	check(t, scrapeHandler(t, m.Handler()), map[string]float64{"sendonce_schedule_up": 0})
}
