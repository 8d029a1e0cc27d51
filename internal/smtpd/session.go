package smtpd

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/mail"
	"slices"
	"strings"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/saslogin"
)

// Replies that do not depend on the message.
var (
	errAuthRequired = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0},
		Message: "authentication required: log in with AUTH (after STARTTLS) before MAIL"}
	errAuthNeedsTLS = &smtp.SMTPError{Code: 538, EnhancedCode: smtp.EnhancedCode{5, 7, 11},
		Message: "encryption required for AUTH: issue STARTTLS first"}
	errAuthDisabled = &smtp.SMTPError{Code: 502, EnhancedCode: smtp.EnhancedCode{5, 5, 1},
		Message: "AUTH is not enabled: no users are configured, loopback clients send without logging in"}
	errAuthFailed = &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8},
		Message: "authentication failed: check the user name and password"}
	errNotRecorded = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0},
		Message: "the message could not be recorded and was not accepted; try again later"}
)

type backend struct{ s *Server }

func (b backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	se := &session{s: b.s, c: c, remote: c.Conn().RemoteAddr(), tc: tracked(c.Conn())}
	if len(b.s.cfg.Users) == 0 {
		se.tenant = sendonce.DefaultTenant
	}
	return se, nil
}

// session is one SMTP session, from EHLO to QUIT, or to STARTTLS, after
// which go-smtp starts a new one: a login never survives STARTTLS.
type session struct {
	s      *Server
	c      *smtp.Conn
	tc     *trackedConn
	remote net.Addr

	user   string // "" until AUTH succeeded
	tenant string // "" until known

	from string
	to   []string
}

// authAllowed is the per-connection rule go-smtp cannot express: AUTH only
// over TLS, or on a loopback connection where nobody can listen in.
func (se *session) authAllowed() bool {
	_, isTLS := se.c.TLSConnectionState()
	return isTLS || se.s.cfg.isLocal(se.remote)
}

func (se *session) AuthMechanisms() []string {
	if len(se.s.cfg.Users) == 0 || !se.authAllowed() {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

func (se *session) Auth(mech string) (sasl.Server, error) {
	if len(se.s.cfg.Users) == 0 {
		return nil, errAuthDisabled
	}
	if !se.authAllowed() {
		se.s.observe(Event{Kind: EventAuthFailed, Code: 538, Remote: se.remote})
		return nil, errAuthNeedsTLS
	}
	key := clientKey(se.remote)
	if blocked, wait := se.s.logins.blocked(key, se.s.cfg.Now()); blocked {
		se.s.log.Warn("smtp login refused: too many failures", "remote", se.remote.String())
		se.s.observe(Event{Kind: EventAuthFailed, Code: 421, Remote: se.remote})
		if se.tc != nil {
			se.tc.closeAfterWrite.Store(true)
		}
		return nil, &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
			Message: fmt.Sprintf("too many failed logins from your address; try again in %d seconds", int(wait.Seconds())+1)}
	}
	check := func(identity, name, pass string) error {
		u, ok := se.s.users[name]
		hash := []byte(u.PasswordHash)
		if !ok {
			hash = se.s.dummy
		}
		// Always run bcrypt, so an unknown user costs as much as a
		// wrong password and the timing tells nothing.
		err := bcrypt.CompareHashAndPassword(hash, []byte(pass))
		if !ok || err != nil || (identity != "" && identity != name) {
			se.s.logins.fail(key, se.s.cfg.Now())
			se.s.log.Info("smtp login failed", "remote", se.remote.String(), "user", name)
			se.s.observe(Event{Kind: EventAuthFailed, User: name, Code: 535, Remote: se.remote})
			return errAuthFailed
		}
		se.user, se.tenant = u.Name, u.Tenant
		return nil
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(check), nil
	case sasl.Login:
		return saslogin.NewServer(func(u, p string) error { return check("", u, p) }), nil
	}
	return nil, &smtp.SMTPError{Code: 504, EnhancedCode: smtp.EnhancedCode{5, 5, 4},
		Message: fmt.Sprintf("AUTH %s is not supported; use PLAIN or LOGIN", oneLine(mech))}
}

func (se *session) reject(err *smtp.SMTPError) error {
	se.s.observe(Event{Kind: EventRejected, Tenant: se.tenant, User: se.user, Code: err.Code, Remote: se.remote})
	return err
}

func (se *session) Mail(from string, opts *smtp.MailOptions) error {
	if se.tenant == "" {
		return se.reject(errAuthRequired)
	}
	if from != "" {
		if err := checkAddress(from); err != nil {
			return se.reject(addressError(err, "sender", smtp.EnhancedCode{5, 1, 7}))
		}
	}
	if se.tc != nil {
		se.tc.inTxn.Store(true)
	}
	se.from = from
	return nil
}

func (se *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if se.tenant == "" {
		return se.reject(errAuthRequired)
	}
	if err := checkAddress(to); err != nil {
		return se.reject(addressError(err, "recipient", smtp.EnhancedCode{5, 1, 3}))
	}
	se.to = append(se.to, to)
	return nil
}

// errNonASCII marks an address the ledger cannot take yet.
var errNonASCII = errors.New("non-ASCII address")

// checkAddress applies the ledger's envelope rules at MAIL and RCPT time,
// so the client learns which address is wrong instead of a failed DATA.
func checkAddress(addr string) error {
	for i := 0; i < len(addr); i++ {
		if addr[i] >= 0x80 {
			return errNonASCII
		}
	}
	a, err := mail.ParseAddress(addr)
	if err != nil {
		return err
	}
	if a.Address != addr && !strings.EqualFold(a.Address, addr) {
		return fmt.Errorf("it reads as %q", a.Address)
	}
	at := strings.LastIndexByte(a.Address, '@')
	if at <= 0 || at == len(a.Address)-1 {
		return errors.New("it has no domain")
	}
	if len(a.Address) > 254 {
		return fmt.Errorf("it is %d bytes long; the maximum is 254", len(a.Address))
	}
	for _, c := range []byte(a.Address) {
		if c < 0x21 || c > 0x7e {
			return errors.New("it contains a space or control character")
		}
	}
	return nil
}

func addressError(err error, role string, code smtp.EnhancedCode) *smtp.SMTPError {
	if errors.Is(err, errNonASCII) {
		// RFC 6531 §3.5: 553 5.6.7 for an address that cannot be taken
		// even with SMTPUTF8.
		return &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 6, 7},
			Message: fmt.Sprintf("the %s address is not ASCII; sendonce does not take internationalised addresses yet", role)}
	}
	return &smtp.SMTPError{Code: 553, EnhancedCode: code,
		Message: oneLine(fmt.Sprintf("bad %s address (%v); use a bare address like user@example.com", role, err))}
}

func (se *session) Reset() {
	se.from, se.to = "", nil
	if se.tc != nil {
		se.tc.inTxn.Store(false)
		// Shutdown closes idle connections and leaves the ones in a
		// transaction; this one just finished hers (after DATA go-smtp
		// has written the reply by now).
		se.s.mu.Lock()
		draining := se.s.draining
		se.s.mu.Unlock()
		if draining {
			se.tc.Conn.Close()
		}
	}
}

func (se *session) Logout() error { return nil }

// Data reads the message, derives its key and records it. The reply is the
// error go-smtp writes, a 250 included: go-smtp's own success reply cannot
// say "queued as KEY" or "duplicate of KEY".
func (se *session) Data(r io.Reader) error {
	if se.tenant == "" { // go-smtp refuses DATA without RCPT, which needs a tenant
		return se.reject(errAuthRequired)
	}
	// go-smtp's ReadTimeout was set for the DATA command line; the body
	// gets the longer DataTimeout of its own.
	se.c.Conn().SetReadDeadline(time.Now().Add(se.s.cfg.DataTimeout))
	data, err := io.ReadAll(r)
	if err != nil {
		return se.readError(err)
	}
	m, err := parseMessage(data, se.s.cfg.MaxLineLength)
	if err != nil {
		return se.reject(err.(*smtp.SMTPError))
	}
	modes := se.s.modes(se.tenant)
	now := se.s.cfg.Now()
	var key string
	var src KeySource
	if !modes.IgnoreHeader {
		k, err := m.headerKey()
		if err != nil {
			return se.reject(err.(*smtp.SMTPError))
		}
		key, src = k, KeyHeader
	}
	if key == "" && modes.MessageID {
		key, src = m.messageIDKey(), KeyMessageID
	}
	if key == "" && modes.FingerprintWindow > 0 {
		cur, prev := m.fingerprintKeys(se.from, se.to, modes.FingerprintWindow, now)
		if done, err := se.previousWindow(prev, modes.FingerprintWindow, now); done {
			return err
		}
		key, src = cur, KeyFingerprint
	}
	if key == "" {
		var b [16]byte
		rand.Read(b[:])
		key, src = "nokey:"+hex.EncodeToString(b[:]), KeyNone
	}
	return se.submit(m, key, src)
}

// previousWindow answers a fingerprint duplicate whose original was
// recorded in the window before the current one, less than a window ago.
// done is false when the message should be submitted.
//
// A small race remains at a window boundary: if the original's admission
// is not yet committed when its repeat looks here, both are recorded. It
// needs the two submissions to overlap in time, which a retry after a
// failure or a queue's redelivery does not.
func (se *session) previousWindow(prev string, window time.Duration, now time.Time) (done bool, err error) {
	rec, gerr := se.s.cfg.Client.Get(se.s.baseCtx, se.tenant, prev)
	switch {
	case errors.Is(gerr, sendonce.ErrNotFound):
		return false, nil
	case gerr != nil:
		se.s.log.Warn("smtp submission: look-up failed", "tenant", se.tenant, "key", prev, "err", gerr)
		return true, se.reject(errNotRecorded)
	case now.Sub(rec.CreatedAt) >= window:
		return false, nil
	}
	return true, se.duplicate(rec.Key, KeyFingerprint)
}

func (se *session) submit(m *message, key string, src KeySource) error {
	rc, err := se.s.cfg.Client.Submit(se.s.baseCtx, sendonce.Submission{
		Tenant: se.tenant,
		Key:    key,
		Raw:    &sendonce.Raw{From: se.from, To: slices.Clone(se.to), Data: m.data},
		Source: "smtp",
	})
	var fe *sendonce.FieldError
	switch {
	case err == nil && rc.Duplicate:
		return se.duplicate(key, src)
	case err == nil:
		se.s.log.Debug("smtp submission queued", "tenant", se.tenant, "key", key, "message_id", rc.Record.MessageID, "key_source", src, "remote", se.remote.String())
		se.s.observe(Event{Kind: EventNew, Tenant: se.tenant, User: se.user, Key: key, Source: src, Code: 250, Remote: se.remote})
		return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "queued as " + key}
	case errors.Is(err, sendonce.ErrKeyReused):
		// The ledger compares content (sendonce.ContentFingerprint), so a
		// message rebuilt for a retry is a duplicate; this is another email.
		return se.rejectKey(&smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 0},
			Message: oneLine(reusedMessage(key, src, rc.Record, sameEnvelope(rc.Record, se.from, se.to)))}, key, src)
	case errors.As(err, &fe):
		code, ec := 550, smtp.EnhancedCode{5, 6, 0}
		switch {
		case strings.HasPrefix(fe.Field, "mail_from"):
			code, ec = 553, smtp.EnhancedCode{5, 1, 7}
		case strings.HasPrefix(fe.Field, "rcpt_to"):
			code, ec = 553, smtp.EnhancedCode{5, 1, 3}
		}
		return se.rejectKey(&smtp.SMTPError{Code: code, EnhancedCode: ec, Message: oneLine(fe.Message)}, key, src)
	case errors.Is(err, sendonce.ErrTooLarge):
		return se.rejectKey(&smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4}, Message: oneLine(err.Error())}, key, src)
	}
	se.s.log.Warn("smtp submission not recorded", "tenant", se.tenant, "key", key, "err", err)
	return se.rejectKey(errNotRecorded, key, src)
}

func (se *session) duplicate(key string, src KeySource) error {
	se.s.log.Debug("smtp submission is a duplicate", "tenant", se.tenant, "key", key, "key_source", src, "remote", se.remote.String())
	se.s.observe(Event{Kind: EventDuplicate, Tenant: se.tenant, User: se.user, Key: key, Source: src, Code: 250, Remote: se.remote})
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "duplicate of " + key + ", not sent again"}
}

func (se *session) rejectKey(e *smtp.SMTPError, key string, src KeySource) error {
	se.s.observe(Event{Kind: EventRejected, Tenant: se.tenant, User: se.user, Key: key, Source: src, Code: e.Code, Remote: se.remote})
	return e
}

func reusedMessage(key string, src KeySource, rec sendonce.Record, sameEnvelope bool) string {
	if src == KeyMessageID {
		return fmt.Sprintf("the Message-ID of this message was already accepted for other envelope recipients (%s); the stored message is kept. Give each distinct message its own Message-ID, or an X-Idempotency-Key", strings.Join(rec.To, ", "))
	}
	what := fmt.Sprintf("another subject (%q)", rec.Subject)
	if !sameEnvelope {
		what = fmt.Sprintf("another envelope (from <%s> to %s)", rec.From, strings.Join(rec.To, ", "))
	}
	return fmt.Sprintf("%s %q was already used for a message with %s; the stored message is kept. Use a new key for a new message", KeyHeaderField, key, what)
}

// sameEnvelope compares the envelope with a record's, as the ledger stores
// it: recipients deduplicated without regard to case.
func sameEnvelope(rec sendonce.Record, from string, to []string) bool {
	if !strings.EqualFold(rec.From, from) {
		return false
	}
	norm := func(in []string) []string {
		out := make([]string, len(in))
		for i, s := range in {
			out[i] = strings.ToLower(s)
		}
		slices.Sort(out)
		return slices.Compact(out)
	}
	return slices.Equal(norm(rec.To), norm(to))
}

// readError turns a failure to read DATA into its reply.
func (se *session) readError(err error) error {
	var ne net.Error
	switch {
	case errors.Is(err, smtp.ErrDataTooLarge):
		return se.reject(&smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
			Message: fmt.Sprintf("the message exceeds the size limit of %d bytes (see SIZE in the EHLO reply)", se.s.cfg.MaxMessageBytes)})
	case errors.Is(err, smtp.ErrTooLongLine):
		// go-smtp closes the connection after this reply: its reader
		// cannot find the end of the line it gave up on.
		return se.reject(contentError("a line is far longer than %d bytes with its CRLF (RFC 5322 2.1.1): encode long lines (quoted-printable or base64)", se.s.cfg.MaxLineLength))
	case errors.As(err, &ne) && ne.Timeout():
		if se.tc != nil {
			se.tc.closeAfterWrite.Store(true)
		}
		return se.reject(&smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2},
			Message: fmt.Sprintf("the message did not arrive within %s; nothing was accepted, try again", se.s.cfg.DataTimeout)})
	}
	// The client went away mid-message: nothing is recorded.
	return err
}
