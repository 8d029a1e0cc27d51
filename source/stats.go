package source

import "sync/atomic"

// Stats are the counts of one source since it was made: what a metrics
// exporter reads (Prometheus or any other; this package has no metrics
// dependency on purpose).
type Stats struct {
	// Received counts messages taken from the broker, redeliveries
	// included.
	Received int64
	// Admitted counts new emails recorded durably.
	Admitted int64
	// Duplicates counts messages the ledger already had: redeliveries and
	// repeats, acknowledged and not sent again.
	Duplicates int64
	// DeadLettered counts messages moved to the dead-letter destination
	// with their reason.
	DeadLettered int64
	// Errors counts failures that leave a message unacknowledged for now
	// (an unreachable ledger, a failed ack or dead-letter publish, a lost
	// broker connection). Each one means a redelivery or a retry, never a
	// loss.
	Errors int64
}

// StatsReporter is a Source that counts what it does.
type StatsReporter interface {
	Stats() Stats
}

// Counters are the live counts behind Stats, safe for concurrent use. A
// source embeds one and reports Snapshot.
type Counters struct {
	Received, Admitted, Duplicates, DeadLettered, Errors atomic.Int64
}

// Snapshot reads the counts.
func (c *Counters) Snapshot() Stats {
	return Stats{
		Received:     c.Received.Load(),
		Admitted:     c.Admitted.Load(),
		Duplicates:   c.Duplicates.Load(),
		DeadLettered: c.DeadLettered.Load(),
		Errors:       c.Errors.Load(),
	}
}
