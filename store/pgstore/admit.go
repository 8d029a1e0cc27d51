package pgstore

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/sendonce/sendonce/store"
)

// errVanished: a key that the insert found taken had no row a statement
// later (a sweeper removed it in between). The batch is run again.
var errVanished = errors.New("pgstore: admitted key vanished during admission; retry")

// maxTries bounds how often a batch transaction is run after retryable
// failures.
const maxTries = 3

// item is one admission with its JSON columns encoded.
type item struct {
	a        store.Admission
	to, tags string
}

func encode(batch []store.Admission) ([]item, error) {
	items := make([]item, len(batch))
	for i, a := range batch {
		to := a.To
		if to == nil {
			to = []string{}
		}
		tb, err := json.Marshal(to)
		if err != nil {
			return nil, fmt.Errorf("pgstore: admit %q: encode to: %w", a.Key, err)
		}
		gb, err := json.Marshal(a.Tags)
		if err != nil {
			return nil, fmt.Errorf("pgstore: admit %q: encode tags: %w", a.Key, err)
		}
		items[i] = item{a: a, to: string(tb), tags: string(gb)}
	}
	return items, nil
}

type admitReq struct {
	ctx   context.Context
	items []item
	res   []store.AdmitResult
	err   error
	done  chan struct{} // closed by a batcher once res or err is set
}

// Admit records the batch in a transaction shared with whatever other
// Admit calls are waiting, and returns once it is committed.
func (s *Store) Admit(ctx context.Context, batch []store.Admission) ([]store.AdmitResult, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	if len(batch) == 0 {
		return []store.AdmitResult{}, nil
	}
	items, err := encode(batch)
	if err != nil {
		return nil, err
	}
	r := &admitReq{ctx: ctx, items: items, done: make(chan struct{})}
	select {
	case s.admits <- r:
	case <-s.quit:
		return nil, store.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	select {
	case <-r.done:
		return r.res, r.err
	case <-ctx.Done():
		// A batcher may still commit r; the contract lets the caller retry,
		// and the retry is answered as a duplicate of the same record.
		return nil, ctx.Err()
	case <-s.workersDone:
		select {
		case <-r.done: // answered before the batchers exited
			return r.res, r.err
		default:
			return nil, store.ErrClosed
		}
	}
}

// AdmitTx admits the batch inside the caller's transaction: the transactional
// outbox. The records exist if and only if tx commits, and become claimable
// only then; the outcomes (new, duplicate, conflict) are those Admit would
// give. It does not use the batcher: the caller owns the transaction.
//
// tx may be on any connection to the store's database; every statement
// names the store's schema. A concurrent admission of the same key in
// another open transaction makes this call wait on the unique index until
// that transaction commits (this one then reports a duplicate or conflict)
// or aborts (this one inserts): PostgreSQL's own behaviour, and what keeps a
// key unique across transactions. Under REPEATABLE READ or SERIALIZABLE,
// a key committed by another transaction after tx's snapshot fails the call
// with a serialization failure (SQLSTATE 40001): retry the whole
// transaction. An error leaves tx aborted; roll it back.
func (s *Store) AdmitTx(ctx context.Context, tx pgx.Tx, batch []store.Admission) ([]store.AdmitResult, error) {
	if s.closed.Load() {
		return nil, store.ErrClosed
	}
	if len(batch) == 0 {
		return []store.AdmitResult{}, nil
	}
	items, err := encode(batch)
	if err != nil {
		return nil, err
	}
	res, err := s.admitItems(ctx, tx, items)
	if err != nil {
		// The caller's transaction, not the store, may be what failed.
		if errors.Is(err, pgx.ErrTxClosed) {
			return nil, fmt.Errorf("pgstore: admit in transaction: %w", err)
		}
		return nil, s.interpretError("admit in transaction", err)
	}
	return res, nil
}

// batcher takes a request, drains whatever else is already waiting (up to
// MaxBatch admissions), and runs the lot in one transaction.
func (s *Store) batcher() {
	var batch []*admitReq
	for {
		select {
		case r := <-s.admits:
			batch = append(batch[:0], r)
		case <-s.quit:
			s.refuseQueued()
			return
		}
		n := len(batch[0].items)
	drain:
		for n < s.opts.MaxBatch {
			select {
			case r := <-s.admits:
				batch = append(batch, r)
				n += len(r.items)
			default:
				break drain
			}
		}
		s.requests.Add(int64(len(batch)))
		s.admissions.Add(int64(n))
		s.batches.Add(1)
		s.runBatch(batch)
		clear(batch) // drop references for the GC
	}
}

func (s *Store) refuseQueued() {
	for {
		select {
		case r := <-s.admits:
			r.err = store.ErrClosed
			close(r.done)
		default:
			return
		}
	}
}

func (s *Store) runBatch(batch []*admitReq) {
	// A caller that has already given up is not run: it has been told
	// ctx.Err(), and not running its request makes that answer exact.
	live := batch[:0:0]
	for _, r := range batch {
		if err := r.ctx.Err(); err != nil {
			r.err = err
			close(r.done)
			continue
		}
		live = append(live, r)
	}
	if len(live) == 0 {
		return
	}
	err := s.runTx(live)
	if err == nil {
		for _, r := range live {
			close(r.done)
		}
		return
	}
	var pe *pgconn.PgError
	if len(live) == 1 || !errors.As(err, &pe) {
		// Alone, or the database is away rather than refusing a request:
		// running each request again would only fail each again.
		for _, r := range live {
			r.res, r.err = nil, s.interpretError("admit", err)
			close(r.done)
		}
		return
	}
	// The database refused something in the batch. Run every request alone
	// so only the one at fault fails.
	s.reruns.Add(1)
	s.log.Warn("pgstore: admission batch refused; re-running its requests one at a time",
		"requests", len(live), "err", err)
	for _, r := range live {
		if err := s.runTx([]*admitReq{r}); err != nil {
			r.res, r.err = nil, s.interpretError("admit", err)
		}
		close(r.done)
	}
}

// runTx admits every request of reqs in one transaction, retrying it when
// PostgreSQL asks for that, and sets each request's results once committed.
// The transaction does not use any caller's context: one caller giving up
// must not abort the batch of the others.
func (s *Store) runTx(reqs []*admitReq) error {
	var items []item
	for _, r := range reqs {
		items = append(items, r.items...)
	}
	var err error
	for try := 1; try <= maxTries; try++ {
		if try > 1 {
			s.retries.Add(1)
			s.log.Info("pgstore: re-running admission batch", "try", try, "admissions", len(items), "err", err)
		}
		var res []store.AdmitResult
		var commit time.Duration
		err = func() error {
			ctx, cancel := context.WithTimeout(context.Background(), s.opts.WriteTimeout)
			defer cancel()
			tx, err := s.pool.Begin(ctx)
			if err != nil {
				return err
			}
			defer tx.Rollback(ctx) // after a commit, a no-op
			if res, err = s.admitItems(ctx, tx, items); err != nil {
				return err
			}
			start := time.Now()
			if err := tx.Commit(ctx); err != nil {
				return err
			}
			commit = time.Since(start)
			return nil
		}()
		if err == nil {
			s.commits.Add(1)
			if s.opts.OnCommit != nil {
				s.opts.OnCommit(CommitInfo{Requests: len(reqs), Admissions: len(items), Commit: commit})
			}
			for _, r := range reqs {
				r.res, res = res[:len(r.items):len(r.items)], res[len(r.items):]
			}
			return nil
		}
		if !retryable(err) {
			return err
		}
	}
	return err
}

type tenantKey struct{ tenant, key string }

func compareKeys(a, b tenantKey) int {
	return cmp.Or(cmp.Compare(a.tenant, b.tenant), cmp.Compare(a.key, b.key))
}

// The insert takes record ids from the sequence in admission order (so ids
// grow with admission order, which List's newest-first order relies on),
// but inserts the rows in (tenant, key) order: two transactions inserting
// overlapping keys then wait for each other in one order and never
// deadlock. PostgreSQL evaluates a volatile function such as nextval after
// the sort it is above.
const insertSQL = `WITH v AS (
	SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
		$8::text[], $9::text[], $10::text[], $11::bigint[], $12::bigint[], $13::bytea[])
		AS v(ord, tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags, source,
		     next_attempt, created_at, data)
), ids AS (
	SELECT ord, nextval({seq}) AS id FROM (SELECT ord FROM v ORDER BY ord) o
)
INSERT INTO {emails} (id, tenant, idem_key, fingerprint, message_id, mail_from, rcpt_to, subject, tags, source,
	state, next_attempt, created_at, updated_at, data)
SELECT ids.id, v.tenant, v.idem_key, v.fingerprint, v.message_id, v.mail_from, v.rcpt_to::jsonb, v.subject,
	v.tags::jsonb, v.source, 'queued', v.next_attempt, v.created_at, v.created_at, v.data
FROM v JOIN ids USING (ord)
ORDER BY v.tenant, v.idem_key
ON CONFLICT (tenant, idem_key) DO NOTHING
RETURNING id, tenant, idem_key`

// existingSQL reads and locks the records of keys that were already taken,
// in key order for the same reason as the insert. In READ COMMITTED each
// statement has a new snapshot, so it sees the rows of the transactions
// the insert waited for.
const existingSQL = `SELECT {cols} FROM {emails}
WHERE (tenant, idem_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY tenant, idem_key
FOR UPDATE`

const duplicatesSQL = `UPDATE {emails} e SET duplicates = e.duplicates + u.n
FROM unnest($1::bigint[], $2::bigint[]) AS u(id, n) WHERE e.id = u.id`

// admitItems admits items, in order, inside tx: the first occurrence of a
// key not yet stored is new; a later one with the same fingerprint is a
// duplicate (counted), with another fingerprint a conflict (nothing
// changed). Admissions of the same key later in the batch behave exactly as
// if they had come in a later call.
func (s *Store) admitItems(ctx context.Context, tx pgx.Tx, items []item) ([]store.AdmitResult, error) {
	first := make(map[tenantKey]int, len(items)) // key -> index of its first occurrence
	var (
		ord                                                  []int64
		tenants, keys, fps, mids, froms, tos, subjects, tags []string
		sources                                              []string
		nexts, createds                                      []int64
		datas                                                [][]byte
	)
	for i, it := range items {
		k := tenantKey{it.a.Tenant, it.a.Key}
		if _, seen := first[k]; seen {
			continue
		}
		first[k] = i
		next := it.a.NotBefore
		if next.IsZero() {
			next = it.a.Now
		}
		data := it.a.Data
		if data == nil {
			data = []byte{}
		}
		ord = append(ord, int64(i))
		tenants, keys, fps = append(tenants, it.a.Tenant), append(keys, it.a.Key), append(fps, it.a.Fingerprint)
		mids, froms, tos = append(mids, it.a.MessageID), append(froms, it.a.From), append(tos, it.to)
		subjects, tags, sources = append(subjects, it.a.Subject), append(tags, it.tags), append(sources, it.a.Source)
		nexts, createds, datas = append(nexts, nanos(next)), append(createds, nanos(it.a.Now)), append(datas, data)
	}
	rows, err := tx.Query(ctx, s.q.expand(insertSQL),
		ord, tenants, keys, fps, mids, froms, tos, subjects, tags, sources, nexts, createds, datas)
	if err != nil {
		return nil, err
	}
	inserted := make(map[tenantKey]int64, len(first))
	var (
		id   int64
		k    tenantKey
		scan = []any{&id, &k.tenant, &k.key}
	)
	_, err = pgx.ForEachRow(rows, scan, func() error { inserted[k] = id; return nil })
	if err != nil {
		return nil, err
	}

	// The current record of every key, as the items are walked in order.
	cur := make(map[tenantKey]*store.Record, len(first))
	var taken []tenantKey
	for k := range first {
		if id, ok := inserted[k]; ok {
			cur[k] = newRecord(id, items[first[k]])
		} else {
			taken = append(taken, k)
		}
	}
	if len(taken) > 0 {
		slices.SortFunc(taken, compareKeys)
		ts, ks := make([]string, len(taken)), make([]string, len(taken))
		for i, k := range taken {
			ts[i], ks[i] = k.tenant, k.key
		}
		rows, err := tx.Query(ctx, s.q.expand(existingSQL), ts, ks)
		if err != nil {
			return nil, err
		}
		recs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (store.Record, error) { return scanRecord(row, false) })
		if err != nil {
			return nil, err
		}
		for _, r := range recs {
			cur[tenantKey{r.Tenant, r.Key}] = &r
		}
		if len(recs) != len(taken) {
			return nil, errVanished
		}
	}

	res := make([]store.AdmitResult, len(items))
	dups := map[int64]int64{}
	for i, it := range items {
		k := tenantKey{it.a.Tenant, it.a.Key}
		r := cur[k]
		switch {
		case i == first[k] && inserted[k] != 0:
			res[i] = store.AdmitResult{Outcome: store.OutcomeNew, Record: clone(*r)}
			continue
		case r.Fingerprint == it.a.Fingerprint:
			r.Duplicates++
			dups[r.ID]++
			res[i].Outcome = store.OutcomeDuplicate
		default:
			res[i].Outcome = store.OutcomeConflict
		}
		res[i].Record = clone(*r)
	}
	if len(dups) > 0 {
		ids := slices.Sorted(maps.Keys(dups))
		ns := make([]int64, len(ids))
		for i, id := range ids {
			ns[i] = dups[id]
		}
		if _, err := tx.Exec(ctx, s.q.expand(duplicatesSQL), ids, ns); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// newRecord is the record as the insert stored it, so its times match a
// later Get exactly.
func newRecord(id int64, it item) *store.Record {
	a := it.a
	next := a.NotBefore
	if next.IsZero() {
		next = a.Now
	}
	r := &store.Record{
		ID: id, Tenant: a.Tenant, Key: a.Key, Fingerprint: a.Fingerprint, MessageID: a.MessageID,
		From: a.From, To: slices.Clone(a.To), Subject: a.Subject, Source: a.Source, State: store.StateQueued,
		NextAttempt: fromNanos(nanos(next)), CreatedAt: fromNanos(nanos(a.Now)), UpdatedAt: fromNanos(nanos(a.Now)),
	}
	// Decoded from the stored JSON, as Get will return it.
	_ = json.Unmarshal([]byte(it.tags), &r.Tags)
	return r
}

// clone gives each result its own slices and maps: callers may modify them.
func clone(r store.Record) store.Record {
	r.To = slices.Clone(r.To)
	r.Tags = maps.Clone(r.Tags)
	return r
}
