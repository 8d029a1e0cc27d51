// Package transport defines how sendonce hands a message to the outside
// world, and how it learns what happened.
//
// # The contract of Send
//
// A Transport delivers one Message per Send call, in steps:
//
//  1. Preparation (connect, greet, authenticate, MAIL, RCPT, and writing the
//     body without its terminator). Nothing here is irreversible: if it fails,
//     the upstream does not have the message (RFC 5321 §4.1.1.4: an
//     unfinished DATA is discarded).
//  2. Commit: just before the irreversible step, Send calls the commit
//     function it was given. The caller makes a durable marker there. If
//     commit returns an error, Send must abort without performing the
//     irreversible step and return that error.
//  3. The irreversible step (SMTP: the final "." of DATA; an HTTP API: the
//     request) and its answer.
//
// Send classifies every error it returns with Temporary, Permanent or
// Ambiguous (see Error). An error from step 1 or 2 is never Ambiguous. An
// error after step 3 began is Ambiguous unless the upstream answered: a 4xx
// answer is Temporary (the upstream said it does not have the message), a 5xx
// answer is Permanent.
//
// A Transport is safe for concurrent use; it may pool connections.
package transport

import (
	"context"
	"errors"
	"fmt"
)

// Message is one email ready for the wire. Data is sent byte for byte on
// every attempt.
type Message struct {
	Tenant    string
	Key       string
	MessageID string
	From      string   // envelope sender; "" is the null sender
	To        []string // envelope recipients
	Data      []byte   // the RFC 5322 message, CRLF line endings
}

// Receipt is the upstream's answer to a successful Send.
type Receipt struct {
	Reply string // e.g. "250 2.0.0 Ok: queued as 4F2A"
}

// CommitFunc records the commit marker; see the package documentation.
type CommitFunc func(ctx context.Context) error

// Transport delivers messages.
type Transport interface {
	// Name says what kind of transport this is, for logs and metrics
	// ("maildir", "smtp", ...).
	Name() string
	// Send delivers msg. It calls commit exactly once, just before the
	// irreversible step, unless it fails before reaching it.
	Send(ctx context.Context, msg *Message, commit CommitFunc) (Receipt, error)
	// Close releases pooled connections and other resources.
	Close() error
}

// Idempotent is implemented by transports for which repeating a Send of the
// same Message can never produce a second copy (maildir: the file name is
// derived from the key). For them an Ambiguous outcome is simply retried
// instead of becoming in_doubt.
type Idempotent interface {
	Idempotent() bool
}

// IsIdempotent reports whether t declares itself idempotent.
func IsIdempotent(t Transport) bool {
	i, ok := t.(Idempotent)
	return ok && i.Idempotent()
}

// Kind classifies a delivery error.
type Kind int

const (
	// Temporary: the upstream does not have the message; try again later.
	Temporary Kind = iota + 1
	// Permanent: the upstream refused the message; trying again is useless.
	Permanent
	// Ambiguous: the upstream may or may not have the message.
	Ambiguous
)

func (k Kind) String() string {
	switch k {
	case Temporary:
		return "temporary"
	case Permanent:
		return "permanent"
	case Ambiguous:
		return "ambiguous"
	}
	return "unclassified"
}

// Error is a classified delivery error.
type Error struct {
	Kind Kind
	// Step names where it happened: "connect", "mail", "rcpt", "data",
	// "commit", "final-dot", ...
	Step string
	// Code is the upstream's reply code, when it answered (SMTP 4xx/5xx,
	// HTTP status).
	Code int
	Err  error
}

func (e *Error) Error() string {
	if e.Step == "" {
		return fmt.Sprintf("%s: %v", e.Kind, e.Err)
	}
	return fmt.Sprintf("%s at %s: %v", e.Kind, e.Step, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// Errorf returns an *Error of kind k at step.
func Errorf(k Kind, step string, code int, format string, args ...any) *Error {
	return &Error{Kind: k, Step: step, Code: code, Err: fmt.Errorf(format, args...)}
}

// Wrap classifies err; it returns nil for a nil err.
func Wrap(k Kind, step string, code int, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Kind: k, Step: step, Code: code, Err: err}
}

// KindOf returns the classification of err. An unclassified error counts as
// Temporary, the safe default before the commit step; the dispatcher treats
// any unclassified error after commit as Ambiguous.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return Temporary
}

// Classified reports whether err carries an explicit classification.
func Classified(err error) bool {
	var e *Error
	return errors.As(err, &e)
}
