package ses

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"

	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/sendonce/sendonce/transport"
)

// codeKinds classifies the error codes SES (and the AWS front end before
// it) answers SendEmail with. The package documentation says why each is
// what it is; a code not listed here is classified by its HTTP status.
var codeKinds = map[string]transport.Kind{
	// Throttling and quotas: SES refused the request.
	"TooManyRequestsException":  transport.Temporary,
	"ThrottlingException":       transport.Temporary,
	"Throttling":                transport.Temporary,
	"ThrottledException":        transport.Temporary,
	"RequestThrottled":          transport.Temporary,
	"RequestThrottledException": transport.Temporary,
	"SlowDown":                  transport.Temporary,
	"LimitExceededException":    transport.Temporary,

	// The account, not the message.
	"SendingPausedException":    transport.Temporary,
	"AccountSuspendedException": transport.Temporary,

	// Our credentials, permissions or clock, not the message.
	"AccessDeniedException":               transport.Temporary,
	"AccessDenied":                        transport.Temporary,
	"UnrecognizedClientException":         transport.Temporary,
	"InvalidSignatureException":           transport.Temporary,
	"SignatureDoesNotMatch":               transport.Temporary,
	"IncompleteSignature":                 transport.Temporary,
	"MissingAuthenticationToken":          transport.Temporary,
	"MissingAuthenticationTokenException": transport.Temporary,
	"InvalidClientTokenId":                transport.Temporary,
	"ExpiredToken":                        transport.Temporary,
	"ExpiredTokenException":               transport.Temporary,
	"RequestExpired":                      transport.Temporary,
	"RequestTimeTooSkewed":                transport.Temporary,

	// SES did not get the whole request.
	"RequestTimeout":          transport.Temporary,
	"RequestTimeoutException": transport.Temporary,

	// SES answered that it failed.
	"InternalFailure":               transport.Temporary,
	"InternalServiceErrorException": transport.Temporary,
	"InternalServerError":           transport.Temporary,
	"ServiceUnavailable":            transport.Temporary,
	"ServiceUnavailableException":   transport.Temporary,

	// SES refused this message.
	"MessageRejected":                    transport.Permanent,
	"MailFromDomainNotVerifiedException": transport.Permanent,
	"BadRequestException":                transport.Permanent,
	"NotFoundException":                  transport.Permanent,
}

// hints name the fix for the errors an operator, not a retry, must solve.
var hints = map[string]string{
	"SendingPausedException":      "sending is paused for this account or configuration set; resume it in SES",
	"AccountSuspendedException":   "the SES account is suspended; AWS must reinstate it",
	"AccessDeniedException":       "the credentials may not call ses:SendEmail for this identity",
	"UnrecognizedClientException": "the access key is unknown to AWS",
	"InvalidSignatureException":   "the secret key does not match the access key",
	"SignatureDoesNotMatch":       "the secret key does not match the access key",
	"InvalidClientTokenId":        "the access key is unknown to AWS",
	"ExpiredToken":                "the session token has expired",
	"ExpiredTokenException":       "the session token has expired",
	"RequestExpired":              "this machine's clock is wrong",
	"RequestTimeTooSkewed":        "this machine's clock is wrong",
}

// classify turns a failed SendEmail into a *transport.Error. handed says
// whether the request reached the HTTP client; see markHanded.
func classify(err error, handed bool) error {
	// The SDK wraps every error of the deserialize step in a ResponseError,
	// even a failed transmission, with an empty response whose status is 0:
	// only a non-zero status is an answer.
	status := 0
	var re *smithyhttp.ResponseError
	if errors.As(err, &re) {
		status = re.HTTPStatusCode()
	}
	code := ""
	var ae smithy.APIError
	if errors.As(err, &ae) {
		code = ae.ErrorCode()
	}

	if status == 0 && code == "" {
		switch {
		case !handed:
			return transport.Wrap(transport.Temporary, "request", 0, fmt.Errorf("ses transport: request not sent: %w", err))
		case notConnected(err):
			return transport.Wrap(transport.Temporary, "connect", 0, fmt.Errorf("ses transport: could not connect to SES, request not sent: %w", err))
		}
		return transport.Wrap(transport.Ambiguous, "request", 0, fmt.Errorf("ses transport: no answer from SES, which may have the message: %w", err))
	}

	kind, known := codeKinds[code]
	if !known {
		kind = statusKind(status)
	}
	if kind == transport.Ambiguous {
		return transport.Wrap(kind, "request", status, fmt.Errorf("ses transport: an answer that does not tell whether SES has the message: %w", err))
	}
	if h, ok := hints[code]; ok {
		return transport.Wrap(kind, "request", status, fmt.Errorf("ses transport: %s: %w", h, err))
	}
	return transport.Wrap(kind, "request", status, fmt.Errorf("ses transport: %w", err))
}

// statusKind classifies an answer by its HTTP status alone.
func statusKind(status int) transport.Kind {
	switch {
	case status/100 == 2:
		// Accepted, but the body could not be read: no MessageId.
		return transport.Ambiguous
	case status == 408, status == 429, status == 401, status == 403:
		return transport.Temporary
	case status == 502, status == 504:
		// A gateway speaking for SES: it may have passed the request on.
		return transport.Ambiguous
	case status/100 == 5:
		return transport.Temporary
	case status/100 == 4:
		return transport.Permanent
	}
	return transport.Ambiguous
}

// notConnected reports whether err shows that no connection to SES was
// made: then not one byte of the request was written. Go's HTTP client
// retries a POST on a fresh connection only when nothing was written on the
// stale one, so a dial error here is never the second half of a request
// that left.
func notConnected(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && (op.Op == "dial" || op.Op == "proxyconnect") {
		return true
	}
	var dns *net.DNSError
	if errors.As(err, &dns) {
		return true
	}
	// Certificate checks happen in the TLS handshake, before the request.
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	return errors.As(err, &cv) || errors.As(err, &ua) || errors.As(err, &he) || errors.As(err, &ci)
}
