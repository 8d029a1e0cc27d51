package ses_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/sesv2"
	"github.com/aws/aws-sdk-go-v2/service/sesv2/types"

	"github.com/sendonce/sendonce/transport"
	"github.com/sendonce/sendonce/transport/ses"
)

// sendRequest is the JSON body of SendEmail (POST /v2/email/outbound-emails),
// as the SES v2 REST protocol carries it. Blobs are base64 in JSON, which
// encoding/json decodes into []byte.
type sendRequest struct {
	Content struct {
		Raw struct {
			Data []byte
		}
	}
	Destination struct {
		ToAddresses  []string
		CcAddresses  []string
		BccAddresses []string
	}
	FromEmailAddress     string
	ConfigurationSetName string
	EmailTags            []struct{ Name, Value string }
}

// fakeSES speaks enough of the SES v2 REST protocol for SendEmail, and
// answers each request with its fault.
type fakeSES struct {
	*httptest.Server
	fault func(w http.ResponseWriter, r *http.Request)

	mu   sync.Mutex
	reqs []sendRequest
	bad  []string // what was wrong with a request, reported by the test
}

func newFakeSES(t *testing.T, fault func(w http.ResponseWriter, r *http.Request)) *fakeSES {
	f := &fakeSES{fault: fault}
	f.Server = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(func() {
		f.Close()
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, b := range f.bad {
			t.Errorf("fake SES: %s", b)
		}
	})
	return f
}

func (f *fakeSES) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	var req sendRequest
	f.mu.Lock()
	switch {
	case err != nil:
		f.bad = append(f.bad, "read body: "+err.Error())
	case r.Method != "POST" || r.URL.Path != "/v2/email/outbound-emails":
		f.bad = append(f.bad, "unexpected request "+r.Method+" "+r.URL.Path)
	case !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 Credential=test/"):
		f.bad = append(f.bad, "request not signed with the test credentials: "+r.Header.Get("Authorization"))
	}
	if err := json.Unmarshal(body, &req); err != nil {
		f.bad = append(f.bad, "decode body: "+err.Error())
	}
	f.reqs = append(f.reqs, req)
	f.mu.Unlock()
	f.fault(w, r)
}

func (f *fakeSES) requests() []sendRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]sendRequest(nil), f.reqs...)
}

// Faults.

func answerOK(id string) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Amzn-RequestId", "req-1")
		io.WriteString(w, `{"MessageId":"`+id+`"}`)
	}
}

// answerError answers as SES does: the error type in X-Amzn-ErrorType,
// with the namespace suffix real answers carry, and the message in the
// JSON body.
func answerError(status int, code, message string) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Amzn-RequestId", "req-1")
		if code != "" {
			w.Header().Set("X-Amzn-ErrorType", code+":http://internal.amazon.com/coral/com.amazonaws.sesv2/")
		}
		w.WriteHeader(status)
		b, _ := json.Marshal(map[string]string{"message": message})
		w.Write(b)
	}
}

func answerRaw(status int, body string) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(status)
		io.WriteString(w, body)
	}
}

// neverAnswer holds the request until the client gives up on it.
func neverAnswer(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }

// hangUp closes the connection after reading the request, without a word.
func hangUp(w http.ResponseWriter, r *http.Request) {
	c, _, err := w.(http.Hijacker).Hijack()
	if err != nil {
		panic(err)
	}
	c.Close()
}

// hostileConfig is an AWS configuration that asks for retries in every way
// the SDK knows: the transport must make one request anyway.
func hostileConfig() *aws.Config {
	return &aws.Config{
		Region:           "us-east-1",
		Credentials:      credentials.NewStaticCredentialsProvider("test", "test", ""),
		RetryMaxAttempts: 5,
		Retryer:          func() aws.Retryer { return eagerRetryer() },
	}
}

// eagerRetryer is the SDK's standard retryer without waits between
// attempts.
func eagerRetryer() aws.Retryer {
	return retry.NewStandard(func(o *retry.StandardOptions) {
		o.MaxAttempts = 5
		o.Backoff = retry.BackoffDelayerFunc(func(int, error) (time.Duration, error) { return 0, nil })
	})
}

func newTransport(t *testing.T, endpoint string, opts ses.Options) *ses.Transport {
	t.Helper()
	opts.Endpoint = endpoint
	if opts.AWSConfig == nil {
		opts.AWSConfig = hostileConfig()
	}
	tr, err := ses.New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

// testMessage has a Bcc recipient: in the envelope, not in the headers.
func testMessage() *transport.Message {
	data := "From: Sender <noreply@example.org>\r\n" +
		"To: ann@example.com\r\n" +
		"Subject: =?utf-8?q?caf=C3=A9?=\r\n" +
		"Message-ID: <k1.t1@sendonce.example.org>\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\n" +
		"Content-Transfer-Encoding: 8bit\r\n" +
		"\r\n" +
		"caf\xc3\xa9\r\n" +
		".leading dot and trailing spaces  \r\n" +
		"\x00binary-ish\tbytes\r\n"
	return &transport.Message{
		Tenant: "t1", Key: "k1", MessageID: "<k1.t1@sendonce.example.org>",
		From: "bounces@example.org",
		To:   []string{"ann@example.com", "hidden-bcc@example.net"},
		Data: []byte(data),
	}
}

type commitCounter struct {
	n   atomic.Int32
	err error
}

func (c *commitCounter) commit(context.Context) error {
	c.n.Add(1)
	return c.err
}

func TestSend(t *testing.T) {
	type tc struct {
		name      string
		fault     func(http.ResponseWriter, *http.Request)
		timeout   time.Duration
		kind      transport.Kind // 0: success
		code      int            // the HTTP status the error carries
		reply     string
		errHas    string
		refused   bool  // nothing listens
		commitErr error // commit fails
		requests  int   // how many requests the server must have seen
	}
	cases := []tc{
		{name: "accepted", fault: answerOK("0100-abc"), reply: "SES MessageId 0100-abc", requests: 1},
		{name: "429 TooManyRequestsException", fault: answerError(429, "TooManyRequestsException", "Too many requests."), kind: transport.Temporary, code: 429, requests: 1},
		{name: "400 ThrottlingException", fault: answerError(400, "ThrottlingException", "Maximum sending rate exceeded."), kind: transport.Temporary, code: 400, requests: 1},
		{name: "429 without an error type", fault: answerRaw(429, "slow down"), kind: transport.Temporary, code: 429, requests: 1},
		{name: "400 LimitExceededException", fault: answerError(400, "LimitExceededException", "Daily quota exceeded."), kind: transport.Temporary, code: 400, requests: 1},
		{name: "400 SendingPausedException", fault: answerError(400, "SendingPausedException", "Sending is paused."), kind: transport.Temporary, code: 400, errHas: "resume it in SES", requests: 1},
		{name: "400 AccountSuspendedException", fault: answerError(400, "AccountSuspendedException", "Suspended."), kind: transport.Temporary, code: 400, requests: 1},
		{name: "403 UnrecognizedClientException", fault: answerError(403, "UnrecognizedClientException", "The security token included in the request is invalid."), kind: transport.Temporary, code: 403, errHas: "access key", requests: 1},
		{name: "500 InternalFailure", fault: answerError(500, "InternalFailure", "Internal failure."), kind: transport.Temporary, code: 500, requests: 1},
		{name: "503 ServiceUnavailable", fault: answerError(503, "ServiceUnavailable", "Service unavailable."), kind: transport.Temporary, code: 503, requests: 1},
		{name: "500 that is not JSON", fault: answerRaw(500, "<html>oops</html>"), kind: transport.Temporary, code: 500, requests: 1},
		{name: "504 from a gateway", fault: answerRaw(504, "<html>Gateway Timeout</html>"), kind: transport.Ambiguous, code: 504, requests: 1},
		{name: "502 from a gateway", fault: answerRaw(502, ""), kind: transport.Ambiguous, code: 502, requests: 1},
		{name: "400 MessageRejected", fault: answerError(400, "MessageRejected", "Email address is not verified."), kind: transport.Permanent, code: 400, errHas: "Email address is not verified", requests: 1},
		{name: "400 MailFromDomainNotVerifiedException", fault: answerError(400, "MailFromDomainNotVerifiedException", "MAIL FROM domain not verified."), kind: transport.Permanent, code: 400, requests: 1},
		{name: "400 BadRequestException", fault: answerError(400, "BadRequestException", "Bad request."), kind: transport.Permanent, code: 400, requests: 1},
		{name: "404 NotFoundException", fault: answerError(404, "NotFoundException", "Configuration set does not exist."), kind: transport.Permanent, code: 404, requests: 1},
		{name: "400 without an error type", fault: answerRaw(400, "nope"), kind: transport.Permanent, code: 400, requests: 1},
		{name: "200 that is not JSON", fault: answerRaw(200, "{not json"), kind: transport.Ambiguous, code: 200, requests: 1},
		{name: "no answer before RequestTimeout", fault: neverAnswer, timeout: 300 * time.Millisecond, kind: transport.Ambiguous, errHas: "may have the message", requests: 1},
		{name: "connection closed after the request", fault: hangUp, kind: transport.Ambiguous, errHas: "may have the message", requests: 1},
		{name: "connection refused", refused: true, kind: transport.Temporary, errHas: "request not sent"},
		{name: "commit fails", fault: answerOK("never"), commitErr: errors.New("marker not written"), requests: 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var f *fakeSES
			endpoint := ""
			if c.refused {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				endpoint = "http://" + ln.Addr().String()
				ln.Close() // nothing listens there now
			} else {
				f = newFakeSES(t, c.fault)
				endpoint = f.URL
			}
			tr := newTransport(t, endpoint, ses.Options{
				RequestTimeout:   c.timeout,
				ConfigurationSet: "transactional",
				Tags:             map[string]string{"tenant": "t1", "app": "billing"},
			})
			cc := &commitCounter{err: c.commitErr}
			msg := testMessage()
			rcpt, err := tr.Send(context.Background(), msg, cc.commit)

			if n := cc.n.Load(); n != 1 {
				t.Errorf("commit called %d times, want 1", n)
			}
			if f != nil {
				if n := len(f.requests()); n != c.requests {
					t.Errorf("the server got %d requests, want %d", n, c.requests)
				}
			}
			switch {
			case c.commitErr != nil:
				if err != c.commitErr {
					t.Fatalf("Send returned %v, want the commit error untouched", err)
				}
				return
			case c.kind == 0:
				if err != nil {
					t.Fatalf("Send: %v", err)
				}
				if rcpt.Reply != c.reply {
					t.Errorf("reply %q, want %q", rcpt.Reply, c.reply)
				}
			default:
				if err == nil {
					t.Fatalf("Send succeeded (%q), want a %s error", rcpt.Reply, c.kind)
				}
				var te *transport.Error
				if !errors.As(err, &te) {
					t.Fatalf("error %v is not classified", err)
				}
				if te.Kind != c.kind || te.Code != c.code {
					t.Errorf("error %v: kind %s code %d, want %s code %d", err, te.Kind, te.Code, c.kind, c.code)
				}
				if c.errHas != "" && !strings.Contains(err.Error(), c.errHas) {
					t.Errorf("error %q does not say %q", err, c.errHas)
				}
				t.Logf("%s: %v", c.name, err)
			}
			if f == nil || c.requests == 0 {
				return
			}
			got := f.requests()[0]
			if !bytes.Equal(got.Content.Raw.Data, msg.Data) {
				t.Errorf("raw data arrived as %q, want %q", got.Content.Raw.Data, msg.Data)
			}
			if !reflect.DeepEqual(got.Destination.ToAddresses, msg.To) || got.Destination.CcAddresses != nil || got.Destination.BccAddresses != nil {
				t.Errorf("destination %+v, want To %v only", got.Destination, msg.To)
			}
			if got.FromEmailAddress != msg.From {
				t.Errorf("FromEmailAddress %q, want %q", got.FromEmailAddress, msg.From)
			}
			if got.ConfigurationSetName != "transactional" {
				t.Errorf("ConfigurationSetName %q, want transactional", got.ConfigurationSetName)
			}
			wantTags := []struct{ Name, Value string }{{"app", "billing"}, {"tenant", "t1"}}
			if !reflect.DeepEqual(got.EmailTags, wantTags) {
				t.Errorf("EmailTags %v, want %v", got.EmailTags, wantTags)
			}
		})
	}
}

// TestRetryingClientWouldDuplicate shows that the fake server and the
// hostile configuration of TestSend do provoke SDK retries when nothing
// stops them, so that TestSend's "one request" can fail.
func TestRetryingClientWouldDuplicate(t *testing.T) {
	f := newFakeSES(t, answerError(500, "InternalFailure", "Internal failure."))
	client := sesv2.NewFromConfig(*hostileConfig(), func(o *sesv2.Options) { o.BaseEndpoint = aws.String(f.URL) })
	_, err := client.SendEmail(context.Background(), &sesv2.SendEmailInput{
		Content:     &types.EmailContent{Raw: &types.RawMessage{Data: testMessage().Data}},
		Destination: &types.Destination{ToAddresses: []string{"ann@example.com"}},
	})
	if err == nil {
		t.Fatal("SendEmail succeeded against a server that answers 500")
	}
	if n := len(f.requests()); n < 2 {
		t.Fatalf("a plain SDK client made %d requests on a 500; the test of the transport's single request proves nothing", n)
	}
}

func TestSendNoRecipients(t *testing.T) {
	f := newFakeSES(t, answerOK("x"))
	tr := newTransport(t, f.URL, ses.Options{})
	cc := &commitCounter{}
	msg := testMessage()
	msg.To = nil
	_, err := tr.Send(context.Background(), msg, cc.commit)
	if transport.KindOf(err) != transport.Permanent || cc.n.Load() != 0 || len(f.requests()) != 0 {
		t.Fatalf("Send without recipients: %v, %d commits, %d requests; want Permanent before commit", err, cc.n.Load(), len(f.requests()))
	}
}

// TestSendContextDoneAfterCommit: if the caller gives up while the marker
// is written, the request is not sent, and the error says so.
func TestSendContextDoneAfterCommit(t *testing.T) {
	f := newFakeSES(t, answerOK("x"))
	tr := newTransport(t, f.URL, ses.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	_, err := tr.Send(ctx, testMessage(), func(context.Context) error { cancel(); return nil })
	if transport.KindOf(err) != transport.Temporary || len(f.requests()) != 0 {
		t.Fatalf("Send: %v with %d requests; want Temporary and no request", err, len(f.requests()))
	}
}

// TestSendFromNullSender: an empty envelope sender is left out, and SES
// takes the From header.
func TestSendFromNullSender(t *testing.T) {
	f := newFakeSES(t, answerOK("x"))
	tr := newTransport(t, f.URL, ses.Options{})
	msg := testMessage()
	msg.From = ""
	if _, err := tr.Send(context.Background(), msg, func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if got := f.requests()[0]; got.FromEmailAddress != "" || got.ConfigurationSetName != "" || got.EmailTags != nil {
		t.Errorf("request %+v, want no FromEmailAddress, configuration set or tags", got)
	}
}

// TestSendConcurrently runs Sends in parallel on one Transport, for the
// race detector.
func TestSendConcurrently(t *testing.T) {
	f := newFakeSES(t, answerOK("x"))
	tr := newTransport(t, f.URL, ses.Options{RatePerSecond: 1000})
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Go(func() {
			_, err := tr.Send(context.Background(), testMessage(), func(context.Context) error { return nil })
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := len(f.requests()); n != 20 {
		t.Errorf("%d requests, want 20", n)
	}
}

// fakeClock stands still until the limiter sleeps, which moves it on.
type fakeClock struct {
	mu    sync.Mutex
	now   time.Time
	slept []time.Duration
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.slept = append(c.slept, d)
	c.now = c.now.Add(d)
	return nil
}

func TestRateLimit(t *testing.T) {
	for _, c := range []struct {
		rate  float64
		sends int
		waits int
		each  time.Duration
	}{
		{rate: 50, sends: 20, waits: 0},                               // within the burst of 50
		{rate: 5, sends: 20, waits: 15, each: 200 * time.Millisecond}, // a burst of 5, then one every 1/5 s
		{rate: 0.5, sends: 3, waits: 2, each: 2 * time.Second},        // burst of 1 below 1/s
	} {
		f := newFakeSES(t, answerOK("x"))
		tr := newTransport(t, f.URL, ses.Options{RatePerSecond: c.rate})
		clock := &fakeClock{now: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
		ses.SetLimiterClock(tr, clock.Now, clock.Sleep)
		for range c.sends {
			if _, err := tr.Send(context.Background(), testMessage(), func(context.Context) error { return nil }); err != nil {
				t.Fatal(err)
			}
		}
		calls, waits := ses.LimiterStats(tr)
		if calls != c.sends || waits != c.waits || len(clock.slept) != c.waits {
			t.Errorf("rate %g, %d sends: limiter consulted %d times, %d waits, %d sleeps; want %d, %d, %d",
				c.rate, c.sends, calls, waits, len(clock.slept), c.sends, c.waits, c.waits)
		}
		for _, d := range clock.slept {
			if diff := d - c.each; diff < -time.Millisecond || diff > time.Millisecond {
				t.Errorf("rate %g: waited %s, want %s", c.rate, d, c.each)
			}
		}
		if n := len(f.requests()); n != c.sends {
			t.Errorf("rate %g: %d requests, want %d", c.rate, n, c.sends)
		}
	}
}

// TestRateLimitWaitEnds: a Send whose context ends while it waits for the
// rate is Temporary, before commit, and sends nothing.
func TestRateLimitWaitEnds(t *testing.T) {
	f := newFakeSES(t, answerOK("x"))
	tr := newTransport(t, f.URL, ses.Options{RatePerSecond: 1.0 / 7200}) // one every two hours
	clock := &fakeClock{now: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
	ses.SetLimiterClock(tr, clock.Now, func(ctx context.Context, d time.Duration) error {
		<-ctx.Done()
		return ctx.Err()
	})
	commit := func(context.Context) error { return nil }
	if _, err := tr.Send(context.Background(), testMessage(), commit); err != nil {
		t.Fatal(err) // the burst of one
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	cc := &commitCounter{}
	_, err := tr.Send(ctx, testMessage(), cc.commit)
	var te *transport.Error
	if !errors.As(err, &te) || te.Kind != transport.Temporary || te.Step != "rate" {
		t.Fatalf("Send: %v, want Temporary at rate", err)
	}
	if cc.n.Load() != 0 || len(f.requests()) != 1 {
		t.Errorf("%d commits and %d requests, want 0 and 1", cc.n.Load(), len(f.requests()))
	}
	// A deadline sooner than the next slot fails at once, without waiting.
	ctx, cancel = context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	ses.SetLimiterClock(tr, clock.Now, func(context.Context, time.Duration) error {
		t.Error("the limiter waited for a slot after the deadline")
		return nil
	})
	_, err = tr.Send(ctx, testMessage(), cc.commit)
	if transport.KindOf(err) != transport.Temporary || cc.n.Load() != 0 {
		t.Errorf("Send with a near deadline: %v, %d commits; want Temporary before commit", err, cc.n.Load())
	}
}

func TestNewValidates(t *testing.T) {
	for _, c := range []struct {
		name string
		opts ses.Options
		want string
	}{
		{"bad region", ses.Options{Region: "us east 1"}, "AWS_REGION"},
		{"bad tag", ses.Options{Tags: map[string]string{"team": "a b"}}, `tag "team"="a b"`},
		{"empty tag name", ses.Options{Tags: map[string]string{"": "x"}}, "no empty name"},
		{"negative rate", ses.Options{RatePerSecond: -1}, "RatePerSecond"},
		{"negative timeout", ses.Options{RequestTimeout: -time.Second}, "RequestTimeout"},
		{"bad endpoint", ses.Options{Endpoint: "127.0.0.1:8005"}, "http://"},
		{"no credentials", ses.Options{AWSConfig: &aws.Config{Region: "us-east-1"}}, "Credentials"},
	} {
		if c.opts.AWSConfig == nil {
			c.opts.AWSConfig = hostileConfig()
		}
		_, err := ses.New(context.Background(), c.opts)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: New returned %v, want an error naming %q", c.name, err, c.want)
		}
	}
}

// isolateAWSEnv clears what the standard AWS configuration reads, so that
// the tests that load it see only what they set.
func isolateAWSEnv(t *testing.T) {
	dir := t.TempDir()
	for _, k := range []string{"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
		"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SESV2", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
		"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"} {
		t.Setenv(k, "")
	}
	t.Setenv("AWS_CONFIG_FILE", dir+"/config")
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", dir+"/credentials")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

func TestNewNoRegion(t *testing.T) {
	isolateAWSEnv(t)
	_, err := ses.New(context.Background(), ses.Options{})
	if err == nil || !strings.Contains(err.Error(), "AWS_REGION") || !strings.Contains(err.Error(), "no region") {
		t.Fatalf("New without a region: %v, want an error naming AWS_REGION", err)
	}
}

// TestStandardConfiguration: with no AWSConfig, the region, credentials
// and endpoint come from the environment, AWS_ENDPOINT_URL_SESV2 included,
// and AWS_MAX_ATTEMPTS does not bring the SDK's retries back.
func TestStandardConfiguration(t *testing.T) {
	isolateAWSEnv(t)
	f := newFakeSES(t, answerError(503, "ServiceUnavailable", "later"))
	t.Setenv("AWS_REGION", "eu-west-1")
	t.Setenv("AWS_ACCESS_KEY_ID", "test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test")
	t.Setenv("AWS_ENDPOINT_URL_SESV2", f.URL)
	t.Setenv("AWS_MAX_ATTEMPTS", "5")
	tr, err := ses.New(context.Background(), ses.Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = tr.Send(context.Background(), testMessage(), func(context.Context) error { return nil })
	if transport.KindOf(err) != transport.Temporary {
		t.Fatalf("Send: %v, want Temporary", err)
	}
	if n := len(f.requests()); n != 1 {
		t.Fatalf("the server at AWS_ENDPOINT_URL_SESV2 got %d requests, want 1", n)
	}
}

// flakyCredentials answers the first Retrieve and fails every later one.
type flakyCredentials struct{ calls atomic.Int32 }

func (c *flakyCredentials) Retrieve(context.Context) (aws.Credentials, error) {
	if c.calls.Add(1) == 1 {
		return aws.Credentials{AccessKeyID: "test", SecretAccessKey: "test", Source: "flaky"}, nil
	}
	return aws.Credentials{}, errors.New("token service unreachable")
}

// TestSendFailsBeforeTheRequest: an error inside the SDK before the
// request reaches the HTTP client (here signing, whose credentials fail
// after commit) cannot have sent anything: Temporary, not in doubt.
func TestSendFailsBeforeTheRequest(t *testing.T) {
	f := newFakeSES(t, answerOK("x"))
	cfg := hostileConfig()
	cfg.Credentials = &flakyCredentials{}
	tr := newTransport(t, f.URL, ses.Options{AWSConfig: cfg})
	cc := &commitCounter{}
	_, err := tr.Send(context.Background(), testMessage(), cc.commit)
	var te *transport.Error
	if !errors.As(err, &te) || te.Kind != transport.Temporary || !strings.Contains(err.Error(), "request not sent") {
		t.Fatalf("Send: %v, want Temporary: request not sent", err)
	}
	if cc.n.Load() != 1 || len(f.requests()) != 0 {
		t.Errorf("%d commits and %d requests, want 1 and 0", cc.n.Load(), len(f.requests()))
	}
	// The next Send fails at the credentials, before commit.
	_, err = tr.Send(context.Background(), testMessage(), cc.commit)
	if !errors.As(err, &te) || te.Kind != transport.Temporary || te.Step != "credentials" || cc.n.Load() != 1 {
		t.Fatalf("Send: %v after %d commits, want Temporary at credentials, before commit", err, cc.n.Load())
	}
}
