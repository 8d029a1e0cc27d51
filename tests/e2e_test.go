package tests

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/sendonce/sendonce/transport/transporttest"
)

// TestDuplicateSubmissionsAcrossRestartSendOnce is the seed's story: the
// same email submitted 50 times at once, then 50 more times after the
// service restarted, reaches the SMTP server exactly once.
func TestDuplicateSubmissionsAcrossRestartSendOnce(t *testing.T) {
	sink := transporttest.NewSink(t)
	data := t.TempDir()
	const key = "tasks.cron_monthly_email_reminder[a9e5a73a-4d4a-4995-a91c-90295e27100a]"
	body := emailJSON("ann@example.com", "Your monthly reminder")

	burst := func(s *server) map[int]int {
		var wg sync.WaitGroup
		var mu sync.Mutex
		statuses := map[int]int{}
		for i := 0; i < 50; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				code, err := s.submit(key, body)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				statuses[code]++
				mu.Unlock()
			}()
		}
		wg.Wait()
		return statuses
	}

	s := startServer(t, data, sink.URL())
	if got := burst(s); got[http.StatusAccepted] != 1 || got[http.StatusOK] != 49 {
		t.Fatalf("first burst answered %v, want one 202 and 49 200", got)
	}
	s.stop()

	s = startServer(t, data, sink.URL())
	if got := burst(s); got[http.StatusOK] != 50 {
		t.Fatalf("burst after restart answered %v, want 50 times 200", got)
	}
	var rec record
	eventually(t, 30*time.Second, "email sent", func() (bool, string) {
		r, err := s.get(key)
		rec = r
		return err == nil && r.State == "sent", fmt.Sprintf("%+v %v", r, err)
	})
	if rec.Duplicates != 99 {
		t.Errorf("duplicates = %d, want 99", rec.Duplicates)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := sink.Wait(ctx, 1); err != nil {
		t.Fatal(err)
	}
	s.stop() // nothing is left to send; a second copy would have to come now
	msgs := sink.Messages()
	if len(msgs) != 1 {
		t.Fatalf("the sink received %d messages, want exactly 1", len(msgs))
	}
	if msgs[0].MessageID != rec.MessageID {
		t.Errorf("Message-ID at the sink %q, record says %q", msgs[0].MessageID, rec.MessageID)
	}
}

// TestCrashWhileDelivering kills the process (SIGKILL) while it waits for a
// slow SMTP server's replies, restarts it, and checks the promise: every
// accepted email ends sent or in_doubt, none reaches the sink twice, and
// every email recorded sent is at the sink.
func TestCrashWhileDelivering(t *testing.T) {
	sink := transporttest.NewSink(t, transporttest.WithFaults(transporttest.Fault{
		Step: transporttest.StepFinalDot, Action: transporttest.Delay, Delay: 3 * time.Second,
	}))
	data := t.TempDir()
	env := []string{"SENDONCE_DISPATCH_LEASE=5s", "SENDONCE_DISPATCH_WORKERS=4", "SENDONCE_DISPATCH_POLL_INTERVAL=100ms"}
	s := startServer(t, data, sink.URL(), env...)
	const n = 20
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("crash/%02d", i)
		if code, err := s.submit(keys[i], emailJSON(fmt.Sprintf("user%d@example.com", i), "crash test")); err != nil || code != http.StatusAccepted {
			t.Fatalf("submit %s: %d %v", keys[i], code, err)
		}
	}
	// Kill as soon as the sink holds bodies whose replies are still pending:
	// the dispatcher is in the window between the final dot and the answer.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := sink.Wait(ctx, 1); err != nil {
		t.Fatal(err)
	}
	s.kill()
	beforeRestart := len(sink.Messages())
	if err := sink.SetFaults(); err != nil {
		t.Fatal(err)
	}

	s = startServer(t, data, sink.URL(), env...)
	final := map[string]record{}
	eventually(t, 60*time.Second, "every email settled", func() (bool, string) {
		for _, k := range keys {
			r, err := s.get(k)
			if err != nil {
				return false, err.Error()
			}
			if r.State != "sent" && r.State != "in_doubt" {
				return false, fmt.Sprintf("%s is %s", k, r.State)
			}
			final[k] = r
		}
		return true, ""
	})
	s.stop()

	atSink := sink.CountByMessageID()
	var sent, inDoubt, inDoubtDelivered int
	for _, k := range keys {
		r := final[k]
		if c := atSink[r.MessageID]; c > 1 {
			t.Errorf("%s reached the sink %d times", k, c)
		}
		switch r.State {
		case "sent":
			sent++
			if atSink[r.MessageID] != 1 {
				t.Errorf("%s is recorded sent but the sink has %d copies", k, atSink[r.MessageID])
			}
		case "in_doubt":
			inDoubt++
			if atSink[r.MessageID] == 1 {
				inDoubtDelivered++
			}
		}
	}
	t.Logf("%d emails: %d sent, %d in_doubt (%d of them did reach the sink); %d bodies at the sink when killed", n, sent, inDoubt, inDoubtDelivered, beforeRestart)
	if inDoubt == 0 {
		t.Error("the kill hit no attempt in its commit window; the test did not test the crash")
	}
	if len(sink.Messages()) > n {
		t.Errorf("the sink received %d messages for %d emails", len(sink.Messages()), n)
	}
}
