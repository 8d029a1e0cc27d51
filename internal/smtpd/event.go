package smtpd

import "net"

// EventKind says what happened.
type EventKind string

// The kinds of Event.
const (
	// EventNew: a message was recorded under a new key (KeySource KeyNone
	// means it was accepted without deduplication).
	EventNew EventKind = "new"
	// EventDuplicate: a message was answered from an existing record and
	// not queued again.
	EventDuplicate EventKind = "duplicate"
	// EventRejected: a message, or its MAIL or RCPT, was refused (Code
	// says how); nothing was recorded.
	EventRejected EventKind = "rejected"
	// EventAuthFailed: a login failed, or was refused by the rate limit.
	EventAuthFailed EventKind = "auth_failed"
	// EventConnRefused: a connection was refused before the greeting.
	EventConnRefused EventKind = "conn_refused"
)

// KeySource says where a message's key came from.
type KeySource string

// The key sources, in the order they are tried.
const (
	KeyHeader      KeySource = "header"      // X-Idempotency-Key
	KeyMessageID   KeySource = "message_id"  // "message-id:" + the Message-ID
	KeyFingerprint KeySource = "fingerprint" // "fingerprint:" + hash + "@" + window start
	KeyNone        KeySource = "none"        // "nokey:" + random: not deduplicated
)

// Event reports one outcome to Config.Observer, for metrics and tests.
type Event struct {
	Kind   EventKind
	Tenant string    // "" before the tenant is known
	User   string    // the authenticated user, if any
	Key    string    // the message's key, when one was derived
	Source KeySource // where Key came from
	Code   int       // the SMTP reply code sent
	Remote net.Addr
}
