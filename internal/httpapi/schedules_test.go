package httpapi_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/httpapi"
	"github.com/sendonce/sendonce/internal/schedule"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// GET /v1/schedules shows a tenant its own schedules only, each with its
// next instants and its fires' recorded progress.
func TestSchedulesProgressPerTenant(t *testing.T) {
	dir := t.TempDir()
	st, err := sqlitestore.Open(context.Background(), filepath.Join(dir, "data"), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
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
	src, err := schedule.NewFileSource(write("r.jsonl", "{\"email\":\"a@example.net\"}\n{\"email\":\"b@example.net\"}\n{\"email\":\"nobody\"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	cron, err := schedule.ParseCron("0 9 1 * *")
	if err != nil {
		t.Fatal(err)
	}
	tpl := schedule.TemplateFiles{Subject: write("s.tmpl", "News"), Text: write("t.tmpl", "Hello")}
	paris, err := time.LoadLocation("Europe/Paris")
	if err != nil {
		t.Fatal(err)
	}
	sched, err := schedule.New(schedule.Config{Store: st, Submitter: c, BatchSize: 2, Schedules: []schedule.Schedule{
		{Name: "acme-news", Cron: cron, Location: paris, Source: src, From: "n@example.com", Tenant: "acme", Templates: tpl},
		{Name: "other-news", Cron: cron, Source: src, From: "n@example.com", Tenant: "other", Templates: tpl},
	}})
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2030, 3, 1, 8, 0, 0, 0, time.UTC)
	for _, name := range []string{"acme-news", "other-news"} {
		if _, err := sched.RunFire(t.Context(), name, at, true); err != nil {
			t.Fatal(err)
		}
	}
	api, err := httpapi.New(httpapi.Config{Client: c, Schedules: sched,
		Tokens: []httpapi.Token{{Name: "ops", Tenant: "acme", Secret: "acme-secret-123"}}})
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodGet, "/v1/schedules", nil)
	req.Header.Set("Authorization", "Bearer acme-secret-123")
	w := httptest.NewRecorder()
	api.ServeHTTP(w, req)
	if w.Code != http.StatusOK {
		t.Fatalf("GET /v1/schedules: %d %s", w.Code, w.Body)
	}
	var out struct {
		Schedules []httpapi.ScheduleJSON `json:"schedules"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil {
		t.Fatal(err)
	}
	if len(out.Schedules) != 1 || out.Schedules[0].Name != "acme-news" {
		t.Fatalf("tenant acme sees %+v, want its one schedule", out.Schedules)
	}
	sc := out.Schedules[0]
	if sc.Cron != "0 9 1 * *" || sc.TimeZone != "Europe/Paris" || sc.CatchUp != "skip" || len(sc.Next) != 3 {
		t.Errorf("schedule = %+v", sc)
	}
	if len(sc.Fires) != 1 {
		t.Fatalf("fires = %+v, want the one run", sc.Fires)
	}
	f := sc.Fires[0]
	if f.Key != "acme-news@2030-03-01T08:00:00Z" || !f.ScheduledAt.Equal(at) || f.State != "done" || f.Admitted != 2 || f.Duplicates != 0 ||
		f.Rejected != 1 || f.Attempts != 1 || !f.Manual || f.Cursor == "" || f.FinishedAt == nil || f.NextAttempt != nil {
		t.Errorf("fire = %+v", f)
	}
}
