package source

import (
	"context"
	"time"
)

// Lag is how far a source's consumer is behind its broker: what the broker
// still holds for it, as the broker itself counts it.
type Lag struct {
	// Waiting counts messages not yet delivered to this consumer (the
	// backlog). Approximate where the broker says so (SQS).
	Waiting int64
	// Unacked counts messages delivered and not yet acknowledged: in
	// flight, or held by a consumer that died until they are redelivered.
	Unacked int64
	// Oldest is when the oldest waiting message entered the broker, where
	// the broker tells it cheaply (Redis Streams, from the entry ID); the
	// zero time when it is unknown or nothing waits.
	Oldest time.Time
}

// LagReporter is a Source that can ask its broker for its lag. Lag costs
// one or two round trips to the broker and no scan, so a metrics exporter
// may call it at every scrape; it honours ctx's deadline.
type LagReporter interface {
	Lag(ctx context.Context) (Lag, error)
}
