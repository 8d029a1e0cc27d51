package sqlitestore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/sendonce/sendonce/store"
)

// Admit records each admission with INSERT ... ON CONFLICT DO NOTHING under
// the UNIQUE (tenant, idem_key) constraint: uniqueness is the database's, not
// a check followed by an insert. The whole batch is one request of the
// writer, so it shares one commit with it and with other callers' requests.
func (s *Store) Admit(ctx context.Context, batch []store.Admission) ([]store.AdmitResult, error) {
	if len(batch) == 0 {
		if s.closed.Load() {
			return nil, store.ErrClosed
		}
		return []store.AdmitResult{}, nil
	}
	type encoded struct{ to, tags string }
	enc := make([]encoded, len(batch))
	for i, a := range batch {
		to, err := json.Marshal(a.To)
		if err != nil {
			return nil, fmt.Errorf("sqlitestore: admit %q: encode to: %w", a.Key, err)
		}
		tags, err := json.Marshal(a.Tags)
		if err != nil {
			return nil, fmt.Errorf("sqlitestore: admit %q: encode tags: %w", a.Key, err)
		}
		enc[i] = encoded{string(to), string(tags)}
	}
	v, err := s.write(ctx, func(ctx context.Context, tx *wtx) (answer, error) {
		res := make([]store.AdmitResult, len(batch))
		for i, a := range batch {
			r, err := admitOne(ctx, tx, a, enc[i].to, enc[i].tags)
			if err != nil {
				return answer{}, fmt.Errorf("sqlitestore: admit %q: %w", a.Key, err)
			}
			res[i] = r
		}
		return answer{val: res}, nil
	})
	if err != nil {
		return nil, err
	}
	return v.([]store.AdmitResult), nil
}

func admitOne(ctx context.Context, tx *wtx, a store.Admission, to, tags string) (store.AdmitResult, error) {
	next := a.NotBefore
	if next.IsZero() {
		next = a.Now
	}
	now := nanos(a.Now)
	var id int64
	err := tx.QueryRowContext(ctx, `INSERT INTO emails
		(tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags, source, state,
		 next_attempt, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)
		ON CONFLICT (tenant, idem_key) DO NOTHING
		RETURNING id`,
		a.Tenant, a.Key, a.Fingerprint, a.MessageID, a.From, to, a.Subject, tags, a.Source,
		nanos(next), now, now).Scan(&id)
	switch {
	case err == nil:
		if len(a.Data) > 0 {
			if _, err := tx.ExecContext(ctx, "INSERT INTO email_bodies (id, data) VALUES (?, ?)", id, a.Data); err != nil {
				return store.AdmitResult{}, err
			}
		}
		// Rebuild the record as stored, so the times match a later Get.
		r := store.Record{
			ID: id, Tenant: a.Tenant, Key: a.Key, Fingerprint: a.Fingerprint, MessageID: a.MessageID,
			From: a.From, To: slices.Clone(a.To), Subject: a.Subject, Source: a.Source, State: store.StateQueued,
			NextAttempt: fromNanos(nanos(next)), CreatedAt: fromNanos(now), UpdatedAt: fromNanos(now),
		}
		if a.Tags != nil {
			r.Tags = maps.Clone(a.Tags) // what the stored JSON decodes to
		}
		return store.AdmitResult{Outcome: store.OutcomeNew, Record: r}, nil
	case !errors.Is(err, sql.ErrNoRows):
		return store.AdmitResult{}, err
	}
	// The key exists. Only the writer writes, so nothing can change the row
	// between this read and the update below.
	existing, err := scanRecord(tx.QueryRowContext(ctx,
		"SELECT "+recordCols+" FROM emails WHERE tenant = ? AND idem_key = ?", a.Tenant, a.Key), false)
	if err != nil {
		return store.AdmitResult{}, err
	}
	if existing.Fingerprint != a.Fingerprint {
		return store.AdmitResult{Outcome: store.OutcomeConflict, Record: existing}, nil
	}
	if _, err := tx.ExecContext(ctx, "UPDATE emails SET duplicates = duplicates + 1 WHERE id = ?", existing.ID); err != nil {
		return store.AdmitResult{}, err
	}
	existing.Duplicates++
	return store.AdmitResult{Outcome: store.OutcomeDuplicate, Record: existing}, nil
}

// inDoubtExpired is the LastError of a record whose lease expired after its
// commit marker.
const inDoubtExpired = "lease expired after the commit marker: the upstream may or may not have the message"

// Claim first moves sending records whose lease expired after the marker to
// in_doubt, then claims due records, oldest due first: queued ones by
// next_attempt, and marker-less sending ones whose lease expired by their
// expiry. Both queries are served by indexes (emails_due, emails_lease).
func (s *Store) Claim(ctx context.Context, req store.ClaimRequest) ([]store.Record, error) {
	if req.Lease <= 0 {
		return nil, fmt.Errorf("sqlitestore: claim: lease %v must be positive", req.Lease)
	}
	v, err := s.write(ctx, func(ctx context.Context, tx *wtx) (answer, error) {
		recs, err := claim(ctx, tx, req)
		if err != nil {
			return answer{}, fmt.Errorf("sqlitestore: claim: %w", err)
		}
		return answer{val: recs}, nil
	})
	if err != nil {
		return nil, err
	}
	claimed := v.([]claimedRecord)
	recs := make([]store.Record, len(claimed))
	for i, c := range claimed {
		recs[i] = c.rec
		if err := c.json.decode(&recs[i]); err != nil {
			// Claimed and committed: the lease expiry returns it to the
			// queue, and the next claim fails the same way, loudly.
			return nil, fmt.Errorf("sqlitestore: claim: %w", err)
		}
	}
	return recs, nil
}

// claimedRecord is a record as the writer claimed it, its JSON decoded by
// Claim's caller rather than by the writer.
type claimedRecord struct {
	rec  store.Record
	json recordJSON
}

func claim(ctx context.Context, tx *wtx, req store.ClaimRequest) ([]claimedRecord, error) {
	now := nanos(req.Now)
	if _, err := tx.ExecContext(ctx, `UPDATE emails SET state = 'in_doubt', last_error = ?, updated_at = ?
		WHERE state = 'sending' AND committing = 1 AND lease_expiry <= ?`, inDoubtExpired, now, now); err != nil {
		return nil, err
	}
	if req.Limit <= 0 {
		return nil, nil
	}
	// The limit is written into the statement, not bound: SQLite plans a
	// LIMIT with its value, so a bound one made it parse and plan the
	// statement again at every claim (a sixth of the claim's CPU in a
	// profile). Rounded up to a power of two, it needs few statements in
	// the cache; the rows past req.Limit are not read.
	lim := 1
	for lim < req.Limit {
		lim *= 2
	}
	rows, err := tx.QueryContext(ctx, fmt.Sprintf(`SELECT id FROM (
			SELECT id, due FROM (SELECT id, next_attempt AS due FROM emails
				WHERE state = 'queued' AND next_attempt <= ?1 ORDER BY next_attempt, id LIMIT %[1]d)
			UNION ALL
			SELECT id, due FROM (SELECT id, lease_expiry AS due FROM emails
				WHERE state = 'sending' AND committing = 0 AND lease_expiry <= ?1 ORDER BY lease_expiry, id LIMIT %[1]d)
		) ORDER BY due, id LIMIT %[1]d`, lim), now)
	if err != nil {
		return nil, err
	}
	var ids []int64
	for len(ids) < req.Limit && rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return nil, err
		}
		ids = append(ids, id)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	expiry := nanos(req.Now.Add(req.Lease))
	recs := make([]claimedRecord, 0, len(ids))
	for _, id := range ids {
		r, j, err := scanRaw(tx.QueryRowContext(ctx, `UPDATE emails SET state = 'sending', fence = fence + 1,
			lease_owner = ?, lease_expiry = ?, committing = 0, attempts = attempts + 1, updated_at = ?
			WHERE id = ? RETURNING `+recordCols+`, (SELECT data FROM email_bodies WHERE email_bodies.id = emails.id)`,
			req.Owner, expiry, now, id), true)
		if err != nil {
			return nil, err
		}
		recs = append(recs, claimedRecord{r, j})
	}
	return recs, nil
}

// casLease runs a compare-and-set update on a lease that must be held
// (state sending, same fence, unexpired at now); no row updated means the
// lease is lost.
func (s *Store) casLease(ctx context.Context, what string, l store.Lease, query string, args ...any) error {
	return s.cas(ctx, fmt.Sprintf("%s %d/%d", what, l.ID, l.Fence), query, args...)
}

// cas runs a compare-and-set update of a held lease, of an email or a
// fire; op names it in errors. No row updated means the lease is lost.
func (s *Store) cas(ctx context.Context, op string, query string, args ...any) error {
	_, err := s.write(ctx, func(ctx context.Context, tx *wtx) (answer, error) {
		res, err := tx.ExecContext(ctx, query, args...)
		if err != nil {
			return answer{}, fmt.Errorf("sqlitestore: %s: %w", op, err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return answer{}, fmt.Errorf("sqlitestore: %s: %w", op, err)
		}
		if n == 0 {
			return answer{err: fmt.Errorf("sqlitestore: %s: %w", op, store.ErrLeaseLost)}, nil
		}
		return answer{}, nil
	})
	return err
}

// Renew extends a held lease to now+d.
func (s *Store) Renew(ctx context.Context, l store.Lease, now time.Time, d time.Duration) error {
	n := nanos(now)
	return s.casLease(ctx, "renew", l, `UPDATE emails SET lease_expiry = ?, updated_at = ?
		WHERE id = ? AND fence = ? AND state = 'sending' AND lease_expiry > ?`,
		nanos(now.Add(d)), n, l.ID, l.Fence, n)
}

// MarkCommitting sets the commit marker on a held lease. Setting it again
// under the same fence is a no-op, so the call is safe to retry.
func (s *Store) MarkCommitting(ctx context.Context, l store.Lease, now time.Time) error {
	n := nanos(now)
	return s.casLease(ctx, "mark committing", l, `UPDATE emails SET committing = 1, updated_at = ?
		WHERE id = ? AND fence = ? AND state = 'sending' AND lease_expiry > ?`,
		n, l.ID, l.Fence, n)
}

// Complete ends an attempt; see completion for the rules.
func (s *Store) Complete(ctx context.Context, c store.Completion) error {
	if c.Result < store.ResultSent || c.Result > store.ResultRelease {
		return fmt.Errorf("sqlitestore: complete %d/%d: unknown result %d", c.Lease.ID, c.Lease.Fence, c.Result)
	}
	q, args := completion(c)
	// The update applies exactly when c.Decide would say apply: the same
	// fence, a record sending or in_doubt, and for a release, sending
	// without the marker. That is the common case and costs one statement;
	// only when no row matches does the record's state decide the answer.
	cond := " WHERE id = ? AND fence = ? AND state IN ('sending', 'in_doubt')"
	if c.Result == store.ResultRelease {
		cond = " WHERE id = ? AND fence = ? AND state = 'sending' AND committing = 0"
	}
	_, err := s.write(ctx, func(ctx context.Context, tx *wtx) (answer, error) {
		res, err := tx.ExecContext(ctx, q+cond, append(args, c.Lease.ID, c.Lease.Fence)...)
		if err != nil {
			return answer{}, fmt.Errorf("sqlitestore: complete %d/%d: %w", c.Lease.ID, c.Lease.Fence, err)
		}
		if n, err := res.RowsAffected(); err != nil {
			return answer{}, fmt.Errorf("sqlitestore: complete %d/%d: %w", c.Lease.ID, c.Lease.Fence, err)
		} else if n == 0 {
			return answer{err: notCompleted(ctx, tx, c)}, nil
		}
		if c.PurgeData && (c.Result == store.ResultSent || c.Result == store.ResultFailed) {
			if _, err := tx.ExecContext(ctx, "DELETE FROM email_bodies WHERE id = ?", c.Lease.ID); err != nil {
				return answer{}, fmt.Errorf("sqlitestore: complete %d/%d: purge the message: %w", c.Lease.ID, c.Lease.Fence, err)
			}
		}
		return answer{}, nil
	})
	return err
}

// notCompleted is the answer to a completion whose update matched no row:
// nil for an idempotent repeat, else the contract's error
// (store.Completion.Decide) for the record as it is.
func notCompleted(ctx context.Context, tx *wtx, c store.Completion) error {
	var (
		state      string
		fence      int64
		committing int64
	)
	err := tx.QueryRowContext(ctx, "SELECT state, fence, committing FROM emails WHERE id = ?", c.Lease.ID).
		Scan(&state, &fence, &committing)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("sqlitestore: complete %d/%d: %w", c.Lease.ID, c.Lease.Fence, store.ErrLeaseLost)
	}
	if err != nil {
		return fmt.Errorf("sqlitestore: complete %d/%d: %w", c.Lease.ID, c.Lease.Fence, err)
	}
	apply, derr := c.Decide(store.State(state), fence, committing != 0)
	if derr != nil {
		return fmt.Errorf("sqlitestore: complete %d/%d (%s, record %s): %w", c.Lease.ID, c.Lease.Fence, c.Result, state, derr)
	}
	if apply {
		// The update's condition and Decide disagree: a bug, not a state.
		return fmt.Errorf("sqlitestore: complete %d/%d (%s, record %s): no row updated, yet the record allows it", c.Lease.ID, c.Lease.Fence, c.Result, state)
	}
	return nil // an idempotent repeat
}

// completion returns the UPDATE (without its WHERE) that writes c's
// result.
func completion(c store.Completion) (string, []any) {
	now := nanos(c.Now)
	retryAt := c.RetryAt
	if retryAt.IsZero() {
		retryAt = c.Now
	}
	switch c.Result {
	case store.ResultSent:
		return `UPDATE emails SET state = 'sent', reply = ?, sent_at = ?, updated_at = ?, lease_expiry = 0`,
			[]any{c.Reply, now, now}
	case store.ResultFailed:
		return `UPDATE emails SET state = 'failed', last_error = ?, reply = ?, updated_at = ?, lease_expiry = 0`,
			[]any{c.Error, c.Reply, now}
	case store.ResultRetry:
		return `UPDATE emails SET state = 'queued', last_error = ?, reply = ?, next_attempt = ?, committing = 0,
			updated_at = ?, lease_expiry = 0`,
			[]any{c.Error, c.Reply, nanos(retryAt), now}
	case store.ResultInDoubt:
		return `UPDATE emails SET state = 'in_doubt', last_error = ?, reply = ?, updated_at = ?, lease_expiry = 0`,
			[]any{c.Error, c.Reply, now}
	case store.ResultRelease:
		return `UPDATE emails SET state = 'queued', next_attempt = ?, attempts = attempts - 1, committing = 0,
			updated_at = ?, lease_expiry = 0`,
			[]any{nanos(retryAt), now}
	}
	return "", nil // Complete checked the result
}

// Resolve applies an operator's action to an in_doubt record and advances
// its fence, so the worker of the in-doubt attempt can no longer write.
func (s *Store) Resolve(ctx context.Context, r store.Resolution) (store.Record, error) {
	if !r.Action.Valid() {
		return store.Record{}, fmt.Errorf("sqlitestore: resolve %q: unknown action %q", r.Key, r.Action)
	}
	v, err := s.write(ctx, func(ctx context.Context, tx *wtx) (answer, error) {
		var id int64
		var state string
		err := tx.QueryRowContext(ctx, "SELECT id, state FROM emails WHERE tenant = ? AND idem_key = ?", r.Tenant, r.Key).
			Scan(&id, &state)
		if errors.Is(err, sql.ErrNoRows) {
			return answer{err: fmt.Errorf("sqlitestore: resolve %q: %w", r.Key, store.ErrNotFound)}, nil
		}
		if err != nil {
			return answer{}, fmt.Errorf("sqlitestore: resolve %q: %w", r.Key, err)
		}
		if store.State(state) != store.StateInDoubt {
			return answer{err: fmt.Errorf("sqlitestore: resolve %q: record is %s: %w", r.Key, state, store.ErrInvalidState)}, nil
		}
		now := nanos(r.Now)
		by := store.ResolvedBy(r.Action, r.Actor)
		var q string
		var args []any
		switch r.Action {
		case store.ActionResend:
			q, args = `state = 'queued', next_attempt = ?`, []any{now}
		case store.ActionMarkSent:
			q, args = `state = 'sent', sent_at = ?`, []any{now}
		case store.ActionFail:
			q, args = `state = 'failed'`, nil
		}
		rec, err := scanRecord(tx.QueryRowContext(ctx, `UPDATE emails SET `+q+`, fence = fence + 1, committing = 0,
			lease_expiry = 0, resolved_by = ?, updated_at = ? WHERE id = ? RETURNING `+recordCols,
			append(args, by, now, id)...), false)
		if err != nil {
			return answer{}, fmt.Errorf("sqlitestore: resolve %q: %w", r.Key, err)
		}
		return answer{val: rec}, nil
	})
	if err != nil {
		return store.Record{}, err
	}
	return v.(store.Record), nil
}

// Sweep deletes up to limit final (sent or failed) records created before
// before, oldest first, in one short write: the retention sweeper calls it
// repeatedly in small batches so no write waits long behind it.
func (s *Store) Sweep(ctx context.Context, before time.Time, limit int) (int, error) {
	if limit <= 0 {
		return 0, nil
	}
	v, err := s.write(ctx, func(ctx context.Context, tx *wtx) (answer, error) {
		res, err := tx.ExecContext(ctx, `DELETE FROM emails WHERE id IN (
			SELECT id FROM emails WHERE created_at < ? AND state IN ('sent', 'failed') ORDER BY created_at LIMIT ?)`,
			nanos(before), limit)
		if err != nil {
			return answer{}, fmt.Errorf("sqlitestore: sweep: %w", err)
		}
		n, _ := res.RowsAffected()
		return answer{val: int(n)}, nil
	})
	if err != nil {
		return 0, err
	}
	return v.(int), nil
}
