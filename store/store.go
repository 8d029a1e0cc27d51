// Package store defines the ledger that makes sendonce's promise possible:
// one durable record per (tenant, idempotency key), which is at once the
// deduplication ledger, the outbox the dispatcher works from, and the audit
// trail of every attempt.
//
// # The contract every Store keeps
//
// Atomicity: each call is atomic. Either all of its effects are visible to
// every later call (from any goroutine, process or node sharing the store),
// or none are. A call that returns an error other than the sentinels below
// may or may not have taken effect only if ctx ended while it ran; callers
// retry such calls, and every call is safe to retry.
//
// Durability: when a write call (Admit, Claim, Renew, MarkCommitting,
// Complete, Resolve) returns without error, its effects survive a crash of
// the process and of the machine (fsync, or a PostgreSQL commit). A write that
// has not returned may be lost by a crash; the caller has not acknowledged
// anything yet, so nothing promised is lost.
//
// Uniqueness: Admit is guarded by a unique constraint on (tenant, key); it is
// never a check followed by an insert. Of any number of concurrent Admit
// calls for one (tenant, key), exactly one reports OutcomeNew.
//
// Fencing: Claim gives each claimed record a new fence, one more than any
// fence the record had before. Renew, MarkCommitting and Complete are
// compare-and-set operations on (ID, Fence): once another claim or a Resolve
// has advanced the fence, they change nothing and return ErrLeaseLost. A
// worker that was paused or partitioned past its lease can therefore never
// overwrite the work of the worker that took over.
//
// Time: every call that compares against the clock takes now from the
// caller. A store never reads the wall clock for lease decisions, so tests
// can move time without sleeping.
//
// The lifecycle of a record (see docs/guarantees.md):
//
//	Admit ─▶ queued ─Claim─▶ sending ─MarkCommitting─▶ sending+committing
//	                  ▲          │                            │
//	                  │ Retry, or lease expired               │ Sent / Failed / InDoubt,
//	                  │ with no marker                        │ or lease expired ─▶ in_doubt
//	                  └──────────┘
//	in_doubt ─Resolve─▶ sent | queued (resend) | failed
package store

import (
	"context"
	"time"
)

// State is where a record is in its lifecycle.
type State string

// The states of a record. Sent, Failed are final; InDoubt waits for Resolve.
const (
	StateQueued  State = "queued"
	StateSending State = "sending"
	StateSent    State = "sent"
	StateFailed  State = "failed"
	StateInDoubt State = "in_doubt"
)

// Valid reports whether s is one of the defined states.
func (s State) Valid() bool {
	switch s {
	case StateQueued, StateSending, StateSent, StateFailed, StateInDoubt:
		return true
	}
	return false
}

// Final reports whether no further delivery will be attempted from s
// without an explicit Resolve.
func (s State) Final() bool { return s == StateSent || s == StateFailed }

// Admission is one email to be recorded under (Tenant, Key). Everything in it
// is fixed at admission: every attempt sends exactly Data, so every attempt
// carries the same Message-ID and the same bytes.
type Admission struct {
	Tenant      string
	Key         string
	Fingerprint string // canonical payload hash; same key + other fingerprint is a conflict
	MessageID   string // "<...@domain>", derived from (Tenant, Key)
	From        string // envelope sender (MAIL FROM), may be empty for a null sender
	To          []string
	Subject     string            // for listing and search only
	Tags        map[string]string // for listing and search only
	Source      string            // the front door that accepted it ("http", "smtp", "library", ...)
	Data        []byte            // the complete RFC 5322 message
	NotBefore   time.Time         // earliest delivery; zero means Now
	Now         time.Time         // admission time, recorded as CreatedAt
}

// Outcome says what Admit did with one admission.
type Outcome int

const (
	// OutcomeNew: the record was created by this call.
	OutcomeNew Outcome = iota + 1
	// OutcomeDuplicate: a record with this key and the same fingerprint
	// already existed; its duplicate counter was incremented and it is
	// returned unchanged otherwise.
	OutcomeDuplicate
	// OutcomeConflict: a record with this key but a different fingerprint
	// exists. Nothing was changed; the existing record is returned.
	OutcomeConflict
)

func (o Outcome) String() string {
	switch o {
	case OutcomeNew:
		return "new"
	case OutcomeDuplicate:
		return "duplicate"
	case OutcomeConflict:
		return "conflict"
	}
	return "unknown"
}

// AdmitResult is the answer to one Admission.
type AdmitResult struct {
	Outcome Outcome
	Record  Record // the stored record (without Data)
}

// Record is the ledger entry of one email. Data is filled only by Claim.
type Record struct {
	ID          int64
	Tenant      string
	Key         string
	Fingerprint string
	MessageID   string
	From        string
	To          []string
	Subject     string
	Tags        map[string]string
	Source      string
	State       State
	// Attempts counts delivery attempts started: Claim adds one, and a
	// Release (the attempt never reached the transport) takes it back. A
	// claim whose worker died is counted: nobody can know how far it got.
	Attempts    int
	Duplicates  int64 // later submissions of the same key that were suppressed
	LastError   string
	Reply       string // the upstream's final reply, when there was one
	Fence       int64
	LeaseOwner  string
	LeaseExpiry time.Time
	Committing  bool // the commit marker is set for the current fence
	NextAttempt time.Time
	CreatedAt   time.Time
	UpdatedAt   time.Time
	SentAt      time.Time
	ResolvedBy  string // who resolved an in-doubt record, and how: ResolvedBy(action, actor)
	Data        []byte
}

// Lease identifies one claim of one record: the worker holding it may write
// to the record only while Fence is still the record's current fence.
type Lease struct {
	ID    int64
	Fence int64
}

// ClaimRequest asks for up to Limit records that are due at Now.
type ClaimRequest struct {
	Owner string        // recorded as the lease owner, for operators
	Now   time.Time     // the caller's clock
	Lease time.Duration // the lease lasts until Now+Lease
	Limit int
}

// Result kinds for Complete.
type Result int

const (
	// ResultSent: the upstream accepted the message. Final.
	ResultSent Result = iota + 1
	// ResultFailed: the upstream refused it permanently, or retries ran out. Final.
	ResultFailed
	// ResultRetry: the attempt failed in a way that proves the upstream does
	// not have the message; deliver again at RetryAt.
	ResultRetry
	// ResultInDoubt: the outcome is unknowable; wait for Resolve.
	ResultInDoubt
	// ResultRelease: the attempt was never started (shutdown); requeue at
	// RetryAt without counting an attempt. Refused once the marker is set.
	ResultRelease
)

func (r Result) String() string {
	switch r {
	case ResultSent:
		return "sent"
	case ResultFailed:
		return "failed"
	case ResultRetry:
		return "retry"
	case ResultInDoubt:
		return "in_doubt"
	case ResultRelease:
		return "release"
	}
	return "unknown"
}

// Completion is the end of one attempt.
type Completion struct {
	Lease   Lease
	Result  Result
	Error   string    // the reason, for Failed, Retry and InDoubt
	Reply   string    // the upstream's reply, when it gave one
	RetryAt time.Time // for Retry and Release
	Now     time.Time
	// PurgeData drops the stored message when the result is final (Sent or
	// Failed), for privacy; the record itself is kept for deduplication.
	PurgeData bool
}

// Action is an operator's (or a policy's) decision about an in-doubt record.
type Action string

// The resolve actions.
const (
	ActionResend   Action = "resend"    // requeue: it will be sent again, with the same Message-ID
	ActionMarkSent Action = "mark_sent" // the upstream had it
	ActionFail     Action = "fail"      // give up
)

// Valid reports whether a is a defined action.
func (a Action) Valid() bool {
	return a == ActionResend || a == ActionMarkSent || a == ActionFail
}

// ResolvedBy is what Resolve records in Record.ResolvedBy: the action and
// the actor, as "<action> by <actor>" (e.g. "resend by policy:resend"). Every
// Store uses this one format so operators and tests can rely on it.
func ResolvedBy(a Action, actor string) string { return string(a) + " by " + actor }

// Resolution is one Resolve request.
type Resolution struct {
	Tenant string
	Key    string
	Action Action
	Actor  string // who decided: a token's name, "policy:resend", ...
	Now    time.Time
}

// Filter selects records for List. Records are listed newest first, or
// oldest first with Oldest. Every condition set must hold.
type Filter struct {
	// Tenant is whose records are listed. AllTenants lists every tenant's:
	// it is for the service's own loops (metrics, in-doubt rules), never
	// for a caller's request.
	Tenant string
	State  State // empty: any
	// KeyPrefix keeps the records whose key starts with it (case-sensitive).
	KeyPrefix string
	// Recipient keeps the records with exactly this address among To.
	Recipient string
	// CreatedFrom and CreatedBefore bound CreatedAt: From <= CreatedAt <
	// Before. A zero time leaves that side open.
	CreatedFrom, CreatedBefore time.Time
	// Oldest lists oldest (lowest ID) first. A cursor continues in the
	// direction of the listing that gave it.
	Oldest bool
	Limit  int // at most MaxListLimit; 0 means DefaultListLimit
	Cursor string
}

// AllTenants as Filter.Tenant or the tenant of Counts means every tenant.
const AllTenants = "*"

// Limits of List.
const (
	DefaultListLimit = 50
	MaxListLimit     = 1000
)

// Page is one page of List.
type Page struct {
	Records []Record
	Next    string // cursor of the next page; empty at the end
}

// Event is one entry of a record's timeline.
type Event struct {
	ID int64
	// At is the record's time of the change (its UpdatedAt, CreatedAt for
	// EventAccepted) from the caller's clock; for EventDuplicate, which
	// changes no time of the record, the database's clock.
	At   time.Time
	Kind EventKind
	// State, Attempt and Fence are the record's after the change.
	State   State
	Attempt int
	Fence   int64
	// Detail: the front door (accepted), the upstream's reply (sent), the
	// error (failed, retry, in_doubt), who decided (resolved), the lease
	// owner (attempt), the duplicate count after it (duplicate; repeats of
	// one key within one Admit batch may be recorded as one event).
	Detail string
}

// EventKind says what happened.
type EventKind string

// The kinds of events.
const (
	EventAccepted   EventKind = "accepted"   // Admit created the record
	EventDuplicate  EventKind = "duplicate"  // Admit suppressed a repeat of the key
	EventAttempt    EventKind = "attempt"    // Claim started an attempt (new fence)
	EventCommitting EventKind = "committing" // the commit marker: the irreversible step follows
	EventSent       EventKind = "sent"
	EventFailed     EventKind = "failed"
	EventRetry      EventKind = "retry" // back to the queue: a retry or a release
	EventInDoubt    EventKind = "in_doubt"
	EventResolved   EventKind = "resolved" // Resolve settled an in-doubt record
)

// MaxEvents is the most events Events returns.
const MaxEvents = 1000

// Counts is the number of records per state.
type Counts map[State]int64

// Store is the ledger. All methods are safe for concurrent use. See the
// package documentation for what each call promises.
type Store interface {
	// Admit records each admission, in one durable commit shared by all of
	// them. The results are in the order of the admissions. Admit returns an
	// error only when nothing could be recorded durably; outcomes per item
	// (new, duplicate, conflict) are in the results.
	Admit(ctx context.Context, batch []Admission) ([]AdmitResult, error)

	// Get returns the record of (tenant, key) without Data, or ErrNotFound.
	Get(ctx context.Context, tenant, key string) (Record, error)

	// List returns a page of records of one tenant, newest first.
	List(ctx context.Context, f Filter) (Page, error)

	// Events returns the timeline of (tenant, key), oldest first: at most
	// MaxEvents, the latest. The store records an event, in the same
	// transaction, for every change that matters to an operator (see
	// Event). ErrNotFound if there is no such record.
	Events(ctx context.Context, tenant, key string) ([]Event, error)

	// Message returns the stored message (the Data every attempt sends) of
	// (tenant, key), for an operator to read; empty once purged after the
	// email was sent or failed. ErrNotFound if there is no such record.
	Message(ctx context.Context, tenant, key string) ([]byte, error)

	// Claim takes up to Limit due records: queued records whose NextAttempt
	// is at or before Now, and sending records whose lease expired without
	// the commit marker (their worker died before the irreversible step). It
	// sets them sending, owned by Owner until Now+Lease, with a new fence,
	// and returns them with Data. In the same transaction, sending records
	// whose lease expired after the marker are moved to in_doubt: their
	// worker died in the window no protocol can decide.
	Claim(ctx context.Context, req ClaimRequest) ([]Record, error)

	// Renew extends the lease to now+d. ErrLeaseLost if the fence moved, the
	// record is no longer sending, or the lease already expired at now.
	Renew(ctx context.Context, l Lease, now time.Time, d time.Duration) error

	// MarkCommitting durably records that the irreversible step is about to
	// happen under this fence. ErrLeaseLost if the fence moved, the record
	// is no longer sending, or the lease expires at or before now: the
	// caller must then abort the attempt without performing the
	// irreversible step. Marking again under the same held lease is a no-op.
	MarkCommitting(ctx context.Context, l Lease, now time.Time) error

	// Complete ends an attempt. It also accepts an in_doubt record that the
	// lease expiry moved there under the same fence, so a late but definite
	// answer from the upstream is still recorded (Sent, Failed or Retry;
	// InDoubt only updates the error). ErrLeaseLost if the fence moved;
	// ErrInvalidState for a Release after the marker. So that a retried
	// call is safe, repeating the call that already ended the attempt under
	// this fence (Sent on sent, Failed on failed, Retry or Release on
	// queued) changes nothing and returns nil; any other result on those
	// states is ErrInvalidState.
	Complete(ctx context.Context, c Completion) error

	// Resolve applies an action to an in_doubt record and advances its fence.
	// ErrNotFound if there is no such record; ErrInvalidState if it is not
	// in_doubt.
	Resolve(ctx context.Context, r Resolution) (Record, error)

	// Sweep deletes up to limit final (sent or failed) records created
	// before the cut-off, oldest first, and returns how many. Records still
	// queued, sending or in_doubt are never swept. A swept key can be
	// admitted again as new: the retention window is the dedup window.
	Sweep(ctx context.Context, before time.Time, limit int) (int, error)

	// Counts returns the number of records per state for a tenant, or for
	// all tenants when tenant is "*".
	Counts(ctx context.Context, tenant string) (Counts, error)

	// Ping reports whether the store can serve requests.
	Ping(ctx context.Context) error

	// Close releases the store. Calls after Close return ErrClosed.
	Close() error
}

// Decide applies the contract of Complete to a record found in state with
// fence and the marker flag committing. It returns apply=true when the
// store must write c's result, apply=false with a nil error for an
// idempotent repeat (nothing to write), or a logical error:
//
//   - another fence: ErrLeaseLost.
//   - sending: Sent, Failed, Retry, InDoubt apply; Release applies only
//     without the marker (ErrInvalidState after it) and gives the attempt
//     back.
//   - in_doubt under the same fence (the lease expired after the marker, or
//     the worker reported InDoubt): a late definite answer (Sent, Failed,
//     Retry) applies; InDoubt only updates the error; Release is
//     ErrInvalidState.
//   - sent or failed under the same fence: repeating the result that put it
//     there is a no-op (a retried call), anything else ErrInvalidState.
//   - queued under the same fence (after this worker's Retry or Release):
//     Retry or Release is a no-op, anything else ErrInvalidState.
//
// Every store calls it, so the stores differ only in how they write.
func (c Completion) Decide(state State, fence int64, committing bool) (apply bool, err error) {
	if fence != c.Lease.Fence {
		return false, ErrLeaseLost
	}
	switch state {
	case StateSent, StateFailed:
		if (state == StateSent && c.Result == ResultSent) || (state == StateFailed && c.Result == ResultFailed) {
			return false, nil
		}
		return false, ErrInvalidState
	case StateQueued:
		if c.Result == ResultRetry || c.Result == ResultRelease {
			return false, nil
		}
		return false, ErrInvalidState
	case StateSending, StateInDoubt:
	default:
		return false, ErrInvalidState
	}
	switch c.Result {
	case ResultSent, ResultFailed, ResultRetry, ResultInDoubt:
		return true, nil
	case ResultRelease:
		if state != StateSending || committing {
			return false, ErrInvalidState
		}
		return true, nil
	}
	return false, ErrInvalidState
}
