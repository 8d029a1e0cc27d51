package pgstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce/store"
)

// inDoubtExpired is the LastError of a record whose lease expired after its
// commit marker.
const inDoubtExpired = "lease expired after the commit marker: the upstream may or may not have the message"

// claimSQL is one statement, so one snapshot and one commit:
//
//   - doubt moves marked sending records whose lease expired to in_doubt.
//     SKIP LOCKED: a row locked by someone else is being completed or moved
//     right now, and waiting for it would only serialise the nodes.
//   - picked locks the oldest due records nobody else holds, walking the
//     due index in order; a row another node claimed since this snapshot is
//     re-checked after its lock and no longer matches.
//   - claimed gives them a lease and a new fence.
//
// doubt and picked are disjoint: a marked record has no due time.
const claimSQL = `WITH doubt AS (
	UPDATE {emails} SET state = 'in_doubt', last_error = $3, updated_at = $1
	WHERE id IN (SELECT id FROM {emails} WHERE state = 'sending' AND committing AND lease_expiry <= $1
		FOR UPDATE SKIP LOCKED)
), picked AS (
	SELECT id, due FROM {emails} WHERE due <= $1 ORDER BY due, id LIMIT $2 FOR UPDATE SKIP LOCKED
), claimed AS (
	UPDATE {emails} e SET state = 'sending', fence = e.fence + 1, lease_owner = $4, lease_expiry = $5,
		committing = false, attempts = e.attempts + 1, updated_at = $1
	FROM picked WHERE e.id = picked.id
	RETURNING {e.cols}, e.data, picked.due AS picked_due
)
SELECT {cols}, data FROM claimed ORDER BY picked_due, id`

// Claim moves expired marked leases to in_doubt and claims the oldest due
// records, in one statement; see claimSQL.
func (s *Store) Claim(ctx context.Context, req store.ClaimRequest) ([]store.Record, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	if req.Lease <= 0 {
		return nil, fmt.Errorf("pgstore: claim: lease %v must be positive", req.Lease)
	}
	now := nanos(req.Now)
	rows, err := s.pool.Query(ctx, s.q.expand(claimSQL), now, max(req.Limit, 0), inDoubtExpired, req.Owner, nanos(req.Now.Add(req.Lease)))
	if err != nil {
		return nil, s.interpretError("claim", err)
	}
	recs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (store.Record, error) { return scanRecord(row, true) })
	if err != nil {
		return nil, s.interpretError("claim", err)
	}
	if recs == nil {
		recs = []store.Record{}
	}
	return recs, nil
}

// casLease runs a compare-and-set update on a lease that must be held
// (state sending, same fence, unexpired at now); no row updated means the
// lease is lost. A concurrent claim of the same row makes the update wait
// and re-check the new row version, whose fence has moved.
func (s *Store) casLease(ctx context.Context, what string, l store.Lease, query string, args ...any) error {
	return s.cas(ctx, fmt.Sprintf("%s %d/%d", what, l.ID, l.Fence), query, args...)
}

// cas runs a compare-and-set update of a held lease, of an email or a
// fire; op names it in errors. No row updated means the lease is lost.
func (s *Store) cas(ctx context.Context, op string, query string, args ...any) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	tag, err := s.pool.Exec(ctx, s.q.expand(query), args...)
	if err != nil {
		return s.interpretError(op, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("pgstore: %s: %w", op, store.ErrLeaseLost)
	}
	return nil
}

// Renew extends a held lease to now+d.
func (s *Store) Renew(ctx context.Context, l store.Lease, now time.Time, d time.Duration) error {
	n := nanos(now)
	return s.casLease(ctx, "renew", l, `UPDATE {emails} SET lease_expiry = $1, updated_at = $2
		WHERE id = $3 AND fence = $4 AND state = 'sending' AND lease_expiry > $2`,
		nanos(now.Add(d)), n, l.ID, l.Fence)
}

// MarkCommitting sets the commit marker on a held lease. Setting it again
// under the same fence is a no-op, so the call is safe to retry.
func (s *Store) MarkCommitting(ctx context.Context, l store.Lease, now time.Time) error {
	return s.casLease(ctx, "mark committing", l, `UPDATE {emails} SET committing = true, updated_at = $1
		WHERE id = $2 AND fence = $3 AND state = 'sending' AND lease_expiry > $1`,
		nanos(now), l.ID, l.Fence)
}

// errLogical carries a logical answer (ErrLeaseLost, ErrInvalidState,
// ErrNotFound) out of a transaction function, which then rolls back having
// written nothing.
type errLogical struct{ err error }

func (e errLogical) Error() string { return e.err.Error() }
func (e errLogical) Unwrap() error { return e.err }

// inTx runs fn in a transaction of its own and translates its error.
func (s *Store) inTx(ctx context.Context, op string, fn func(tx pgx.Tx) error) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	err := pgx.BeginFunc(ctx, s.pool, fn)
	var le errLogical
	if errors.As(err, &le) {
		return fmt.Errorf("pgstore: %s: %w", op, le.err)
	}
	return s.interpretError(op, err)
}

// Complete ends an attempt; see completion for the rules. The record is
// locked while its state is read, so the decision and the update see the
// same row.
func (s *Store) Complete(ctx context.Context, c store.Completion) error {
	op := fmt.Sprintf("complete %d/%d (%s)", c.Lease.ID, c.Lease.Fence, c.Result)
	if c.Result < store.ResultSent || c.Result > store.ResultRelease {
		return fmt.Errorf("pgstore: %s: unknown result %d", op, c.Result)
	}
	return s.inTx(ctx, op, func(tx pgx.Tx) error {
		var (
			state      string
			fence      int64
			committing bool
		)
		err := tx.QueryRow(ctx, s.q.expand("SELECT state, fence, committing FROM {emails} WHERE id = $1 FOR UPDATE"),
			c.Lease.ID).Scan(&state, &fence, &committing)
		if errors.Is(err, pgx.ErrNoRows) {
			return errLogical{store.ErrLeaseLost}
		}
		if err != nil {
			return err
		}
		q, args, lerr := completion(c, store.State(state), fence, committing)
		if lerr != nil {
			return errLogical{fmt.Errorf("record is %s: %w", state, lerr)}
		}
		if q == "" { // an idempotent repeat
			return nil
		}
		n := len(args)
		_, err = tx.Exec(ctx, s.q.expand(q)+fmt.Sprintf(" WHERE id = $%d AND fence = $%d", n+1, n+2),
			append(args, c.Lease.ID, c.Lease.Fence)...)
		return err
	})
}

// completion returns the UPDATE (without its WHERE) that writes c's
// result, "" for an idempotent repeat, or the contract's logical error
// (store.Completion.Decide).
func completion(c store.Completion, state store.State, fence int64, committing bool) (string, []any, error) {
	if apply, err := c.Decide(state, fence, committing); !apply {
		return "", nil, err
	}
	now := nanos(c.Now)
	retryAt := c.RetryAt
	if retryAt.IsZero() {
		retryAt = c.Now
	}
	purge := ""
	if c.PurgeData {
		purge = ", data = ''::bytea"
	}
	switch c.Result {
	case store.ResultSent:
		return `UPDATE {emails} SET state = 'sent', reply = $1, sent_at = $2, updated_at = $2, lease_expiry = 0` + purge,
			[]any{c.Reply, now}, nil
	case store.ResultFailed:
		return `UPDATE {emails} SET state = 'failed', last_error = $1, reply = $2, updated_at = $3, lease_expiry = 0` + purge,
			[]any{c.Error, c.Reply, now}, nil
	case store.ResultRetry:
		return `UPDATE {emails} SET state = 'queued', last_error = $1, reply = $2, next_attempt = $3, committing = false,
			updated_at = $4, lease_expiry = 0`,
			[]any{c.Error, c.Reply, nanos(retryAt), now}, nil
	case store.ResultInDoubt:
		return `UPDATE {emails} SET state = 'in_doubt', last_error = $1, reply = $2, updated_at = $3, lease_expiry = 0`,
			[]any{c.Error, c.Reply, now}, nil
	case store.ResultRelease:
		return `UPDATE {emails} SET state = 'queued', next_attempt = $1, attempts = attempts - 1, committing = false,
			updated_at = $2, lease_expiry = 0`,
			[]any{nanos(retryAt), now}, nil
	}
	return "", nil, store.ErrInvalidState
}

// Resolve applies an operator's action to an in_doubt record and advances
// its fence, so the worker of the in-doubt attempt can no longer write.
func (s *Store) Resolve(ctx context.Context, r store.Resolution) (store.Record, error) {
	op := fmt.Sprintf("resolve %q", r.Key)
	if !r.Action.Valid() {
		return store.Record{}, fmt.Errorf("pgstore: %s: unknown action %q; use %s, %s or %s",
			op, r.Action, store.ActionResend, store.ActionMarkSent, store.ActionFail)
	}
	var rec store.Record
	err := s.inTx(ctx, op, func(tx pgx.Tx) error {
		var id int64
		var state string
		err := tx.QueryRow(ctx, s.q.expand("SELECT id, state FROM {emails} WHERE tenant = $1 AND idem_key = $2 FOR UPDATE"),
			r.Tenant, r.Key).Scan(&id, &state)
		if errors.Is(err, pgx.ErrNoRows) {
			return errLogical{store.ErrNotFound}
		}
		if err != nil {
			return err
		}
		if store.State(state) != store.StateInDoubt {
			return errLogical{fmt.Errorf("record is %s: %w", state, store.ErrInvalidState)}
		}
		now := nanos(r.Now)
		var set string
		switch r.Action {
		case store.ActionResend:
			set = "state = 'queued', next_attempt = $1"
		case store.ActionMarkSent:
			set = "state = 'sent', sent_at = $1"
		case store.ActionFail:
			set = "state = 'failed'"
		}
		rec, err = scanRecord(tx.QueryRow(ctx, s.q.expand(`UPDATE {emails} SET `+set+`, fence = fence + 1,
			committing = false, lease_expiry = 0, resolved_by = $2, updated_at = $1 WHERE id = $3 RETURNING {cols}`),
			now, store.ResolvedBy(r.Action, r.Actor), id), false)
		return err
	})
	if err != nil {
		return store.Record{}, err
	}
	return rec, nil
}

// Sweep deletes up to limit final (sent or failed) records created before
// before, oldest first, in one short statement: the retention sweeper calls
// it repeatedly in small batches, so no lock is held long. SKIP LOCKED lets
// the sweepers of several nodes run at once without waiting for each other
// or for a worker still touching a record. An admission racing the delete
// of its key re-runs and then finds the key free.
func (s *Store) Sweep(ctx context.Context, before time.Time, limit int) (int, error) {
	if s.closed.Load() {
		return 0, store.ErrClosed
	}
	if limit <= 0 {
		return 0, nil
	}
	tag, err := s.pool.Exec(ctx, s.q.expand(`DELETE FROM {emails} WHERE id IN (
		SELECT id FROM {emails} WHERE created_at < $1 AND state IN ('sent', 'failed')
		ORDER BY created_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)`), nanos(before), limit)
	if err != nil {
		return 0, s.interpretError("sweep", err)
	}
	return int(tag.RowsAffected()), nil
}
