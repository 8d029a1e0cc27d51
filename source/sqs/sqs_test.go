package sqs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/source/sourcetest"
)

// reminderJob is the body of the incident's cron task for one user.
func reminderJob(t *testing.T, key, user string) string {
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
	return string(b)
}

func redrive(f *fixture, dlq string) string {
	return fmt.Sprintf(`{"deadLetterTargetArn":%q,"maxReceiveCount":"20"}`, f.queueARN(dlq))
}

// TestSeedIncident replays docs' incident: a cron task for 1,000 users on
// a standard queue; the first worker takes longer than the visibility
// timeout and its visibility extensions are lost, so SQS hands its
// messages to a second worker as well; the first worker is then stopped
// in the middle of its batch. Every user gets one email: the ledger has
// 1,000 records, the redeliveries are counted as duplicates, the queue
// ends empty.
func TestSeedIncident(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	dlq := f.createQueue("reminders-dlq", nil)
	url := f.createQueue("reminders", map[string]string{"VisibilityTimeout": "2", "RedrivePolicy": redrive(f, dlq)})

	const n = 1000
	task := uuid()
	keys := map[string]bool{}
	msgs := make([]*outgoing, n)
	for i := range n {
		user := fmt.Sprintf("user%04d", i)
		key := fmt.Sprintf("tasks.cron_monthly_email_reminder[%s]/%s", task, user)
		keys[key] = true
		msgs[i] = &outgoing{body: reminderJob(t, key, user)}
	}
	f.send(url, msgs)

	// Worker 1: its admissions wait until worker 2 has been handed one
	// of its messages again, and its ChangeMessageVisibilityBatch calls
	// are lost on the way.
	lost := &dropTarget{target: "AmazonSQS.ChangeMessageVisibilityBatch", base: http.DefaultTransport.(*http.Transport).Clone()}
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	slow := admitFunc(func(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
		select {
		case started <- struct{}{}:
		default:
		}
		select {
		case <-release:
		case <-time.After(30 * time.Second):
			return nil, errors.New("test: worker 1 was never released")
		}
		return f.client.SubmitBatch(ctx, subs)
	})
	t1 := newTally()
	src1, err := New(ctx, Options{QueueURL: url, Concurrency: 2, WaitTime: time.Second,
		AWSConfig: awsConfig(f.endpoint, &http.Client{Transport: lost}), Logger: testLogger(t, "worker1"), Observer: t1.observe})
	if err != nil {
		t.Fatal(err)
	}
	w1 := run(t, src1, slow)
	select {
	case <-started:
	case <-time.After(20 * time.Second):
		t.Fatalf("worker 1 received nothing: %v", t1)
	}

	// Worker 2 is healthy, and watches for the redelivery.
	redelivered := make(chan struct{})
	var once sync.Once
	t2 := newTally()
	t2.onEvent = func(e Event) {
		if e.Kind == EventReceived && e.ReceiveCount > 1 {
			once.Do(func() { close(redelivered) })
		}
	}
	src2, err := New(ctx, Options{QueueURL: url, WaitTime: time.Second, AWSConfig: awsConfig(f.endpoint, nil), Logger: testLogger(t, "worker2"), Observer: t2.observe})
	if err != nil {
		t.Fatal(err)
	}
	run(t, src2, f.client)
	select {
	case <-redelivered:
	case <-time.After(20 * time.Second):
		t.Fatalf("no message was redelivered to worker 2: worker 1 %v; worker 2 %v", t1, t2)
	}

	// The kill: worker 1 is stopped mid-batch. Its admission still
	// completes (a duplicate of worker 2's, or the first, whichever
	// commits second is the duplicate) and only then are its messages
	// deleted.
	stopped := make(chan struct{})
	go func() { w1.stop(); close(stopped) }()
	close(release)
	<-stopped

	f.waitEmpty(url, 30*time.Second)
	recs := f.records()
	if len(recs) != n {
		t.Fatalf("the ledger has %d records, want %d", len(recs), n)
	}
	var dups int64
	for _, r := range recs {
		if !keys[r.Key] {
			t.Errorf("unexpected key %q", r.Key)
		}
		if r.Source != "sqs:reminders" {
			t.Errorf("record %q has source %q", r.Key, r.Source)
		}
		dups += r.Duplicates
	}
	dupEvents := t1.count(EventDuplicate) + t2.count(EventDuplicate)
	t.Logf("worker 1: %v; worker 2: %v; extensions lost: %d; duplicates in the ledger: %d", t1, t2, lost.dropped.Load(), dups)
	if dups == 0 || dups != int64(dupEvents) {
		t.Errorf("the ledger counts %d duplicates, the sources answered %d; want the same, and more than 0", dups, dupEvents)
	}
	if lost.dropped.Load() == 0 {
		t.Errorf("worker 1 never tried to extend the visibility")
	}
	if got, want := t1.count(EventAdmitted)+t1.count(EventDuplicate), t1.count(EventReceived); got != want || t1.count(EventAdmitFailed) != 0 {
		t.Errorf("worker 1 received %d messages and admitted %d: a stop mid-batch must finish the batch", want, got)
	}
	for _, tl := range []*tally{t1, t2} {
		for _, k := range []EventKind{EventInvalid, EventConflict, EventDeadLettered} {
			if c := tl.count(k); c != 0 {
				t.Errorf("%d %s events", c, k)
			}
		}
	}
	if v, nv, _, _ := f.depth(dlq); v+nv != 0 {
		t.Errorf("the dead-letter queue has %d messages", v+nv)
	}
}

// TestCrashAfterCommitBeforeDelete: a worker's batch is admitted durably
// and then the worker dies before deleting it. The messages reappear after
// the visibility timeout, are answered as duplicates and deleted. The jobs
// have no key: the fingerprint is the key, with no change to the producer.
func TestCrashAfterCommitBeforeDelete(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	dlq := f.createQueue("emails-dlq", nil)
	url := f.createQueue("emails", map[string]string{"VisibilityTimeout": "2", "RedrivePolicy": redrive(f, dlq)})

	const n = 100
	msgs := make([]*outgoing, n)
	for i := range n {
		msgs[i] = &outgoing{body: fmt.Sprintf(`{"from": "noreply@example.org", "to": ["user%d@example.com"], "subject": "Welcome", "text": "Hello"}`, i)}
	}
	f.send(url, msgs)

	var crashed atomic.Int64 // the size of the batch that was lost after its commit
	crashing := admitFunc(func(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
		res, err := f.client.SubmitBatch(ctx, subs)
		if err == nil && crashed.CompareAndSwap(0, int64(len(subs))) {
			return nil, errors.New("injected: the process died after the commit, before the delete")
		}
		return res, err
	})
	tl := newTally()
	src, err := New(ctx, Options{QueueURL: url, Concurrency: 2, WaitTime: time.Second, AWSConfig: awsConfig(f.endpoint, nil), Logger: testLogger(t, "worker"), Observer: tl.observe})
	if err != nil {
		t.Fatal(err)
	}
	run(t, src, crashing)
	f.waitEmpty(url, 30*time.Second)

	recs := f.records()
	if len(recs) != n {
		t.Fatalf("the ledger has %d records, want %d", len(recs), n)
	}
	var dups int64
	for _, r := range recs {
		if !strings.HasPrefix(r.Key, source.FingerprintPrefix) {
			t.Errorf("key %q is not a fingerprint", r.Key)
		}
		dups += r.Duplicates
	}
	lostBatch := crashed.Load()
	t.Logf("events %v; batch lost after its commit: %d", tl, lostBatch)
	if lostBatch == 0 {
		t.Fatal("no batch was admitted")
	}
	if got := tl.count(EventAdmitFailed); got != int(lostBatch) {
		t.Errorf("%d admit_failed events, want %d", got, lostBatch)
	}
	if dups != lostBatch || tl.count(EventDuplicate) != int(lostBatch) {
		t.Errorf("%d duplicates recorded, %d answered; want %d (the redelivered batch)", dups, tl.count(EventDuplicate), lostBatch)
	}
	if tl.redelivered < int(lostBatch) {
		t.Errorf("%d redeliveries, want at least %d", tl.redelivered, lostBatch)
	}
	if got := tl.count(EventDeleted); got < n {
		t.Errorf("%d messages deleted, want at least %d", got, n)
	}
}

// TestFIFOWithInvalidJobs: a FIFO queue whose producer names each job
// with MessageDeduplicationId (content-based deduplication off), with
// malformed jobs mixed in and a consumer that dies after a commit. Every
// valid job is one record; every invalid one lands on the dead-letter
// queue once, with its reason; none loops, none is lost.
func TestFIFOWithInvalidJobs(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	fifo := map[string]string{"FifoQueue": "true", "ContentBasedDeduplication": "false"}
	dlq := f.createQueue("reminders-dlq.fifo", fifo)
	url := f.createQueue("reminders.fifo", map[string]string{"FifoQueue": "true", "ContentBasedDeduplication": "false", "VisibilityTimeout": "2"})

	const n = 300
	task := uuid()
	keys := map[string]bool{}
	var msgs []*outgoing
	for i := range n {
		user := fmt.Sprintf("user%03d", i)
		key := fmt.Sprintf("tasks.cron_monthly_email_reminder[%s]/%s", task, user)
		keys[key] = true
		// No "key" in the body: MessageDeduplicationId is the key.
		msgs = append(msgs, &outgoing{body: reminderJob(t, "", user), group: user, dedupID: key})
	}
	invalid := map[string]string{ // body → what its sendonce_error must say
		`tasks.cron_monthly_email_reminder[` + task + `]`:                                                             "not valid JSON",
		`{"from": "noreply@example.org", "to": ["ann@example.com"], "subject": "Hi", "colour": "blue"}`:               "job: colour: unknown field",
		`{"from": "noreply@example.org", "to": ["ann at example"], "subject": "Hi"}`:                                  "job: to[0]:",
		`{"version": 2, "from": "noreply@example.org", "to": ["ann@example.com"], "subject": "Hi"}`:                   "job: version: version 2 is not supported",
		`{"tenant": "acme", "from": "noreply@example.org", "to": ["ann@example.com"], "subject": "Hi"}`:               "job: tenant: a job cannot choose its tenant",
		`{"raw": "RnJvbTogYUBleGFtcGxlLm9yZw0KDQpoaQ0K", "rcpt_to": ["ann@example.com"], "subject": "raw and email"}`: "job: subject:",
	}
	var bad []*outgoing
	i := 0
	for body := range invalid {
		m := &outgoing{body: body, group: fmt.Sprintf("bad%d", i), dedupID: fmt.Sprintf("bad-%d", i)}
		bad = append(bad, m)
		msgs = append(msgs, m)
		i++
	}
	rand.Shuffle(len(msgs), func(i, j int) { msgs[i], msgs[j] = msgs[j], msgs[i] })
	f.send(url, msgs)

	// Worker 1 dies after its first commit; worker 2 is healthy.
	var crashed atomic.Int64
	started := make(chan struct{})
	crashing := admitFunc(func(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
		res, err := f.client.SubmitBatch(ctx, subs)
		if err == nil && crashed.CompareAndSwap(0, int64(len(subs))) {
			close(started)
			return nil, errors.New("injected: the process died after the commit, before the delete")
		}
		return res, err
	})
	t1, t2 := newTally(), newTally()
	opts := func(tl *tally, who string) Options {
		return Options{QueueURL: url, DeadLetterQueueURL: dlq, WaitTime: time.Second, AWSConfig: awsConfig(f.endpoint, nil), Logger: testLogger(t, who), Observer: tl.observe}
	}
	src1, err := New(ctx, opts(t1, "worker1"))
	if err != nil {
		t.Fatal(err)
	}
	run(t, src1, crashing)
	select {
	case <-started:
	case <-time.After(20 * time.Second):
		t.Fatalf("worker 1 admitted nothing: %v", t1)
	}
	src2, err := New(ctx, opts(t2, "worker2"))
	if err != nil {
		t.Fatal(err)
	}
	run(t, src2, f.client)
	f.waitEmpty(url, 30*time.Second)
	sourcetest.Eventually(t, 10*time.Second, "every valid job recorded", func() (bool, string) {
		r := f.records()
		return len(r) == n, fmt.Sprintf("%d records", len(r))
	})

	// Later, the producer retries ten jobs past SQS's five-minute
	// deduplication window (a new MessageDeduplicationId, the key in the
	// idempotency_key attribute), and reuses one key for another email.
	var later []*outgoing
	for i := range 10 {
		user := fmt.Sprintf("user%03d", i)
		key := fmt.Sprintf("tasks.cron_monthly_email_reminder[%s]/%s", task, user)
		later = append(later, &outgoing{body: reminderJob(t, "", user), group: user, dedupID: "retry-" + uuid(), attrs: map[string]string{"idempotency_key": key}})
	}
	conflictKey := fmt.Sprintf("tasks.cron_monthly_email_reminder[%s]/user299", task)
	conflict := &outgoing{body: `{"from": "noreply@example.org", "to": ["mallory@example.com"], "subject": "Something else"}`, group: "user299", dedupID: "conflict-1", attrs: map[string]string{"idempotency_key": conflictKey}}
	later = append(later, conflict)
	invalid[conflict.body] = "idempotency key reused with a different payload: the key"
	bad = append(bad, conflict)
	f.send(url, later)
	f.waitEmpty(url, 30*time.Second)

	// The dead-letter queue holds each invalid job once, with its reason.
	got := map[string]string{}
	sourcetest.Eventually(t, 20*time.Second, "every invalid job on the dead-letter queue", func() (bool, string) {
		out, err := f.sqs.ReceiveMessage(ctx, &awssqs.ReceiveMessageInput{QueueUrl: aws.String(dlq), MaxNumberOfMessages: 10, MessageAttributeNames: []string{"All"}})
		if err != nil {
			return false, err.Error()
		}
		for _, m := range out.Messages {
			body := aws.ToString(m.Body)
			if _, dup := got[body]; dup {
				t.Errorf("the dead-letter queue has %s twice", body)
			}
			got[body] = aws.ToString(m.MessageAttributes[AttrError].StringValue)
			if q := aws.ToString(m.MessageAttributes[AttrSourceQueue].StringValue); q != url {
				t.Errorf("%s: %s is %q, want %q", body, AttrSourceQueue, q, url)
			}
			if _, err := f.sqs.DeleteMessage(ctx, &awssqs.DeleteMessageInput{QueueUrl: aws.String(dlq), ReceiptHandle: m.ReceiptHandle}); err != nil {
				return false, err.Error()
			}
		}
		return len(got) >= len(invalid), fmt.Sprintf("%d of %d", len(got), len(invalid))
	})
	for body, want := range invalid {
		if reason, ok := got[body]; !ok {
			t.Errorf("lost: %s", body)
		} else if !strings.Contains(reason, want) {
			t.Errorf("%s\nhas %s %q, want it to say %q", body, AttrError, reason, want)
		}
	}
	for _, m := range bad {
		if c := t1.received[m.id] + t2.received[m.id]; c != 1 {
			t.Errorf("invalid job %s was received %d times, want once", m.body, c)
		}
	}

	recs := f.records()
	if len(recs) != n {
		t.Fatalf("the ledger has %d records, want %d", len(recs), n)
	}
	var dups int64
	for _, r := range recs {
		if !keys[r.Key] {
			t.Errorf("unexpected key %q", r.Key)
		}
		if r.Key == conflictKey && r.To[0] != "user299@example.com" {
			t.Errorf("the conflicting job overwrote the stored email: %v", r.To)
		}
		dups += r.Duplicates
	}
	dupEvents := t1.count(EventDuplicate) + t2.count(EventDuplicate)
	t.Logf("worker 1: %v; worker 2: %v; duplicates in the ledger: %d", t1, t2, dups)
	if want := 10 + crashed.Load(); dups != want || int64(dupEvents) != want {
		t.Errorf("%d duplicates recorded, %d answered; want %d (10 retries and the batch lost after its commit)", dups, dupEvents, want)
	}
	if c := t1.count(EventConflict) + t2.count(EventConflict); c != 1 {
		t.Errorf("%d conflicts, want 1", c)
	}
	if c := t1.count(EventDeadLettered) + t2.count(EventDeadLettered); c != len(invalid) {
		t.Errorf("%d dead-lettered, want %d", c, len(invalid))
	}
	st1, st2 := src1.Stats(), src2.Stats()
	if st1.Received+st2.Received != int64(t1.count(EventReceived)+t2.count(EventReceived)) ||
		st1.Duplicates+st2.Duplicates != int64(dupEvents) || st1.DeadLettered+st2.DeadLettered != int64(len(invalid)) ||
		st1.Admitted+st2.Admitted != n-crashed.Load() {
		t.Errorf("stats %+v and %+v do not match the events: %d admitted (the batch lost after its commit is a duplicate), %d duplicates, %d dead-lettered", st1, st2, n-crashed.Load(), dupEvents, len(invalid))
	}
}

// TestRefusesQueueWithNowhereForInvalidJobs: a queue with no redrive
// policy and no configured dead-letter queue would receive an invalid job
// forever; New says so and names both fixes.
func TestRefusesQueueWithNowhereForInvalidJobs(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	url := f.createQueue("plain", nil)
	dlq := f.createQueue("plain-dlq", nil)
	cfg := awsConfig(f.endpoint, nil)

	_, err := New(ctx, Options{QueueURL: url, AWSConfig: cfg})
	if err == nil {
		t.Fatal("New accepted a queue with no RedrivePolicy and no DeadLetterQueueURL")
	}
	for _, fix := range []string{"DeadLetterQueueURL", "RedrivePolicy", "maxReceiveCount"} {
		if !strings.Contains(err.Error(), fix) {
			t.Errorf("the error does not name %s: %v", fix, err)
		}
	}
	src, err := New(ctx, Options{QueueURL: url, DeadLetterQueueURL: dlq, AWSConfig: cfg})
	if err != nil {
		t.Fatalf("with a dead-letter queue: %v", err)
	}
	if src.Name() != "sqs:plain" {
		t.Errorf("Name() = %q", src.Name())
	}
	withPolicy := f.createQueue("with-policy", map[string]string{"RedrivePolicy": redrive(f, dlq)})
	if _, err := New(ctx, Options{QueueURL: withPolicy, AWSConfig: cfg}); err != nil {
		t.Errorf("with a redrive policy: %v", err)
	}

	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{}, "QueueURL is required"},
		{Options{QueueURL: "reminders"}, "not a queue URL"},
		{Options{QueueURL: url, DeadLetterQueueURL: url}, "the queue itself"},
		{Options{QueueURL: url, DeadLetterQueueURL: f.endpoint + "/000000000000/no-such-queue"}, "DeadLetterQueueURL"},
		{Options{QueueURL: f.endpoint + "/000000000000/no-such-queue", DeadLetterQueueURL: dlq}, "Options.QueueURL"},
		{Options{QueueURL: url, DeadLetterQueueURL: dlq, MaxMessages: 11}, "MaxMessages"},
		{Options{QueueURL: url, DeadLetterQueueURL: dlq, WaitTime: 21 * time.Second}, "WaitTime"},
		{Options{QueueURL: url, DeadLetterQueueURL: dlq, VisibilityTimeout: 1500 * time.Millisecond}, "VisibilityTimeout"},
		{Options{QueueURL: url, DeadLetterQueueURL: dlq, Concurrency: -1}, "Concurrency"},
	} {
		tc.o.AWSConfig = cfg
		if _, err := New(ctx, tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error saying %q", tc.o, err, tc.want)
		}
	}
}

// TestStoreDownDeletesNothing: while the ledger cannot be reached, nothing
// is deleted; the messages come back after the visibility timeout, and are
// admitted once the ledger is back, each once.
func TestStoreDownDeletesNothing(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	dlq := f.createQueue("outage-dlq", nil)
	url := f.createQueue("outage", map[string]string{"VisibilityTimeout": "2", "RedrivePolicy": redrive(f, dlq)})
	const n = 50
	msgs := make([]*outgoing, n)
	for i := range n {
		msgs[i] = &outgoing{body: reminderJob(t, fmt.Sprintf("outage/%d", i), fmt.Sprintf("user%d", i))}
	}
	f.send(url, msgs)

	var down atomic.Bool
	down.Store(true)
	flaky := admitFunc(func(ctx context.Context, subs []sendonce.Submission) ([]sendonce.BatchResult, error) {
		if down.Load() {
			return nil, errors.New("injected: database is locked")
		}
		return f.client.SubmitBatch(ctx, subs)
	})
	tl := newTally()
	src, err := New(ctx, Options{QueueURL: url, Concurrency: 2, WaitTime: time.Second, AWSConfig: awsConfig(f.endpoint, nil), Logger: testLogger(t, "worker"), Observer: tl.observe})
	if err != nil {
		t.Fatal(err)
	}
	run(t, src, flaky)
	sourcetest.Eventually(t, 20*time.Second, "admissions fail", func() (bool, string) {
		return tl.count(EventAdmitFailed) >= 20, tl.String()
	})
	if c := tl.count(EventDeleted); c != 0 {
		t.Fatalf("%d messages deleted while the ledger was down", c)
	}
	if v, nv, _, err := f.depth(url); err != nil || v+nv != n {
		t.Fatalf("the queue holds %d+%d messages during the outage (%v), want %d", v, nv, err, n)
	}
	down.Store(false)
	f.waitEmpty(url, 30*time.Second)
	recs := f.records()
	if len(recs) != n {
		t.Fatalf("the ledger has %d records, want %d", len(recs), n)
	}
	for _, r := range recs {
		if r.Duplicates != 0 {
			t.Errorf("%s: %d duplicates; nothing was committed during the outage", r.Key, r.Duplicates)
		}
	}
	t.Logf("events %v", tl)
}
