package smtpd

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// clientKey is the unit the per-client limits count: an IPv4 address, or an
// IPv6 /64, since one host typically owns a whole /64 and could otherwise
// step around any per-address limit.
func clientKey(a net.Addr) string {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return a.String()
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return ta.IP.String()
	}
	ip = ip.Unmap()
	if ip.Is4() {
		return ip.String()
	}
	p, err := ip.Prefix(64)
	if err != nil {
		return ip.String()
	}
	return p.String()
}

// limitListener refuses connections over the per-client limit, and, with
// no users configured, from anything but loopback, before go-smtp sees them.
type limitListener struct {
	net.Listener
	s *Server
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if tc, reply := l.s.admitConn(c); reply != "" {
			l.s.refuse(c, reply)
		} else {
			return tc, nil
		}
	}
}

// admitConn tracks c, or returns the reply that refuses it.
func (s *Server) admitConn(c net.Conn) (*trackedConn, string) {
	remote := c.RemoteAddr()
	if len(s.cfg.Users) == 0 && !s.cfg.isLocal(remote) {
		s.observe(Event{Kind: EventConnRefused, Remote: remote, Code: 554})
		return nil, "554 5.7.1 this server serves only loopback clients: no users are configured"
	}
	key := clientKey(remote)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, "421 4.3.2 shutting down; try again later"
	}
	if s.perIP[key] >= s.cfg.MaxConnsPerIP {
		s.mu.Unlock()
		s.observe(Event{Kind: EventConnRefused, Remote: remote, Code: 421})
		return nil, fmt.Sprintf("421 4.7.0 too many connections from your address (the limit is %d); close one and try again", s.cfg.MaxConnsPerIP)
	}
	s.perIP[key]++
	tc := &trackedConn{Conn: c, s: s, key: key}
	s.conns[tc] = struct{}{}
	s.mu.Unlock()
	return tc, ""
}

// refuse writes reply to c and closes it, in its own goroutine so that a
// client that does not read cannot stall the accept loop.
func (s *Server) refuse(c net.Conn, reply string) {
	s.mu.Lock()
	if s.closed {
		// Close may be waiting for s.wg already: no new goroutine.
		s.mu.Unlock()
		c.Close()
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		var w net.Conn = c
		if s.cfg.ImplicitTLS {
			// The client expects TLS from the first byte; a plain reply
			// would be noise to it.
			w = tls.Server(c, s.cfg.TLSConfig)
		}
		fmt.Fprintf(w, "%s\r\n", reply)
		if tc, ok := w.(*tls.Conn); ok {
			tc.Close()
		}
	}()
}

// trackedConn counts a connection against its client's limit until closed,
// and carries what Shutdown and the login limiter need to know of it.
type trackedConn struct {
	net.Conn
	s   *Server
	key string
	// inTxn is set from MAIL until the transaction ends: Shutdown closes
	// only connections without one, so it never cuts a DATA in progress.
	inTxn atomic.Bool
	// closeAfterWrite closes the connection once the next reply is
	// written: go-smtp has no way to end a session from a backend error.
	closeAfterWrite atomic.Bool
	once            sync.Once
}

func (c *trackedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if c.closeAfterWrite.Load() {
		c.Conn.Close()
	}
	return n, err
}

// Close frees the client's slot before closing the socket, so a client
// that saw its connection end can connect again at once.
func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.s.mu.Lock()
		delete(c.s.conns, c)
		if c.s.perIP[c.key]--; c.s.perIP[c.key] <= 0 {
			delete(c.s.perIP, c.key)
		}
		c.s.mu.Unlock()
	})
	return c.Conn.Close()
}

// tracked finds the trackedConn under a connection go-smtp holds, which is
// a *tls.Conn after STARTTLS or with implicit TLS.
func tracked(c net.Conn) *trackedConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	t, _ := c.(*trackedConn)
	return t
}

// loginLimiter counts failed logins per client in a sliding window.
type loginLimiter struct {
	max    int
	window time.Duration

	mu       sync.Mutex
	failures map[string][]time.Time // oldest first
}

func newLoginLimiter(max int, window time.Duration) *loginLimiter {
	return &loginLimiter{max: max, window: window, failures: map[string][]time.Time{}}
}

// blocked reports whether key has used up its failures at now, and when
// it may try again.
func (l *loginLimiter) blocked(key string, now time.Time) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.prune(key, now)
	if len(f) < l.max {
		return false, 0
	}
	return true, f[0].Add(l.window).Sub(now)
}

func (l *loginLimiter) fail(key string, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.failures[key] = append(l.prune(key, now), now)
	// Bound the memory an address-hopping attacker can make us use:
	// forget every client whose failures are all too old.
	if len(l.failures) > 4096 {
		for k := range l.failures {
			l.prune(k, now)
		}
	}
}

// prune drops key's failures older than the window; l.mu must be held.
func (l *loginLimiter) prune(key string, now time.Time) []time.Time {
	f := l.failures[key]
	i := 0
	for i < len(f) && !now.Before(f[i].Add(l.window)) {
		i++
	}
	f = f[i:]
	if len(f) == 0 {
		delete(l.failures, key)
		return nil
	}
	l.failures[key] = f
	return f
}
