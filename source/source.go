// Package source holds what every broker front door of sendonce shares: the
// JSON job format (docs/jobs.md, docs/job.schema.json), the derivation of a
// job's idempotency key, and the seam between a broker consumer and the
// ledger.
//
// A Source promises the acknowledgment rules of docs/jobs.md: a message is
// acknowledged (deleted, acked) only after the ledger has recorded its email
// durably, or answered that it already had it (a duplicate is acknowledged
// too, so the broker stops redelivering it). A message that can never be
// admitted (not a job, an invalid field, a key reused for another email) is
// dead-lettered with the reason: never retried forever, never dropped
// silently. When the ledger cannot be reached nothing is acknowledged, and
// the broker redelivers later; the ledger answers the redelivery as a
// duplicate if the first admission did commit.
package source

import (
	"context"

	"github.com/sendonce/sendonce"
)

// Admitter records emails durably. *sendonce.Client satisfies it.
//
// SubmitBatch returns an error only when nothing could be recorded (the
// store is unreachable): a Source then acknowledges nothing of the batch.
// Otherwise each item's outcome is in its BatchResult: new, Duplicate, or
// Err (a *sendonce.FieldError, sendonce.ErrTooLarge, sendonce.ErrKeyReused:
// answers about the item itself that no retry will change).
type Admitter interface {
	SubmitBatch(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error)
}

// Source consumes a broker and admits its jobs.
type Source interface {
	// Name identifies the source in logs and in each record's Source
	// field, such as "sqs:emails".
	Name() string
	// Run consumes until ctx ends. It then stops receiving, lets the
	// batches in flight finish their admission and acknowledgment (or
	// abandons them, unacknowledged, when that takes too long), and
	// returns nil. It never acknowledges a message whose email is not
	// durably admitted. It returns an error only when it cannot start.
	Run(ctx context.Context, a Admitter) error
}
