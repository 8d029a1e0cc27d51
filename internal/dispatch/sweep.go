package dispatch

import (
	"context"
	"log/slog"
	"time"

	"github.com/sendonce/sendonce/store"
)

// SweepConfig configures the retention sweeper.
type SweepConfig struct {
	Store store.Store
	// Retention is how long a final record is kept, from its acceptance;
	// it is also how long a repeat of its key is recognised.
	Retention time.Duration
	// Every is the pause between sweeps. Default 10 minutes.
	Every time.Duration
	// Batch is how many records one write removes. Default 500: small
	// enough that no admission waits long behind it.
	Batch  int
	Now    func() time.Time
	Logger *slog.Logger
}

// RunSweeper removes final records older than the retention window until
// ctx ends. Several nodes may run it at once: a record is deleted once.
func RunSweeper(ctx context.Context, c SweepConfig) {
	if c.Every == 0 {
		c.Every = 10 * time.Minute
	}
	if c.Batch == 0 {
		c.Batch = 500
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	t := time.NewTicker(c.Every)
	defer t.Stop()
	for {
		removed := 0
		for ctx.Err() == nil {
			n, err := c.Store.Sweep(ctx, c.Now().Add(-c.Retention), c.Batch)
			if err != nil {
				if ctx.Err() == nil {
					c.Logger.Warn("retention sweep failed; trying again at the next sweep", "err", err)
				}
				break
			}
			removed += n
			if n < c.Batch {
				break
			}
		}
		if removed > 0 {
			c.Logger.Info("retention sweep", "removed", removed, "retention", c.Retention)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
