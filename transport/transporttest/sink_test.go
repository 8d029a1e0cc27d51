package transporttest

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// sendRaw delivers msg with go-smtp's client, an implementation independent
// of the transports under test.
func sendRaw(t *testing.T, s *Sink, key string) error {
	t.Helper()
	c, err := smtp.Dial(s.Addr())
	if err != nil {
		return err
	}
	defer c.Close()
	c.CommandTimeout, c.SubmissionTimeout = 5*time.Second, 5*time.Second
	m := NewMessage(key)
	return c.SendMail(m.From, m.To, strings.NewReader(string(m.Data)))
}

func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestSinkRecordsAndWaits(t *testing.T) {
	s := NewSink(t)
	done := make(chan error, 1)
	go func() { done <- sendRaw(t, s, "a") }()
	if err := s.Wait(waitCtx(t), 1); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := s.Messages()
	want := NewMessage("a")
	if len(got) != 1 || string(got[0].Data) != string(want.Data) || got[0].MessageID != want.MessageID || got[0].Key != "a" || !got[0].Answered || got[0].Code != 250 {
		t.Fatalf("received %+v", got)
	}
	if s.CountByMessageID()[want.MessageID] != 1 || s.Connections() != 1 {
		t.Errorf("counts: %v, %d connections", s.CountByMessageID(), s.Connections())
	}
}

func TestSinkFinalDotDropKeepsMessage(t *testing.T) {
	s := NewSink(t, WithFaults(Fault{Step: StepFinalDot, Action: Drop}))
	err := sendRaw(t, s, "dropped")
	var se *smtp.SMTPError
	if err == nil || errors.As(err, &se) {
		t.Fatalf("client got %v, want a broken connection", err)
	}
	got := s.Messages()
	if len(got) != 1 || got[0].Answered || got[0].Code != 0 {
		t.Fatalf("received %+v, want one unanswered message", got)
	}
}

func TestSinkFaultTimesAndReplace(t *testing.T) {
	s := NewSink(t, WithFaults(Fault{Step: StepMail, Action: Reply, Code: 451, Times: 1}))
	var se *smtp.SMTPError
	if err := sendRaw(t, s, "first"); !errors.As(err, &se) || se.Code != 451 {
		t.Fatalf("first send: %v, want 451", err)
	}
	if err := sendRaw(t, s, "second"); err != nil {
		t.Fatalf("second send: %v; the fault should strike once", err)
	}
	if err := s.SetFaults(Fault{Step: StepRcpt, Action: Reply, Code: 550}); err != nil {
		t.Fatal(err)
	}
	if err := sendRaw(t, s, "third"); !errors.As(err, &se) || se.Code != 550 {
		t.Fatalf("third send: %v, want 550", err)
	}
}

func TestSinkProbabilityIsSeeded(t *testing.T) {
	pattern := func() string {
		s := NewSink(t, WithSeed(7), WithFaults(Fault{Step: StepMail, Action: Reply, Code: 451, Probability: 0.5}))
		var b strings.Builder
		for range 20 {
			if sendRaw(t, s, "p") != nil {
				b.WriteByte('x')
			} else {
				b.WriteByte('.')
			}
		}
		return b.String()
	}
	a, b := pattern(), pattern()
	if a != b || !strings.Contains(a, "x") || !strings.Contains(a, ".") {
		t.Errorf("patterns %q and %q: want equal, mixing faults and successes", a, b)
	}
}

func TestSinkRejectsImpossibleFaults(t *testing.T) {
	s := NewSink(t, WithStartTLS())
	for _, f := range []Fault{
		{Step: StepBody, Action: Reply, Code: 451},
		{Step: StepMail, Action: Reply},
		{Step: StepData, Action: Drop}, // needs plaintext
		{Step: StepFinalDot, Action: Delay},
		{Step: StepData, Action: Reply, Code: 451, Addr: "x@y"},
	} {
		if err := s.SetFaults(f); err == nil {
			t.Errorf("SetFaults(%+v) accepted", f)
		}
	}
}
