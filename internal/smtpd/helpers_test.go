package smtpd_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"math/big"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/smtpd"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// clock is a settable clock shared by the client and the server.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Date(2030, 1, 2, 3, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// env is one server with its ledger.
type env struct {
	t      *testing.T
	srv    *smtpd.Server
	addr   string
	client *sendonce.Client
	store  *sqlitestore.Store
	clock  *clock

	mu     sync.Mutex
	events []smtpd.Event
}

// start runs a server on 127.0.0.1:0 against a fresh SQLite ledger. cfg's
// Client, Now and Observer are filled in.
func start(t *testing.T, cfg smtpd.Config) *env {
	t.Helper()
	ctx := context.Background()
	st, err := sqlitestore.Open(ctx, t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, store: st, clock: newClock()}
	e.client, err = sendonce.New(sendonce.Config{Store: st, Now: e.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Client = e.client
	cfg.Now = e.clock.Now
	cfg.Observer = func(ev smtpd.Event) {
		e.mu.Lock()
		e.events = append(e.events, ev)
		e.mu.Unlock()
	}
	if cfg.Domain == "" {
		cfg.Domain = "sendonce.test"
	}
	e.srv, err = smtpd.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	served := make(chan error, 1)
	go func() { served <- e.srv.Serve(ln) }()
	t.Cleanup(func() {
		if err := e.srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-served; !errors.Is(err, smtpd.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		st.Close()
	})
	return e
}

// count returns how many events of kind (and source, if not "") arrived.
func (e *env) count(kind smtpd.EventKind, src smtpd.KeySource) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, ev := range e.events {
		if ev.Kind == kind && (src == "" || ev.Source == src) {
			n++
		}
	}
	return n
}

// records lists a tenant's records.
func (e *env) records(tenant string) []store.Record {
	e.t.Helper()
	p, err := e.client.List(context.Background(), tenant, sendonce.ListOptions{Limit: 100})
	if err != nil {
		e.t.Fatal(err)
	}
	return p.Records
}

func (e *env) get(tenant, key string) store.Record {
	e.t.Helper()
	r, err := e.client.Get(context.Background(), tenant, key)
	if err != nil {
		e.t.Fatalf("Get(%q, %q): %v", tenant, key, err)
	}
	return r
}

// conn speaks raw SMTP, as go-smtp's own tests do.
type conn struct {
	t  *testing.T
	nc net.Conn
	r  *bufio.Reader
}

func (e *env) dial() *conn {
	e.t.Helper()
	nc, err := net.Dial("tcp", e.addr)
	if err != nil {
		e.t.Fatal(err)
	}
	return newConn(e.t, nc)
}

func newConn(t *testing.T, nc net.Conn) *conn {
	t.Helper()
	c := &conn{t: t, nc: nc, r: bufio.NewReader(nc)}
	t.Cleanup(func() { nc.Close() })
	// No test waits forever on a reply that never comes.
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	return c
}

// reply reads one (possibly multi-line) reply.
func (c *conn) reply() (int, string) {
	c.t.Helper()
	var lines []string
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			c.t.Fatalf("reading reply: %v (so far %q)", err, lines)
		}
		line = strings.TrimRight(line, "\r\n")
		if len(line) < 4 {
			c.t.Fatalf("short reply line %q", line)
		}
		lines = append(lines, line[4:])
		if line[3] == ' ' {
			code, err := strconv.Atoi(line[:3])
			if err != nil {
				c.t.Fatalf("bad reply line %q", line)
			}
			return code, strings.Join(lines, "\n")
		}
	}
}

func (c *conn) send(s string) {
	c.t.Helper()
	if _, err := c.nc.Write([]byte(s)); err != nil {
		c.t.Fatal(err)
	}
}

// cmd sends one command line and returns the reply.
func (c *conn) cmd(line string) (int, string) {
	c.t.Helper()
	c.send(line + "\r\n")
	return c.reply()
}

// expect sends line and fails unless the reply has code.
func (c *conn) expect(line string, code int) string {
	c.t.Helper()
	got, msg := c.cmd(line)
	if got != code {
		c.t.Fatalf("%q: got %d %s, want %d", line, got, msg, code)
	}
	return msg
}

// hello reads the greeting and sends EHLO; it returns the EHLO reply.
func (c *conn) hello() string {
	c.t.Helper()
	if code, msg := c.reply(); code != 220 {
		c.t.Fatalf("greeting: %d %s", code, msg)
	}
	return c.expect("EHLO client.test", 250)
}

// login authenticates with AUTH PLAIN.
func (c *conn) login(user, pass string) (int, string) {
	c.t.Helper()
	return c.cmd("AUTH PLAIN " + base64.StdEncoding.EncodeToString([]byte("\x00"+user+"\x00"+pass)))
}

// data sends a message after a 354 and returns the final reply. msg's
// lines must end in CRLF; it is dot-stuffed here.
func (c *conn) data(msg string) (int, string) {
	c.t.Helper()
	if code, text := c.cmd("DATA"); code != 354 {
		c.t.Fatalf("DATA: %d %s", code, text)
	}
	if !strings.HasSuffix(msg, "\r\n") {
		msg += "\r\n"
	}
	msg = strings.ReplaceAll(msg, "\r\n.", "\r\n..")
	if strings.HasPrefix(msg, ".") {
		msg = "." + msg
	}
	c.send(msg + ".\r\n")
	return c.reply()
}

// submit runs one transaction and returns the reply to the final dot.
func (c *conn) submit(from string, to []string, msg string) (int, string) {
	c.t.Helper()
	c.expect("MAIL FROM:<"+from+">", 250)
	for _, r := range to {
		c.expect("RCPT TO:<"+r+">", 250)
	}
	return c.data(msg)
}

// closed reports whether the server closed the connection, reading
// whatever it still had to say.
func (c *conn) closed() bool {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		if _, err := c.r.ReadString('\n'); err != nil {
			var ne net.Error
			return !(errors.As(err, &ne) && ne.Timeout())
		}
	}
}

// msg builds a small message; extra header lines come first.
func msg(subject, body string, extra ...string) string {
	var b strings.Builder
	for _, h := range extra {
		b.WriteString(h + "\r\n")
	}
	b.WriteString("From: App <app@example.com>\r\nTo: Ann <ann@example.net>\r\nSubject: " + subject + "\r\n\r\n" + body + "\r\n")
	return b.String()
}

func hash(t testing.TB, pass string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(pass), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

// selfSigned makes a TLS server config for 127.0.0.1 and a pool trusting it.
func selfSigned(t testing.TB) (*tls.Config, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "sendonce test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}}, MinVersion: tls.VersionTLS12}, pool
}

// starttls upgrades c and returns the TLS connection's conn.
func (c *conn) starttls(pool *x509.CertPool) *conn {
	c.t.Helper()
	c.expect("STARTTLS", 220)
	tc := tls.Client(c.nc, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	if err := tc.Handshake(); err != nil {
		c.t.Fatalf("TLS handshake: %v", err)
	}
	return newConn(c.t, tc)
}
