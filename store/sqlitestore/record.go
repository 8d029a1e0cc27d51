package sqlitestore

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/sendonce/sendonce/store"
)

// recordCols are the columns of a store.Record without Data, in scan order.
const recordCols = `id, tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags, source,
	state, attempts, duplicates, last_error, reply, fence, lease_owner, lease_expiry, committing,
	next_attempt, created_at, updated_at, sent_at, resolved_by`

type scanner interface{ Scan(dest ...any) error }

// scanRecord scans recordCols, plus data when withData is set.
func scanRecord(sc scanner, withData bool) (store.Record, error) {
	r, j, err := scanRaw(sc, withData)
	if err != nil {
		return store.Record{}, err
	}
	return r, j.decode(&r)
}

// recordJSON is a record's JSON columns as stored.
type recordJSON struct{ to, tags string }

// decode sets r's recipients and tags. The writer leaves this to its
// callers (Claim), so the single writer spends no time on JSON.
func (j recordJSON) decode(r *store.Record) error {
	if err := json.Unmarshal([]byte(j.to), &r.To); err != nil {
		return fmt.Errorf("record %d: rcpt_to: %w", r.ID, err)
	}
	if err := json.Unmarshal([]byte(j.tags), &r.Tags); err != nil {
		return fmt.Errorf("record %d: tags: %w", r.ID, err)
	}
	return nil
}

// scanRaw scans like scanRecord but leaves the JSON columns undecoded.
func scanRaw(sc scanner, withData bool) (store.Record, recordJSON, error) {
	var (
		r                                       store.Record
		to, tags, state                         string
		leaseExpiry, next, created, updated, at int64
		committing                              int64
	)
	dest := []any{&r.ID, &r.Tenant, &r.Key, &r.Fingerprint, &r.MessageID, &r.From, &to, &r.Subject, &tags, &r.Source,
		&state, &r.Attempts, &r.Duplicates, &r.LastError, &r.Reply, &r.Fence, &r.LeaseOwner, &leaseExpiry, &committing,
		&next, &created, &updated, &at, &r.ResolvedBy}
	if withData {
		dest = append(dest, &r.Data)
	}
	if err := sc.Scan(dest...); err != nil {
		return store.Record{}, recordJSON{}, err
	}
	r.State = store.State(state)
	r.Committing = committing != 0
	r.LeaseExpiry = fromNanos(leaseExpiry)
	r.NextAttempt = fromNanos(next)
	r.CreatedAt = fromNanos(created)
	r.UpdatedAt = fromNanos(updated)
	r.SentAt = fromNanos(at)
	if withData && r.Data == nil {
		r.Data = []byte{}
	}
	return r, recordJSON{to, tags}, nil
}

// nanos stores t as unix nanoseconds; the zero time is 0. Times outside
// 1678..2262 do not fit and are clamped by UnixNano's definition; sendonce
// never uses them.
func nanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromNanos(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func boolInt(b bool) int64 {
	if b {
		return 1
	}
	return 0
}
