package amqp

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sendonce/sendonce/source/sourcetest"
)

// syncBuffer collects a process's output while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// celeryPython is a Python that can import celery: Debian's python3
// (apt-get install python3-celery) first, then the one on PATH.
func celeryPython(t *testing.T) string {
	t.Helper()
	for _, py := range []string{"/usr/bin/python3", "python3"} {
		if exec.Command(py, "-c", "import celery, kombu").Run() == nil {
			return py
		}
	}
	msg := "SKIPPED: Celery is not installed (apt-get install python3-celery); the Celery example of docs/examples/celery is not tested"
	if os.Getenv("CI") == "true" {
		msg = "CI=true but " + msg
	}
	t.Skip(msg)
	return ""
}

// TestCeleryExample runs docs/examples/celery: a real Celery worker whose
// task publishes the email job to RabbitMQ with the task id as its key,
// and this source consuming it. One task is queued twice with the same id
// (Celery's redelivery after a worker died before its ack): the ledger
// has one email per task id, the repeat answered as a duplicate.
func TestCeleryExample(t *testing.T) {
	t.Parallel()
	py := celeryPython(t)
	conn := needBroker(t)
	q := newQueues(t, conn, unique("sendonce-test-celery"))
	celeryQueue := unique("sendonce-test-celery-tasks")
	t.Cleanup(func() {
		if ch, err := conn.Channel(); err == nil {
			ch.QueueDelete(celeryQueue, false, false, false)
			ch.ExchangeDelete(celeryQueue, false, false) // Celery declares one per queue
			ch.Close()
		}
	})
	dir, err := filepath.Abs("../../docs/examples/celery")
	if err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(),
		"CELERY_BROKER_URL=amqp://guest:guest@"+brokerAddr()+"//",
		"CELERY_QUEUE="+celeryQueue,
		"SENDONCE_QUEUE="+q.name,
		"SENDONCE_DLX="+q.dlx,
		"PYTHONDONTWRITEBYTECODE=1",
	)

	workerOut := &syncBuffer{}
	worker := exec.Command(py, "-m", "celery", "-A", "tasks", "worker", "--pool=solo", "-Q", celeryQueue,
		"-n", celeryQueue+"@localhost", "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "WARNING")
	worker.Dir, worker.Env = dir, env
	worker.Stdout, worker.Stderr = workerOut, workerOut
	if err := worker.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		worker.Process.Signal(syscall.SIGTERM) // warm shutdown
		done := make(chan struct{})
		go func() { worker.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			worker.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("celery worker output:\n%s", workerOut.String())
		}
	}()

	const n = 5
	send := exec.Command(py, "send.py", fmt.Sprint(n))
	send.Dir, send.Env = dir, env
	out, err := send.CombinedOutput()
	if err != nil {
		t.Fatalf("send.py: %v\n%s", err, out)
	}
	ids := strings.Fields(string(out))
	if len(ids) != n {
		t.Fatalf("send.py printed %q, want %d task ids", out, n)
	}

	l := sourcetest.NewLedger(t)
	// The queue exists once the first task has run; the source needs it.
	sourcetest.Eventually(t, 60*time.Second, "the worker's first job on the queue", func() (bool, string) {
		return q.ready(t, q.name) > 0, workerOut.String()
	})
	src, err := New(context.Background(), Options{URL: brokerURL(brokerAddr()), Queue: q.name, DeadLetterExchange: q.dlx, Logger: testLogger(t, "sendonce")})
	if err != nil {
		t.Fatal(err)
	}
	r := sourcetest.Start(t, src, l)
	sourcetest.Eventually(t, 60*time.Second, "every task's email recorded, the repeat a duplicate", func() (bool, string) {
		recs, dups := l.Count()
		return recs == n && dups == 1, fmt.Sprintf("%d records, %d duplicates; %+v", recs, dups, src.Stats())
	})
	r.Stop()
	byKey := map[string]int64{}
	for _, rec := range l.Records() {
		byKey[rec.Key] = rec.Duplicates
		if rec.Subject == "" || !strings.HasPrefix(rec.Subject, "Welcome, User ") {
			t.Errorf("record %s has subject %q", rec.Key, rec.Subject)
		}
	}
	for i, id := range ids {
		d, ok := byKey[id]
		switch {
		case !ok:
			t.Errorf("no email with the key of task %s", id)
		case i == 0 && d != 1:
			t.Errorf("task %s ran twice and has %d duplicates, want 1", id, d)
		case i > 0 && d != 0:
			t.Errorf("task %s has %d duplicates, want 0", id, d)
		}
	}
}
