package transporttest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sendonce/sendonce/transport"
)

// NewMessage returns a message for key whose body exercises dot-stuffing (a
// line starting with ".", a line that is only "."), addressed to to, or to
// one recipient if to is empty.
func NewMessage(key string, to ...string) *transport.Message {
	return newMessage(key, 0, to...)
}

// newMessage pads the body with at least pad bytes of short lines.
func newMessage(key string, pad int, to ...string) *transport.Message {
	if len(to) == 0 {
		to = []string{"rcpt@example.test"}
	}
	mid := "<" + key + "@transporttest.invalid>"
	var b bytes.Buffer
	fmt.Fprintf(&b, "From: <sender@example.test>\r\n")
	fmt.Fprintf(&b, "To: %s\r\n", strings.Join(to, ", "))
	fmt.Fprintf(&b, "Subject: transporttest %s\r\n", key)
	fmt.Fprintf(&b, "Message-ID: %s\r\n", mid)
	fmt.Fprintf(&b, "X-Idempotency-Key: %s\r\n", key)
	b.WriteString("\r\n")
	b.WriteString("Hello.\r\n.a line that starts with a dot\r\n.\r\n..two dots\r\n")
	line := strings.Repeat("0123456789", 7) + "\r\n"
	for b.Len() < pad {
		b.WriteString(line)
	}
	b.WriteString("Bye.\r\n")
	return &transport.Message{
		Tenant:    "transporttest",
		Key:       key,
		MessageID: mid,
		From:      "sender@example.test",
		To:        to,
		Data:      b.Bytes(),
	}
}

// bigBody is larger than what the kernel buffers between client and sink
// (the client's send buffer grows to a few MiB; the sink keeps its receive
// buffer small), so a drop mid-body reaches the client while it writes.
const bigBody = 16 << 20

// RunTransport checks that a transport classifies every fault of the sink
// as the transport package's contract says. newTransport is called once per
// case with a fresh sink and must return a transport that delivers to it
// (trusting sink.CertPool() if it uses TLS); the suite closes it. The
// transport must honour ctx deadlines at every step, including while it
// waits for the reply to the final dot: the "past the deadline" cases give
// it 300ms.
func RunTransport(t *testing.T, newTransport func(t *testing.T, sink *Sink) transport.Transport) {
	setup := func(t *testing.T, faults ...Fault) (*Sink, transport.Transport) {
		t.Helper()
		sink := NewSink(t)
		if err := sink.SetFaults(faults...); err != nil {
			t.Fatal(err)
		}
		tr := newTransport(t, sink)
		t.Cleanup(func() { tr.Close() })
		return sink, tr
	}

	t.Run("success", func(t *testing.T) {
		sink, tr := setup(t)
		msg := NewMessage("success")
		c := newCommit(sink, nil)
		rcpt, err := tr.Send(testContext(t, 10*time.Second), msg, c.fn)
		if err != nil {
			t.Fatalf("Send: %v", err)
		}
		c.check(t, 1)
		if !strings.HasPrefix(rcpt.Reply, "250") {
			t.Errorf("Receipt.Reply = %q, want the upstream's 250 reply", rcpt.Reply)
		}
		got := sink.Messages()
		if len(got) != 1 {
			t.Fatalf("sink received %d messages, want 1", len(got))
		}
		checkReceived(t, got[0], msg)
		if !got[0].Answered {
			t.Errorf("sink did not answer")
		}
	})

	t.Run("several recipients", func(t *testing.T) {
		sink, tr := setup(t)
		msg := NewMessage("rcpts", "a@example.test", "b@example.test", "c@example.test")
		if _, err := tr.Send(testContext(t, 10*time.Second), msg, newCommit(sink, nil).fn); err != nil {
			t.Fatalf("Send: %v", err)
		}
		got := sink.Messages()
		if len(got) != 1 {
			t.Fatalf("sink received %d messages, want 1", len(got))
		}
		checkReceived(t, got[0], msg)
	})

	t.Run("sequential sends", func(t *testing.T) {
		sink, tr := setup(t)
		for i := range 5 {
			msg := NewMessage(fmt.Sprintf("seq-%d", i))
			if _, err := tr.Send(testContext(t, 10*time.Second), msg, newCommit(sink, nil).fn); err != nil {
				t.Fatalf("Send %d: %v", i, err)
			}
		}
		for id, n := range sink.CountByMessageID() {
			if n != 1 {
				t.Errorf("%s received %d times", id, n)
			}
		}
		if n := len(sink.Messages()); n != 5 {
			t.Errorf("sink received %d messages, want 5", n)
		}
	})

	t.Run("refused connection", func(t *testing.T) {
		sink, tr := setup(t)
		sink.Close() // nothing listens on its port any more
		c := newCommit(sink, nil)
		_, err := tr.Send(testContext(t, 10*time.Second), NewMessage("refused"), c.fn)
		checkKind(t, err, transport.Temporary, 0)
		c.check(t, 0)
	})

	t.Run("commit error", func(t *testing.T) {
		sink, tr := setup(t)
		boom := errors.New("marker not written")
		c := newCommit(sink, boom)
		_, err := tr.Send(testContext(t, 10*time.Second), NewMessage("commit-error"), c.fn)
		if !errors.Is(err, boom) {
			t.Fatalf("Send returned %v, want the commit error", err)
		}
		if transport.KindOf(err) == transport.Ambiguous {
			t.Errorf("commit error classified %v; nothing irreversible happened", transport.KindOf(err))
		}
		c.check(t, 1)
		// The abandoned DATA can only end with the connection; once the
		// sink has seen it close it has read every byte the client sent.
		tr.Close()
		if err := sink.WaitIdle(testContext(t, 5*time.Second)); err != nil {
			t.Fatalf("the connection of an abandoned DATA must be closed: %v", err)
		}
		if n := len(sink.Messages()); n != 0 {
			t.Errorf("sink received %d messages after a failed commit; the final dot was sent", n)
		}
	})

	t.Run("cancelled context", func(t *testing.T) {
		sink, tr := setup(t)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		c := newCommit(sink, nil)
		_, err := tr.Send(ctx, NewMessage("cancelled"), c.fn)
		if err == nil {
			t.Fatal("Send with a cancelled context succeeded")
		}
		if k := transport.KindOf(err); k != transport.Temporary {
			t.Errorf("kind = %v, want temporary (%v)", k, err)
		}
		c.check(t, 0)
	})

	t.Run("one recipient refused", func(t *testing.T) {
		// A partial delivery cannot be recorded as sent once nor retried
		// once, so the whole message must fail before DATA.
		sink, tr := setup(t, Fault{Step: StepRcpt, Action: Reply, Code: 550, Addr: "b@example.test"})
		c := newCommit(sink, nil)
		msg := NewMessage("one-refused", "a@example.test", "b@example.test")
		_, err := tr.Send(testContext(t, 10*time.Second), msg, c.fn)
		checkKind(t, err, transport.Permanent, 550)
		c.check(t, 0)
		if n := len(sink.Messages()); n != 0 {
			t.Errorf("sink received %d messages, want none", n)
		}
	})

	cases := []struct {
		name     string
		fault    Fault
		pad      int           // body size
		deadline time.Duration // of Send's context
		want     transport.Kind
		code     int
		commits  int
		has      bool // the sink read the final dot
	}{
		{name: "greeting 421", fault: Fault{Step: StepConnect, Action: Reply, Code: 421}, want: transport.Temporary},
		{name: "greeting drop", fault: Fault{Step: StepConnect, Action: Drop}, want: transport.Temporary},
		{name: "greeting stall past deadline", fault: Fault{Step: StepConnect, Action: Stall}, deadline: 300 * time.Millisecond, want: transport.Temporary},
		{name: "mail 451", fault: Fault{Step: StepMail, Action: Reply, Code: 451}, want: transport.Temporary, code: 451},
		{name: "mail 550", fault: Fault{Step: StepMail, Action: Reply, Code: 550}, want: transport.Permanent, code: 550},
		{name: "mail drop", fault: Fault{Step: StepMail, Action: Drop}, want: transport.Temporary},
		{name: "mail stall past deadline", fault: Fault{Step: StepMail, Action: Stall}, deadline: 300 * time.Millisecond, want: transport.Temporary},
		{name: "rcpt 452", fault: Fault{Step: StepRcpt, Action: Reply, Code: 452}, want: transport.Temporary, code: 452},
		{name: "rcpt 550", fault: Fault{Step: StepRcpt, Action: Reply, Code: 550}, want: transport.Permanent, code: 550},
		{name: "rcpt drop", fault: Fault{Step: StepRcpt, Action: Drop}, want: transport.Temporary},
		{name: "data 451", fault: Fault{Step: StepData, Action: Reply, Code: 451}, want: transport.Temporary, code: 451},
		{name: "data 554", fault: Fault{Step: StepData, Action: Reply, Code: 554}, want: transport.Permanent, code: 554},
		{name: "data drop", fault: Fault{Step: StepData, Action: Drop}, want: transport.Temporary},
		{name: "data stall past deadline", fault: Fault{Step: StepData, Action: Stall}, deadline: 300 * time.Millisecond, want: transport.Temporary},
		{name: "body drop", fault: Fault{Step: StepBody, Action: Drop}, pad: bigBody, want: transport.Temporary},
		{name: "body stall past deadline", fault: Fault{Step: StepBody, Action: Stall}, pad: bigBody, deadline: 300 * time.Millisecond, want: transport.Temporary},
		{name: "final dot drop", fault: Fault{Step: StepFinalDot, Action: Drop}, want: transport.Ambiguous, commits: 1, has: true},
		{name: "final dot stall past deadline", fault: Fault{Step: StepFinalDot, Action: Stall}, deadline: 300 * time.Millisecond, want: transport.Ambiguous, commits: 1, has: true},
		{name: "final dot slow reply past deadline", fault: Fault{Step: StepFinalDot, Action: Delay, Delay: time.Minute}, deadline: 300 * time.Millisecond, want: transport.Ambiguous, commits: 1, has: true},
		{name: "final dot 451", fault: Fault{Step: StepFinalDot, Action: Reply, Code: 451}, want: transport.Temporary, code: 451, commits: 1, has: true},
		{name: "final dot 554", fault: Fault{Step: StepFinalDot, Action: Reply, Code: 554}, want: transport.Permanent, code: 554, commits: 1, has: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sink, tr := setup(t, tc.fault)
			deadline := tc.deadline
			if deadline == 0 {
				// Long enough for any sane transport; a hang fails the
				// case instead of the whole run.
				deadline = 20 * time.Second
			}
			c := newCommit(sink, nil)
			msg := newMessage(strings.ReplaceAll(tc.name, " ", "-"), tc.pad)
			start := time.Now()
			_, err := tr.Send(testContext(t, deadline), msg, c.fn)
			checkKind(t, err, tc.want, tc.code)
			c.check(t, tc.commits)
			if tc.deadline > 0 && time.Since(start) > tc.deadline+5*time.Second {
				t.Errorf("Send returned %v after its context's deadline", time.Since(start)-tc.deadline)
			}
			got := sink.Messages()
			switch {
			case tc.has && len(got) != 1:
				t.Errorf("sink has %d messages, want the one whose final dot was sent", len(got))
			case tc.has:
				checkReceived(t, got[0], msg)
			case len(got) != 0:
				t.Errorf("sink has %d messages, want none", len(got))
			}
		})
	}
}

func testContext(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// commit counts calls and checks that the final dot has not reached the
// sink when the commit marker is written.
type commit struct {
	sink   *Sink
	err    error
	calls  atomic.Int32
	before int
	early  atomic.Bool
}

func newCommit(sink *Sink, err error) *commit {
	return &commit{sink: sink, err: err, before: len(sink.Messages())}
}

func (c *commit) fn(ctx context.Context) error {
	c.calls.Add(1)
	if len(c.sink.Messages()) > c.before {
		c.early.Store(true)
	}
	return c.err
}

func (c *commit) check(t *testing.T, want int) {
	t.Helper()
	if n := int(c.calls.Load()); n != want {
		t.Errorf("commit called %d times, want %d", n, want)
	}
	if c.early.Load() {
		t.Errorf("the sink had the message before commit was called: the final dot went first")
	}
}

func checkKind(t *testing.T, err error, want transport.Kind, code int) {
	t.Helper()
	if err == nil {
		t.Fatalf("Send succeeded, want a %v error", want)
	}
	if !transport.Classified(err) {
		t.Errorf("error is not classified: %v", err)
	}
	if k := transport.KindOf(err); k != want {
		t.Errorf("kind = %v, want %v (error: %v)", k, want, err)
	}
	if code != 0 {
		var e *transport.Error
		if errors.As(err, &e) && e.Code != code {
			t.Errorf("Code = %d, want %d (error: %v)", e.Code, code, err)
		}
	}
}

func checkReceived(t *testing.T, got Received, msg *transport.Message) {
	t.Helper()
	if !bytes.Equal(got.Data, msg.Data) {
		t.Errorf("sink received a body of %d bytes that differs from the %d bytes sent", len(got.Data), len(msg.Data))
	}
	if got.MessageID != msg.MessageID {
		t.Errorf("Message-ID = %q, want %q", got.MessageID, msg.MessageID)
	}
	if got.From != msg.From {
		t.Errorf("MAIL FROM = %q, want %q", got.From, msg.From)
	}
	if strings.Join(got.To, ",") != strings.Join(msg.To, ",") {
		t.Errorf("RCPT TO = %q, want %q", got.To, msg.To)
	}
}
