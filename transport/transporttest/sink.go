// Package transporttest helps test transports: Sink is a real SMTP server
// that injects faults at chosen steps of a session (modelled on mailpit's
// chaos mode), and RunTransport is the conformance suite every SMTP-speaking
// transport runs against it.
//
// The sink records every message whose final dot it read, including the ones
// it then refused to answer, so a test can tell "the upstream has it" from
// "the upstream answered" — the difference the in-doubt state is about.
package transporttest

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/mail"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/sendonce/sendonce/internal/saslogin"
)

// Received is one message whose final dot the sink read.
type Received struct {
	From      string
	To        []string
	MessageID string // the Message-ID header as written, angle brackets included
	Key       string // the X-Idempotency-Key header, if any
	Data      []byte // the body exactly as received, dot-stuffing removed
	// Answered is false if the sink dropped the connection or stalled
	// instead of replying to the final dot. A Delay counts as answered
	// (late); whether the client still listened is its own business.
	Answered bool
	// Code is the reply the sink gave (250, or a fault's code); 0 if it
	// did not answer.
	Code int
	// User is the authenticated user, "" without AUTH.
	User string
	// TLS reports whether the session was encrypted.
	TLS bool
}

// SinkOption configures a Sink.
type SinkOption func(*sinkConfig)

type sinkConfig struct {
	startTLS     bool
	implicitTLS  bool
	user, pass   string
	insecureAuth bool
	faults       []Fault
	seed         uint64
}

// WithStartTLS offers STARTTLS with a self-signed certificate generated at
// start for 127.0.0.1, ::1 and localhost; see Sink.CertPool.
func WithStartTLS() SinkOption { return func(c *sinkConfig) { c.startTLS = true } }

// WithImplicitTLS makes the sink speak TLS from the first byte (smtps).
func WithImplicitTLS() SinkOption { return func(c *sinkConfig) { c.implicitTLS = true } }

// WithAuth requires AUTH PLAIN or LOGIN with these credentials before MAIL.
// AUTH is only offered over TLS unless WithAllowInsecureAuth is given.
func WithAuth(user, pass string) SinkOption {
	return func(c *sinkConfig) { c.user, c.pass = user, pass }
}

// WithAllowInsecureAuth offers AUTH on unencrypted connections.
func WithAllowInsecureAuth() SinkOption { return func(c *sinkConfig) { c.insecureAuth = true } }

// WithFaults sets the initial fault plan; see Sink.SetFaults.
func WithFaults(f ...Fault) SinkOption {
	return func(c *sinkConfig) { c.faults = append([]Fault(nil), f...) }
}

// WithSeed seeds the generator behind Fault.Probability (default 1).
func WithSeed(seed uint64) SinkOption { return func(c *sinkConfig) { c.seed = seed } }

// Sink is a fault-injecting SMTP server. Its methods are safe for concurrent
// use.
type Sink struct {
	cfg    sinkConfig
	srv    *smtp.Server
	ln     net.Listener
	pool   *x509.CertPool
	done   chan struct{} // closed by Close: wakes every delay and stall
	served chan struct{} // closed when srv.Serve returned

	mu       sync.Mutex
	changed  chan struct{} // closed and replaced whenever msgs or open change
	msgs     []Received
	faults   []plannedFault
	rng      *rand.Rand
	accepted int
	open     map[*sinkConn]struct{}
	closed   bool
}

type plannedFault struct {
	Fault
	struck int
}

// errDropped is what a session returns after it closed the connection
// itself; go-smtp's attempt to write a reply then fails silently.
var errDropped = errors.New("transporttest: connection dropped by fault")

// NewSink starts a sink on 127.0.0.1:0 and stops it when the test ends.
func NewSink(t testing.TB, opts ...SinkOption) *Sink {
	t.Helper()
	s, err := StartSink("127.0.0.1:0", opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// StartSink starts a sink listening on addr, for use outside tests; stop it
// with Close.
func StartSink(addr string, opts ...SinkOption) (*Sink, error) {
	cfg := sinkConfig{seed: 1}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.startTLS && cfg.implicitTLS {
		return nil, errors.New("transporttest: WithStartTLS and WithImplicitTLS exclude each other")
	}
	s := &Sink{
		cfg:     cfg,
		done:    make(chan struct{}),
		served:  make(chan struct{}),
		changed: make(chan struct{}),
		rng:     rand.New(rand.NewPCG(cfg.seed, cfg.seed)),
		open:    make(map[*sinkConn]struct{}),
	}
	if err := s.SetFaults(cfg.faults...); err != nil {
		return nil, err
	}

	srv := smtp.NewServer(backend{s})
	srv.Domain = "localhost"
	srv.AllowInsecureAuth = cfg.insecureAuth
	srv.ErrorLog = log.New(io.Discard, "", 0)
	var tlsConfig *tls.Config
	if cfg.startTLS || cfg.implicitTLS {
		cert, pool, err := selfSigned()
		if err != nil {
			return nil, err
		}
		s.pool = pool
		tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	if cfg.startTLS {
		srv.TLSConfig = tlsConfig
	}

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("transporttest: listen %s: %w", addr, err)
	}
	s.ln = ln
	var l net.Listener = &sinkListener{Listener: ln, s: s}
	if cfg.implicitTLS {
		l = tls.NewListener(l, tlsConfig)
	}
	s.srv = srv
	go func() {
		defer close(s.served)
		srv.Serve(l)
	}()
	return s, nil
}

// Addr returns "127.0.0.1:port".
func (s *Sink) Addr() string { return s.ln.Addr().String() }

// URL returns "smtp://127.0.0.1:port", or "smtps://..." with implicit TLS.
func (s *Sink) URL() string {
	if s.cfg.implicitTLS {
		return "smtps://" + s.Addr()
	}
	return "smtp://" + s.Addr()
}

// CertPool trusts the sink's self-signed certificate; nil without TLS.
func (s *Sink) CertPool() *x509.CertPool { return s.pool }

// Close stops the sink: it closes the listener and every connection, wakes
// every delayed or stalled session and waits for them to end.
func (s *Sink) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.done)
	s.mu.Unlock()

	err := s.srv.Close()
	// go-smtp only closes listeners its Serve has registered, which may
	// not have happened yet.
	s.ln.Close()
	<-s.served
	// go-smtp may not yet have registered a connection accepted just
	// before its Close; close ours so no handler waits on a live client.
	s.mu.Lock()
	for c := range s.open {
		c.Conn.Close()
	}
	s.mu.Unlock()
	if werr := s.WaitIdle(context.Background()); err == nil {
		err = werr
	}
	if errors.Is(err, smtp.ErrServerClosed) {
		err = nil
	}
	return err
}

// CloseConnections closes every open connection, as a server does with
// idle clients, so a client's pooled connection is dead when next used.
func (s *Sink) CloseConnections() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.open {
		c.Conn.Close()
	}
}

// SetFaults replaces the fault plan. For each step the first matching fault
// that still has strikes left applies. It is safe to call while clients are
// connected; a session in progress sees the new plan at its next step.
func (s *Sink) SetFaults(f ...Fault) error {
	plan := make([]plannedFault, len(f))
	for i, x := range f {
		if err := x.validate(s.cfg.startTLS || s.cfg.implicitTLS, s.cfg.implicitTLS); err != nil {
			return err
		}
		plan[i] = plannedFault{Fault: x}
	}
	s.mu.Lock()
	s.faults = plan
	s.mu.Unlock()
	return nil
}

// Messages returns every message whose final dot the sink read, in order.
func (s *Sink) Messages() []Received {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Received, len(s.msgs))
	copy(out, s.msgs)
	return out
}

// CountByMessageID counts received messages per Message-ID: any count above
// one is a duplicate delivery.
func (s *Sink) CountByMessageID() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := make(map[string]int, len(s.msgs))
	for _, m := range s.msgs {
		n[m.MessageID]++
	}
	return n
}

// Connections returns how many connections the sink has accepted.
func (s *Sink) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted
}

// Wait returns when the sink has received at least n messages, or with
// ctx's error, or with an error if the sink closes first.
func (s *Sink) Wait(ctx context.Context, n int) error {
	return s.waitFor(ctx, func() bool { return len(s.msgs) >= n },
		func() error { return fmt.Errorf("transporttest: sink has %d messages, want %d", len(s.msgs), n) })
}

// WaitIdle returns when every connection the sink accepted has been closed,
// and so every byte a client sent has been processed: after it, Messages is
// final for the clients that closed their connections.
func (s *Sink) WaitIdle(ctx context.Context) error {
	return s.waitFor(ctx, func() bool { return len(s.open) == 0 },
		func() error { return fmt.Errorf("transporttest: %d connections still open", len(s.open)) })
}

// waitFor waits until cond, evaluated under s.mu, holds. describe, also
// under s.mu, explains a timeout.
func (s *Sink) waitFor(ctx context.Context, cond func() bool, describe func() error) error {
	for {
		s.mu.Lock()
		if cond() {
			s.mu.Unlock()
			return nil
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			s.mu.Lock()
			err := describe()
			s.mu.Unlock()
			return fmt.Errorf("%w: %w", err, ctx.Err())
		}
	}
}

// notifyLocked wakes every waiter; s.mu must be held.
func (s *Sink) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Sink) record(r Received) {
	s.mu.Lock()
	s.msgs = append(s.msgs, r)
	s.notifyLocked()
	s.mu.Unlock()
}

// pick returns the fault that strikes at step for addr, if any, and counts
// the strike.
func (s *Sink) pick(step Step, addr string) (Fault, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range s.faults {
		f := &s.faults[i]
		if f.Step != step || (f.Addr != "" && !strings.EqualFold(f.Addr, addr)) {
			continue
		}
		if f.Times > 0 && f.struck >= f.Times {
			continue
		}
		if f.Probability > 0 && f.Probability < 1 && s.rng.Float64() >= f.Probability {
			continue
		}
		f.struck++
		return f.Fault, true
	}
	return Fault{}, false
}

// wait sleeps for d, the sink playing a slow server, or until Close.
func (s *Sink) wait(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-s.done:
	}
}

// hold keeps nc open without ever answering, until the client goes away or
// the sink closes, then closes it.
func (s *Sink) hold(nc net.Conn) {
	stop := make(chan struct{})
	go func() {
		select {
		case <-s.done:
			nc.Close()
		case <-stop:
		}
	}()
	io.Copy(io.Discard, nc)
	close(stop)
	nc.Close()
}

// sinkListener counts and tracks accepted connections.
type sinkListener struct {
	net.Listener
	s *Sink
}

func (l *sinkListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	// A small receive buffer keeps the kernel from swallowing a whole
	// message on the sink's side, so a StepBody drop reaches a client that
	// is still writing.
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetReadBuffer(64 << 10)
	}
	sc := &sinkConn{Conn: c, s: l.s}
	l.s.mu.Lock()
	l.s.accepted++
	if l.s.closed {
		c.Close()
	} else {
		l.s.open[sc] = struct{}{}
	}
	l.s.notifyLocked()
	l.s.mu.Unlock()
	return sc, nil
}

// sinkConn injects greeting and DATA faults by intercepting the replies
// go-smtp writes, since go-smtp's Session is only consulted after it sent
// the greeting and the 354.
type sinkConn struct {
	net.Conn
	s         *Sink
	greeted   bool // only touched by go-smtp's single handler goroutine
	closeOnce sync.Once
}

func (c *sinkConn) Write(p []byte) (int, error) {
	if !c.greeted {
		c.greeted = true
		if bytes.HasPrefix(p, []byte("220 ")) {
			if f, ok := c.s.pick(StepConnect, ""); ok {
				return c.strike(f, p)
			}
		}
	}
	if bytes.HasPrefix(p, []byte("354 ")) {
		if f, ok := c.s.pick(StepData, ""); ok {
			return c.strike(f, p)
		}
	}
	return c.Conn.Write(p)
}

func (c *sinkConn) strike(f Fault, p []byte) (int, error) {
	switch f.Action {
	case Reply:
		// The session cannot go on from here: close after replying.
		fmt.Fprintf(c.Conn, "%d %s\r\n", f.Code, f.message())
		c.Conn.Close()
		return len(p), nil
	case Drop:
		c.Conn.Close()
		return 0, errDropped
	case Delay:
		c.s.wait(f.Delay)
		return c.Conn.Write(p)
	default: // Stall
		c.s.hold(c.Conn)
		return 0, errDropped
	}
}

func (c *sinkConn) Close() error {
	err := c.Conn.Close()
	c.closeOnce.Do(func() {
		c.s.mu.Lock()
		delete(c.s.open, c)
		c.s.notifyLocked()
		c.s.mu.Unlock()
	})
	return err
}

type backend struct{ s *Sink }

func (b backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	return &session{s: b.s, c: c}, nil
}

type session struct {
	s    *Sink
	c    *smtp.Conn
	user string
	from string
	to   []string
}

func (se *session) AuthMechanisms() []string {
	if se.s.cfg.user == "" {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

func (se *session) Auth(mech string) (sasl.Server, error) {
	check := func(user, pass string) error {
		if user != se.s.cfg.user || pass != se.s.cfg.pass {
			return smtp.ErrAuthFailed
		}
		se.user = user
		return nil
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, user, pass string) error {
			if identity != "" && identity != user {
				return smtp.ErrAuthFailed
			}
			return check(user, pass)
		}), nil
	case sasl.Login:
		return saslogin.NewServer(check), nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

func (se *session) Mail(from string, _ *smtp.MailOptions) error {
	if se.s.cfg.user != "" && se.user == "" {
		return smtp.ErrAuthRequired
	}
	if err := se.strike(StepMail, from); err != nil {
		return err
	}
	se.from = from
	return nil
}

func (se *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if err := se.strike(StepRcpt, to); err != nil {
		return err
	}
	se.to = append(se.to, to)
	return nil
}

func (se *session) Data(r io.Reader) error {
	if f, ok := se.s.pick(StepBody, ""); ok {
		switch f.Action {
		case Delay:
			se.s.wait(f.Delay)
		case Drop:
			io.CopyN(io.Discard, r, BodyPrefix)
			se.c.Conn().Close()
			return errDropped
		case Stall:
			// Stop reading, so the client blocks in the middle of its
			// body; a reader would also swallow the final dot.
			io.CopyN(io.Discard, r, BodyPrefix)
			<-se.s.done
			se.c.Conn().Close()
			return errDropped
		}
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	rec := Received{From: se.from, To: append([]string(nil), se.to...), Data: data, User: se.user}
	_, rec.TLS = se.c.TLSConnectionState()
	if m, err := mail.ReadMessage(bytes.NewReader(data)); err == nil {
		rec.MessageID = strings.TrimSpace(m.Header.Get("Message-Id"))
		rec.Key = strings.TrimSpace(m.Header.Get("X-Idempotency-Key"))
	}

	f, ok := se.s.pick(StepFinalDot, "")
	if !ok {
		rec.Answered, rec.Code = true, 250
		se.s.record(rec)
		return nil
	}
	switch f.Action {
	case Reply:
		rec.Answered, rec.Code = true, f.Code
		se.s.record(rec)
		if f.Code/100 == 2 {
			return nil
		}
		return &smtp.SMTPError{Code: f.Code, Message: f.message()}
	case Drop:
		se.s.record(rec)
		se.c.Conn().Close()
		return errDropped
	case Delay:
		rec.Answered, rec.Code = true, 250
		se.s.record(rec)
		se.s.wait(f.Delay)
		return nil
	default: // Stall
		se.s.record(rec)
		se.s.hold(se.c.Conn())
		return errDropped
	}
}

// strike applies a command-step fault; nil means carry on normally.
func (se *session) strike(step Step, addr string) error {
	f, ok := se.s.pick(step, addr)
	if !ok {
		return nil
	}
	switch f.Action {
	case Reply:
		if f.Code/100 == 2 {
			return nil
		}
		return &smtp.SMTPError{Code: f.Code, Message: f.message()}
	case Drop:
		se.c.Conn().Close()
		return errDropped
	case Delay:
		se.s.wait(f.Delay)
		return nil
	default: // Stall
		se.s.hold(se.c.Conn())
		return errDropped
	}
}

func (se *session) Reset() {
	se.from = ""
	se.to = nil
}

func (se *session) Logout() error { return nil }

// ClosedAddr returns a loopback address where nothing listens, for the
// "upstream is down" case.
func ClosedAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
