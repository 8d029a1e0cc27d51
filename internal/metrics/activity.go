package metrics

import (
	"sync"
	"time"
)

// Minute is what one node did in one minute.
type Minute struct {
	Start      time.Time `json:"start"`
	Accepted   int64     `json:"accepted"`
	Duplicates int64     `json:"duplicates"` // submissions suppressed as duplicates
	Sent       int64     `json:"sent"`
	Failed     int64     `json:"failed"`
	InDoubt    int64     `json:"in_doubt"` // attempts that ended in doubt
}

// activityMinutes is the length of the history: an hour, plus the minute
// in progress.
const activityMinutes = 61

// Activity keeps per-minute counts of the last hour, per tenant, for the
// dashboard's chart: a tenant sees only its own. It is this node's memory
// (it starts empty and is not shared with other nodes); the ledger's gauges
// are the durable truth.
type Activity struct {
	now func() time.Time

	mu      sync.Mutex
	tenants map[string]*ring
}

type ring [activityMinutes]struct {
	minute int64 // unix minute the slot holds
	m      Minute
}

func newActivity(now func() time.Time) *Activity {
	return &Activity{now: now, tenants: map[string]*ring{}}
}

func (a *Activity) add(tenant string, f func(*Minute)) {
	t := a.now()
	min := t.Unix() / 60
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.tenants[tenant]
	if r == nil {
		r = &ring{}
		a.tenants[tenant] = r
	}
	slot := &r[min%activityMinutes]
	if slot.minute != min {
		slot.minute = min
		slot.m = Minute{Start: time.Unix(min*60, 0).UTC()}
	}
	f(&slot.m)
}

// LastHour returns the tenant's 60 minutes before the current one and the
// current one, oldest first; minutes with nothing in them are zero.
func (a *Activity) LastHour(tenant string) []Minute {
	cur := a.now().Unix() / 60
	out := make([]Minute, activityMinutes)
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.tenants[tenant]
	for i := range out {
		min := cur - int64(activityMinutes-1-i)
		if r == nil {
			out[i] = Minute{Start: time.Unix(min*60, 0).UTC()}
			continue
		}
		slot := r[((min%activityMinutes)+activityMinutes)%activityMinutes]
		if slot.minute == min {
			out[i] = slot.m
		} else {
			out[i] = Minute{Start: time.Unix(min*60, 0).UTC()}
		}
	}
	return out
}
