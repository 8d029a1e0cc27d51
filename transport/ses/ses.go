// Package ses delivers messages through Amazon SES, with one call of the
// API v2 SendEmail operation as the irreversible step of the transport
// contract.
//
// What it promises, beyond the transport package's contract:
//
//   - One HTTP request per Send, never more. SES has no idempotency token:
//     a request repeated after it may have reached SES can be a second
//     email. The SDK's own retries (by default up to three attempts on
//     throttling, 5xx and connection errors) are therefore switched off,
//     whatever AWS_MAX_ATTEMPTS or AWS_RETRY_MODE say; the dispatcher
//     retries instead, with backoff, and only when the answer says SES
//     does not have the message. Below the SDK, Go's HTTP client re-sends a
//     POST only when none of it was written, and follows only 307 and 308
//     redirects, whose sender says it did not act on the request: neither
//     can duplicate an email.
//   - The message is sent as raw content, byte for byte, so the Message-ID
//     derived from the idempotency key is the one recipients see. The
//     envelope goes in FromEmailAddress and Destination.ToAddresses, which
//     SES uses instead of the headers: Bcc recipients are in the envelope
//     only.
//   - Everything that can fail without SES being involved happens before
//     commit: waiting for the send rate (Options.RatePerSecond) and getting
//     credentials (which may itself be a network call, to STS or the
//     instance metadata service). An error there is Temporary and no
//     commit marker is written.
//   - Every request carries Options.ConfigurationSet and Options.Tags, for
//     SES's event publishing.
//
// # How errors are classified
//
// An answer from SES is classified by its error code first (the
// X-Amzn-ErrorType header or the body's type), then by its HTTP status:
//
//	what happened                                          kind       why
//	TooManyRequestsException, ThrottlingException,         Temporary  SES refused the request: it
//	  Throttling, HTTP 429                                            does not have the message
//	LimitExceededException                                 Temporary  a quota, which resets
//	SendingPausedException, AccountSuspendedException      Temporary  the account is stopped, not
//	                                                                  the message: once an operator
//	                                                                  resumes sending, the queue
//	                                                                  drains (DispatchConfig.
//	                                                                  MaxAttempts bounds the wait)
//	AccessDeniedException, UnrecognizedClientException,    Temporary  our credentials, permissions
//	  InvalidSignatureException, SignatureDoesNotMatch,               or clock are wrong, not the
//	  IncompleteSignature, MissingAuthenticationToken,                message: like a refused SMTP
//	  InvalidClientTokenId, ExpiredToken(Exception),                  AUTH, fixing the configuration
//	  RequestExpired, HTTP 401, HTTP 403                              delivers the queue
//	RequestTimeout(Exception), HTTP 408                    Temporary  SES did not receive the whole
//	                                                                  request
//	InternalFailure, InternalServiceErrorException,        Temporary  SES answered that it failed;
//	  ServiceUnavailable, other HTTP 5xx                              AWS documents these as safe to
//	                                                                  retry
//	HTTP 502 or 504 without an SES error code              Ambiguous  a gateway answered for SES,
//	                                                                  which may have the request
//	MessageRejected, MailFromDomainNotVerifiedException,   Permanent  SES refused this message;
//	  BadRequestException, NotFoundException (e.g. no                 sending it again is refused
//	  such configuration set), any other 4xx                          again
//	any 2xx answer whose body cannot be read or parsed     Ambiguous  SES probably accepted it, but
//	                                                                  we have no MessageId to show
//
// Without an answer:
//
//	the request never reached the HTTP client (endpoint,   Temporary  not a byte of it left
//	  signing), DNS failure, connection refused, a TLS
//	  certificate refused (*net.OpError with Op "dial",
//	  x509 errors)
//	a timeout (Options.RequestTimeout or the caller's      Ambiguous  the request may have reached
//	  context), a connection lost or reset, an answer                 SES, and nothing tells
//	  cut short, anything else                                        whether it did
//
// One residual risk is accepted: a 500 InternalFailure is in principle
// possible after SES queued the message. AWS's own SDKs retry it, and
// treating every 5xx as in doubt would leave an operator a pile of emails
// to resolve after each SES incident; the cost is a rare duplicate, which
// the constant Message-ID lets receivers discard.
//
// A Transport is safe for concurrent use.
package ses

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/url"
	"sort"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sesv2"
	"github.com/aws/aws-sdk-go-v2/service/sesv2/types"
	"github.com/aws/smithy-go/middleware"

	"github.com/sendonce/sendonce/transport"
)

// Options configure a Transport. The zero value sends with the standard
// AWS configuration (region, credentials and endpoint from the environment
// and the shared config files) and no rate limit.
type Options struct {
	// Region is the AWS region, e.g. "eu-west-1". Default: the standard
	// AWS resolution (AWS_REGION, AWS_DEFAULT_REGION, the profile).
	Region string
	// Endpoint overrides the SES endpoint URL (a local test server, a VPC
	// endpoint). Default: the standard resolution, which also reads
	// AWS_ENDPOINT_URL_SESV2 and AWS_ENDPOINT_URL.
	Endpoint string
	// ConfigurationSet is sent as ConfigurationSetName with every email.
	ConfigurationSet string
	// Tags are sent as EmailTags with every email. SES allows only ASCII
	// letters, digits, '_' and '-' in names and values, up to 256 each;
	// New checks them.
	Tags map[string]string
	// RatePerSecond caps how many emails a second this Transport sends,
	// with bursts of up to max(1, RatePerSecond); a new Transport may send
	// a full burst at once. Set it to the account's maximum send rate (or
	// its share, with several senders). 0 means no limit.
	RatePerSecond float64
	// RequestTimeout bounds the SendEmail request, from just after commit
	// to the end of SES's answer. When it expires the outcome is Ambiguous.
	// Default 30s.
	RequestTimeout time.Duration
	// AWSConfig, if set, is used instead of loading the standard AWS
	// configuration (tests; programs that already have one). Region,
	// Endpoint and the no-retry rule still apply on top of it.
	AWSConfig *aws.Config
}

// Transport sends through Amazon SES.
type Transport struct {
	client  *sesv2.Client
	creds   aws.CredentialsProvider
	opts    Options
	tags    []types.MessageTag
	limiter *limiter
}

var _ transport.Transport = (*Transport)(nil)

// New returns a Transport. It does not call AWS: a wrong credential or a
// missing identity shows on the first Send.
func New(ctx context.Context, opts Options) (*Transport, error) {
	if r := opts.RatePerSecond; r < 0 || math.IsNaN(r) || math.IsInf(r, 0) {
		return nil, fmt.Errorf("ses transport: RatePerSecond is %v; use the account's maximum send rate, or 0 for no limit", r)
	}
	if opts.RequestTimeout < 0 {
		return nil, fmt.Errorf("ses transport: RequestTimeout is %s; use a positive duration, or 0 for the default of 30s", opts.RequestTimeout)
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = 30 * time.Second
	}
	if opts.Endpoint != "" {
		u, err := url.Parse(opts.Endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("ses transport: endpoint %q is not an http:// or https:// URL", opts.Endpoint)
		}
	}
	tags, err := messageTags(opts.Tags)
	if err != nil {
		return nil, err
	}

	var cfg aws.Config
	if opts.AWSConfig != nil {
		cfg = opts.AWSConfig.Copy()
	} else {
		var load []func(*config.LoadOptions) error
		if opts.Region != "" {
			load = append(load, config.WithRegion(opts.Region))
		}
		cfg, err = config.LoadDefaultConfig(ctx, load...)
		if err != nil {
			return nil, fmt.Errorf("ses transport: load the AWS configuration: %w", err)
		}
	}
	if opts.Region != "" {
		cfg.Region = opts.Region
	}
	if cfg.Region == "" {
		return nil, errors.New("ses transport: no region: set AWS_REGION or the transport's region (ses.Options.Region)")
	}
	if cfg.Credentials == nil {
		return nil, errors.New("ses transport: no AWS credentials provider in Options.AWSConfig: set its Credentials, or leave AWSConfig nil to use the standard chain")
	}

	client := sesv2.NewFromConfig(cfg, func(o *sesv2.Options) {
		if opts.Endpoint != "" {
			o.BaseEndpoint = aws.String(opts.Endpoint)
		}
		noRetries(o)
	})
	// Resolving the endpoint is local (the SDK's rules, no request), and
	// catches a mistyped region now rather than on every Send.
	o := client.Options()
	if _, err := o.EndpointResolverV2.ResolveEndpoint(ctx, sesv2.EndpointParameters{
		Region:       aws.String(o.Region),
		Endpoint:     o.BaseEndpoint,
		UseFIPS:      aws.Bool(o.EndpointOptions.UseFIPSEndpoint == aws.FIPSEndpointStateEnabled),
		UseDualStack: aws.Bool(o.EndpointOptions.UseDualStackEndpoint == aws.DualStackEndpointStateEnabled),
	}); err != nil {
		return nil, fmt.Errorf("ses transport: region %q has no SES endpoint (check AWS_REGION or the transport's region): %w", o.Region, err)
	}

	return &Transport{
		client:  client,
		creds:   cfg.Credentials,
		opts:    opts,
		tags:    tags,
		limiter: newLimiter(opts.RatePerSecond),
	}, nil
}

// noRetries makes SendEmail a single attempt. RetryMaxAttempts is cleared
// too: the SDK would otherwise wrap our retryer again with the attempts
// from AWS_MAX_ATTEMPTS.
func noRetries(o *sesv2.Options) {
	o.Retryer = aws.NopRetryer{}
	o.RetryMaxAttempts = 0
}

// Name implements transport.Transport.
func (t *Transport) Name() string { return "ses" }

// Close implements transport.Transport; the HTTP client needs no closing.
func (t *Transport) Close() error { return nil }

// Send implements transport.Transport; see the package documentation.
func (t *Transport) Send(ctx context.Context, msg *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
	if len(msg.To) == 0 {
		return transport.Receipt{}, transport.Errorf(transport.Permanent, "prepare", 0, "ses transport: message %q has no recipients", msg.Key)
	}
	if err := t.limiter.wait(ctx); err != nil {
		return transport.Receipt{}, transport.Wrap(transport.Temporary, "rate", 0, fmt.Errorf("ses transport: waiting for the send rate: %w", err))
	}
	// The SDK would get credentials while signing, after commit, where a
	// failure could not be told from a lost request. They are cached, so
	// this is a network call only when they are due for renewal.
	if _, err := t.creds.Retrieve(ctx); err != nil {
		return transport.Receipt{}, transport.Wrap(transport.Temporary, "credentials", 0, fmt.Errorf("ses transport: no AWS credentials (see the AWS SDK's credential chain: AWS_ACCESS_KEY_ID, AWS_PROFILE, an IAM role): %w", err))
	}

	in := &sesv2.SendEmailInput{
		Content:     &types.EmailContent{Raw: &types.RawMessage{Data: msg.Data}},
		Destination: &types.Destination{ToAddresses: msg.To},
		EmailTags:   t.tags,
	}
	if msg.From != "" {
		in.FromEmailAddress = aws.String(msg.From)
	}
	if t.opts.ConfigurationSet != "" {
		in.ConfigurationSetName = aws.String(t.opts.ConfigurationSet)
	}

	if err := commit(ctx); err != nil {
		return transport.Receipt{}, err
	}
	if err := ctx.Err(); err != nil {
		return transport.Receipt{}, transport.Wrap(transport.Temporary, "commit", 0,
			fmt.Errorf("ses transport: context done after commit, request not sent: %w", err))
	}

	// From here on, SES may have the message.
	rctx, cancel := context.WithTimeout(ctx, t.opts.RequestTimeout)
	defer cancel()
	var handed bool
	out, err := t.client.SendEmail(rctx, in, func(o *sesv2.Options) {
		noRetries(o) // a client option could have been overridden per call; not ours
		o.APIOptions = append(o.APIOptions, markHanded(&handed))
	})
	if err != nil {
		return transport.Receipt{}, classify(err, handed)
	}
	id := aws.ToString(out.MessageId)
	if id == "" {
		return transport.Receipt{Reply: "SES accepted the message without a MessageId"}, nil
	}
	return transport.Receipt{Reply: "SES MessageId " + id}, nil
}

// markHanded sets *handed when the request is given to the HTTP client. It
// runs last in the deserialize step, so everything before it (endpoint
// resolution, signing) has succeeded and only the transmission is left:
// an error that comes back without handed set cannot have sent anything.
// The whole stack runs in the caller's goroutine, so no lock is needed.
func markHanded(handed *bool) func(*middleware.Stack) error {
	return func(s *middleware.Stack) error {
		return s.Deserialize.Add(middleware.DeserializeMiddlewareFunc("sendonceHandedToHTTP",
			func(ctx context.Context, in middleware.DeserializeInput, next middleware.DeserializeHandler) (middleware.DeserializeOutput, middleware.Metadata, error) {
				*handed = true
				return next.HandleDeserialize(ctx, in)
			}), middleware.After)
	}
}

// messageTags checks tags against SES's rules, so that a bad tag fails at
// startup instead of making SES refuse every email as a BadRequest.
func messageTags(m map[string]string) ([]types.MessageTag, error) {
	if len(m) == 0 {
		return nil, nil
	}
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	tags := make([]types.MessageTag, 0, len(m))
	for _, k := range names {
		v := m[k]
		if k == "" || !validTag(k) || !validTag(v) {
			return nil, fmt.Errorf("ses transport: tag %q=%q: SES allows only ASCII letters, digits, '_' and '-' in tag names and values, at most 256 of them, and no empty name", k, v)
		}
		tags = append(tags, types.MessageTag{Name: aws.String(k), Value: aws.String(v)})
	}
	return tags, nil
}

func validTag(s string) bool {
	if len(s) > 256 {
		return false
	}
	for _, c := range []byte(s) {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
		if !ok {
			return false
		}
	}
	return true
}
