package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"log"
	"log/slog"
	"net"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	gosmtp "github.com/emersion/go-smtp"

	"github.com/sendonce/sendonce/internal/smtpd"
)

// sink is a local SMTP server that discards what it receives but records
// when each Message-ID arrived. The bench uses it rather than
// transporttest's Sink because that one keeps every message in memory
// (which would distort the peak RSS) and records no receipt time.
type sink struct {
	srv    *gosmtp.Server
	ln     net.Listener
	served chan struct{}
	count  atomic.Int64
	track  bool
	mu     sync.Mutex
	at     receipts
	last   time.Time
}

// receipts maps a Message-ID's hash to a time in nanoseconds since
// benchEpoch. Neither key nor value holds a pointer, so the garbage
// collector does not scan the map: with strings and time.Times, a paced
// run of 720,000 emails made the bench's own heap grow past 800 MiB and
// its collections take CPU from what was measured, more as the run went.
type receipts map[uint64]int64

var (
	benchEpoch = time.Now()
	idSeed     = maphash.MakeSeed()
)

func idHash(id string) uint64 { return maphash.String(idSeed, id) }

func stamp(t time.Time) int64 { return int64(t.Sub(benchEpoch)) }

func startSink(track bool) (*sink, error) {
	s := &sink{served: make(chan struct{}), track: track, at: receipts{}}
	s.srv = gosmtp.NewServer(sinkBackend{s})
	s.srv.Domain = "localhost"
	s.srv.ErrorLog = log.New(io.Discard, "", 0)
	s.srv.ReadTimeout = time.Minute
	s.srv.WriteTimeout = time.Minute
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s.ln = ln
	go func() { defer close(s.served); _ = s.srv.Serve(ln) }()
	return s, nil
}

func (s *sink) addr() string { return s.ln.Addr().String() }

func (s *sink) close() {
	_ = s.srv.Close()
	s.ln.Close()
	<-s.served
}

type sinkBackend struct{ s *sink }

func (b sinkBackend) NewSession(*gosmtp.Conn) (gosmtp.Session, error) {
	return &sinkSession{s: b.s}, nil
}

type sinkSession struct{ s *sink }

func (*sinkSession) Reset()                                 { /* nothing kept */ }
func (*sinkSession) Logout() error                          { return nil }
func (*sinkSession) Mail(string, *gosmtp.MailOptions) error { return nil }
func (*sinkSession) Rcpt(string, *gosmtp.RcptOptions) error { return nil }

func (ss *sinkSession) Data(r io.Reader) error {
	s := ss.s
	if !s.track {
		_, err := io.Copy(io.Discard, r)
		if err == nil {
			s.count.Add(1)
		}
		return err
	}
	br := bufio.NewReader(r)
	id := ""
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return err
		}
		t := strings.TrimRight(line, "\r\n")
		if t == "" {
			break
		}
		if name, v, ok := strings.Cut(t, ":"); ok && strings.EqualFold(name, "Message-ID") {
			id = strings.TrimSpace(v)
		}
	}
	if _, err := io.Copy(io.Discard, br); err != nil {
		return err
	}
	now := time.Now()
	s.mu.Lock()
	if id != "" {
		s.at[idHash(id)] = stamp(now)
	}
	s.last = now
	s.mu.Unlock()
	s.count.Add(1)
	return nil
}

// smtpClient is a bare SMTP client on one reused connection that
// pipelines (RFC 2920) as sendonce's smtp transport does: MAIL, RCPT and
// DATA in one write, then the body and the final dot. Both servers it
// drives (the sink and sendonce's front door) advertise PIPELINING.
type smtpClient struct {
	addr string
	nc   net.Conn
	text *textproto.Conn
}

func (sc *smtpClient) send(from, to string, msg []byte) error {
	if sc.text == nil {
		nc, err := net.Dial("tcp", sc.addr)
		if err != nil {
			return err
		}
		text := textproto.NewConn(nc)
		_, _, err = text.ReadResponse(220)
		if err == nil {
			err = text.PrintfLine("EHLO localhost")
		}
		if err == nil {
			_, _, err = text.ReadResponse(250)
		}
		if err != nil {
			nc.Close()
			return err
		}
		sc.nc, sc.text = nc, text
	}
	err := func() error {
		w := sc.text.W
		fmt.Fprintf(w, "MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n", from, to)
		if err := w.Flush(); err != nil {
			return err
		}
		for _, code := range []int{250, 25, 354} {
			if _, _, err := sc.text.ReadResponse(code); err != nil {
				return err
			}
		}
		dw := sc.text.DotWriter()
		if _, err := dw.Write(msg); err != nil {
			return err
		}
		if err := dw.Close(); err != nil {
			return err
		}
		_, _, err := sc.text.ReadResponse(250)
		return err
	}()
	if err != nil {
		sc.close()
	}
	return err
}

func (sc *smtpClient) close() {
	if sc.text != nil {
		_ = sc.text.PrintfLine("QUIT")
		sc.nc.Close()
		sc.nc, sc.text = nil, nil
	}
}

// message is a submission as an SMTP client writes it.
func (b *bencher) message(key string) []byte {
	var m bytes.Buffer
	fmt.Fprintf(&m, "From: Bench <bench@example.com>\r\nTo: rcpt@example.com\r\nSubject: Your receipt\r\n")
	fmt.Fprintf(&m, "Message-ID: <%s@bench.example.com>\r\n", key)
	fmt.Fprintf(&m, "X-Idempotency-Key: %s\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n", key)
	m.WriteString(strings.ReplaceAll(body(b.opts.Size), "\n", "\r\n"))
	return m.Bytes()
}

// smtpLoop drives addr with one reused connection per caller.
func (b *bencher) smtpLoop(ctx context.Context, name, addr, prefix string) (Row, error) {
	clients := make([]smtpClient, b.opts.Concurrency)
	for i := range clients {
		clients[i].addr = addr
	}
	defer func() {
		for i := range clients {
			clients[i].close()
		}
	}()
	return b.drive(ctx, name, b.opts.Concurrency, func(_ context.Context, w int) (int, error) {
		return 1, clients[w].send("bench@example.com", "rcpt@example.com", b.message(b.key(prefix)))
	})
}

// ceilingSMTP is a bare SMTP client-to-sink loop with the same callers.
func (b *bencher) ceilingSMTP(ctx context.Context) (Row, error) {
	s, err := startSink(false)
	if err != nil {
		return Row{}, err
	}
	defer s.close()
	return b.smtpLoop(ctx, "ceiling-smtp-sink", s.addr(), "bare")
}

// smtp drives sendonce's SMTP submission server (the real front door,
// admitting into a fresh SQLite ledger; no dispatcher) with one reused
// connection per caller.
func (b *bencher) smtp(ctx context.Context) ([]Row, error) {
	st, _, err := b.openSQLite(ctx, "smtp")
	if err != nil {
		return nil, err
	}
	defer st.Close()
	c, err := newClient(st)
	if err != nil {
		return nil, err
	}
	srv, err := smtpd.New(smtpd.Config{
		Addr:          "127.0.0.1:0",
		Client:        c,
		Logger:        slog.New(slog.DiscardHandler),
		MaxConnsPerIP: b.opts.Concurrency + 8,
	})
	if err != nil {
		return nil, err
	}
	ln, err := srv.Listen()
	if err != nil {
		return nil, err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	row, err := b.smtpLoop(ctx, PathSMTP, ln.Addr().String(), "smtp")
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if serr := srv.Shutdown(sctx); serr != nil && err == nil {
		err = serr
	}
	if serr := <-served; serr != nil && !errors.Is(serr, smtpd.ErrServerClosed) && !errors.Is(serr, gosmtp.ErrServerClosed) && err == nil {
		err = serr
	}
	if err != nil {
		return nil, err
	}
	row.Ceiling = "ceiling-smtp-sink"
	row.Note = "one reused connection per caller"
	bare, err := b.ceilingSMTP(ctx)
	if err != nil {
		return nil, err
	}
	return []Row{row, bare}, nil
}
