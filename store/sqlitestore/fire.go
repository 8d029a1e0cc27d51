package sqlitestore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/sendonce/sendonce/store"
)

var _ store.FireStore = (*Store)(nil)

const fireCols = `fire_key, schedule, scheduled_at, state, fence, owner, lease_expiry, cursor, admitted, duplicates,
	rejected, attempts, last_error, next_attempt, manual, created_at, updated_at, finished_at`

func scanFire(sc scanner) (store.Fire, error) {
	var (
		f                                                   store.Fire
		state                                               string
		at, lease, next, created, updated, finished, manual int64
	)
	err := sc.Scan(&f.Key, &f.Schedule, &at, &state, &f.Fence, &f.Owner, &lease, &f.Cursor, &f.Admitted, &f.Duplicates,
		&f.Rejected, &f.Attempts, &f.LastError, &next, &manual, &created, &updated, &finished)
	if err != nil {
		return store.Fire{}, err
	}
	f.State = store.FireState(state)
	f.ScheduledAt = fromNanos(at)
	f.LeaseExpiry = fromNanos(lease)
	f.NextAttempt = fromNanos(next)
	f.Manual = manual != 0
	f.CreatedAt = fromNanos(created)
	f.UpdatedAt = fromNanos(updated)
	f.FinishedAt = fromNanos(finished)
	return f, nil
}

// ClaimFire creates or takes over a fire. The single writer runs the read
// and the write in one transaction, so no other claim can come between
// them; the primary key guards the insert all the same.
func (s *Store) ClaimFire(ctx context.Context, c store.FireClaim) (store.Fire, error) {
	if c.Lease <= 0 {
		return store.Fire{}, fmt.Errorf("sqlitestore: claim fire %q: lease %v must be positive", c.Key, c.Lease)
	}
	v, err := s.write(ctx, func(ctx context.Context, tx *wtx) (answer, error) {
		now := nanos(c.Now)
		expiry := nanos(c.Now.Add(c.Lease))
		cur, err := scanFire(tx.QueryRowContext(ctx, "SELECT "+fireCols+" FROM fires WHERE fire_key = ?", c.Key))
		switch {
		case errors.Is(err, sql.ErrNoRows):
			f, err := scanFire(tx.QueryRowContext(ctx, `INSERT INTO fires
				(fire_key, schedule, scheduled_at, state, fence, owner, lease_expiry, attempts, manual, created_at, updated_at)
				VALUES (?, ?, ?, 'running', 1, ?, ?, 1, ?, ?, ?) RETURNING `+fireCols,
				c.Key, c.Schedule, nanos(c.ScheduledAt), c.Owner, expiry, boolInt(c.Manual), now, now))
			if err != nil {
				return answer{}, fmt.Errorf("sqlitestore: claim fire %q: %w", c.Key, err)
			}
			return answer{val: f}, nil
		case err != nil:
			return answer{}, fmt.Errorf("sqlitestore: claim fire %q: %w", c.Key, err)
		}
		if lerr := store.DecideClaim(cur.State, cur.LeaseExpiry, cur.NextAttempt, c.Now); lerr != nil {
			return answer{err: fmt.Errorf("sqlitestore: claim fire %q (%s, owner %q): %w", c.Key, cur.State, cur.Owner, lerr)}, nil
		}
		f, err := scanFire(tx.QueryRowContext(ctx, `UPDATE fires SET state = 'running', fence = fence + 1, owner = ?,
			lease_expiry = ?, attempts = attempts + 1, updated_at = ? WHERE fire_key = ? RETURNING `+fireCols,
			c.Owner, expiry, now, c.Key))
		if err != nil {
			return answer{}, fmt.Errorf("sqlitestore: claim fire %q: %w", c.Key, err)
		}
		return answer{val: f}, nil
	})
	if err != nil {
		return store.Fire{}, err
	}
	return v.(store.Fire), nil
}

// casFire runs a compare-and-set update on a held fire lease.
func (s *Store) casFire(ctx context.Context, what string, l store.FireLease, query string, args ...any) error {
	return s.cas(ctx, fmt.Sprintf("%s %q/%d", what, l.Key, l.Fence), query, args...)
}

// RenewFire extends a held fire lease.
func (s *Store) RenewFire(ctx context.Context, l store.FireLease, now time.Time, d time.Duration) error {
	n := nanos(now)
	return s.casFire(ctx, "renew fire", l, `UPDATE fires SET lease_expiry = ?, updated_at = ?
		WHERE fire_key = ? AND fence = ? AND state = 'running' AND lease_expiry > ?`,
		nanos(now.Add(d)), n, l.Key, l.Fence, n)
}

// ProgressFire records a batch's cursor and counts under a held lease.
func (s *Store) ProgressFire(ctx context.Context, p store.FireProgress) error {
	n := nanos(p.Now)
	return s.casFire(ctx, "progress fire", p.Lease, `UPDATE fires SET cursor = ?, admitted = admitted + ?,
		duplicates = duplicates + ?, rejected = rejected + ?, lease_expiry = ?, updated_at = ?
		WHERE fire_key = ? AND fence = ? AND state = 'running' AND lease_expiry > ?`,
		p.Cursor, p.Admitted, p.Duplicates, p.Rejected, nanos(p.Now.Add(p.Extend)), n, p.Lease.Key, p.Lease.Fence, n)
}

// FinishFire ends a run under a held lease.
func (s *Store) FinishFire(ctx context.Context, f store.FireFinish) error {
	n := nanos(f.Now)
	if f.Done {
		return s.casFire(ctx, "finish fire", f.Lease, `UPDATE fires SET state = 'done', lease_expiry = 0, last_error = '',
			finished_at = ?, updated_at = ? WHERE fire_key = ? AND fence = ? AND state = 'running' AND lease_expiry > ?`,
			n, n, f.Lease.Key, f.Lease.Fence, n)
	}
	return s.casFire(ctx, "finish fire", f.Lease, `UPDATE fires SET state = 'waiting', lease_expiry = 0, last_error = ?,
		next_attempt = ?, updated_at = ? WHERE fire_key = ? AND fence = ? AND state = 'running' AND lease_expiry > ?`,
		f.Error, nanos(f.RetryAt), n, f.Lease.Key, f.Lease.Fence, n)
}

// GetFire returns one fire.
func (s *Store) GetFire(ctx context.Context, key string) (store.Fire, error) {
	if s.closed.Load() {
		return store.Fire{}, store.ErrClosed
	}
	f, err := scanFire(s.rdb.QueryRowContext(ctx, "SELECT "+fireCols+" FROM fires WHERE fire_key = ?", key))
	if errors.Is(err, sql.ErrNoRows) {
		return store.Fire{}, fmt.Errorf("sqlitestore: get fire %q: %w", key, store.ErrNotFound)
	}
	if err != nil {
		return store.Fire{}, s.readErr(fmt.Sprintf("get fire %q", key), err)
	}
	return f, nil
}

// ListFires returns fires, latest scheduled first.
func (s *Store) ListFires(ctx context.Context, ff store.FireFilter) ([]store.Fire, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	q := "SELECT " + fireCols + " FROM fires WHERE scheduled_at >= ?"
	args := []any{nanos(ff.Since)}
	if ff.Schedule != "" {
		q += " AND schedule = ?"
		args = append(args, ff.Schedule)
	}
	if ff.Unfinished {
		q += " AND state <> 'done'"
	}
	limit := ff.Limit
	if limit <= 0 {
		limit = 100
	}
	q += " ORDER BY scheduled_at DESC, fire_key DESC LIMIT ?"
	args = append(args, limit)
	rows, err := s.rdb.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, s.readErr("list fires", err)
	}
	defer rows.Close()
	out := []store.Fire{}
	for rows.Next() {
		f, err := scanFire(rows)
		if err != nil {
			return nil, s.readErr("list fires", err)
		}
		out = append(out, f)
	}
	if err := rows.Err(); err != nil {
		return nil, s.readErr("list fires", err)
	}
	return out, nil
}
