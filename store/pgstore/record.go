package pgstore

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce/store"
)

// recordCols are the columns of a store.Record without Data, in scan order.
var recordCols = []string{"id", "tenant", "idem_key", "fingerprint", "message_id", "mail_from", "rcpt_to", "subject",
	"tags", "source", "state", "attempts", "duplicates", "last_error", "reply", "fence", "lease_owner", "lease_expiry",
	"committing", "next_attempt", "created_at", "updated_at", "sent_at", "resolved_by"}

// cols lists recordCols, each prefixed (a table alias and a dot, or "").
func cols(prefix string) string {
	var b strings.Builder
	for i, c := range recordCols {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(prefix)
		b.WriteString(c)
	}
	return b.String()
}

// queries holds the SQL whose table names depend on Options.Schema: every
// statement names the schema, so AdmitTx works whatever search_path the
// caller's connection has.
type queries struct {
	emails, events, fires, seq, migrations string
	cols, colsE                            string
}

func newQueries(schema string) queries {
	q := queries{emails: "sendonce_emails", events: "sendonce_email_events", fires: "sendonce_fires", migrations: migrationsTable, cols: cols(""), colsE: cols("e.")}
	seq := "sendonce_emails_id_seq"
	if schema != "" {
		q.emails = pgx.Identifier{schema, q.emails}.Sanitize()
		q.events = pgx.Identifier{schema, q.events}.Sanitize()
		q.fires = pgx.Identifier{schema, q.fires}.Sanitize()
		q.migrations = pgx.Identifier{schema, q.migrations}.Sanitize()
		seq = pgx.Identifier{schema, seq}.Sanitize()
	}
	q.seq = "'" + strings.ReplaceAll(seq, "'", "''") + "'" // a regclass literal for nextval
	return q
}

// expand replaces {emails}, {events}, {fires}, {seq}, {cols} and {e.cols} in a statement.
func (q queries) expand(sql string) string {
	return strings.NewReplacer("{emails}", q.emails, "{events}", q.events, "{fires}", q.fires, "{seq}", q.seq, "{cols}", q.cols, "{e.cols}", q.colsE).Replace(sql)
}

// scanRecord scans recordCols, plus data when withData is set.
func scanRecord(row pgx.Row, withData bool) (store.Record, error) {
	var (
		r                                       store.Record
		to, tags                                []byte
		state                                   string
		leaseExpiry, next, created, updated, at int64
	)
	dest := []any{&r.ID, &r.Tenant, &r.Key, &r.Fingerprint, &r.MessageID, &r.From, &to, &r.Subject, &tags, &r.Source,
		&state, &r.Attempts, &r.Duplicates, &r.LastError, &r.Reply, &r.Fence, &r.LeaseOwner, &leaseExpiry, &r.Committing,
		&next, &created, &updated, &at, &r.ResolvedBy}
	if withData {
		dest = append(dest, &r.Data)
	}
	if err := row.Scan(dest...); err != nil {
		return store.Record{}, err
	}
	if err := json.Unmarshal(to, &r.To); err != nil {
		return store.Record{}, fmt.Errorf("record %d: rcpt_to: %w", r.ID, err)
	}
	if err := json.Unmarshal(tags, &r.Tags); err != nil {
		return store.Record{}, fmt.Errorf("record %d: tags: %w", r.ID, err)
	}
	r.State = store.State(state)
	r.LeaseExpiry = fromNanos(leaseExpiry)
	r.NextAttempt = fromNanos(next)
	r.CreatedAt = fromNanos(created)
	r.UpdatedAt = fromNanos(updated)
	r.SentAt = fromNanos(at)
	if withData && r.Data == nil {
		r.Data = []byte{}
	}
	return r, nil
}

// nanos stores t as unix nanoseconds; the zero time is 0. Times outside
// 1678..2262 do not fit; sendonce never uses them.
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
