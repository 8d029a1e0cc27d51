package ses

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// limiter is a token bucket: rate tokens a second, at most burst saved up.
// SES enforces a maximum send rate per account and answers above it with
// throttling errors; waiting here, before the commit marker, keeps us under
// it instead of turning every burst into retries.
//
// It is written here rather than taken from golang.org/x/time/rate so that
// tests can give it a clock and see every wait without sleeping.
type limiter struct {
	rate  float64 // tokens per second; 0 means no limit
	burst float64

	now   func() time.Time
	sleep func(ctx context.Context, d time.Duration) error

	mu     sync.Mutex
	tokens float64
	last   time.Time
	calls  int // how many times wait was consulted, for tests
	waits  int // how many of them had to wait, for tests
}

func newLimiter(rate float64) *limiter {
	return &limiter{
		rate:   rate,
		burst:  max(1, rate),
		tokens: max(1, rate),
		now:    time.Now,
		sleep:  sleepCtx,
	}
}

// wait takes one token, waiting for it if needed. It returns an error,
// without taking a token, if ctx ends first or would end before the token
// is due.
func (l *limiter) wait(ctx context.Context) error {
	l.mu.Lock()
	l.calls++
	if l.rate == 0 {
		l.mu.Unlock()
		return nil
	}
	now := l.now()
	if !l.last.IsZero() && now.After(l.last) {
		l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	}
	if now.After(l.last) {
		l.last = now
	}
	l.tokens--
	var d time.Duration
	if l.tokens < 0 {
		d = time.Duration(-l.tokens / l.rate * float64(time.Second))
		l.waits++
	}
	sleep := l.sleep
	l.mu.Unlock()
	if d == 0 {
		return nil
	}
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < d {
		l.giveBack()
		return fmt.Errorf("send rate %g/s: the next slot is in %s, after the context's deadline", l.rate, d)
	}
	if err := sleep(ctx, d); err != nil {
		l.giveBack()
		return err
	}
	return nil
}

// giveBack returns a token that was reserved but not used, so that a
// cancelled wait does not slow down the others.
func (l *limiter) giveBack() {
	l.mu.Lock()
	l.tokens = min(l.burst, l.tokens+1)
	l.mu.Unlock()
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}
