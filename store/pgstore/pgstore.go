// Package pgstore is sendonce's PostgreSQL store: the ledger shared by every
// node when one machine is not enough. Every node runs the same binary
// against one database; nothing else coordinates them.
//
// It keeps the store.Store contract as follows:
//
//   - Uniqueness across nodes rests on the unique constraint on
//     (tenant, idem_key) alone: admission is INSERT ... ON CONFLICT DO
//     NOTHING, never a check followed by an insert. A node's batcher only
//     shares round trips and commits; it is not what makes a key unique.
//   - Group commit: concurrent Admit calls of one Store are collected by
//     Options.AdmitWorkers batcher goroutines, each running everything
//     already waiting (up to Options.MaxBatch admissions) in one transaction:
//     one multi-row insert, then, only for keys that already existed, one
//     locking read and one update of the duplicate counters. A call returns
//     only after its commit. Rows are inserted and locked in (tenant, key)
//     order, so two nodes admitting the same keys in another order wait for
//     each other instead of deadlocking; a deadlock or serialization failure
//     that happens anyway re-runs the batch.
//   - A batch that the database refuses because of one request's data (text
//     with a NUL byte, say) is rolled back and every request in it is re-run
//     alone, so one bad request cannot fail the others.
//   - Claims across nodes rest on FOR UPDATE SKIP LOCKED: each claim locks
//     the oldest due rows nobody else holds, in one statement that also
//     moves expired marked leases to in_doubt. Each claim advances the
//     record's fence, and every Renew, MarkCommitting and Complete is a
//     compare-and-set on (id, fence), so a worker whose lease was taken over
//     changes nothing, whichever node it runs on.
//   - Durability is a PostgreSQL commit. A connection whose server runs
//     with synchronous_commit = off is switched to on, because an
//     acknowledged admission must survive a crash of the database server.
//   - AdmitTx admits inside the caller's transaction (the transactional
//     outbox): the record exists if and only if the caller commits.
//   - Retention: Sweep deletes old final records in small batches with FOR
//     UPDATE SKIP LOCKED, so sweepers on several nodes neither collide nor
//     hold long locks. An admission whose key is swept under it is re-run
//     and finds the key free.
//   - Fires of schedules (store.FireStore, table sendonce_fires): a claim
//     is one INSERT ... ON CONFLICT DO UPDATE ... WHERE claimable, so the
//     primary key decides between nodes creating a fire and the row lock
//     between nodes taking over an expired one; progress and finish are
//     compare-and-set on (fire key, fence), like email leases.
//   - Connection loss: calls fail (wrapped pgx errors, never a store
//     sentinel) while the database is away, and the pool reconnects on its
//     own when it returns; nothing needs restarting. A batch that failed
//     before reaching the server is re-run at once.
//
// Clocks: the store never reads a clock for lease decisions; every time
// comes from the caller. Nodes' clocks therefore meet only through leases:
// a lease written with one node's now is judged expired by another node's
// now. A worker must finish its irreversible step before its lease expires
// by the clock of any node that could claim the record, so the lease safety
// margin the dispatcher keeps before MarkCommitting must exceed the largest
// clock difference between nodes (NTP keeps it to milliseconds; the margin
// is seconds). Nothing else depends on clocks agreeing.
//
// The schema is created by Migrate (embedded, numbered migrations; see
// migrate.go). Open refuses a database that is not migrated, or that a
// newer sendonce migrated.
//
// Timestamps are stored as bigint unix nanoseconds (UTC), the zero time.Time
// as 0, so times round-trip exactly.
package pgstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/puddle/v2"

	"github.com/sendonce/sendonce/store"
)

// Defaults of Options.
const (
	DefaultMaxBatch     = 1024
	DefaultAdmitWorkers = 2
	DefaultWriteTimeout = 30 * time.Second
)

// Options tune a Store. The zero value is ready to use.
type Options struct {
	// MaxConns is the size of the connection pool. 0 means pgxpool's
	// default (the URL's pool_max_conns, or max(4, number of CPUs)).
	MaxConns int32
	// Schema is the PostgreSQL schema holding sendonce's tables; every
	// query names it. Empty means the connection's search_path (usually
	// "public"). Tests use one schema each.
	Schema string
	// Migrate applies pending migrations at Open (serve --migrate).
	// Without it, Open refuses a database whose schema is behind.
	Migrate bool
	// Logger receives migrations applied and batches re-run. nil discards.
	Logger *slog.Logger
	// MaxBatch is the most admissions written in one transaction. 0 means
	// DefaultMaxBatch.
	MaxBatch int
	// AdmitWorkers is the number of batch transactions in flight at once.
	// 0 means DefaultAdmitWorkers.
	AdmitWorkers int
	// WriteTimeout bounds one batch transaction: callers share it, so it
	// cannot use any one caller's context. 0 means DefaultWriteTimeout.
	WriteTimeout time.Duration
	// OnCommit, when set, sees every committed transaction of the batched
	// admissions (Admit; not AdmitTx, whose transaction is the caller's):
	// how many Admit calls shared it and how long its COMMIT took. It is
	// called from the AdmitWorkers batchers at once, so it must be safe for
	// concurrent use, and it must return quickly: the callers of the batch
	// have their answer only after it.
	OnCommit func(CommitInfo)
}

// CommitInfo describes one committed admission transaction.
type CommitInfo struct {
	// Requests is how many Admit calls shared the transaction.
	Requests int
	// Admissions is how many emails they held together.
	Admissions int
	// Commit is how long the COMMIT took: the round trip and the
	// server's WAL flush (synchronous_commit).
	Commit time.Duration
}

func (o Options) validate() error {
	if o.MaxConns < 0 {
		return fmt.Errorf("pgstore: Options.MaxConns is %d; use a positive number, or 0 for the default", o.MaxConns)
	}
	if o.MaxBatch < 0 {
		return fmt.Errorf("pgstore: Options.MaxBatch is %d; use a positive number, or 0 for %d", o.MaxBatch, DefaultMaxBatch)
	}
	if o.AdmitWorkers < 0 {
		return fmt.Errorf("pgstore: Options.AdmitWorkers is %d; use a positive number, or 0 for %d", o.AdmitWorkers, DefaultAdmitWorkers)
	}
	if o.WriteTimeout < 0 {
		return fmt.Errorf("pgstore: Options.WriteTimeout is %v; use a positive duration, or 0 for %v", o.WriteTimeout, DefaultWriteTimeout)
	}
	return nil
}

func (o Options) withDefaults() Options {
	if o.MaxBatch == 0 {
		o.MaxBatch = DefaultMaxBatch
	}
	if o.AdmitWorkers == 0 {
		o.AdmitWorkers = DefaultAdmitWorkers
	}
	if o.WriteTimeout == 0 {
		o.WriteTimeout = DefaultWriteTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// Stats counts the work of the admission batchers since Open.
type Stats struct {
	Requests   int64 // Admit calls taken by a batcher
	Admissions int64 // admissions in them
	Batches    int64 // batches taken (one transaction each, unless retried or re-run)
	Commits    int64 // batch transactions committed
	Retries    int64 // batch transactions re-run after a deadlock, serialization failure or lost connection
	Reruns     int64 // batches rolled back after the database refused one request, re-run one request at a time
}

// Store is a store.Store backed by a PostgreSQL database shared by any
// number of nodes.
type Store struct {
	pool *pgxpool.Pool
	opts Options
	log  *slog.Logger
	q    queries

	admits      chan *admitReq
	quit        chan struct{} // closed by Close: batchers stop taking requests
	workers     sync.WaitGroup
	workersDone chan struct{} // closed when every batcher has exited
	closed      atomic.Bool
	closeOnce   sync.Once

	requests, admissions, batches, commits, retries, reruns atomic.Int64
}

var _ store.Store = (*Store)(nil)

// Open connects to the database at url (a postgres:// URL or a key=value
// connection string) and checks its schema: with opts.Migrate it first
// applies pending migrations; without it, a schema behind this binary is
// refused with the command that fixes it. A schema newer than this binary
// is always refused.
func Open(ctx context.Context, url string, opts Options) (*Store, error) {
	if err := opts.validate(); err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	if opts.Migrate {
		if err := Migrate(ctx, url, opts); err != nil {
			return nil, err
		}
	}
	cfg, err := poolConfig(url, opts)
	if err != nil {
		return nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgstore: connect to %s: %w", where(cfg.ConnConfig), err)
	}
	s := &Store{
		pool:        pool,
		opts:        opts,
		log:         opts.Logger,
		q:           newQueries(opts.Schema),
		admits:      make(chan *admitReq, opts.MaxBatch),
		quit:        make(chan struct{}),
		workersDone: make(chan struct{}),
	}
	if err := s.checkVersion(ctx, where(cfg.ConnConfig)); err != nil {
		pool.Close()
		return nil, err
	}
	for range opts.AdmitWorkers {
		s.workers.Go(s.batcher)
	}
	go func() { s.workers.Wait(); close(s.workersDone) }()
	return s, nil
}

func poolConfig(url string, opts Options) (*pgxpool.Config, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		// pgx's error does not echo the password; the URL itself might.
		return nil, fmt.Errorf("pgstore: invalid PostgreSQL URL: %w", err)
	}
	if opts.MaxConns > 0 {
		cfg.MaxConns = opts.MaxConns
	}
	cfg.AfterConnect = ensureDurableCommit
	return cfg, nil
}

// ensureDurableCommit turns synchronous_commit back on for this session if
// the server runs without it: with it off, a commit is acknowledged before
// its WAL is flushed, and a server crash would lose admissions we had
// acknowledged. Stronger settings (remote_write, remote_apply) are kept.
func ensureDurableCommit(ctx context.Context, c *pgx.Conn) error {
	var v string
	if err := c.QueryRow(ctx, "SELECT current_setting('synchronous_commit')").Scan(&v); err != nil {
		return err
	}
	if v == "off" {
		_, err := c.Exec(ctx, "SET synchronous_commit = on")
		return err
	}
	return nil
}

// where names a database for error messages, without credentials.
func where(c *pgx.ConnConfig) string {
	return fmt.Sprintf("PostgreSQL at %s:%d (database %q)", c.Host, c.Port, c.Database)
}

// Stats returns the batchers' counters.
func (s *Store) Stats() Stats {
	return Stats{
		Requests:   s.requests.Load(),
		Admissions: s.admissions.Load(),
		Batches:    s.batches.Load(),
		Commits:    s.commits.Load(),
		Retries:    s.retries.Load(),
		Reruns:     s.reruns.Load(),
	}
}

// Close stops the batchers (requests still queued are answered with
// store.ErrClosed; batches in flight finish), then closes the pool once
// every call in flight has returned its connection. Close is idempotent.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		close(s.quit)
		<-s.workersDone
		s.pool.Close()
	})
	return nil
}

// Ping reports whether the database answers.
func (s *Store) Ping(ctx context.Context) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	return s.interpretError("ping", s.pool.Ping(ctx))
}

// interpretError is the one place where errors of pgx and PostgreSQL become
// the store's sentinels, or get the hint that names their fix. Every
// method's error passes through it.
func (s *Store) interpretError(op string, err error) error {
	if err == nil {
		return nil
	}
	switch {
	case s.closed.Load() || errors.Is(err, puddle.ErrClosedPool):
		return fmt.Errorf("pgstore: %s: %w", op, store.ErrClosed)
	case errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("pgstore: %s: %w", op, store.ErrNotFound)
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch pe.Code {
		case "42P01", "42703", "42P02": // undefined table or column: a schema behind the binary
			return fmt.Errorf("pgstore: %s: %w (is the schema migrated? run \"sendonce migrate --postgres URL\")", op, err)
		case "22021", "22P05": // invalid byte sequence (NUL, broken UTF-8)
			return fmt.Errorf("pgstore: %s: %w (text fields must be valid UTF-8 without NUL bytes)", op, err)
		case "57P01", "57P02", "57P03": // admin shutdown, crash shutdown, cannot connect now
			return fmt.Errorf("pgstore: %s: database unavailable, retry later: %w", op, err)
		}
	}
	return fmt.Errorf("pgstore: %s: %w", op, err)
}

// retryable reports whether a failed transaction may simply be run again:
// PostgreSQL chose it as a deadlock or serialization victim, a row it
// relied on vanished, or the statement never reached the server.
func retryable(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code == "40P01" || pe.Code == "40001"
	}
	return errors.Is(err, errVanished) || pgconn.SafeToRetry(err)
}
