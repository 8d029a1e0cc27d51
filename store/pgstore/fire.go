package pgstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce/store"
)

var _ store.FireStore = (*Store)(nil)

const fireCols = `fire_key, schedule, scheduled_at, state, fence, owner, lease_expiry, cursor, admitted, duplicates,
	rejected, attempts, last_error, next_attempt, manual, created_at, updated_at, finished_at`

func scanFire(row pgx.Row) (store.Fire, error) {
	var (
		f                                           store.Fire
		state                                       string
		at, lease, next, created, updated, finished int64
	)
	err := row.Scan(&f.Key, &f.Schedule, &at, &state, &f.Fence, &f.Owner, &lease, &f.Cursor, &f.Admitted, &f.Duplicates,
		&f.Rejected, &f.Attempts, &f.LastError, &next, &f.Manual, &created, &updated, &finished)
	if err != nil {
		return store.Fire{}, err
	}
	f.State = store.FireState(state)
	f.ScheduledAt = fromNanos(at)
	f.LeaseExpiry = fromNanos(lease)
	f.NextAttempt = fromNanos(next)
	f.CreatedAt = fromNanos(created)
	f.UpdatedAt = fromNanos(updated)
	f.FinishedAt = fromNanos(finished)
	return f, nil
}

// claimFireSQL creates the fire, or takes it over when it is claimable, in
// one statement: the primary key decides between concurrent creators on any
// number of nodes, and ON CONFLICT DO UPDATE ... WHERE locks the existing
// row and re-checks the condition on its latest version, so of two nodes
// taking over an expired lease at once only one gets a row back.
const claimFireSQL = `INSERT INTO {fires} AS f
	(fire_key, schedule, scheduled_at, state, fence, owner, lease_expiry, attempts, manual, created_at, updated_at)
	VALUES ($1, $2, $3, 'running', 1, $4, $5, 1, $6, $7, $7)
	ON CONFLICT (fire_key) DO UPDATE SET state = 'running', fence = f.fence + 1, owner = EXCLUDED.owner,
		lease_expiry = EXCLUDED.lease_expiry, attempts = f.attempts + 1, updated_at = EXCLUDED.updated_at
	WHERE (f.state = 'running' AND f.lease_expiry <= $7) OR (f.state = 'waiting' AND f.next_attempt <= $7)
	RETURNING ` + fireCols

// ClaimFire creates or takes over a fire; see claimFireSQL.
func (s *Store) ClaimFire(ctx context.Context, c store.FireClaim) (store.Fire, error) {
	if s.closed.Load() {
		return store.Fire{}, store.ErrClosed
	}
	if c.Lease <= 0 {
		return store.Fire{}, fmt.Errorf("pgstore: claim fire %q: lease %v must be positive", c.Key, c.Lease)
	}
	op := fmt.Sprintf("claim fire %q", c.Key)
	now := nanos(c.Now)
	f, err := scanFire(s.pool.QueryRow(ctx, s.q.expand(claimFireSQL), c.Key, c.Schedule, nanos(c.ScheduledAt), c.Owner,
		nanos(c.Now.Add(c.Lease)), c.Manual, now))
	if err == nil {
		return f, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return store.Fire{}, s.interpretError(op, err)
	}
	// Not claimable: say why, from the row as it is now.
	cur, err := s.GetFire(ctx, c.Key)
	if err != nil {
		return store.Fire{}, err
	}
	lerr := store.DecideClaim(cur.State, cur.LeaseExpiry, cur.NextAttempt, c.Now)
	if lerr == nil {
		lerr = store.ErrFireBusy // it changed between the two statements; the caller tries again later
	}
	return store.Fire{}, fmt.Errorf("pgstore: %s (%s, owner %q): %w", op, cur.State, cur.Owner, lerr)
}

func (s *Store) casFire(ctx context.Context, what string, l store.FireLease, query string, args ...any) error {
	return s.cas(ctx, fmt.Sprintf("%s %q/%d", what, l.Key, l.Fence), query, args...)
}

// RenewFire extends a held fire lease.
func (s *Store) RenewFire(ctx context.Context, l store.FireLease, now time.Time, d time.Duration) error {
	n := nanos(now)
	return s.casFire(ctx, "renew fire", l, `UPDATE {fires} SET lease_expiry = $1, updated_at = $2
		WHERE fire_key = $3 AND fence = $4 AND state = 'running' AND lease_expiry > $2`,
		nanos(now.Add(d)), n, l.Key, l.Fence)
}

// ProgressFire records a batch's cursor and counts under a held lease.
func (s *Store) ProgressFire(ctx context.Context, p store.FireProgress) error {
	n := nanos(p.Now)
	return s.casFire(ctx, "progress fire", p.Lease, `UPDATE {fires} SET cursor = $1, admitted = admitted + $2,
		duplicates = duplicates + $3, rejected = rejected + $4, lease_expiry = $5, updated_at = $6
		WHERE fire_key = $7 AND fence = $8 AND state = 'running' AND lease_expiry > $6`,
		p.Cursor, p.Admitted, p.Duplicates, p.Rejected, nanos(p.Now.Add(p.Extend)), n, p.Lease.Key, p.Lease.Fence)
}

// FinishFire ends a run under a held lease.
func (s *Store) FinishFire(ctx context.Context, f store.FireFinish) error {
	n := nanos(f.Now)
	if f.Done {
		return s.casFire(ctx, "finish fire", f.Lease, `UPDATE {fires} SET state = 'done', lease_expiry = 0, last_error = '',
			finished_at = $1, updated_at = $1 WHERE fire_key = $2 AND fence = $3 AND state = 'running' AND lease_expiry > $1`,
			n, f.Lease.Key, f.Lease.Fence)
	}
	return s.casFire(ctx, "finish fire", f.Lease, `UPDATE {fires} SET state = 'waiting', lease_expiry = 0, last_error = $1,
		next_attempt = $2, updated_at = $3 WHERE fire_key = $4 AND fence = $5 AND state = 'running' AND lease_expiry > $3`,
		f.Error, nanos(f.RetryAt), n, f.Lease.Key, f.Lease.Fence)
}

// GetFire returns one fire.
func (s *Store) GetFire(ctx context.Context, key string) (store.Fire, error) {
	if s.closed.Load() {
		return store.Fire{}, store.ErrClosed
	}
	f, err := scanFire(s.pool.QueryRow(ctx, s.q.expand("SELECT "+fireCols+" FROM {fires} WHERE fire_key = $1"), key))
	if err != nil {
		return store.Fire{}, s.interpretError(fmt.Sprintf("get fire %q", key), err)
	}
	return f, nil
}

// ListFires returns fires, latest scheduled first.
func (s *Store) ListFires(ctx context.Context, ff store.FireFilter) ([]store.Fire, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	limit := ff.Limit
	if limit <= 0 {
		limit = 100
	}
	q := "SELECT " + fireCols + " FROM {fires} WHERE scheduled_at >= $1 AND ($2 = '' OR schedule = $2)"
	if ff.Unfinished {
		q += " AND state <> 'done'"
	}
	q += " ORDER BY scheduled_at DESC, fire_key DESC LIMIT $3"
	rows, err := s.pool.Query(ctx, s.q.expand(q), nanos(ff.Since), ff.Schedule, limit)
	if err != nil {
		return nil, s.interpretError("list fires", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (store.Fire, error) { return scanFire(row) })
	if err != nil {
		return nil, s.interpretError("list fires", err)
	}
	if out == nil {
		out = []store.Fire{}
	}
	return out, nil
}
