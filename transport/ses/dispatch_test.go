package ses_test

import (
	"bytes"
	"context"
	"net/http"
	"net/mail"
	"strings"
	"testing"
	"time"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store/sqlitestore"
	"github.com/sendonce/sendonce/transport/ses"
)

// TestDispatchOutcomes runs one email through the dispatcher and this
// transport against the fake SES, and checks that the record ends in the
// state DESIGN.md gives each answer: an explicit refusal that SES does not
// have the message is retried (throttling) or failed (rejection), and no
// answer at all is in_doubt, never resent.
func TestDispatchOutcomes(t *testing.T) {
	cases := []struct {
		name    string
		fault   func(http.ResponseWriter, *http.Request)
		state   sendonce.State
		errHas  string // in LastError
		replyIs string // Reply
	}{
		{name: "accepted", fault: answerOK("0100-ok"), state: sendonce.StateSent, replyIs: "SES MessageId 0100-ok"},
		{name: "throttled", fault: answerError(429, "TooManyRequestsException", "Maximum sending rate exceeded."), state: sendonce.StateQueued, errHas: "TooManyRequestsException"},
		{name: "rejected", fault: answerError(400, "MessageRejected", "Email address is not verified. The following identities failed the check: ann@example.com"), state: sendonce.StateFailed, errHas: "MessageRejected: Email address is not verified"},
		{name: "no answer", fault: neverAnswer, state: sendonce.StateInDoubt, errHas: "may have the message"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := newFakeSES(t, c.fault)
			tr := newTransport(t, f.URL, ses.Options{RequestTimeout: 300 * time.Millisecond})
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
			e := sendonce.Email{From: "noreply@example.org", To: []string{"ann@example.com"}, Subject: "ses: " + c.name, Text: "hello"}
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
			if c.errHas != "" && !strings.Contains(rec.LastError, c.errHas) {
				t.Errorf("last_error %q does not say %q", rec.LastError, c.errHas)
			}
			if c.replyIs != "" && rec.Reply != c.replyIs {
				t.Errorf("reply %q, want %q", rec.Reply, c.replyIs)
			}
			reqs := f.requests()
			if len(reqs) != 1 {
				t.Fatalf("SES got %d requests, want 1", len(reqs))
			}
			m, err := mail.ReadMessage(bytes.NewReader(reqs[0].Content.Raw.Data))
			if err != nil {
				t.Fatalf("SES got a raw message that does not parse: %v", err)
			}
			if id := m.Header.Get("Message-Id"); id != rec.MessageID {
				t.Errorf("the raw message's Message-ID is %q, want the record's %q", id, rec.MessageID)
			}
			t.Logf("%s -> %s: %s", c.name, rec.State, rec.LastError)
		})
	}
}
