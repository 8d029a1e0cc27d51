package pgstore

import (
	"context"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce/store"
)

// Get returns the record of (tenant, key) without Data.
func (s *Store) Get(ctx context.Context, tenant, key string) (store.Record, error) {
	if s.closed.Load() {
		return store.Record{}, store.ErrClosed
	}
	r, err := scanRecord(s.pool.QueryRow(ctx, s.q.expand("SELECT {cols} FROM {emails} WHERE tenant = $1 AND idem_key = $2"), tenant, key), false)
	if err != nil {
		return store.Record{}, s.interpretError(fmt.Sprintf("get %q", key), err)
	}
	return r, nil
}

// Events returns the timeline of (tenant, key), oldest first.
func (s *Store) Events(ctx context.Context, tenant, key string) ([]store.Event, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	var id int64
	if err := s.pool.QueryRow(ctx, s.q.expand("SELECT id FROM {emails} WHERE tenant = $1 AND idem_key = $2"), tenant, key).Scan(&id); err != nil {
		return nil, s.interpretError(fmt.Sprintf("events %q", key), err)
	}
	rows, err := s.pool.Query(ctx, s.q.expand(`SELECT id, at, kind, state, attempt, fence, detail FROM {events}
		WHERE email_id = $1 ORDER BY id DESC LIMIT $2`), id, store.MaxEvents)
	if err != nil {
		return nil, s.interpretError(fmt.Sprintf("events %q", key), err)
	}
	evs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (store.Event, error) {
		var (
			e           store.Event
			at          int64
			kind, state string
		)
		err := row.Scan(&e.ID, &at, &kind, &state, &e.Attempt, &e.Fence, &e.Detail)
		e.At, e.Kind, e.State = fromNanos(at), store.EventKind(kind), store.State(state)
		return e, err
	})
	if err != nil {
		return nil, s.interpretError(fmt.Sprintf("events %q", key), err)
	}
	if evs == nil {
		evs = []store.Event{}
	}
	slices.Reverse(evs)
	return evs, nil
}

// Message returns the stored message of (tenant, key).
func (s *Store) Message(ctx context.Context, tenant, key string) ([]byte, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	var data []byte
	err := s.pool.QueryRow(ctx, s.q.expand("SELECT data FROM {emails} WHERE tenant = $1 AND idem_key = $2"), tenant, key).Scan(&data)
	if err != nil {
		return nil, s.interpretError(fmt.Sprintf("message %q", key), err)
	}
	return data, nil
}

// List returns a page of records, newest (highest ID) first unless
// f.Oldest.
func (s *Store) List(ctx context.Context, f store.Filter) (store.Page, error) {
	if s.closed.Load() {
		return store.Page{}, store.ErrClosed
	}
	if f.State != "" && !f.State.Valid() {
		return store.Page{}, fmt.Errorf("pgstore: list: unknown state %q", f.State)
	}
	limit := f.PageLimit()
	q := "SELECT {cols} FROM {emails} WHERE true"
	var args []any
	cond := func(sql string, v any) {
		args = append(args, v)
		q += fmt.Sprintf(sql, len(args))
	}
	if f.Tenant != store.AllTenants {
		cond(" AND tenant = $%d", f.Tenant)
	}
	if f.State != "" {
		cond(" AND state = $%d", string(f.State))
	}
	if f.KeyPrefix != "" {
		cond(" AND starts_with(idem_key, $%d)", f.KeyPrefix)
	}
	if f.Recipient != "" {
		cond(" AND rcpt_to @> jsonb_build_array($%d::text)", f.Recipient)
	}
	if !f.CreatedFrom.IsZero() {
		cond(" AND created_at >= $%d", nanos(f.CreatedFrom))
	}
	if !f.CreatedBefore.IsZero() {
		cond(" AND created_at < $%d", nanos(f.CreatedBefore))
	}
	if f.Cursor != "" {
		after, err := store.DecodeCursor(f.Cursor)
		if err != nil {
			return store.Page{}, fmt.Errorf("pgstore: list: %w", err)
		}
		if f.Oldest {
			cond(" AND id > $%d", after)
		} else {
			cond(" AND id < $%d", after)
		}
	}
	order := " ORDER BY id DESC LIMIT $%d"
	if f.Oldest {
		order = " ORDER BY id ASC LIMIT $%d"
	}
	cond(order, limit+1) // one more tells whether there is a next page
	rows, err := s.pool.Query(ctx, s.q.expand(q), args...)
	if err != nil {
		return store.Page{}, s.interpretError("list", err)
	}
	recs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (store.Record, error) { return scanRecord(row, false) })
	if err != nil {
		return store.Page{}, s.interpretError("list", err)
	}
	p := store.Page{Records: recs}
	if len(p.Records) > limit {
		p.Records = p.Records[:limit]
		p.Next = store.EncodeCursor(p.Records[limit-1].ID)
	}
	return p, nil
}

// Counts returns the number of records per state, every state present
// (zero when there are none); tenant "*" counts all tenants.
func (s *Store) Counts(ctx context.Context, tenant string) (store.Counts, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	q := "SELECT state, count(*) FROM {emails} WHERE tenant = $1 GROUP BY state"
	args := []any{tenant}
	if tenant == "*" {
		q = "SELECT state, count(*) FROM {emails} GROUP BY state"
		args = nil
	}
	rows, err := s.pool.Query(ctx, s.q.expand(q), args...)
	if err != nil {
		return nil, s.interpretError("counts", err)
	}
	c := store.Counts{store.StateQueued: 0, store.StateSending: 0, store.StateSent: 0, store.StateFailed: 0, store.StateInDoubt: 0}
	var (
		st string
		n  int64
	)
	if _, err := pgx.ForEachRow(rows, []any{&st, &n}, func() error { c[store.State(st)] = n; return nil }); err != nil {
		return nil, s.interpretError("counts", err)
	}
	return c, nil
}
