package sqs

import (
	"context"
	"fmt"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
)

// Lag reads the queue's approximate counts: messages waiting, then
// received and not yet deleted.
func TestLag(t *testing.T) {
	f := newFixture(t)
	dlq := f.createQueue("lag-dlq", nil)
	url := f.createQueue("lag", map[string]string{"VisibilityTimeout": "60", "RedrivePolicy": redrive(f, dlq)})
	ctx := context.Background()
	src, err := New(ctx, Options{QueueURL: url, AWSConfig: awsConfig(f.endpoint, nil), Logger: testLogger(t, "lag")})
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]*outgoing, 7)
	for i := range msgs {
		msgs[i] = &outgoing{body: fmt.Sprintf(`{"n":%d}`, i)}
	}
	f.send(url, msgs)
	lag, err := src.Lag(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if lag.Waiting != 7 || lag.Unacked != 0 {
		t.Fatalf("lag %+v after 7 sent, want 7 waiting", lag)
	}
	if _, err := f.sqs.ReceiveMessage(ctx, &awssqs.ReceiveMessageInput{QueueUrl: aws.String(url), MaxNumberOfMessages: 3}); err != nil {
		t.Fatal(err)
	}
	lag, err = src.Lag(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if lag.Waiting+lag.Unacked != 7 || lag.Unacked < 1 {
		t.Fatalf("lag %+v after a receive, want 7 in all, some not visible", lag)
	}
}
