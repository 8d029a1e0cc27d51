// Package sourcetest is the conformance suite of sendonce's broker
// sources: every source runs it against its real broker from a few lines,
// by implementing Harness. It checks the promise of docs/jobs.md with a
// real ledger (a sendonce.Client on a SQLite file in t.TempDir()) and
// counts emails by the ledger's records:
//
//   - the same message delivered twice is one email; the second delivery
//     is answered as a duplicate and acknowledged;
//   - a consumer that dies after the admission and before its ack: the
//     redelivery is a duplicate, acknowledged, not a second email;
//   - a malformed message is dead-lettered once, with its reason, and not
//     retried forever;
//   - nothing is acknowledged while the ledger cannot record it; it is
//     admitted, once, when the ledger is back;
//   - a graceful shutdown finishes the batches in flight: their messages
//     are acknowledged, not redelivered.
//
// A new behaviour of the seam is a new case here first.
package sourcetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// Harness is what a broker's test implements to run the suite. Each case
// calls NewHarness for a fresh queue (stream, subject) of its own.
type Harness interface {
	// Publish puts one message with body on the queue, durably (with a
	// publisher confirm where the broker has them). key, when not empty,
	// goes where the broker carries a message's own key: the AMQP
	// message_id, the Nats-Msg-Id header, a Redis entry's key field.
	Publish(t testing.TB, body []byte, key string)
	// NewSource returns a new consumer of the queue: to the broker,
	// another process. Its shutdown timeout should be long enough (a few
	// seconds) for a batch in flight to finish.
	NewSource(t testing.TB) source.Source
	// Crash ends src's connection to the broker abruptly, as the death of
	// its process would, so that the broker redelivers what src has not
	// acknowledged (at once, or after the broker's ack timeout or claim
	// idle time: the harness should configure these short). The suite
	// calls it from inside a SubmitBatch that has committed, on one of
	// src's goroutines (so it reports problems with t.Errorf, not
	// t.Fatal), and then stops src without letting it acknowledge
	// anything.
	Crash(t testing.TB, src source.Source)
	// DeadLetters returns every message dead-lettered so far, in any
	// order.
	DeadLetters(t testing.TB) []DeadLetter
	// Outstanding is the number of messages of the queue that are not
	// acknowledged (waiting, or delivered and unacknowledged). The suite
	// calls it only once every source of the case has stopped.
	Outstanding(t testing.TB) int
}

// DeadLetter is one dead-lettered message: the original body and the
// reason the source gave.
type DeadLetter struct {
	Body   []byte
	Reason string
}

// Run runs every case, each in a subtest with its own harness.
func Run(t *testing.T, newHarness func(t *testing.T) Harness) {
	cases := []struct {
		name string
		fn   func(*testing.T, Harness)
	}{
		{"DeliveredTwiceIsOneEmail", testDeliveredTwice},
		{"BrokerKeyIsTheKey", testBrokerKey},
		{"CrashAfterAdmissionBeforeAck", testCrashBeforeAck},
		{"MalformedIsDeadLettered", testMalformed},
		{"AckOnlyAfterDurableAdmission", testAckOnlyAfterAdmission},
		{"ShutdownDrainsInFlight", testShutdownDrains},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.fn(t, newHarness(t))
		})
	}
}

// Ledger is a real sendonce.Client on a SQLite file of the test.
type Ledger struct {
	*sendonce.Client
	t testing.TB
}

// NewLedger opens a ledger in t.TempDir(), closed at the end of the test.
func NewLedger(t testing.TB) *Ledger {
	t.Helper()
	st, err := sqlitestore.Open(context.Background(), t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	c, err := sendonce.New(sendonce.Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	return &Ledger{Client: c, t: t}
}

// Records lists every record of the default tenant.
func (l *Ledger) Records() []store.Record {
	l.t.Helper()
	var out []store.Record
	cursor := ""
	for {
		page, err := l.List(context.Background(), "", sendonce.ListOptions{Limit: store.MaxListLimit, Cursor: cursor})
		if err != nil {
			l.t.Fatal(err)
		}
		out = append(out, page.Records...)
		if page.Next == "" {
			return out
		}
		cursor = page.Next
	}
}

// Emails is the number of records, whatever their state: cheap enough to
// poll while thousands are admitted.
func (l *Ledger) Emails() int {
	l.t.Helper()
	counts, err := l.Counts(context.Background(), "")
	if err != nil {
		l.t.Fatal(err)
	}
	var n int64
	for _, c := range counts {
		n += c
	}
	return int(n)
}

// Count is the number of records and the sum of their duplicates.
func (l *Ledger) Count() (records int, duplicates int64) {
	l.t.Helper()
	for _, r := range l.Records() {
		records++
		duplicates += r.Duplicates
	}
	return records, duplicates
}

// AdmitFunc adapts a function to source.Admitter.
type AdmitFunc func(context.Context, []sendonce.Submission) ([]sendonce.BatchResult, error)

// SubmitBatch calls f.
func (f AdmitFunc) SubmitBatch(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
	return f(ctx, subs)
}

// Running is a Source consuming in a goroutine.
type Running struct {
	t      testing.TB
	Source source.Source
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// Start runs src with a; it is stopped at the end of the test at the
// latest.
func Start(t testing.TB, src source.Source, a source.Admitter) *Running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &Running{t: t, Source: src, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- src.Run(ctx, a) }()
	t.Cleanup(r.Stop)
	return r
}

// Cancel cancels Run's context without waiting.
func (r *Running) Cancel() { r.cancel() }

// Stop cancels Run's context and fails the test unless Run returns nil
// within a minute. It may be called from any goroutine, more than once.
func (r *Running) Stop() {
	r.once.Do(func() {
		r.cancel()
		select {
		case err := <-r.done:
			if err != nil {
				r.t.Errorf("%s: Run returned %v, want nil", r.Source.Name(), err)
			}
		case <-time.After(time.Minute):
			r.t.Errorf("%s: Run did not return within a minute of the cancel", r.Source.Name())
		}
	})
}

// Eventually polls cond until it holds, or fails the test at the deadline
// with cond's last description.
func Eventually(t testing.TB, within time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, desc := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %s", what, within, desc)
		}
		<-tick.C
	}
}

// Job is the body of a valid email job; key may be empty.
func Job(t testing.TB, key, user string) []byte {
	t.Helper()
	b, err := json.Marshal(source.Job{Key: key, Email: sendonce.Email{
		From:    "Difio <noreply@example.org>",
		To:      []string{user + "@example.com"},
		Subject: "Your monthly reminder",
		Text:    "Hello " + user + ", three of your packages have updates.",
	}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const wait = 30 * time.Second

func waitRecords(t *testing.T, l *Ledger, n int) {
	t.Helper()
	Eventually(t, wait, fmt.Sprintf("%d records", n), func() (bool, string) {
		r := l.Emails()
		return r >= n, fmt.Sprintf("%d records", r)
	})
}

func checkOutstanding(t *testing.T, h Harness, want int) {
	t.Helper()
	if got := h.Outstanding(t); got != want {
		t.Errorf("the queue holds %d unacknowledged messages, want %d", got, want)
	}
}

func stats(src source.Source) string {
	if s, ok := src.(source.StatsReporter); ok {
		return fmt.Sprintf("%+v", s.Stats())
	}
	return "(no stats)"
}

// testDeliveredTwice: the same job, published twice (a producer's retry,
// a broker's redelivery), is one email; the second is a duplicate and is
// acknowledged.
func testDeliveredTwice(t *testing.T, h Harness) {
	l := NewLedger(t)
	body := Job(t, "reminder/ann/2013-12", "ann")
	h.Publish(t, body, "")
	h.Publish(t, body, "")
	src := h.NewSource(t)
	r := Start(t, src, l)
	Eventually(t, wait, "the second delivery answered as a duplicate", func() (bool, string) {
		n, d := l.Count()
		return n == 1 && d == 1, fmt.Sprintf("%d records, %d duplicates; %s", n, d, stats(src))
	})
	r.Stop()
	recs := l.Records()
	if len(recs) != 1 || recs[0].Key != "reminder/ann/2013-12" || recs[0].Duplicates != 1 {
		t.Fatalf("records %+v, want one with key reminder/ann/2013-12 and 1 duplicate", recs)
	}
	if recs[0].Source != src.Name() {
		t.Errorf("the record's source is %q, want %q", recs[0].Source, src.Name())
	}
	checkOutstanding(t, h, 0)
	if s, ok := src.(source.StatsReporter); ok {
		got := s.Stats()
		if got.Received != 2 || got.Admitted != 1 || got.Duplicates != 1 || got.DeadLettered != 0 {
			t.Errorf("stats %+v, want 2 received, 1 admitted, 1 duplicate", got)
		}
	}
}

// testBrokerKey: a job without "key" takes the broker's own key; a job's
// "key" wins over it; the same broker key twice is one email.
func testBrokerKey(t *testing.T, h Harness) {
	l := NewLedger(t)
	h.Publish(t, Job(t, "", "bob"), "celery-task-7d9a")
	h.Publish(t, Job(t, "", "bob"), "celery-task-7d9a") // the broker may drop it itself
	h.Publish(t, Job(t, "explicit/carol", "carol"), "ignored-broker-key")
	src := h.NewSource(t)
	r := Start(t, src, l)
	waitRecords(t, l, 2)
	// A third message (a sentinel) is admitted after the others, so that
	// a late duplicate would have shown by then.
	h.Publish(t, Job(t, "sentinel", "dave"), "")
	waitRecords(t, l, 3)
	r.Stop()
	keys := map[string]bool{}
	for _, rec := range l.Records() {
		keys[rec.Key] = true
	}
	for _, k := range []string{"celery-task-7d9a", "explicit/carol", "sentinel"} {
		if !keys[k] {
			t.Errorf("no record with key %q; have %v", k, keys)
		}
	}
	if len(keys) != 3 {
		t.Errorf("records with keys %v, want exactly 3", keys)
	}
	checkOutstanding(t, h, 0)
}

var errCrashed = errors.New("sourcetest: the process died after the commit, before the ack")

// testCrashBeforeAck: consumer A admits a batch durably and dies before
// its ack; consumer B gets the redelivery, which the ledger answers as a
// duplicate; B acknowledges it. One email per job.
func testCrashBeforeAck(t *testing.T, h Harness) {
	l := NewLedger(t)
	const n = 20
	for i := range n {
		h.Publish(t, Job(t, fmt.Sprintf("crash/%d", i), fmt.Sprintf("user%d", i)), "")
	}
	a := h.NewSource(t)
	var (
		ra      *Running
		crashed = make(chan int, 1)
		dead    atomic.Bool
	)
	ready := make(chan struct{})
	crashing := AdmitFunc(func(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
		<-ready
		if dead.Load() {
			return nil, errCrashed
		}
		res, err := l.SubmitBatch(ctx, subs)
		if err != nil {
			return res, err
		}
		if dead.CompareAndSwap(false, true) {
			h.Crash(t, a)
			ra.Cancel()
			crashed <- len(subs)
			return nil, errCrashed
		}
		return res, nil
	})
	ra = Start(t, a, crashing)
	close(ready)
	var lost int
	select {
	case lost = <-crashed:
	case <-time.After(wait):
		t.Fatalf("consumer A admitted nothing: %s", stats(a))
	}
	ra.Stop()
	b := h.NewSource(t)
	rb := Start(t, b, l)
	// A may have had more than the lost batch in flight when it died
	// (another batch admitted whose ack failed on the dead connection):
	// B must take over every one of them, not only the lost batch.
	Eventually(t, wait, "every job recorded, the lost batch answered as duplicates, nothing left unacknowledged", func() (bool, string) {
		r, d := l.Count()
		out := h.Outstanding(t)
		return r == n && d >= int64(lost) && out == 0, fmt.Sprintf("%d records, %d duplicates, %d unacknowledged; A %s; B %s", r, d, out, stats(a), stats(b))
	})
	rb.Stop()
	r, d := l.Count()
	t.Logf("batch lost after its commit: %d; %d records, %d duplicates; A %s; B %s", lost, r, d, stats(a), stats(b))
	if r != n {
		t.Errorf("%d records, want %d", r, n)
	}
	// Other batches that committed may have lost their acks too (A's
	// around the crash; any consumer's whose ack came after a broker's
	// ack timeout): each redelivery is one more duplicate, never one more
	// email.
	if d < int64(lost) {
		t.Errorf("%d duplicates, want at least %d: the batch lost after its commit, redelivered", d, lost)
	}
	sa, okA := a.(source.StatsReporter)
	sb, okB := b.(source.StatsReporter)
	if okA && okB {
		if got := sa.Stats().Duplicates + sb.Stats().Duplicates; got != d {
			t.Errorf("the sources counted %d duplicates, the ledger %d", got, d)
		}
	}
	checkOutstanding(t, h, 0)
}

// testMalformed: every message that can never be admitted is
// dead-lettered once, with a reason naming the field; the valid ones
// around it are admitted; nothing loops.
func testMalformed(t *testing.T, h Harness) {
	l := NewLedger(t)
	invalid := map[string]string{ // body → what the reason must say
		`tasks.cron_monthly_email_reminder[a9e5a73a]`:                                                                 "not valid JSON",
		`{"from": "noreply@example.org", "to": ["ann@example.com"], "subject": "Hi", "colour": "blue"}`:               "job: colour: unknown field",
		`{"from": "noreply@example.org", "to": ["ann at example"], "subject": "Hi"}`:                                  "job: to[0]:",
		`{"version": 2, "from": "noreply@example.org", "to": ["ann@example.com"], "subject": "Hi"}`:                   "job: version: version 2 is not supported",
		`{"tenant": "acme", "from": "noreply@example.org", "to": ["ann@example.com"], "subject": "Hi"}`:               "job: tenant: a job cannot choose its tenant",
		`{"raw": "RnJvbTogYUBleGFtcGxlLm9yZw0KDQpoaQ0K", "rcpt_to": ["ann@example.com"], "subject": "raw and email"}`: "job: subject:",
		`{"key": "conflict/1", "from": "noreply@example.org", "to": ["mallory@example.com"], "subject": "Other"}`:     "idempotency key reused with a different payload",
	}
	h.Publish(t, Job(t, "conflict/1", "ann"), "")
	src := h.NewSource(t)
	r := Start(t, src, l)
	waitRecords(t, l, 1) // the conflict needs the first one recorded
	const valid = 10
	i := 0
	for body := range invalid {
		h.Publish(t, []byte(body), "")
		h.Publish(t, Job(t, fmt.Sprintf("valid/%d", i), fmt.Sprintf("user%d", i)), "")
		i++
	}
	for ; i < valid; i++ {
		h.Publish(t, Job(t, fmt.Sprintf("valid/%d", i), fmt.Sprintf("user%d", i)), "")
	}
	var got []DeadLetter
	Eventually(t, wait, "every malformed message dead-lettered", func() (bool, string) {
		got = h.DeadLetters(t)
		return len(got) >= len(invalid), fmt.Sprintf("%d of %d; %s", len(got), len(invalid), stats(src))
	})
	waitRecords(t, l, 1+valid)
	// A sentinel after everything: had a malformed message been
	// requeued, it would have been dead-lettered again by now.
	h.Publish(t, Job(t, "sentinel", "zed"), "")
	waitRecords(t, l, 2+valid)
	r.Stop()
	got = h.DeadLetters(t)
	seen := map[string]int{}
	for _, dl := range got {
		seen[string(dl.Body)]++
		want, ok := invalid[string(dl.Body)]
		switch {
		case !ok:
			t.Errorf("dead-lettered a message that is not malformed: %s (reason %q)", dl.Body, dl.Reason)
		case !strings.Contains(dl.Reason, want):
			t.Errorf("%s\nwas dead-lettered with reason %q, want it to say %q", dl.Body, dl.Reason, want)
		}
	}
	for body := range invalid {
		if seen[body] != 1 {
			t.Errorf("%s was dead-lettered %d times, want once", body, seen[body])
		}
	}
	recs := l.Records()
	if len(recs) != 2+valid {
		t.Errorf("%d records, want %d", len(recs), 2+valid)
	}
	for _, rec := range recs {
		if rec.Key == "conflict/1" && rec.To[0] != "ann@example.com" {
			t.Errorf("the conflicting job overwrote the stored email: %v", rec.To)
		}
	}
	checkOutstanding(t, h, 0)
	if s, ok := src.(source.StatsReporter); ok && s.Stats().DeadLettered != int64(len(invalid)) {
		t.Errorf("stats %+v, want %d dead-lettered", s.Stats(), len(invalid))
	}
}

// testAckOnlyAfterAdmission: while the ledger fails, nothing is
// acknowledged and nothing is dead-lettered; once it is back, every job is
// admitted once.
func testAckOnlyAfterAdmission(t *testing.T, h Harness) {
	l := NewLedger(t)
	const n = 10
	for i := range n {
		h.Publish(t, Job(t, fmt.Sprintf("outage/%d", i), fmt.Sprintf("user%d", i)), "")
	}
	var calls atomic.Int64
	down := AdmitFunc(func(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
		calls.Add(1)
		return nil, errors.New("sourcetest: database is locked")
	})
	src := h.NewSource(t)
	r := Start(t, src, down)
	Eventually(t, wait, "admissions tried and failed", func() (bool, string) {
		return calls.Load() >= 3, fmt.Sprintf("%d calls; %s", calls.Load(), stats(src))
	})
	r.Stop()
	if dl := h.DeadLetters(t); len(dl) != 0 {
		t.Errorf("%d messages dead-lettered during a ledger outage: %q", len(dl), dl[0].Reason)
	}
	checkOutstanding(t, h, n)
	if s, ok := src.(source.StatsReporter); ok {
		if got := s.Stats(); got.Errors == 0 || got.Admitted != 0 {
			t.Errorf("stats %+v, want errors and nothing admitted", got)
		}
	}

	src = h.NewSource(t)
	r = Start(t, src, l)
	waitRecords(t, l, n)
	r.Stop()
	if rec, d := l.Count(); rec != n || d != 0 {
		t.Errorf("%d records, %d duplicates; want %d and 0: nothing was committed during the outage", rec, d, n)
	}
	checkOutstanding(t, h, 0)
}

// testShutdownDrains: a source stopped while a batch is being admitted
// finishes that batch and acknowledges it before Run returns; its
// messages are not redelivered.
func testShutdownDrains(t *testing.T, h Harness) {
	l := NewLedger(t)
	const n = 30
	for i := range n {
		h.Publish(t, Job(t, fmt.Sprintf("drain/%d", i), fmt.Sprintf("user%d", i)), "")
	}
	inFlight := make(chan struct{})
	release := make(chan struct{})
	var first atomic.Bool
	gate := AdmitFunc(func(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
		if first.CompareAndSwap(false, true) {
			close(inFlight)
			<-release
		}
		return l.SubmitBatch(ctx, subs)
	})
	src := h.NewSource(t)
	r := Start(t, src, gate)
	select {
	case <-inFlight:
	case <-time.After(wait):
		t.Fatalf("nothing was admitted: %s", stats(src))
	}
	r.Cancel()
	close(release)
	r.Stop()
	admitted, _ := l.Count()
	if admitted == 0 {
		t.Fatal("the batch in flight at shutdown was not admitted")
	}
	checkOutstanding(t, h, n-admitted)

	src = h.NewSource(t)
	r = Start(t, src, l)
	waitRecords(t, l, n)
	r.Stop()
	if rec, d := l.Count(); rec != n || d != 0 {
		t.Errorf("%d records, %d duplicates; want %d and 0: the batch in flight at shutdown must be acknowledged, not redelivered", rec, d, n)
	}
	checkOutstanding(t, h, 0)
}
