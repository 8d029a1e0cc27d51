package tests

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store/sqlitestore"
	smtptransport "github.com/sendonce/sendonce/transport/smtp"
	"github.com/sendonce/sendonce/transport/transporttest"
)

// TestSMTPFaultAtEveryStep breaks a real SMTP conversation at each step and
// checks that the email ends in the state DESIGN.md gives: before the final
// dot nothing can have been delivered, so it is retried (4xx, connection
// loss) or failed (5xx); after the final dot only an explicit answer is
// trusted, and anything else is in_doubt.
func TestSMTPFaultAtEveryStep(t *testing.T) {
	const bigText = 6 << 20 // larger than socket buffers, so a drop mid-body is seen mid-body
	type tc struct {
		name    string
		fault   *transporttest.Fault
		refused bool // nothing listens
		big     bool
		state   sendonce.State
		atSink  int
	}
	F := func(step transporttest.Step, a transporttest.Action, code int) *transporttest.Fault {
		return &transporttest.Fault{Step: step, Action: a, Code: code, Delay: 2 * time.Second}
	}
	cases := []tc{
		{name: "connection refused", refused: true, state: sendonce.StateQueued},
		{name: "dropped at greeting", fault: F(transporttest.StepConnect, transporttest.Drop, 0), state: sendonce.StateQueued},
		{name: "421 at greeting", fault: F(transporttest.StepConnect, transporttest.Reply, 421), state: sendonce.StateQueued},
		{name: "451 at MAIL", fault: F(transporttest.StepMail, transporttest.Reply, 451), state: sendonce.StateQueued},
		{name: "550 at MAIL", fault: F(transporttest.StepMail, transporttest.Reply, 550), state: sendonce.StateFailed},
		{name: "stall at MAIL", fault: F(transporttest.StepMail, transporttest.Stall, 0), state: sendonce.StateQueued},
		{name: "452 at RCPT", fault: F(transporttest.StepRcpt, transporttest.Reply, 452), state: sendonce.StateQueued},
		{name: "550 at RCPT", fault: F(transporttest.StepRcpt, transporttest.Reply, 550), state: sendonce.StateFailed},
		{name: "451 at DATA", fault: F(transporttest.StepData, transporttest.Reply, 451), state: sendonce.StateQueued},
		{name: "554 at DATA", fault: F(transporttest.StepData, transporttest.Reply, 554), state: sendonce.StateFailed},
		{name: "dropped mid-DATA", fault: F(transporttest.StepBody, transporttest.Drop, 0), big: true, state: sendonce.StateQueued},
		{name: "dropped after the final dot", fault: F(transporttest.StepFinalDot, transporttest.Drop, 0), state: sendonce.StateInDoubt, atSink: 1},
		{name: "reply slower than the timeout", fault: F(transporttest.StepFinalDot, transporttest.Delay, 0), state: sendonce.StateInDoubt, atSink: 1},
		{name: "stall after the final dot", fault: F(transporttest.StepFinalDot, transporttest.Stall, 0), state: sendonce.StateInDoubt, atSink: 1},
		{name: "451 after the final dot", fault: F(transporttest.StepFinalDot, transporttest.Reply, 451), state: sendonce.StateQueued, atSink: 1},
		{name: "554 after the final dot", fault: F(transporttest.StepFinalDot, transporttest.Reply, 554), state: sendonce.StateFailed, atSink: 1},
		{name: "no fault", state: sendonce.StateSent, atSink: 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var sink *transporttest.Sink
			url := ""
			if c.refused {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				url = "smtp://" + ln.Addr().String()
				ln.Close() // nothing listens there now
			} else {
				var opts []transporttest.SinkOption
				if c.fault != nil {
					opts = append(opts, transporttest.WithFaults(*c.fault))
				}
				sink = transporttest.NewSink(t, opts...)
				url = sink.URL()
			}
			tr, err := smtptransport.New(url, smtptransport.Options{
				DialTimeout: 2 * time.Second, CommandTimeout: 500 * time.Millisecond, FinalDotTimeout: 500 * time.Millisecond,
			})
			if err != nil {
				t.Fatal(err)
			}
			st, err := sqlitestore.Open(context.Background(), t.TempDir(), sqlitestore.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			type ev struct {
				result string
				err    error
			}
			events := make(chan ev, 10)
			client, err := sendonce.New(sendonce.Config{Store: st, Transport: tr, Dispatch: sendonce.DispatchConfig{
				PollInterval: 10 * time.Millisecond, BackoffBase: time.Hour, ShutdownTimeout: 5 * time.Second,
				Observer: func(_ sendonce.Record, result string, err error) { events <- ev{result, err} },
			}})
			if err != nil {
				t.Fatal(err)
			}
			e := sendonce.Email{From: "noreply@example.org", To: []string{"ann@example.com"}, Subject: "fault: " + c.name, Text: "hello"}
			if c.big {
				e.Text = strings.Repeat("0123456789abcdef\n", bigText/17)
			}
			if _, err := client.Submit(context.Background(), sendonce.Submission{Key: "k", Email: e}); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- client.Run(ctx) }()
			var got ev
			select {
			case got = <-events:
			case <-time.After(30 * time.Second):
				t.Fatal("no attempt finished within 30s")
			}
			cancel()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			tr.Close()
			rec, err := client.Get(context.Background(), "", "k")
			if err != nil {
				t.Fatal(err)
			}
			if rec.State != c.state {
				t.Fatalf("state %s, want %s (attempt %s: %v)", rec.State, c.state, got.result, got.err)
			}
			if rec.Attempts != 1 {
				t.Errorf("attempts %d, want 1", rec.Attempts)
			}
			if c.state != sendonce.StateSent && rec.LastError == "" {
				t.Error("last_error is empty")
			}
			if sink != nil {
				if n := sink.CountByMessageID()[rec.MessageID]; n != c.atSink {
					t.Errorf("the sink has %d copies, want %d", n, c.atSink)
				}
			}
			t.Logf("%s -> %s: %s", c.name, rec.State, rec.LastError)
		})
	}
}
