package ses

import (
	"context"
	"time"
)

// SetLimiterClock makes the rate limiter of t read the time from now and
// wait with sleep, so tests see every wait without sleeping.
func SetLimiterClock(t *Transport, now func() time.Time, sleep func(context.Context, time.Duration) error) {
	t.limiter.mu.Lock()
	defer t.limiter.mu.Unlock()
	t.limiter.now, t.limiter.sleep = now, sleep
}

// LimiterStats says how often the rate limiter of t was consulted, and how
// often it made a Send wait.
func LimiterStats(t *Transport) (calls, waits int) {
	t.limiter.mu.Lock()
	defer t.limiter.mu.Unlock()
	return t.limiter.calls, t.limiter.waits
}
