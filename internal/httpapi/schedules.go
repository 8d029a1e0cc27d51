package httpapi

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/sendonce/sendonce/internal/schedule"
	"github.com/sendonce/sendonce/store"
)

// Schedules is what GET /v1/schedules reads: the configured schedules with
// their next instants, and their recorded fires. *schedule.Scheduler
// satisfies it.
type Schedules interface {
	Status(ctx context.Context, next int) ([]schedule.Status, error)
	Fires(ctx context.Context, f store.FireFilter) ([]store.Fire, error)
}

// Limits of GET /v1/schedules.
const (
	nextFires        = 3
	defaultFireLimit = 10
	maxFireLimit     = 100
)

// ScheduleJSON is one schedule of GET /v1/schedules.
type ScheduleJSON struct {
	Name     string      `json:"name"`
	Cron     string      `json:"cron"`
	TimeZone string      `json:"time_zone"`
	CatchUp  string      `json:"catch_up"`
	Next     []time.Time `json:"next"`
	Fires    []FireJSON  `json:"fires"`
}

// FireJSON is one fire of a schedule and how far it got.
type FireJSON struct {
	Key         string     `json:"key"`
	ScheduledAt time.Time  `json:"scheduled_at"`
	State       string     `json:"state"`
	Admitted    int64      `json:"admitted"`
	Duplicates  int64      `json:"duplicates"`
	Rejected    int64      `json:"rejected"`
	Cursor      string     `json:"cursor"`
	Attempts    int        `json:"attempts"`
	LastError   string     `json:"last_error,omitempty"`
	NextAttempt *time.Time `json:"next_attempt,omitempty"`
	Manual      bool       `json:"manual"`
	Owner       string     `json:"owner,omitempty"`
	UpdatedAt   time.Time  `json:"updated_at"`
	FinishedAt  *time.Time `json:"finished_at,omitempty"`
}

func fireJSON(f store.Fire) FireJSON {
	opt := func(t time.Time) *time.Time {
		if t.IsZero() {
			return nil
		}
		u := t.UTC()
		return &u
	}
	out := FireJSON{Key: f.Key, ScheduledAt: f.ScheduledAt.UTC(), State: string(f.State), Admitted: f.Admitted, Duplicates: f.Duplicates,
		Rejected: f.Rejected, Cursor: f.Cursor, Attempts: f.Attempts, LastError: f.LastError, Manual: f.Manual,
		UpdatedAt: f.UpdatedAt.UTC(), FinishedAt: opt(f.FinishedAt)}
	if f.State == store.FireWaiting {
		out.NextAttempt = opt(f.NextAttempt)
	}
	if f.State == store.FireRunning {
		out.Owner = f.Owner
	}
	return out
}

// schedules lists the caller's tenant's schedules: other tenants'
// campaigns are not theirs to see. Without a scheduler the list is empty.
func (a *API) schedules(w http.ResponseWriter, r *http.Request) {
	limit := defaultFireLimit
	if v := r.URL.Query().Get("fires"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxFireLimit {
			writeError(w, http.StatusBadRequest, "invalid_parameter", "fires", fmt.Sprintf("fires is %q; give the number of latest fires per schedule, 1 to %d", v, maxFireLimit))
			return
		}
		limit = n
	}
	out := struct {
		Schedules []ScheduleJSON `json:"schedules"`
		Now       time.Time      `json:"now"`
	}{Schedules: []ScheduleJSON{}, Now: time.Now().UTC()}
	if a.cfg.Schedules == nil {
		writeJSON(w, http.StatusOK, out)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	statuses, err := a.cfg.Schedules.Status(ctx, nextFires)
	if err != nil {
		a.lookupError(w, err, "")
		return
	}
	tenant := callerOf(r).tenant
	for _, st := range statuses {
		sc := st.Schedule
		if sc.Tenant != tenant {
			continue
		}
		fires, err := a.cfg.Schedules.Fires(ctx, store.FireFilter{Schedule: sc.Name, Limit: limit})
		if err != nil {
			a.lookupError(w, err, "")
			return
		}
		js := ScheduleJSON{Name: sc.Name, CatchUp: string(sc.CatchUp), Next: []time.Time{}, Fires: make([]FireJSON, len(fires))}
		if sc.Cron != nil {
			js.Cron = sc.Cron.String()
		}
		if sc.Location != nil {
			js.TimeZone = sc.Location.String()
		}
		for _, t := range st.Next {
			js.Next = append(js.Next, t.UTC())
		}
		for i, f := range fires {
			js.Fires[i] = fireJSON(f)
		}
		out.Schedules = append(out.Schedules, js)
	}
	writeJSON(w, http.StatusOK, out)
}
