package store

import (
	"context"
	"errors"
	"time"
)

// FireStore is an optional add-on of a Store, found by type assertion: the
// durable record of each fire of a schedule, which lets any number of
// scheduler nodes share one schedule. A fire is one scheduled instant of one
// schedule, keyed by (schedule name, instant in UTC).
//
// # The contract every FireStore keeps
//
// Uniqueness: a fire key has at most one record; ClaimFire creates it with
// an insert guarded by the primary key, never a check followed by an
// insert. Of any number of concurrent ClaimFire calls for a key with no
// record, exactly one succeeds.
//
// One runner at a time: a fire is running under a lease (owner, expiry) and
// a fence. ClaimFire takes a running fire only when its lease expired at the
// caller's now (its node died or stalled), and a waiting fire only when its
// retry time has come; each take advances the fence. RenewFire,
// ProgressFire and FinishFire are compare-and-set operations on
// (key, fence) and refuse with ErrLeaseLost once the fence moved, the fire
// is no longer running, or the lease expired at now.
//
// Resumability: ProgressFire durably records the cursor of the recipient
// source after a batch of emails was admitted, and a later claim returns
// it, so whoever takes over resumes after the last recorded batch. The batch
// after the cursor may have been admitted already by the dead runner; the
// email ledger answers those admissions as duplicates, so nothing is sent
// twice and nothing is skipped.
//
// Durability and time are as for Store: a write that returned survives a
// crash, and every comparison uses the caller's now.
//
// The lifecycle of a fire:
//
//	ClaimFire ─▶ running ─FinishFire(done)─▶ done
//	               ▲  │
//	               │  └─FinishFire(retry)─▶ waiting (until RetryAt)
//	               └─ClaimFire (lease expired, or retry time reached)
type FireStore interface {
	// ClaimFire creates the fire's record as running, owned by c.Owner until
	// c.Now+c.Lease with fence 1, or takes over an existing one that is
	// claimable (running with an expired lease, or waiting with its retry
	// time reached), advancing its fence and keeping its cursor. It returns
	// the fire as claimed. ErrFireDone if the fire is done; ErrFireBusy if
	// another runner holds it or its retry time has not come.
	ClaimFire(ctx context.Context, c FireClaim) (Fire, error)

	// RenewFire extends a held lease to now+d.
	RenewFire(ctx context.Context, l FireLease, now time.Time, d time.Duration) error

	// ProgressFire records the source cursor after a batch and the running
	// totals, and extends the lease to p.Now+p.Lease.
	ProgressFire(ctx context.Context, p FireProgress) error

	// FinishFire ends a run: done (every recipient admitted), or waiting for
	// a retry at f.RetryAt with the error that stopped it.
	FinishFire(ctx context.Context, f FireFinish) error

	// GetFire returns the fire's record, or ErrNotFound.
	GetFire(ctx context.Context, key string) (Fire, error)

	// ListFires returns fires of one schedule (all schedules when
	// f.Schedule is empty), latest scheduled instant first.
	ListFires(ctx context.Context, f FireFilter) ([]Fire, error)
}

// FireState is where a fire is in its lifecycle.
type FireState string

// The states of a fire.
const (
	FireRunning FireState = "running" // a runner holds the lease, or held it and died
	FireWaiting FireState = "waiting" // stopped by an error; retried at NextAttempt
	FireDone    FireState = "done"    // every recipient was admitted
)

// Fire is the record of one fire.
type Fire struct {
	Key         string // FireKey(Schedule, ScheduledAt)
	Schedule    string
	ScheduledAt time.Time // the scheduled instant, UTC
	State       FireState
	Fence       int64
	Owner       string
	LeaseExpiry time.Time
	Cursor      string // where the recipient source resumes; "" is its start
	Admitted    int64  // emails admitted as new by all runs
	Duplicates  int64  // admissions answered as already recorded (re-run batches)
	Rejected    int64  // recipients refused (invalid address, ...), each logged
	Attempts    int    // runs started
	LastError   string
	NextAttempt time.Time // when a waiting fire may be retried
	Manual      bool      // started by "sendonce schedule run"
	CreatedAt   time.Time
	UpdatedAt   time.Time
	FinishedAt  time.Time
}

// FireKey is the key of the fire of schedule at the instant at:
// "NAME@2006-01-02T15:04:05Z" (RFC 3339 in UTC, with fractional seconds
// only when the instant has them). The same schedule and instant give the
// same key on every node and in every run.
func FireKey(schedule string, at time.Time) string {
	return schedule + "@" + at.UTC().Format(time.RFC3339Nano)
}

// FireLease identifies one claim of one fire.
type FireLease struct {
	Key   string
	Fence int64
}

// FireClaim asks to run one fire.
type FireClaim struct {
	Key         string
	Schedule    string
	ScheduledAt time.Time
	Owner       string
	Manual      bool // recorded when the claim creates the record
	Now         time.Time
	Lease       time.Duration
}

// FireProgress records one admitted batch.
type FireProgress struct {
	Lease      FireLease
	Cursor     string
	Admitted   int64 // added to the totals
	Duplicates int64
	Rejected   int64
	Now        time.Time
	Extend     time.Duration // the lease lasts until Now+Extend
}

// FireFinish ends one run of a fire.
type FireFinish struct {
	Lease   FireLease
	Done    bool      // true: done; false: waiting until RetryAt
	Error   string    // why the run stopped, when not done
	RetryAt time.Time // when not done
	Now     time.Time
}

// FireFilter selects fires for ListFires.
type FireFilter struct {
	Schedule   string
	Since      time.Time // only fires scheduled at or after Since (zero: all)
	Unfinished bool      // only running and waiting fires
	Limit      int       // 0 means 100
}

// Errors of FireStore.
var (
	// ErrFireBusy: another runner holds the fire's lease, or its retry
	// time has not come.
	ErrFireBusy = errors.New("store: fire held by another runner or not yet due for retry")
	// ErrFireDone: the fire has already admitted every recipient.
	ErrFireDone = errors.New("store: fire already done")
)

// DecideClaim applies the contract of ClaimFire to an existing record
// (state, lease expiry, next attempt) at now: nil when the caller may take
// it, ErrFireDone or ErrFireBusy otherwise. Every store calls it.
func DecideClaim(state FireState, leaseExpiry, nextAttempt, now time.Time) error {
	switch state {
	case FireDone:
		return ErrFireDone
	case FireRunning:
		if leaseExpiry.After(now) {
			return ErrFireBusy
		}
	case FireWaiting:
		if nextAttempt.After(now) {
			return ErrFireBusy
		}
	}
	return nil
}
