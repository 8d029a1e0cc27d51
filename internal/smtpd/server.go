// Package smtpd is the SMTP submission front door: an application points its
// SMTP settings at sendonce, and a message it submits twice is sent once.
//
// It promises what every front door promises (see docs/guarantees.md):
//
//   - A message is acknowledged (250) only after the ledger recorded it
//     durably. Any failure before that answers 4xx or 5xx and leaves nothing
//     stored, so the sender keeps the message and may retry.
//   - A repeat of a recorded message is answered 250 "duplicate of KEY, not
//     sent again": a success, so the sender stops retrying, and nothing new is
//     queued.
//   - Each message's key is derived, per tenant and in this order, from the
//     X-Idempotency-Key header (on by default), the message's own Message-ID
//     (off by default), or a content fingerprint within a time window (off by
//     default). A message with none of them is accepted without
//     deduplication under a random "nokey:" key and reported as such to the
//     Observer.
//   - Keys are namespaced by tenant: the tenant of the authenticated user, or
//     "default" when no users are configured. One tenant never suppresses or
//     sees another's mail.
//
// Access: with no users configured the server accepts only loopback clients,
// without AUTH, and refuses to start on any other address. With users, MAIL
// and RCPT need AUTH (530 5.7.0 otherwise); AUTH PLAIN and LOGIN are offered
// only over TLS (STARTTLS or implicit TLS) or on a loopback connection, and
// failed logins are rate limited per client address.
//
// docs/smtp.md lists every reply code and how to point applications at it.
package smtpd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"github.com/sendonce/sendonce"
)

// Defaults of the zero Config fields.
const (
	DefaultAddr                  = "127.0.0.1:2525"
	DefaultMaxMessageBytes       = 25 << 20
	DefaultMaxRecipients         = 100
	DefaultMaxLineLength         = 1000 // RFC 5321 §4.5.3.1.6: 998 characters plus CRLF
	DefaultReadTimeout           = 5 * time.Minute
	DefaultDataTimeout           = 10 * time.Minute
	DefaultWriteTimeout          = time.Minute
	DefaultMaxConnsPerIP         = 20
	DefaultAuthFailuresPerMinute = 5
)

// ErrServerClosed is returned by Serve and ListenAndServe after Shutdown or
// Close, as net/http does.
var ErrServerClosed = errors.New("smtpd: server closed")

// User may authenticate with AUTH PLAIN or LOGIN and submits into Tenant.
type User struct {
	Name   string
	Tenant string
	// PasswordHash is a bcrypt hash ($2a$, $2b$ or $2y$), for example from
	// `htpasswd -nbBC 12 "" 'PASSWORD' | tr -d ':\n'`.
	PasswordHash string
}

// KeyModes says how the keys of one tenant's messages are derived. The zero
// value is the default: the X-Idempotency-Key header only.
type KeyModes struct {
	// IgnoreHeader turns off keys from the X-Idempotency-Key header.
	IgnoreHeader bool
	// MessageID keys a message without the header by its own Message-ID.
	// Only for senders that keep one Message-ID across retries: many mail
	// libraries make a new one per attempt, and then this catches nothing.
	MessageID bool
	// FingerprintWindow, when positive, keys a message with neither by a
	// hash of its envelope, From, To, Cc, Subject and body, so the same
	// content submitted again within the window is a duplicate. At least
	// one second.
	FingerprintWindow time.Duration
}

// Config configures a Server. Only Client is required.
type Config struct {
	// Addr is where ListenAndServe listens. Default DefaultAddr. Without
	// Users it must be a loopback address.
	Addr string
	// TLSConfig enables STARTTLS, or with ImplicitTLS, TLS from the first
	// byte (port 465 style).
	TLSConfig   *tls.Config
	ImplicitTLS bool

	// Users, when set, must authenticate; without them only loopback
	// clients are served, as the default tenant.
	Users []User
	// Tenants tunes key derivation per tenant; a tenant not listed gets the
	// zero KeyModes.
	Tenants map[string]KeyModes

	// MaxMessageBytes is advertised as SIZE and enforced. Default 25 MiB.
	// The Client's own MaxMessageBytes must be at least this plus a few
	// hundred bytes (a Date and Message-ID may be added), or large messages
	// get 552 after their DATA.
	MaxMessageBytes int64
	// MaxRecipients per message. Default 100; at most sendonce.MaxRecipients.
	MaxRecipients int
	// MaxLineLength is the longest line, CRLF included, of a command or of
	// the message. Default 1000 (RFC 5321 and 5322).
	MaxLineLength int
	// ReadTimeout is how long a command may take to arrive; DataTimeout how
	// long a whole DATA may take; WriteTimeout how long a reply may take
	// to be written. Defaults 5 min, 10 min, 1 min (RFC 5321 §4.5.3.2).
	ReadTimeout  time.Duration
	DataTimeout  time.Duration
	WriteTimeout time.Duration
	// MaxConnsPerIP limits the simultaneous connections of one client
	// address (an IPv6 client by its /64). Default 20.
	MaxConnsPerIP int
	// AuthFailuresPerMinute is how many failed logins one client address
	// may have in a minute; after that every AUTH is refused with 421
	// until the oldest failure is a minute old. Default 5.
	AuthFailuresPerMinute int

	// Client records the messages.
	Client *sendonce.Client
	Logger *slog.Logger
	// Domain names the server in its greeting. Default the host name.
	Domain string
	// Observer, if set, is called once per message outcome, refused
	// connection and failed login, from the connection's goroutine: it
	// must be quick and safe for concurrent use.
	Observer func(Event)
	// Now is the clock of the fingerprint windows and the login rate
	// limit. Default time.Now. It should be the Client's clock.
	Now func() time.Time

	// isLocal says whether a client may skip TLS before AUTH and, without
	// users, be served at all. Only tests replace it (export_test.go): a
	// test cannot easily connect from a non-loopback address.
	isLocal func(net.Addr) bool
}

// Server is an SMTP submission server. Use New, then Serve or
// ListenAndServe; stop it with Shutdown or Close.
type Server struct {
	cfg     Config
	log     *slog.Logger
	smtp    *smtp.Server
	users   map[string]User
	dummy   []byte // a bcrypt hash checked for unknown users, so timing does not tell them apart
	logins  *loginLimiter
	baseCtx context.Context
	cancel  context.CancelFunc

	wg sync.WaitGroup // goroutines that refuse connections

	mu        sync.Mutex
	closed    bool
	draining  bool
	listeners []net.Listener
	addr      net.Addr
	conns     map[*trackedConn]struct{}
	perIP     map[string]int
}

// New validates cfg and returns a Server. Every error names the field and
// the fix.
func New(cfg Config) (*Server, error) {
	if cfg.Client == nil {
		return nil, errors.New("smtpd: Config.Client is nil; give the sendonce.Client that records the messages")
	}
	if cfg.Addr == "" {
		cfg.Addr = DefaultAddr
	}
	if cfg.isLocal == nil {
		cfg.isLocal = isLoopback
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Domain == "" {
		cfg.Domain = "localhost"
		if h, err := os.Hostname(); err == nil && h != "" {
			cfg.Domain = h
		}
	}
	for _, f := range []struct {
		name string
		v    *int64
		def  int64
	}{
		{"MaxMessageBytes", &cfg.MaxMessageBytes, DefaultMaxMessageBytes},
	} {
		if *f.v < 0 {
			return nil, fmt.Errorf("smtpd: Config.%s is %d; use a positive number, or 0 for the default %d", f.name, *f.v, f.def)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	for _, f := range []struct {
		name string
		v    *int
		def  int
	}{
		{"MaxRecipients", &cfg.MaxRecipients, DefaultMaxRecipients},
		{"MaxLineLength", &cfg.MaxLineLength, DefaultMaxLineLength},
		{"MaxConnsPerIP", &cfg.MaxConnsPerIP, DefaultMaxConnsPerIP},
		{"AuthFailuresPerMinute", &cfg.AuthFailuresPerMinute, DefaultAuthFailuresPerMinute},
	} {
		if *f.v < 0 {
			return nil, fmt.Errorf("smtpd: Config.%s is %d; use a positive number, or 0 for the default %d", f.name, *f.v, f.def)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	if cfg.MaxRecipients > sendonce.MaxRecipients {
		return nil, fmt.Errorf("smtpd: Config.MaxRecipients is %d; the ledger takes at most %d recipients per email", cfg.MaxRecipients, sendonce.MaxRecipients)
	}
	if cfg.MaxLineLength < 80 {
		return nil, fmt.Errorf("smtpd: Config.MaxLineLength is %d; use at least 80 (the default %d is RFC 5321's limit)", cfg.MaxLineLength, DefaultMaxLineLength)
	}
	for _, f := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"ReadTimeout", &cfg.ReadTimeout, DefaultReadTimeout},
		{"DataTimeout", &cfg.DataTimeout, DefaultDataTimeout},
		{"WriteTimeout", &cfg.WriteTimeout, DefaultWriteTimeout},
	} {
		if *f.v < 0 {
			return nil, fmt.Errorf("smtpd: Config.%s is %s; use a positive duration, or 0 for the default %s", f.name, *f.v, f.def)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	if cfg.ImplicitTLS && cfg.TLSConfig == nil {
		return nil, errors.New("smtpd: Config.ImplicitTLS needs Config.TLSConfig; give a certificate and key, or turn implicit TLS off")
	}
	for t, m := range cfg.Tenants {
		if m.FingerprintWindow < 0 || (m.FingerprintWindow > 0 && m.FingerprintWindow < time.Second) {
			return nil, fmt.Errorf("smtpd: Config.Tenants[%q].FingerprintWindow is %s; use 0 (off) or at least 1s, for example 10m", t, m.FingerprintWindow)
		}
	}

	s := &Server{
		cfg:   cfg,
		log:   cfg.Logger,
		users: make(map[string]User, len(cfg.Users)),
		conns: map[*trackedConn]struct{}{},
		perIP: map[string]int{},
	}
	cost := bcrypt.MinCost
	for i, u := range cfg.Users {
		if u.Name == "" {
			return nil, fmt.Errorf("smtpd: Config.Users[%d] has no Name; give each user the name it logs in with", i)
		}
		if _, dup := s.users[u.Name]; dup {
			return nil, fmt.Errorf("smtpd: Config.Users[%d]: user %q is listed twice; give each user once", i, u.Name)
		}
		if u.Tenant == "" {
			return nil, fmt.Errorf("smtpd: Config.Users[%d] (%q) has no Tenant; name the tenant its mail belongs to (%q for the single-tenant setup)", i, u.Name, sendonce.DefaultTenant)
		}
		c, err := bcrypt.Cost([]byte(u.PasswordHash))
		if err != nil {
			return nil, fmt.Errorf("smtpd: Config.Users[%d] (%q): PasswordHash is not a bcrypt hash (%v); make one with `htpasswd -nbBC 12 \"\" 'PASSWORD' | tr -d ':\\n'`", i, u.Name, err)
		}
		cost = max(cost, c)
		s.users[u.Name] = u
	}
	if len(cfg.Users) > 0 {
		h, err := bcrypt.GenerateFromPassword([]byte("sendonce: no such user"), cost)
		if err != nil {
			return nil, fmt.Errorf("smtpd: prepare password checks: %w", err)
		}
		s.dummy = h
	}
	if err := s.checkAddr("Config.Addr", cfg.Addr); err != nil {
		return nil, err
	}
	s.logins = newLoginLimiter(cfg.AuthFailuresPerMinute, time.Minute)
	s.baseCtx, s.cancel = context.WithCancel(context.Background())

	srv := smtp.NewServer(backend{s})
	srv.Domain = cfg.Domain
	srv.MaxMessageBytes = cfg.MaxMessageBytes
	srv.MaxRecipients = cfg.MaxRecipients
	// The exact limit is parseMessage's, which answers 550 and lets the
	// session go on. go-smtp's is the backstop against a line without end
	// (it also bounds command lines); hitting it ends the session, since
	// its reader cannot find the end of that line.
	srv.MaxLineLength = 2 * cfg.MaxLineLength
	srv.ReadTimeout = cfg.ReadTimeout
	srv.WriteTimeout = cfg.WriteTimeout
	srv.EnableSMTPUTF8 = true
	// go-smtp's own rule is global (TLS or not); the per-connection rule
	// (TLS or loopback) is in session.AuthMechanisms and session.Auth.
	srv.AllowInsecureAuth = true
	if !cfg.ImplicitTLS {
		srv.TLSConfig = cfg.TLSConfig // offers STARTTLS
	}
	srv.ErrorLog = slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelWarn)
	s.smtp = srv
	return s, nil
}

// checkAddr refuses an address that would expose an open relay (no users,
// not loopback) or one no remote client could ever log in on (users, not
// loopback, no TLS).
func (s *Server) checkAddr(what, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("smtpd: %s %q is not host:port (%v); use for example %s", what, addr, err, DefaultAddr)
	}
	local := host == "localhost"
	if ip := net.ParseIP(host); ip != nil {
		local = ip.IsLoopback()
	}
	if local {
		return nil
	}
	if len(s.cfg.Users) == 0 {
		return fmt.Errorf("smtpd: %s %q is not a loopback address and no users are configured: anyone who can reach it could send mail. Listen on 127.0.0.1, or configure users (with a TLS certificate)", what, addr)
	}
	if s.cfg.TLSConfig == nil {
		return fmt.Errorf("smtpd: %s %q is not a loopback address and there is no TLS certificate: AUTH is only offered over TLS there, so no client could log in. Configure a TLS certificate and key", what, addr)
	}
	return nil
}

// ListenAndServe listens on Config.Addr and serves until Shutdown or Close.
func (s *Server) ListenAndServe() error {
	ln, err := s.Listen()
	if err != nil {
		return err
	}
	return s.Serve(ln)
}

// Listen listens on Config.Addr, so that the caller knows the address (for
// example of "127.0.0.1:0") before it calls Serve.
func (s *Server) Listen() (net.Listener, error) {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("smtpd: listen on %s: %w; free the port or choose another address", s.cfg.Addr, err)
	}
	return ln, nil
}

// Serve accepts connections on ln until Shutdown or Close, then returns
// ErrServerClosed. Serve wraps ln in TLS itself when Config.ImplicitTLS is
// set; pass a plain TCP listener.
func (s *Server) Serve(ln net.Listener) error {
	if err := s.checkAddr("the listener's address", ln.Addr().String()); err != nil {
		ln.Close()
		return err
	}
	var l net.Listener = &limitListener{Listener: ln, s: s}
	if s.cfg.ImplicitTLS {
		l = tls.NewListener(l, s.cfg.TLSConfig)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	// Closed by Shutdown and Close ourselves: go-smtp only knows of a
	// listener once its Serve has registered it, which may be too late.
	s.listeners = append(s.listeners, l)
	if s.addr == nil {
		s.addr = ln.Addr()
	}
	s.mu.Unlock()
	s.log.Info("smtp submission serving", "addr", ln.Addr().String(), "implicit_tls", s.cfg.ImplicitTLS,
		"starttls", s.cfg.TLSConfig != nil && !s.cfg.ImplicitTLS, "users", len(s.cfg.Users))
	err := s.smtp.Serve(l)
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return ErrServerClosed
	}
	if err == nil {
		return ErrServerClosed
	}
	return fmt.Errorf("smtpd: serve: %w", err)
}

// Addr is the address of the first listener Serve was given; nil before.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Shutdown stops accepting connections, closes the idle ones, lets every
// message in progress finish (its reply is written, then its connection is
// closed) and returns when all connections are gone, or with ctx's error;
// call Close then.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	first := !s.closed
	s.closed, s.draining = true, true
	for _, l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		if !c.inTxn.Load() {
			c.Conn.Close()
		}
	}
	s.mu.Unlock()
	var err error
	if first {
		err = s.smtp.Shutdown(ctx)
	}
	if err == nil {
		err = s.waitRefusals(ctx)
	}
	if errors.Is(err, smtp.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		// We closed the listeners ourselves, before go-smtp tried.
		err = nil
	}
	return err
}

// Close closes every listener and connection at once. A message whose
// admission is in progress is abandoned: its client gets no 250 and keeps
// the message.
func (s *Server) Close() error {
	s.mu.Lock()
	first := !s.closed
	s.closed = true
	for _, l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.Conn.Close()
	}
	s.mu.Unlock()
	s.cancel()
	var err error
	if first {
		err = s.smtp.Close()
	} else {
		// After Shutdown, go-smtp refuses a second stop; its connections
		// are ours too, and were closed above.
		s.smtp.Close()
	}
	s.wg.Wait()
	if errors.Is(err, smtp.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (s *Server) waitRefusals(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// modes returns the key modes of tenant.
func (s *Server) modes(tenant string) KeyModes { return s.cfg.Tenants[tenant] }

func (s *Server) observe(e Event) {
	if s.cfg.Observer != nil {
		s.cfg.Observer(e)
	}
}

// isLoopback is the production rule: the client connected from 127/8 or ::1.
func isLoopback(a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	return ok && ta.IP.IsLoopback()
}
