package store

import "errors"

// Sentinel errors of every Store. Backends translate their own errors into
// these, so callers test with errors.Is.
var (
	// ErrNotFound: no record has this (tenant, key).
	ErrNotFound = errors.New("store: not found")
	// ErrLeaseLost: the fence moved or the lease expired; the caller no
	// longer owns the record and must not perform the irreversible step.
	ErrLeaseLost = errors.New("store: lease lost")
	// ErrInvalidState: the record is not in a state this call applies to.
	ErrInvalidState = errors.New("store: invalid state for this operation")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("store: closed")
	// ErrLocked: another process holds the store's data directory.
	ErrLocked = errors.New("store: data directory locked by another process")
	// ErrBadCursor: the List cursor was not made by this store.
	ErrBadCursor = errors.New("store: invalid cursor")
)
