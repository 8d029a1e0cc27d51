package source

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"

	"github.com/sendonce/sendonce"
)

// JobVersion is the version of the job format this package reads. A job
// may say so with "version": 1; any other version is refused, so that a
// producer written for a later format is told instead of misread.
const JobVersion = 1

// FingerprintPrefix starts every key derived from a job's content.
const FingerprintPrefix = "job-sha256:"

// Job is one message of a broker: an email (the fields of the HTTP API) or
// a raw RFC 5322 message with its envelope, and optionally its idempotency
// key. Producers written in Go can json.Marshal a Job to get a valid body.
//
// There is deliberately no tenant: the tenant is set by the source's
// configuration, so that a job cannot write into another tenant's keys.
type Job struct {
	Version int    `json:"version,omitempty"`
	Key     string `json:"key,omitempty"`
	sendonce.Email
	// Raw is the message; in JSON, base64 (RFC 4648 §4, line breaks
	// allowed).
	Raw      []byte   `json:"raw,omitempty"`
	MailFrom string   `json:"mail_from,omitempty"`
	RcptTo   []string `json:"rcpt_to,omitempty"`
}

// field returns where the JSON field name is decoded to, or nil when the
// job has no such field. It is the one list of accepted fields; a test
// holds it, the struct tags and docs/job.schema.json equal.
func (j *Job) field(name string) any {
	switch name {
	case "version":
		return &j.Version
	case "key":
		return &j.Key
	case "from":
		return &j.From
	case "to":
		return &j.To
	case "cc":
		return &j.Cc
	case "bcc":
		return &j.Bcc
	case "reply_to":
		return &j.ReplyTo
	case "subject":
		return &j.Subject
	case "text":
		return &j.Text
	case "html":
		return &j.HTML
	case "headers":
		return &j.Headers
	case "tags":
		return &j.Tags
	case "raw":
		return &j.Raw
	case "mail_from":
		return &j.MailFrom
	case "rcpt_to":
		return &j.RcptTo
	}
	return nil
}

// emailFields are the fields of an email job, in the order errors check
// them.
func emailFields() [10]string {
	return [...]string{"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers", "tags"}
}

// hasEmail reports whether any email field of j is set.
func (j *Job) hasEmail() (field string, ok bool) {
	for _, f := range emailFields() {
		if !isEmpty(j.field(f)) {
			return f, true
		}
	}
	return "", false
}

// JobError says what is wrong with a job and how to fix it. Field is the
// JSON field ("to[1]", "headers.X-Campaign"), the broker attribute that
// gave the key ("idempotency_key", "MessageDeduplicationId"), or "" when
// the body as a whole is not a job.
type JobError struct {
	Field  string
	Reason string
}

func (e *JobError) Error() string {
	if e.Field == "" {
		return "job: " + e.Reason
	}
	return "job: " + e.Field + ": " + e.Reason
}

func jobErr(field, format string, args ...any) *JobError {
	return &JobError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// KeyHints are idempotency keys that a broker carries beside the body.
// ParseJob uses them, in this order, when the job has no "key".
type KeyHints struct {
	// Attribute is the message attribute (header) "idempotency_key".
	Attribute string
	// DedupID is the broker's own deduplication ID, such as the SQS FIFO
	// MessageDeduplicationId.
	DedupID string
	// DedupName names DedupID in errors. Default "dedup_id".
	DedupName string
}

// ParseJob decodes and checks a job, and derives its idempotency key: the
// job's "key"; else hints.Attribute; else hints.DedupID; else
// FingerprintPrefix + the hex SHA-256 of the job's canonical JSON (see
// Fingerprint). The Submission has no Tenant and no Source: the caller
// sets both from its configuration.
//
// Every error is a *JobError naming the field and the fix. An email job
// is validated completely here; a raw job's message and envelope
// addresses are checked at admission, which answers with a
// *sendonce.FieldError named the same way.
func ParseJob(body []byte, hints KeyHints) (sendonce.Submission, error) {
	j, present, err := decodeJob(body)
	if err != nil {
		return sendonce.Submission{}, err
	}
	if present["version"] && j.Version != JobVersion {
		return sendonce.Submission{}, jobErr("version", "version %d is not supported; this sendonce reads version %d jobs: set \"version\": %d or leave the field out", j.Version, JobVersion, JobVersion)
	}
	var sub sendonce.Submission
	if present["raw"] {
		if f, ok := j.hasEmail(); ok {
			return sendonce.Submission{}, jobErr(f, "a raw job carries the whole message in \"raw\"; remove %q, or remove \"raw\", \"mail_from\" and \"rcpt_to\" to send an email job", f)
		}
		if len(j.Raw) == 0 {
			return sendonce.Submission{}, jobErr("raw", "is empty; give the base64 of a complete RFC 5322 message (header fields, a blank line, the body)")
		}
		if len(j.RcptTo) == 0 {
			return sendonce.Submission{}, jobErr("rcpt_to", "a raw job needs its envelope recipients: give \"rcpt_to\": [\"user@example.com\"]")
		}
		sub.Raw = &sendonce.Raw{From: j.MailFrom, To: j.RcptTo, Data: j.Raw}
	} else {
		if present["mail_from"] || present["rcpt_to"] {
			f := "mail_from"
			if !present[f] {
				f = "rcpt_to"
			}
			return sendonce.Submission{}, jobErr(f, "is the envelope of a raw job and needs \"raw\"; for an email job give the recipients in \"to\", \"cc\" or \"bcc\"")
		}
		if _, ok := j.hasEmail(); !ok {
			return sendonce.Submission{}, jobErr("from", "the job holds no email: give \"from\", \"to\" and \"subject\" (an email job) or \"raw\" and \"rcpt_to\" (a raw job); see docs/jobs.md")
		}
		if err := j.Email.Validate(); err != nil {
			var fe *sendonce.FieldError
			if errors.As(err, &fe) {
				return sendonce.Submission{}, &JobError{Field: fe.Field, Reason: fe.Message}
			}
			return sendonce.Submission{}, jobErr("", "%v", err)
		}
		sub.Email = j.Email
	}
	key, err := deriveKey(&j, present["key"], hints)
	if err != nil {
		return sendonce.Submission{}, err
	}
	sub.Key = key
	return sub, nil
}

func deriveKey(j *Job, explicit bool, h KeyHints) (string, error) {
	var field, key string
	switch {
	case explicit:
		field, key = "key", j.Key
	case h.Attribute != "":
		field, key = "idempotency_key", h.Attribute
	case h.DedupID != "":
		field, key = h.DedupName, h.DedupID
		if field == "" {
			field = "dedup_id"
		}
	default:
		return Fingerprint(j), nil
	}
	if err := sendonce.ValidateKey(key); err != nil {
		var fe *sendonce.FieldError
		if errors.As(err, &fe) {
			return "", &JobError{Field: field, Reason: fe.Message}
		}
		return "", &JobError{Field: field, Reason: err.Error()}
	}
	return key, nil
}

// Fingerprint is the key of a job that names none: FingerprintPrefix + the
// hex SHA-256 of the job re-encoded as JSON without "key" and "version".
// Re-encoding makes it canonical: object keys sorted, whitespace and field
// order of the original body gone, empty fields left out, "raw" as
// standard base64. Two identical jobs therefore are one email, for as long
// as the ledger keeps the key (the retention window): exactly the
// redelivered cron task of the incident that sendonce exists for. A
// producer that means to send the same content twice must give each job
// its own "key".
func Fingerprint(j *Job) string {
	canon := Job{Email: j.Email, Raw: j.Raw, MailFrom: j.MailFrom, RcptTo: j.RcptTo}
	b, err := json.Marshal(canon)
	if err != nil {
		// Strings, byte slices and maps of strings always encode.
		panic(fmt.Sprintf("source: encoding a job: %v", err))
	}
	sum := sha256.Sum256(b)
	return FingerprintPrefix + hex.EncodeToString(sum[:])
}

// decodeJob reads one JSON object field by field, so that every problem is
// reported with its field: an unknown or misspelt name, a name given twice
// (encoding/json would keep the last silently), a value of the wrong type.
// Names are matched exactly, unlike encoding/json's case-insensitive match.
func decodeJob(body []byte) (Job, map[string]bool, error) {
	var j Job
	present := map[string]bool{}
	dec := json.NewDecoder(bytes.NewReader(body))
	tok, err := dec.Token()
	if err != nil {
		return j, nil, notJSON(body, err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return j, nil, jobErr("", "the body is JSON but not an object; send one object like {\"from\": ..., \"to\": [...], \"subject\": ...}, see docs/jobs.md")
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return j, nil, notJSON(body, err)
		}
		name, _ := tok.(string) // inside an object the decoder yields only string keys here
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return j, nil, notJSON(body, err)
		}
		dst := j.field(name)
		if dst == nil {
			return j, nil, unknownField(name)
		}
		if present[name] {
			return j, nil, jobErr(name, "appears twice; give each field once")
		}
		present[name] = true
		if err := json.Unmarshal(raw, dst); err != nil {
			return j, nil, badValue(name, dst, err)
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return j, nil, notJSON(body, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return j, nil, jobErr("", "the body has data after the JSON object; send exactly one object per message")
	}
	return j, present, nil
}

func notJSON(body []byte, err error) *JobError {
	if len(bytes.TrimSpace(body)) == 0 {
		return jobErr("", "the body is empty; send a JSON job, see docs/jobs.md")
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return jobErr("", "the body is not valid JSON (%v at byte %d); send one JSON object, see docs/jobs.md", err, se.Offset)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return jobErr("", "the JSON body ends too early; check the brackets and quotes")
	}
	return jobErr("", "the body is not valid JSON (%v); send one JSON object, see docs/jobs.md", err)
}

func unknownField(name string) *JobError {
	switch name {
	case "tenant":
		return jobErr(name, "a job cannot choose its tenant: the source's configuration sets it, so that no producer can write into another tenant's keys; remove the field")
	case "idempotency_key", "idempotency-key", "Idempotency-Key":
		return jobErr(name, "unknown field; the idempotency key of a job is \"key\"")
	}
	var probe Job
	if low := strings.ToLower(name); low != name && probe.field(low) != nil {
		return jobErr(name, "unknown field; field names are lower case: did you mean %q?", low)
	}
	return jobErr(name, "unknown field; a job has the fields version, key, from, to, cc, bcc, reply_to, subject, text, html, headers, tags, or raw, mail_from, rcpt_to (see docs/jobs.md)")
}

func badValue(name string, dst any, err error) *JobError {
	var ce base64.CorruptInputError
	if errors.As(err, &ce) {
		return jobErr(name, "is not valid base64 (bad data at byte %d); encode the whole RFC 5322 message with standard base64", int64(ce))
	}
	want := "a string"
	switch dst.(type) {
	case *int:
		want = fmt.Sprintf("the number %d", JobVersion)
	case *[]string:
		want = "an array of strings"
	case *map[string]string:
		want = "an object whose values are strings"
	case *[]byte:
		want = "a base64 string"
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return jobErr(name, "must be %s, not %s", want, te.Value)
	}
	return jobErr(name, "must be %s (%v)", want, err)
}

// isEmpty reports whether the value p points to is its zero value or an
// empty slice or map.
func isEmpty(p any) bool {
	v := reflect.ValueOf(p).Elem()
	switch v.Kind() {
	case reflect.Slice, reflect.Map, reflect.String:
		return v.Len() == 0
	}
	return v.IsZero()
}
