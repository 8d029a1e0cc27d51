package ses_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"

	"github.com/sendonce/sendonce/internal/awslocal"
	"github.com/sendonce/sendonce/transport"
	"github.com/sendonce/sendonce/transport/ses"
)

// localStore is what aws-ses-v2-local answers on GET /store.
type localStore struct {
	Emails []struct {
		MessageID   string `json:"messageId"`
		From        string `json:"from"`
		Subject     string `json:"subject"`
		Destination struct {
			To []string `json:"to"`
		} `json:"destination"`
		Body struct {
			Text string `json:"text"`
		} `json:"body"`
	} `json:"emails"`
}

// TestLocalSES sends three messages through the real SDK to
// aws-ses-v2-local, a server that speaks SES v2, and checks that each
// arrived once, as SES would have parsed it.
//
// aws-ses-v2-local keeps only what it parses out of a raw message (From,
// To, Subject, body), not its other headers, so it cannot show that our
// Message-ID was kept: TestSend checks that the raw bytes reach SES
// unchanged, and TestDispatchOutcomes that they carry the record's
// Message-ID.
func TestLocalSES(t *testing.T) {
	t.Parallel()
	endpoint := awslocal.StartSES(t)
	tr, err := ses.New(context.Background(), ses.Options{
		Endpoint: endpoint,
		AWSConfig: &aws.Config{
			Region:      "us-east-1",
			Credentials: credentials.NewStaticCredentialsProvider("test", "test", ""),
		},
		ConfigurationSet: "transactional",
		Tags:             map[string]string{"app": "sendonce-test"},
		RatePerSecond:    100,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()

	replies := map[string]string{} // subject -> reply
	for i := range 3 {
		subject := fmt.Sprintf("local test %d", i)
		data := fmt.Sprintf("From: noreply@example.org\r\nTo: user%d@example.com\r\nSubject: %s\r\nMessage-ID: <k%d.t@sendonce.test>\r\n\r\nbody %d\r\n", i, subject, i, i)
		msg := &transport.Message{Tenant: "t", Key: fmt.Sprintf("k%d", i), MessageID: fmt.Sprintf("<k%d.t@sendonce.test>", i),
			From: "noreply@example.org", To: []string{fmt.Sprintf("user%d@example.com", i)}, Data: []byte(data)}
		commits := 0
		rcpt, err := tr.Send(context.Background(), msg, func(context.Context) error { commits++; return nil })
		if err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		if commits != 1 {
			t.Errorf("send %d: %d commits, want 1", i, commits)
		}
		if !strings.HasPrefix(rcpt.Reply, "SES MessageId ses-") {
			t.Errorf("send %d: reply %q, want SES MessageId ses-...", i, rcpt.Reply)
		}
		replies[subject] = rcpt.Reply
	}

	var st localStore
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(endpoint + "/store")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatalf("GET /store: %v", err)
	}
	if len(st.Emails) != 3 {
		t.Fatalf("the server has %d emails, want 3: %+v", len(st.Emails), st.Emails)
	}
	seen := map[string]int{}
	for _, e := range st.Emails {
		seen[e.Subject]++
		i := strings.TrimPrefix(e.Subject, "local test ")
		if want := "SES MessageId " + e.MessageID; replies[e.Subject] != want {
			t.Errorf("%q: stored as %s, but Send replied %q", e.Subject, e.MessageID, replies[e.Subject])
		}
		if e.From != "noreply@example.org" || len(e.Destination.To) != 1 || e.Destination.To[0] != "user"+i+"@example.com" {
			t.Errorf("%q: from %q to %v, want noreply@example.org to user%s@example.com", e.Subject, e.From, e.Destination.To, i)
		}
		if strings.TrimSpace(e.Body.Text) != "body "+i {
			t.Errorf("%q: body %q, want %q", e.Subject, e.Body.Text, "body "+i)
		}
	}
	for s := range replies {
		if seen[s] != 1 {
			t.Errorf("%q arrived %d times, want once", s, seen[s])
		}
	}
}
