// Package sqlitestore is sendonce's embedded default store: one SQLite file
// (modernc.org/sqlite, pure Go) in WAL mode with synchronous=FULL, owned by a
// single process.
//
// It keeps the store.Store contract as follows:
//
//   - Durability and group commit: every write (Admit, Claim, Renew,
//     MarkCommitting, Complete, Resolve) is handed to one writer goroutine,
//     which runs everything already waiting (up to Options.MaxBatch requests)
//     in one transaction and commits it with one fsync before answering any
//     caller. A call returns only after its commit.
//   - A logical outcome (a conflict, ErrLeaseLost, ErrInvalidState) writes
//     nothing, so it never spoils the batch it ran in. If the database itself
//     fails inside a batch, the batch is rolled back and every request in it
//     is re-run in a transaction of its own, so one bad request cannot fail
//     the others.
//   - A caller whose ctx ends while its request waits gets ctx.Err(). If the
//     writer had already taken the request, it may still commit; that is
//     allowed by the contract (every call is safe to retry).
//   - One process: the data directory is locked with flock(2) on dir/LOCK
//     for as long as the store is open; a second Open fails at once with
//     store.ErrLocked naming the holder's pid.
//   - Fires of schedules (store.FireStore, table fires) are written by the
//     same writer: a claim reads and writes in one transaction no other
//     write can enter.
//   - Reads (Get, List, Counts, Ping) use a separate pool of read-only
//     connections, which WAL lets run beside the writer.
//
// Timestamps are stored as integer unix nanoseconds (UTC), the zero
// time.Time as 0.
package sqlitestore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver

	"github.com/sendonce/sendonce/store"
)

// DBFile is the name of the database file inside the data directory.
const DBFile = "sendonce.db"

// LockFile is the name of the lock file inside the data directory.
const LockFile = "LOCK"

// Defaults of Options.
const (
	DefaultMaxBatch    = 1024
	DefaultBusyTimeout = 5 * time.Second
)

// Options tune a Store. The zero value is ready to use.
type Options struct {
	// MaxBatch is the most write requests committed in one transaction.
	// 0 means DefaultMaxBatch.
	MaxBatch int
	// BusyTimeout is how long a connection waits for a lock held by another
	// connection (a checkpoint, a reader) before failing. 0 means
	// DefaultBusyTimeout.
	BusyTimeout time.Duration
	// ReadConns is the size of the read-only pool. 0 means max(4, GOMAXPROCS).
	ReadConns int
	// OnCommit, when set, is called by the writer after every committed
	// transaction, for metrics. It runs on the writer goroutine, so it must
	// return at once (update a counter, observe a histogram).
	OnCommit func(CommitInfo)
}

// CommitInfo describes one committed write transaction.
type CommitInfo struct {
	// Requests is how many write requests shared the commit (the group
	// commit's batch size).
	Requests int
	// Sync is how long the COMMIT took: with synchronous=FULL, mostly the
	// fsync of the WAL.
	Sync time.Duration
}

func (o Options) validate() error {
	if o.MaxBatch < 0 {
		return fmt.Errorf("sqlitestore: Options.MaxBatch is %d; use a positive number, or 0 for %d", o.MaxBatch, DefaultMaxBatch)
	}
	if o.BusyTimeout < 0 {
		return fmt.Errorf("sqlitestore: Options.BusyTimeout is %v; use a positive duration, or 0 for %v", o.BusyTimeout, DefaultBusyTimeout)
	}
	if o.ReadConns < 0 {
		return fmt.Errorf("sqlitestore: Options.ReadConns is %d; use a positive number, or 0 for the default", o.ReadConns)
	}
	return nil
}

func (o Options) withDefaults() Options {
	if o.MaxBatch == 0 {
		o.MaxBatch = DefaultMaxBatch
	}
	if o.BusyTimeout == 0 {
		o.BusyTimeout = DefaultBusyTimeout
	}
	if o.ReadConns == 0 {
		o.ReadConns = max(4, runtime.GOMAXPROCS(0))
	}
	return o
}

// Stats counts the work of the writer since Open.
type Stats struct {
	Requests int64 // write requests answered by running them
	Batches  int64 // batches taken from the queue (one transaction each, unless re-run)
	Commits  int64 // transactions committed
	Reruns   int64 // batches rolled back after a database error and re-run one request at a time
}

// Store is a store.Store backed by one SQLite database in a data directory.
type Store struct {
	dir  string
	opts Options
	lock *dirLock

	wdb   *sql.DB // used only by the writer goroutine (and its statement cache)
	stmts *stmtCache
	rdb   *sql.DB // read-only pool

	reqs       chan *request
	quit       chan struct{} // closed by Close: the writer stops taking requests
	writerDone chan struct{} // closed by the writer when it has exited
	closed     atomic.Bool
	closeOnce  sync.Once
	closeErr   error

	requests, batches, commits, reruns atomic.Int64
}

var _ store.Store = (*Store)(nil)

// Open opens (creating if needed) the store in dir: the directory, its lock
// file and dir/sendonce.db. It fails with an error wrapping store.ErrLocked
// if another process, or another Store in this process, holds dir.
func Open(ctx context.Context, dir string, opts Options) (*Store, error) {
	if err := opts.validate(); err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("sqlitestore: create data directory: %w", err)
	}
	lk, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	s := &Store{
		dir:        dir,
		opts:       opts,
		lock:       lk,
		reqs:       make(chan *request, opts.MaxBatch),
		quit:       make(chan struct{}),
		writerDone: make(chan struct{}),
	}
	if err := s.openDBs(ctx); err != nil {
		s.closeDBs()
		lk.release()
		return nil, err
	}
	go s.writer()
	return s, nil
}

func dsn(path string, busy time.Duration, readOnly bool) string {
	q := url.Values{}
	// Every pooled connection runs these, so no connection can miss one.
	q.Add("_pragma", fmt.Sprintf("busy_timeout(%d)", busy.Milliseconds()))
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(FULL)")
	q.Add("_pragma", "foreign_keys(ON)")
	if readOnly {
		q.Set("_query_only", "1")
	} else {
		// A write transaction takes the write lock at BEGIN, so it can never
		// fail half-way with SQLITE_BUSY on lock upgrade.
		q.Set("_txlock", "immediate")
	}
	return "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + q.Encode()
}

func (s *Store) openDBs(ctx context.Context) error {
	path := filepath.Join(s.dir, DBFile)
	wdb, err := sql.Open("sqlite", dsn(path, s.opts.BusyTimeout, false))
	if err != nil {
		return fmt.Errorf("sqlitestore: open %s: %w", path, err)
	}
	// Writes go through one goroutine, so at most one of these
	// connections is in a transaction; the other lets the statement cache
	// prepare while it is (see stmtCache).
	wdb.SetMaxOpenConns(2)
	wdb.SetMaxIdleConns(2)
	wdb.SetConnMaxLifetime(0)
	wdb.SetConnMaxIdleTime(0)
	s.wdb = wdb
	s.stmts = &stmtCache{db: wdb, m: map[string]*sql.Stmt{}}
	if err := migrate(ctx, wdb, path); err != nil {
		return err
	}
	rdb, err := sql.Open("sqlite", dsn(path, s.opts.BusyTimeout, true))
	if err != nil {
		return fmt.Errorf("sqlitestore: open %s: %w", path, err)
	}
	rdb.SetMaxOpenConns(s.opts.ReadConns)
	rdb.SetMaxIdleConns(s.opts.ReadConns)
	s.rdb = rdb
	if err := rdb.PingContext(ctx); err != nil {
		return fmt.Errorf("sqlitestore: open %s for reading: %w", path, err)
	}
	return nil
}

func (s *Store) closeDBs() error {
	var errs []error
	if s.rdb != nil {
		errs = append(errs, s.rdb.Close())
	}
	if s.stmts != nil {
		s.stmts.close()
	}
	if s.wdb != nil {
		errs = append(errs, s.wdb.Close())
	}
	return errors.Join(errs...)
}

// Dir returns the data directory.
func (s *Store) Dir() string { return s.dir }

// Stats returns the writer's counters.
func (s *Store) Stats() Stats {
	return Stats{
		Requests: s.requests.Load(),
		Batches:  s.batches.Load(),
		Commits:  s.commits.Load(),
		Reruns:   s.reruns.Load(),
	}
}

// Close stops the writer (requests still queued are answered with
// store.ErrClosed), closes the database and releases the directory lock.
// Close is idempotent; later calls return the first call's result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		close(s.quit)
		<-s.writerDone
		err := s.closeDBs()
		if lerr := s.lock.release(); lerr != nil {
			err = errors.Join(err, lerr)
		}
		if err != nil {
			s.closeErr = fmt.Errorf("sqlitestore: close %s: %w", s.dir, err)
		}
	})
	return s.closeErr
}

// Ping reports whether the database answers a query.
func (s *Store) Ping(ctx context.Context) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	var one int
	if err := s.rdb.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
		return s.readErr("ping", err)
	}
	return nil
}

// readErr translates errors of the read pool; a read racing Close reports
// store.ErrClosed rather than database/sql's own error.
func (s *Store) readErr(op string, err error) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	return fmt.Errorf("sqlitestore: %s: %w", op, err)
}
