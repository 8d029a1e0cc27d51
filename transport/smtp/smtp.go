// Package smtp delivers messages to an SMTP smarthost (RFC 5321), with the
// final "." of DATA as the irreversible step of the transport contract.
//
// What it promises, beyond the transport package's contract:
//
//   - The whole body is on the wire before commit is called: all that is
//     left after the commit marker is ".\r\n" and the reply, so the in-doubt
//     window is the upstream's reply time. If commit fails, the connection
//     is closed without the final dot, and the upstream discards the
//     unfinished DATA (RFC 5321 §4.1.1.4).
//   - All recipients or none: if any RCPT is refused, Send fails before DATA
//     with that reply (4xx Temporary, 5xx Permanent). A partial delivery
//     could be neither recorded as sent once nor retried without sending
//     twice. Split recipients into separate messages if they must fail
//     independently.
//   - Everything before MAIL (connect, greeting, EHLO, STARTTLS, AUTH) is a
//     fault of the connection or of our configuration, never of the
//     message: it is Temporary, whatever the code, so that fixing the
//     configuration delivers the queue instead of failing it.
//   - Security by default: smtp:// upgrades with STARTTLS whenever the
//     server offers it; with credentials in the URL, STARTTLS is required and
//     a password is never sent in clear, except to a loopback host when
//     Options.AllowInsecureAuth is set. smtps:// speaks TLS from the first
//     byte. Certificates are verified unless the caller's TLSConfig says
//     otherwise.
//
// The client side of SMTP is implemented here on net/textproto rather than
// with go-smtp's Client: go-smtp buffers the body inside a private
// bufio.Writer that only its Close flushes, together with the final dot, and
// it hides the TLS connection after STARTTLS, so it cannot put the body on
// the wire before commit.
//
// A Transport pools connections and is safe for concurrent use.
package smtp

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/sendonce/sendonce/transport"
)

// Options tune a Transport. The zero value is usable.
type Options struct {
	// TLSConfig is the base TLS configuration (RootCAs, client
	// certificates, InsecureSkipVerify for tests). ServerName defaults to
	// the URL's host.
	TLSConfig *tls.Config
	// HelloName is the name sent with EHLO. Default: the machine's host
	// name, or "localhost".
	HelloName string
	// DialTimeout bounds the TCP connect and the TLS handshake. Default 30s.
	DialTimeout time.Duration
	// CommandTimeout bounds the wait for each reply before the final dot,
	// and each write of the body. Default 5 minutes (RFC 5321 §4.5.3.2).
	CommandTimeout time.Duration
	// FinalDotTimeout bounds the wait for the reply to the final dot; when
	// it expires the outcome is Ambiguous. Default 10 minutes (RFC 5321
	// §4.5.3.2.6).
	FinalDotTimeout time.Duration
	// MaxIdleConns is how many idle connections are kept for reuse.
	// Default 16, the dispatcher's default number of concurrent
	// deliveries: with fewer, every delivery beyond them dials, greets and
	// says EHLO again (a third of the end-to-end CPU in a profile with 2).
	// Negative disables pooling.
	MaxIdleConns int
	// MaxMessagesPerConn closes a connection after that many messages.
	// Default 100.
	MaxMessagesPerConn int
	// IdleTimeout discards pooled connections idle for longer (servers
	// drop idle clients after a few minutes). Default 1 minute.
	IdleTimeout time.Duration
	// AllowInsecureAuth permits AUTH without TLS, and only to a loopback
	// host (a local relay or a test sink); New rejects it for any other
	// host.
	AllowInsecureAuth bool
	// NoPipelining sends MAIL, each RCPT and DATA one at a time, waiting
	// for each reply, even to a server that advertises PIPELINING (RFC
	// 2920). By default they go in one write and their replies are read
	// in order: one round trip instead of two plus one per recipient.
	NoPipelining bool
}

// probeAfter is how long a pooled connection may idle before it is checked
// with NOOP; younger ones are used directly, and if the server closed one
// anyway, MAIL fails harmlessly and Send redials once.
const probeAfter = 5 * time.Second

// Transport delivers to one smarthost.
type Transport struct {
	ep   endpoint
	opts Options
	tls  *tls.Config

	mu     sync.Mutex
	idle   []*conn // most recently used last
	closed bool
}

var _ transport.Transport = (*Transport)(nil)

// New returns a transport for rawURL: smtp://[user:pass@]host:port
// (STARTTLS when offered, required with credentials) or
// smtps://[user:pass@]host:port (implicit TLS). It does not connect.
func New(rawURL string, opts Options) (*Transport, error) {
	ep, err := parseURL(rawURL)
	if err != nil {
		return nil, err
	}
	if opts.AllowInsecureAuth && !isLoopback(ep.host) {
		return nil, fmt.Errorf("smtp transport: Options.AllowInsecureAuth is only allowed for a loopback host, not %q: a password sent in clear can be read on the way", ep.host)
	}
	if opts.HelloName == "" {
		opts.HelloName = "localhost"
		if h, err := os.Hostname(); err == nil && h != "" && !strings.ContainsAny(h, " \r\n") {
			opts.HelloName = h
		}
	}
	if strings.ContainsAny(opts.HelloName, " \r\n") {
		return nil, fmt.Errorf("smtp transport: Options.HelloName %q contains a space or line break", opts.HelloName)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&opts.DialTimeout, 30*time.Second)
	def(&opts.CommandTimeout, 5*time.Minute)
	def(&opts.FinalDotTimeout, 10*time.Minute)
	def(&opts.IdleTimeout, time.Minute)
	if opts.MaxIdleConns == 0 {
		opts.MaxIdleConns = 16
	}
	if opts.MaxMessagesPerConn <= 0 {
		opts.MaxMessagesPerConn = 100
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if opts.TLSConfig != nil {
		cfg = opts.TLSConfig.Clone()
	}
	if cfg.ServerName == "" {
		cfg.ServerName = ep.host
	}
	return &Transport{ep: ep, opts: opts, tls: cfg}, nil
}

// Name implements transport.Transport.
func (t *Transport) Name() string { return "smtp" }

// Send implements transport.Transport; see the package documentation.
func (t *Transport) Send(ctx context.Context, msg *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
	if err := checkMessage(msg); err != nil {
		return transport.Receipt{}, err
	}
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return transport.Receipt{}, transport.Wrap(transport.Temporary, "connect", 0, fmt.Errorf("smtp transport: %w", err))
		}
		c, err := t.get(ctx)
		if err != nil {
			return transport.Receipt{}, err
		}
		// Cancelling ctx interrupts whatever I/O is under way.
		stop := context.AfterFunc(ctx, func() { c.raw.SetDeadline(time.Unix(1, 0)) })
		rcpt, err := t.deliver(ctx, c, msg, commit)
		interrupted := !stop()
		if err == nil && !interrupted && c.sent < t.opts.MaxMessagesPerConn {
			t.put(c)
		} else if err == nil && !interrupted {
			c.quit(t.opts.CommandTimeout)
		} else {
			c.nc.Close()
		}
		var stale *staleError
		if errors.As(err, &stale) && attempt == 0 {
			continue // a pooled connection the server had closed
		}
		if stale != nil {
			err = stale.err
		}
		return rcpt, err
	}
}

// staleError marks a failure of the first command on a reused connection
// that is not an answer of the server: the connection died while idle, so
// Send redials once.
type staleError struct{ err error }

func (e *staleError) Error() string { return e.err.Error() }
func (e *staleError) Unwrap() error { return e.err }

func (t *Transport) deliver(ctx context.Context, c *conn, msg *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
	mail := "MAIL FROM:<" + msg.From + ">"
	if _, ok := c.ext["SIZE"]; ok {
		mail += fmt.Sprintf(" SIZE=%d", len(msg.Data))
	}
	if _, ok := c.ext["8BITMIME"]; ok && !isASCII(msg.Data) {
		mail += " BODY=8BITMIME"
	}
	if _, ok := c.ext["SMTPUTF8"]; ok && !allASCII(msg.From, msg.To) {
		mail += " SMTPUTF8"
	}
	reused := c.sent > 0
	// With PIPELINING the envelope and DATA leave in one write, and each
	// reply below is then only read. A failure returns at the first bad
	// reply and the connection is closed unread: if DATA was accepted, the
	// server is left in a message that never ends, which it discards (RFC
	// 5321 §4.1.1.4), so nothing is sent to anyone.
	pipelined := false
	var writeErr error // a failed pipelined write: MAIL's failure, below
	if _, ok := c.ext["PIPELINING"]; ok && !t.opts.NoPipelining {
		pipelined = true
		if err := c.deadline(ctx, t.opts.CommandTimeout); err != nil {
			return transport.Receipt{}, classify("mail", err)
		}
		w := c.text.W
		w.WriteString(mail)
		w.WriteString("\r\n")
		for _, to := range msg.To {
			w.WriteString("RCPT TO:<")
			w.WriteString(to)
			w.WriteString(">\r\n")
		}
		w.WriteString("DATA\r\n")
		writeErr = w.Flush()
	}
	step := func(expect int, format string, args ...any) error {
		if !pipelined {
			_, _, err := c.cmd(ctx, t.opts.CommandTimeout, expect, format, args...)
			return err
		}
		if writeErr != nil {
			return writeErr
		}
		if err := c.deadline(ctx, t.opts.CommandTimeout); err != nil {
			return err
		}
		_, _, err := c.text.ReadResponse(expect)
		return err
	}
	if err := step(250, "%s", mail); err != nil {
		var reply *textproto.Error
		if reused && (!errors.As(err, &reply) || reply.Code == 421) {
			return transport.Receipt{}, &staleError{classify("mail", err)}
		}
		return transport.Receipt{}, classify("mail", err)
	}
	for _, to := range msg.To {
		if err := step(25, "RCPT TO:<%s>", to); err != nil {
			e := classify("rcpt", err).(*transport.Error)
			e.Err = fmt.Errorf("recipient <%s>: %w; no recipient was sent the message, since sendonce delivers to all recipients or none", to, e.Err)
			return transport.Receipt{}, e
		}
	}
	if err := step(354, "DATA"); err != nil {
		return transport.Receipt{}, classify("data", err)
	}

	// The body goes straight to the connection, through a buffer we
	// flush ourselves, so nothing but the final dot waits after commit.
	w := bufio.NewWriterSize(&deadlineWriter{ctx: ctx, c: c, timeout: t.opts.CommandTimeout}, 32<<10)
	if err := writeDotStuffed(w, msg.Data); err != nil {
		return transport.Receipt{}, classify("body", err)
	}
	if err := w.Flush(); err != nil {
		return transport.Receipt{}, classify("body", err)
	}

	if err := commit(ctx); err != nil {
		return transport.Receipt{}, err
	}
	if err := c.deadline(ctx, t.opts.FinalDotTimeout); err != nil {
		return transport.Receipt{}, transport.Wrap(transport.Temporary, "commit", 0,
			fmt.Errorf("smtp transport: context done after commit, final dot not sent: %w", err))
	}

	// From here on, the upstream may have the message.
	if n, err := c.nc.Write([]byte(".\r\n")); err != nil {
		if n < 3 {
			// The terminator never fully left us (a TLS record cut short
			// cannot be decrypted either), so the server cannot have
			// accepted the message: RFC 5321 discards an unfinished DATA.
			return transport.Receipt{}, transport.Wrap(transport.Temporary, "final-dot", 0, fmt.Errorf("smtp transport: final dot not sent: %w", err))
		}
		return transport.Receipt{}, transport.Wrap(transport.Ambiguous, "final-dot", 0, fmt.Errorf("smtp transport: write final dot: %w", err))
	}
	code, text, err := c.text.ReadResponse(2)
	if err != nil {
		var reply *textproto.Error
		if errors.As(err, &reply) && (reply.Code/100 == 4 || reply.Code/100 == 5) {
			return transport.Receipt{}, classify("final-dot", err)
		}
		return transport.Receipt{}, transport.Wrap(transport.Ambiguous, "final-dot", 0, fmt.Errorf("smtp transport: no reply to the final dot: %w", err))
	}
	c.sent++
	return transport.Receipt{Reply: fmt.Sprintf("%d %s", code, text)}, nil
}

func checkMessage(msg *transport.Message) error {
	bad := func(format string, args ...any) error {
		return transport.Errorf(transport.Permanent, "mail", 0, "smtp transport: "+format, args...)
	}
	if len(msg.To) == 0 {
		return bad("message %q has no recipients", msg.Key)
	}
	for _, a := range append([]string{msg.From}, msg.To...) {
		if strings.ContainsAny(a, "<>\r\n") {
			return bad("address %q contains <, > or a line break", a)
		}
	}
	return nil
}

// classify turns an SMTP reply into Temporary (4xx) or Permanent (5xx),
// and anything else before the final dot into Temporary.
func classify(step string, err error) error {
	var reply *textproto.Error
	if errors.As(err, &reply) {
		kind := transport.Temporary
		if reply.Code/100 == 5 {
			kind = transport.Permanent
		}
		return &transport.Error{Kind: kind, Step: step, Code: reply.Code,
			Err: fmt.Errorf("smtp transport: %s refused: %d %s", step, reply.Code, reply.Msg)}
	}
	return transport.Wrap(transport.Temporary, step, 0, fmt.Errorf("smtp transport: %s: %w", step, err))
}

// setupError classifies a failure before MAIL: always Temporary.
func setupError(step string, err error) error {
	e := classify(step, err).(*transport.Error)
	e.Kind = transport.Temporary
	return e
}

// writeDotStuffed writes data with every line that starts with "." given
// one more (RFC 5321 §4.5.2), ending with CRLF, but without the final
// ".\r\n". Other bytes pass unchanged: the upstream gets Data byte for byte.
func writeDotStuffed(w *bufio.Writer, data []byte) error {
	rest := data
	for len(rest) > 0 {
		if rest[0] == '.' {
			w.WriteByte('.')
		}
		i := indexLF(rest)
		if i < 0 {
			w.Write(rest)
			break
		}
		w.Write(rest[:i+1])
		rest = rest[i+1:]
	}
	if len(data) > 0 && !hasCRLFSuffix(data) {
		w.WriteString("\r\n")
	}
	_, err := w.Write(nil) // bufio keeps the first write error
	return err
}

func indexLF(b []byte) int {
	for i, c := range b {
		if c == '\n' {
			return i
		}
	}
	return -1
}

func hasCRLFSuffix(b []byte) bool {
	return len(b) >= 2 && b[len(b)-2] == '\r' && b[len(b)-1] == '\n'
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

func allASCII(from string, to []string) bool {
	for _, s := range append([]string{from}, to...) {
		if !isASCII([]byte(s)) {
			return false
		}
	}
	return true
}

// get returns a pooled connection, or a new one.
func (t *Transport) get(ctx context.Context) (*conn, error) {
	for {
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			return nil, transport.Errorf(transport.Temporary, "connect", 0, "smtp transport: closed")
		}
		var c *conn
		if n := len(t.idle); n > 0 {
			c = t.idle[n-1]
			t.idle = t.idle[:n-1]
		}
		t.mu.Unlock()
		if c == nil {
			return t.dial(ctx)
		}
		idle := time.Since(c.idleSince)
		if idle > t.opts.IdleTimeout {
			c.nc.Close()
			continue
		}
		if idle > probeAfter {
			if _, _, err := c.cmd(ctx, t.opts.CommandTimeout, 250, "NOOP"); err != nil {
				c.nc.Close()
				continue
			}
		}
		return c, nil
	}
}

func (t *Transport) put(c *conn) {
	t.mu.Lock()
	if t.closed || len(t.idle) >= t.opts.MaxIdleConns {
		t.mu.Unlock()
		c.quit(t.opts.CommandTimeout)
		return
	}
	c.idleSince = time.Now()
	t.idle = append(t.idle, c)
	t.mu.Unlock()
}

// Close says QUIT on the idle connections and closes them. Sends in flight
// finish; their connections are closed instead of pooled.
func (t *Transport) Close() error {
	t.mu.Lock()
	idle := t.idle
	t.idle = nil
	t.closed = true
	t.mu.Unlock()
	for _, c := range idle {
		c.quit(t.opts.CommandTimeout)
	}
	return nil
}

// dial connects, greets, upgrades to TLS and authenticates.
func (t *Transport) dial(ctx context.Context) (*conn, error) {
	d := net.Dialer{Timeout: t.opts.DialTimeout}
	nc, err := d.DialContext(ctx, "tcp", t.ep.addr)
	if err != nil {
		return nil, setupError("connect", err)
	}
	c := &conn{raw: nc, nc: nc}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	err = t.setup(ctx, c)
	if !stop() && err == nil {
		err = setupError("connect", ctx.Err())
	}
	if err != nil {
		c.nc.Close()
		return nil, err
	}
	return c, nil
}

func (t *Transport) setup(ctx context.Context, c *conn) error {
	if t.ep.implicitTLS {
		if err := c.startTLS(ctx, t.tls, t.opts.DialTimeout); err != nil {
			return setupError("tls", err)
		}
	} else {
		c.text = textproto.NewConn(c.nc)
	}
	if err := c.deadline(ctx, t.opts.CommandTimeout); err != nil {
		return setupError("greeting", err)
	}
	if _, _, err := c.text.ReadResponse(220); err != nil {
		return setupError("greeting", err)
	}
	if err := c.hello(ctx, t.opts); err != nil {
		return err
	}
	if !c.tls {
		if _, ok := c.ext["STARTTLS"]; ok {
			if _, _, err := c.cmd(ctx, t.opts.CommandTimeout, 220, "STARTTLS"); err != nil {
				return setupError("starttls", err)
			}
			// Bytes the server sent after its 220 would be read as if
			// they came over TLS: a known injection attack.
			if c.text.R.Buffered() > 0 {
				return setupError("starttls", errors.New("server sent data after its STARTTLS reply"))
			}
			if err := c.startTLS(ctx, t.tls, t.opts.DialTimeout); err != nil {
				return setupError("starttls", err)
			}
			if err := c.hello(ctx, t.opts); err != nil {
				return err
			}
		}
	}
	if t.ep.user == "" {
		return nil
	}
	if !c.tls && !t.opts.AllowInsecureAuth {
		return transport.Errorf(transport.Temporary, "starttls", 0,
			"smtp transport: %s does not offer STARTTLS; refusing to send the password of %q in clear (use smtps://, or a server with STARTTLS)", t.ep.addr, t.ep.user)
	}
	return c.auth(ctx, t.opts.CommandTimeout, t.ep.user, t.ep.pass)
}

// conn is one SMTP client connection.
type conn struct {
	raw       net.Conn // the TCP connection; its deadline also bounds TLS
	nc        net.Conn // the TLS connection once TLS is on
	text      *textproto.Conn
	tls       bool
	ext       map[string]string
	sent      int
	idleSince time.Time
}

// deadline bounds the next exchange by d and by ctx. Checking ctx after
// setting the deadline closes the race with the AfterFunc that poisons it.
func (c *conn) deadline(ctx context.Context, d time.Duration) error {
	dl := time.Now().Add(d)
	if cd, ok := ctx.Deadline(); ok && cd.Before(dl) {
		dl = cd
	}
	c.nc.SetDeadline(dl)
	return ctx.Err()
}

func (c *conn) cmd(ctx context.Context, timeout time.Duration, expect int, format string, args ...any) (int, string, error) {
	if err := c.deadline(ctx, timeout); err != nil {
		return 0, "", err
	}
	if err := c.text.PrintfLine(format, args...); err != nil {
		return 0, "", err
	}
	return c.text.ReadResponse(expect)
}

func (c *conn) hello(ctx context.Context, opts Options) error {
	_, text, err := c.cmd(ctx, opts.CommandTimeout, 250, "EHLO %s", opts.HelloName)
	var reply *textproto.Error
	if errors.As(err, &reply) && (reply.Code == 500 || reply.Code == 502) {
		// An old server without extensions.
		c.ext = map[string]string{}
		if _, _, err := c.cmd(ctx, opts.CommandTimeout, 250, "HELO %s", opts.HelloName); err != nil {
			return setupError("helo", err)
		}
		return nil
	}
	if err != nil {
		return setupError("ehlo", err)
	}
	c.ext = map[string]string{}
	lines := strings.Split(text, "\n")
	for _, l := range lines[1:] {
		k, v, _ := strings.Cut(strings.TrimSpace(l), " ")
		c.ext[strings.ToUpper(k)] = v
	}
	return nil
}

func (c *conn) startTLS(ctx context.Context, cfg *tls.Config, timeout time.Duration) error {
	tc := tls.Client(c.nc, cfg)
	if err := c.deadline(ctx, timeout); err != nil {
		return err
	}
	if err := tc.HandshakeContext(ctx); err != nil {
		return err
	}
	c.nc, c.tls = tc, true
	c.text = textproto.NewConn(tc)
	return nil
}

// auth runs AUTH PLAIN, or LOGIN if the server offers only that.
func (c *conn) auth(ctx context.Context, timeout time.Duration, user, pass string) error {
	var client sasl.Client
	mechs := strings.Fields(strings.ToUpper(c.ext["AUTH"]))
	switch {
	case contains(mechs, sasl.Plain):
		client = sasl.NewPlainClient("", user, pass)
	case contains(mechs, sasl.Login):
		client = sasl.NewLoginClient(user, pass)
	default:
		return transport.Errorf(transport.Temporary, "auth", 0, "smtp transport: server offers no AUTH PLAIN or LOGIN (AUTH %q)", c.ext["AUTH"])
	}
	mech, ir, err := client.Start()
	if err != nil {
		return setupError("auth", err)
	}
	line := "AUTH " + mech
	if ir != nil {
		line += " " + encode64(ir)
	}
	code, text, err := c.cmd(ctx, timeout, 0, "%s", line)
	for err == nil && code == 334 {
		var challenge, resp []byte
		challenge, err = base64.StdEncoding.DecodeString(text)
		if err == nil {
			resp, err = client.Next(challenge)
		}
		if err != nil {
			c.cmd(ctx, timeout, 0, "*") // cancel the exchange
			break
		}
		code, text, err = c.cmd(ctx, timeout, 0, "%s", encode64(resp))
	}
	if err == nil && code != 235 {
		err = &textproto.Error{Code: code, Msg: text}
	}
	if err != nil {
		return setupError("auth", err)
	}
	return nil
}

func encode64(b []byte) string {
	if len(b) == 0 {
		return "=" // RFC 4954: an empty initial response
	}
	return base64.StdEncoding.EncodeToString(b)
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// quit says goodbye politely but briefly, then closes.
func (c *conn) quit(timeout time.Duration) {
	if timeout > 5*time.Second {
		timeout = 5 * time.Second
	}
	c.nc.SetDeadline(time.Now().Add(timeout))
	if c.text.PrintfLine("QUIT") == nil {
		c.text.ReadResponse(221)
	}
	c.nc.Close()
}

// deadlineWriter gives every write of the body its own deadline, so a slow
// but moving upload of a large message is not cut short (RFC 5321
// §4.5.3.2.5 bounds each data block, not the whole body).
type deadlineWriter struct {
	ctx     context.Context
	c       *conn
	timeout time.Duration
}

func (w *deadlineWriter) Write(p []byte) (int, error) {
	if err := w.c.deadline(w.ctx, w.timeout); err != nil {
		return 0, err
	}
	return w.c.nc.Write(p)
}
