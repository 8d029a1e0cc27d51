package sqlitestore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/sendonce/sendonce/store"
)

// Get returns the record of (tenant, key) without Data.
func (s *Store) Get(ctx context.Context, tenant, key string) (store.Record, error) {
	if s.closed.Load() {
		return store.Record{}, store.ErrClosed
	}
	row := s.rdb.QueryRowContext(ctx, "SELECT "+recordCols+" FROM emails WHERE tenant = ? AND idem_key = ?", tenant, key)
	r, err := scanRecord(row, false)
	if errors.Is(err, sql.ErrNoRows) {
		return store.Record{}, fmt.Errorf("sqlitestore: get %q: %w", key, store.ErrNotFound)
	}
	if err != nil {
		return store.Record{}, s.readErr(fmt.Sprintf("get %q", key), err)
	}
	return r, nil
}

// Events returns the timeline of (tenant, key), oldest first.
func (s *Store) Events(ctx context.Context, tenant, key string) ([]store.Event, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	var id int64
	err := s.rdb.QueryRowContext(ctx, "SELECT id FROM emails WHERE tenant = ? AND idem_key = ?", tenant, key).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("sqlitestore: events %q: %w", key, store.ErrNotFound)
	}
	if err != nil {
		return nil, s.readErr(fmt.Sprintf("events %q", key), err)
	}
	rows, err := s.rdb.QueryContext(ctx, `SELECT id, at, kind, state, attempt, fence, detail FROM email_events
		WHERE email_id = ? ORDER BY id DESC LIMIT ?`, id, store.MaxEvents)
	if err != nil {
		return nil, s.readErr(fmt.Sprintf("events %q", key), err)
	}
	defer rows.Close()
	evs := []store.Event{}
	for rows.Next() {
		var (
			e           store.Event
			at          int64
			kind, state string
		)
		if err := rows.Scan(&e.ID, &at, &kind, &state, &e.Attempt, &e.Fence, &e.Detail); err != nil {
			return nil, s.readErr(fmt.Sprintf("events %q", key), err)
		}
		e.At, e.Kind, e.State = fromNanos(at), store.EventKind(kind), store.State(state)
		evs = append(evs, e)
	}
	if err := rows.Err(); err != nil {
		return nil, s.readErr(fmt.Sprintf("events %q", key), err)
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
	err := s.rdb.QueryRowContext(ctx, `SELECT coalesce(b.data, x'') FROM emails e LEFT JOIN email_bodies b ON b.id = e.id
		WHERE e.tenant = ? AND e.idem_key = ?`, tenant, key).Scan(&data)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("sqlitestore: message %q: %w", key, store.ErrNotFound)
	}
	if err != nil {
		return nil, s.readErr(fmt.Sprintf("message %q", key), err)
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
		return store.Page{}, fmt.Errorf("sqlitestore: list: unknown state %q", f.State)
	}
	limit := f.PageLimit()
	q := "SELECT " + recordCols + " FROM emails WHERE 1=1"
	var args []any
	if f.Tenant != store.AllTenants {
		q += " AND tenant = ?"
		args = append(args, f.Tenant)
	}
	if f.State != "" {
		q += " AND state = ?"
		args = append(args, string(f.State))
	}
	if f.KeyPrefix != "" {
		// A range on the (tenant, idem_key) index rather than a scan.
		q += " AND idem_key >= ?"
		args = append(args, f.KeyPrefix)
		if hi, ok := store.PrefixEnd(f.KeyPrefix); ok {
			q += " AND idem_key < ?"
			args = append(args, hi)
		}
	}
	if f.Recipient != "" {
		// rcpt_to is a JSON array; the quoted address matches one element
		// exactly.
		needle, _ := json.Marshal(f.Recipient)
		q += " AND instr(rcpt_to, ?) > 0"
		args = append(args, string(needle))
	}
	if !f.CreatedFrom.IsZero() {
		q += " AND created_at >= ?"
		args = append(args, nanos(f.CreatedFrom))
	}
	if !f.CreatedBefore.IsZero() {
		q += " AND created_at < ?"
		args = append(args, nanos(f.CreatedBefore))
	}
	if f.Cursor != "" {
		after, err := store.DecodeCursor(f.Cursor)
		if err != nil {
			return store.Page{}, fmt.Errorf("sqlitestore: list: %w", err)
		}
		if f.Oldest {
			q += " AND id > ?"
		} else {
			q += " AND id < ?"
		}
		args = append(args, after)
	}
	if f.Oldest {
		q += " ORDER BY id ASC LIMIT ?"
	} else {
		q += " ORDER BY id DESC LIMIT ?"
	}
	args = append(args, limit+1) // one more tells whether there is a next page
	rows, err := s.rdb.QueryContext(ctx, q, args...)
	if err != nil {
		return store.Page{}, s.readErr("list", err)
	}
	defer rows.Close()
	var p store.Page
	for rows.Next() {
		r, err := scanRecord(rows, false)
		if err != nil {
			return store.Page{}, s.readErr("list", err)
		}
		p.Records = append(p.Records, r)
	}
	if err := rows.Err(); err != nil {
		return store.Page{}, s.readErr("list", err)
	}
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
	q := "SELECT state, COUNT(*) FROM emails WHERE tenant = ? GROUP BY state"
	args := []any{tenant}
	if tenant == "*" {
		q = "SELECT state, COUNT(*) FROM emails GROUP BY state"
		args = nil
	}
	rows, err := s.rdb.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, s.readErr("counts", err)
	}
	defer rows.Close()
	c := store.Counts{store.StateQueued: 0, store.StateSending: 0, store.StateSent: 0, store.StateFailed: 0, store.StateInDoubt: 0}
	for rows.Next() {
		var st string
		var n int64
		if err := rows.Scan(&st, &n); err != nil {
			return nil, s.readErr("counts", err)
		}
		c[store.State(st)] = n
	}
	if err := rows.Err(); err != nil {
		return nil, s.readErr("counts", err)
	}
	return c, nil
}
