package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"github.com/sendonce/sendonce/internal/awslocal"
)

// TestChainSQSToSES is the system that started the project, end to end:
// jobs on an SQS queue (every one of them put there twice, as a
// redelivering queue would hand them out), consumed by the sendonce binary,
// which is killed with SIGKILL mid-stream and restarted, and delivered
// through SES. No email reaches SES twice; every one recorded sent is there;
// the second copy of each job is counted as a duplicate in its record;
// malformed jobs end on the dead-letter queue with their reason; the queue
// ends empty.
func TestChainSQSToSES(t *testing.T) {
	sqsEndpoint := awslocal.StartSQS(t)
	sesEndpoint := awslocal.StartSES(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	q := awssqs.New(awssqs.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(sqsEndpoint),
		Credentials:  credentials.NewStaticCredentialsProvider("test", "test", ""),
	})
	mk := func(name string) string {
		out, err := q.CreateQueue(ctx, &awssqs.CreateQueueInput{QueueName: aws.String(name),
			Attributes: map[string]string{"VisibilityTimeout": "2"}})
		if err != nil {
			t.Fatalf("create queue %s: %v", name, err)
		}
		return *out.QueueUrl
	}
	queueURL, dlqURL := mk("emails"), mk("emails-dlq")

	const n = 100
	for i := 0; i < n; i++ {
		body := fmt.Sprintf(`{"version": 1, "key": "tasks.cron_monthly_email_reminder[%04d]", "from": "Difio <noreply@example.org>", "to": ["user%d@example.com"], "subject": "Your monthly reminder %d", "text": "Hello"}`, i, i, i)
		for copy := 0; copy < 2; copy++ { // the queue hands every job out twice
			if _, err := q.SendMessage(ctx, &awssqs.SendMessageInput{QueueUrl: aws.String(queueURL), MessageBody: aws.String(body)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	malformed := []string{`not json`, `{"key": "x", "from": "noreply@example.org", "to": ["nobody"], "subject": "s"}`, `{"version": 2, "key": "y"}`}
	for _, body := range malformed {
		if _, err := q.SendMessage(ctx, &awssqs.SendMessageInput{QueueUrl: aws.String(queueURL), MessageBody: aws.String(body)}); err != nil {
			t.Fatal(err)
		}
	}

	dir := t.TempDir()
	cfg := filepath.Join(dir, "sendonce.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("sources:\n  - sqs: %s\n    dead_letter_queue: %s\n    wait_time: 1s\n", queueURL, dlqURL)), 0o600)
	env := []string{"AWS_REGION=us-east-1", "AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test",
		"AWS_ENDPOINT_URL_SQS=" + sqsEndpoint, "AWS_ENDPOINT_URL_SESV2=" + sesEndpoint,
		"SENDONCE_DISPATCH_POLL_INTERVAL=100ms", "SENDONCE_DISPATCH_LEASE=5s"}
	s := startServerArgs(t, filepath.Join(dir, "data"), []string{"--config", cfg, "--transport", "ses"}, env...)

	sesStore := func() (map[string]int, error) {
		resp, err := http.Get(sesEndpoint + "/store")
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		var store struct {
			Emails []struct {
				Subject string `json:"subject"`
			} `json:"emails"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&store); err != nil {
			return nil, err
		}
		seen := map[string]int{}
		for _, e := range store.Emails {
			seen[e.Subject]++
		}
		return seen, nil
	}
	queueEmpty := func() (bool, string) {
		attrs, err := q.GetQueueAttributes(ctx, &awssqs.GetQueueAttributesInput{QueueUrl: aws.String(queueURL),
			AttributeNames: []sqstypes.QueueAttributeName{"ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"}})
		if err != nil {
			return false, err.Error()
		}
		left := attrs.Attributes["ApproximateNumberOfMessages"] + "/" + attrs.Attributes["ApproximateNumberOfMessagesNotVisible"]
		return left == "0/0", "queue visible/in flight " + left
	}

	// A crash mid-stream: kill -9 once a tenth of the emails reached SES.
	eventually(t, 60*time.Second, "a tenth of the emails at SES", func() (bool, string) {
		seen, err := sesStore()
		return err == nil && len(seen) >= n/10, fmt.Sprint(len(seen), err)
	})
	s.kill()
	s = startServerArgs(t, filepath.Join(dir, "data"), []string{"--config", cfg, "--transport", "ses"}, env...)

	records := map[int]record{}
	eventually(t, 90*time.Second, "every email settled and the queue empty", func() (bool, string) {
		if ok, why := queueEmpty(); !ok {
			return false, why
		}
		for i := 0; i < n; i++ {
			r, err := s.get(fmt.Sprintf("tasks.cron_monthly_email_reminder[%04d]", i))
			if err != nil {
				return false, err.Error()
			}
			if r.State != "sent" && r.State != "in_doubt" {
				return false, fmt.Sprintf("%s is %s", r.Key, r.State)
			}
			records[i] = r
		}
		return true, ""
	})
	s.stop()

	seen, err := sesStore()
	if err != nil {
		t.Fatal(err)
	}
	dups, inDoubt := 0, 0
	for i := 0; i < n; i++ {
		r, c := records[i], seen["Your monthly reminder "+strconv.Itoa(i)]
		dups += r.Duplicates
		switch {
		case c > 1:
			t.Errorf("email %d reached SES %d times", i, c)
		case r.State == "sent" && c != 1:
			t.Errorf("email %d is recorded sent but SES has %d copies", i, c)
		case r.State == "in_doubt":
			inDoubt++
		}
	}
	// Every job was on the queue twice; the kill may add redeliveries.
	if dups < n {
		t.Errorf("the records count %d duplicate deliveries, want at least %d", dups, n)
	}
	t.Logf("%d emails: %d in_doubt after the kill, %d duplicate deliveries suppressed", n, inDoubt, dups)

	got, err := q.ReceiveMessage(ctx, &awssqs.ReceiveMessageInput{QueueUrl: aws.String(dlqURL), MaxNumberOfMessages: 10,
		MessageAttributeNames: []string{"All"}, WaitTimeSeconds: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Messages) != len(malformed) {
		t.Fatalf("the dead-letter queue holds %d messages, want %d", len(got.Messages), len(malformed))
	}
	for _, m := range got.Messages {
		if a, ok := m.MessageAttributes["sendonce_error"]; !ok || aws.ToString(a.StringValue) == "" {
			t.Errorf("dead-lettered %q without a reason", aws.ToString(m.Body))
		}
	}
}
