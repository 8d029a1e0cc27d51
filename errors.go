package sendonce

import (
	"errors"
	"fmt"

	"github.com/sendonce/sendonce/store"
)

// Sentinel errors. Store errors are re-exported so that callers of the
// library need not import the store package.
var (
	// ErrKeyReused: the idempotency key was already used for a different
	// email. The stored email is kept; nothing is overwritten.
	ErrKeyReused = errors.New("sendonce: idempotency key reused with a different payload")
	// ErrNotFound: no email has this key in this tenant.
	ErrNotFound = store.ErrNotFound
	// ErrInvalidState: the email is not in a state the action applies to.
	ErrInvalidState = store.ErrInvalidState
	// ErrTooLarge: the rendered message exceeds the configured maximum size.
	ErrTooLarge = errors.New("sendonce: message too large")
)

// FieldError is a validation error that names the offending field and says
// how to fix it. Field uses JSON names with indexes and map keys, such as
// "to[2]" or "headers.X-Campaign".
type FieldError struct {
	Field   string
	Message string
}

func (e *FieldError) Error() string {
	if e.Field == "" {
		return e.Message
	}
	return e.Field + ": " + e.Message
}

func fieldErr(field, format string, args ...any) *FieldError {
	return &FieldError{Field: field, Message: fmt.Sprintf(format, args...)}
}
