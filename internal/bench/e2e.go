package bench

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/transport"
	"github.com/sendonce/sendonce/transport/maildir"
	smtptransport "github.com/sendonce/sendonce/transport/smtp"
)

func newClient(st store.Store) (*sendonce.Client, error) {
	return sendonce.New(sendonce.Config{Store: st})
}

// e2e submits through the library for the duration while the dispatcher
// delivers to a local SMTP sink (or a maildir), then waits for the backlog
// to drain (at most the duration again, and at least 10s). It reports
// deliveries per second and the latency from the acknowledged admission to
// the sink's receipt (maildir: to the dispatcher's record of the delivery).
func (b *bencher) e2e(ctx context.Context) ([]Row, error) {
	st, dir, err := b.openSQLite(ctx, "e2e")
	if err != nil {
		return nil, err
	}
	defer st.Close()

	var (
		mu        sync.Mutex
		admitted  = receipts{}
		delivered = receipts{} // maildir only
		sent      atomic.Int64
		last      time.Time
	)
	var s *sink
	var tr transport.Transport
	if b.opts.Sink == "smtp" {
		if s, err = startSink(true); err != nil {
			return nil, err
		}
		defer s.close()
		if tr, err = smtptransport.New("smtp://"+s.addr(), smtptransport.Options{MaxIdleConns: b.opts.Workers}); err != nil {
			return nil, err
		}
	} else if tr, err = maildir.New(filepath.Join(dir, "maildir")); err != nil {
		return nil, err
	}
	defer tr.Close()
	c, err := sendonce.New(sendonce.Config{Store: st, Transport: tr, Dispatch: sendonce.DispatchConfig{
		Workers: b.opts.Workers,
		Observer: func(r sendonce.Record, result string, _ error) {
			if result != "sent" {
				return
			}
			now := time.Now()
			mu.Lock()
			delivered[idHash(r.MessageID)] = stamp(now)
			last = now
			mu.Unlock()
			sent.Add(1)
		},
	}})
	if err != nil {
		return nil, err
	}
	runCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	var runErr error
	wg.Go(func() { runErr = c.Run(runCtx) })
	stopRun := func() error { stop(); wg.Wait(); return runErr }
	defer stopRun()

	var ru0 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	steal := startSteal()
	start := time.Now()
	e := b.email()
	var n atomic.Int64
	stopProfile, err := b.profile()
	if err != nil {
		return nil, err
	}
	defer stopProfile()
	b.paced = true
	row, err := b.drive(ctx, "e2e-admit", b.opts.Concurrency, func(ctx context.Context, _ int) (int, error) {
		rc, err := c.Submit(ctx, sendonce.Submission{Key: b.key("e2e"), Email: e})
		if err != nil {
			return 0, err
		}
		now := time.Now()
		mu.Lock()
		admitted[idHash(rc.Record.MessageID)] = stamp(now)
		mu.Unlock()
		n.Add(1)
		return 1, nil
	})
	b.paced = false
	if err != nil {
		return nil, err
	}
	count := func() int64 {
		if s != nil {
			return s.count.Load()
		}
		return sent.Load()
	}
	wait, cancel := context.WithTimeout(ctx, max(10*time.Second, b.opts.Duration))
	defer cancel()
	for count() < n.Load() && wait.Err() == nil {
		select {
		case <-wait.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	stopProfile()
	if err := stopRun(); err != nil && !errors.Is(err, context.Canceled) {
		return nil, err
	}
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)

	got := delivered
	end := last
	if s != nil {
		s.mu.Lock()
		got, end = s.at, s.last
		s.mu.Unlock()
	}
	mu.Lock()
	lats := make([]time.Duration, 0, len(admitted))
	for id, at := range admitted {
		if rt, ok := got[id]; ok {
			lats = append(lats, time.Duration(max(0, rt-at)))
		}
	}
	mu.Unlock()
	row.Path = PathE2E
	row.Ops = count()
	row.Seconds = end.Sub(start).Seconds()
	row.Throughput = 0
	if row.Seconds > 0 {
		row.Throughput = float64(row.Ops) / row.Seconds
	}
	row.CPUSeconds = tv(ru.Utime) + tv(ru.Stime) - tv(ru0.Utime) - tv(ru0.Stime)
	row.StealPct = steal.pct()
	row.PeakRSSMiB = float64(ru.Maxrss) / 1024
	row.P50Ms, row.P99Ms, row.MaxMs = 0, 0, 0
	if len(lats) > 0 {
		slices.Sort(lats)
		row.P50Ms = ms(lats[len(lats)*50/100])
		row.P99Ms = ms(lats[min(len(lats)-1, len(lats)*99/100)])
		row.MaxMs = ms(lats[len(lats)-1])
	}
	row.Note = "admitted " + itoa(n.Load()) + ", delivered " + itoa(row.Ops) + " to " + b.opts.Sink + "; latency admission to receipt"
	row.Ceiling = "ceiling-smtp-sink"
	bare, err := b.ceilingSMTP(ctx)
	if err != nil {
		return nil, err
	}
	return []Row{row, bare}, nil
}
