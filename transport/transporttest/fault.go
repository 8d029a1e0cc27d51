package transporttest

import (
	"fmt"
	"time"
)

// Step is the point of an SMTP session where a Fault strikes.
type Step int

const (
	// StepConnect strikes instead of the 220 greeting.
	StepConnect Step = iota + 1
	// StepMail strikes at the MAIL command.
	StepMail
	// StepRcpt strikes at a RCPT command.
	StepRcpt
	// StepData strikes at the DATA command, instead of its 354 reply.
	StepData
	// StepBody strikes while the body is being received: the sink reads
	// the first BodyPrefix bytes and then drops or stalls. No final dot has
	// been read, so the sink does not have the message.
	StepBody
	// StepFinalDot strikes after the sink has read the whole body and its
	// final dot, before it replies: the sink has the message.
	StepFinalDot
)

func (s Step) String() string {
	switch s {
	case StepConnect:
		return "connect"
	case StepMail:
		return "mail"
	case StepRcpt:
		return "rcpt"
	case StepData:
		return "data"
	case StepBody:
		return "body"
	case StepFinalDot:
		return "final-dot"
	}
	return fmt.Sprintf("Step(%d)", int(s))
}

// Action is what the sink does when a Fault strikes.
type Action int

const (
	// Reply answers with Fault.Code and Fault.Message (e.g. 451 or 550).
	Reply Action = iota + 1
	// Drop closes the TCP connection without replying.
	Drop
	// Delay waits Fault.Delay, then carries on normally.
	Delay
	// Stall never replies; it holds the connection until the client goes
	// away or the sink closes. At StepBody it stops reading, so the client
	// blocks in its body, until the sink closes.
	Stall
)

func (a Action) String() string {
	switch a {
	case Reply:
		return "reply"
	case Drop:
		return "drop"
	case Delay:
		return "delay"
	case Stall:
		return "stall"
	}
	return fmt.Sprintf("Action(%d)", int(a))
}

// BodyPrefix is how many bytes of the body the sink reads before a StepBody
// fault strikes. A client only notices a drop mid-body if its message is
// larger than what the kernel buffers on both sides (the sink keeps its
// receive buffer small for that reason); conformance tests use bodies of
// several megabytes.
const BodyPrefix = 4096

// Fault is one rule of the sink's fault plan.
type Fault struct {
	Step   Step
	Action Action
	// Code and Message are the reply of a Reply action. Message defaults
	// to a text naming the injected fault.
	Code    int
	Message string
	// Delay is the wait of a Delay action.
	Delay time.Duration
	// Times limits how often the fault strikes; 0 means every time.
	Times int
	// Probability, when in (0,1), makes the fault strike at random with
	// the sink's seeded generator (see WithSeed), so runs are repeatable.
	Probability float64
	// Addr, for StepMail and StepRcpt, restricts the fault to that address.
	Addr string
}

func (f Fault) validate(tls, implicitTLS bool) error {
	if f.Step < StepConnect || f.Step > StepFinalDot {
		return fmt.Errorf("transporttest: fault %+v: unknown Step", f)
	}
	if f.Action < Reply || f.Action > Stall {
		return fmt.Errorf("transporttest: fault %+v: unknown Action", f)
	}
	if f.Action == Reply && (f.Code < 200 || f.Code > 599) {
		return fmt.Errorf("transporttest: fault at %s: Reply needs a Code between 200 and 599, got %d", f.Step, f.Code)
	}
	if f.Action == Reply && f.Step == StepBody {
		return fmt.Errorf("transporttest: fault at body: SMTP cannot reply in the middle of a body; use StepFinalDot")
	}
	if f.Action == Delay && f.Delay <= 0 {
		return fmt.Errorf("transporttest: fault at %s: Delay action needs a positive Delay", f.Step)
	}
	if f.Addr != "" && f.Step != StepMail && f.Step != StepRcpt {
		return fmt.Errorf("transporttest: fault at %s: Addr only applies to StepMail and StepRcpt", f.Step)
	}
	// Greeting and DATA faults rewrite the bytes go-smtp writes, below
	// its TLS layer (go-smtp offers no hook there), so they cannot see
	// encrypted replies.
	if f.Step == StepData && tls {
		return fmt.Errorf("transporttest: fault at data: needs a sink without TLS (the sink rewrites the plaintext 354 reply)")
	}
	if f.Step == StepConnect && implicitTLS {
		return fmt.Errorf("transporttest: fault at connect: needs a sink without implicit TLS")
	}
	return nil
}

func (f Fault) message() string {
	if f.Message != "" {
		return f.Message
	}
	return fmt.Sprintf("transporttest: injected %s at %s", f.Action, f.Step)
}
