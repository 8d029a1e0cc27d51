package awslocal_test

import (
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/sendonce/sendonce/internal/awslocal"
)

// fakeAuth is a SigV4 Authorization header of the shape the servers want;
// they read the region from it and check nothing else.
const fakeAuth = "AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=00"

func TestStartSES(t *testing.T) {
	t.Parallel()
	ep := awslocal.StartSES(t)
	get(t, ep+"/health-check", 200)
	if body := get(t, ep+"/store", 200); !strings.Contains(body, `"emails":[]`) {
		t.Errorf("a new server's store is %s, want no emails", body)
	}
	loopbackOnly(t, ep)
}

func TestStartSQS(t *testing.T) {
	t.Parallel()
	ep := awslocal.StartSQS(t)
	get(t, ep+"/health", 200)

	req, err := http.NewRequest("POST", ep+"/", strings.NewReader(`{"QueueName":"jobs"}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-amz-json-1.0")
	req.Header.Set("X-Amz-Target", "AmazonSQS.CreateQueue")
	req.Header.Set("Authorization", fakeAuth)
	body := do(t, req, 200)
	if !strings.Contains(body, `/000000000000/jobs"`) {
		t.Errorf("CreateQueue answered %s, want a QueueUrl ending in /000000000000/jobs", body)
	}
	loopbackOnly(t, ep)
}

// TestServersAreIndependent checks that two servers of a kind do not share
// a port or state, so tests may each start their own in parallel.
func TestServersAreIndependent(t *testing.T) {
	t.Parallel()
	a, b := awslocal.StartSQS(t), awslocal.StartSQS(t)
	if a == b {
		t.Fatalf("two servers on one endpoint %s", a)
	}
	c, d := awslocal.StartSES(t), awslocal.StartSES(t)
	if c == d {
		t.Fatalf("two servers on one endpoint %s", c)
	}
}

// loopbackOnly checks that the server does not listen on every address:
// on Linux all of 127.0.0.0/8 reaches the machine, so a server bound to
// 0.0.0.0 would answer on 127.0.0.2 too.
func loopbackOnly(t *testing.T, endpoint string) {
	t.Helper()
	u, err := url.Parse(endpoint)
	if err != nil {
		t.Fatal(err)
	}
	if u.Hostname() != "127.0.0.1" {
		t.Errorf("endpoint %s, want host 127.0.0.1", endpoint)
	}
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.2", u.Port()), time.Second)
	if err == nil {
		c.Close()
		t.Errorf("the server at %s also accepts connections on 127.0.0.2: it listens on more than 127.0.0.1", endpoint)
	}
}

func get(t *testing.T, u string, want int) string {
	t.Helper()
	req, err := http.NewRequest("GET", u, nil)
	if err != nil {
		t.Fatal(err)
	}
	return do(t, req, want)
}

func do(t *testing.T, req *http.Request, want int) string {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != want {
		t.Fatalf("%s %s: %s %s, want %d", req.Method, req.URL, resp.Status, b, want)
	}
	return string(b)
}
