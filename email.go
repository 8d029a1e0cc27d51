package sendonce

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/mail"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	gomail "github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"
)

// Email is one email as callers describe it. Only From, at least one
// recipient (To, Cc or Bcc) and Subject are required.
type Email struct {
	From    string            `json:"from"`
	To      []string          `json:"to,omitempty"`
	Cc      []string          `json:"cc,omitempty"`
	Bcc     []string          `json:"bcc,omitempty"`
	ReplyTo string            `json:"reply_to,omitempty"`
	Subject string            `json:"subject"`
	Text    string            `json:"text,omitempty"`
	HTML    string            `json:"html,omitempty"`
	Headers map[string]string `json:"headers,omitempty"`
	Tags    map[string]string `json:"tags,omitempty"`
}

// Limits on an Email.
const (
	MaxRecipients  = 1000
	MaxSubjectLen  = 998 // RFC 5322 §2.1.1 line limit
	MaxHeaders     = 100
	MaxHeaderValue = 4096
	MaxTags        = 32
	MaxTagLen      = 256
)

// reservedHeaders are set by sendonce from the Email's fields; a caller who
// passes them in Headers gets told which field to use instead.
var reservedHeaders = map[string]string{
	"from":                      "use the \"from\" field",
	"to":                        "use the \"to\" field",
	"cc":                        "use the \"cc\" field",
	"bcc":                       "use the \"bcc\" field",
	"reply-to":                  "use the \"reply_to\" field",
	"subject":                   "use the \"subject\" field",
	"message-id":                "sendonce derives the Message-ID from the idempotency key so every attempt carries the same one; remove it",
	"date":                      "sendonce sets Date to the time the email was accepted; remove it",
	"mime-version":              "sendonce sets it; remove it",
	"content-type":              "use the \"text\" and \"html\" fields",
	"content-transfer-encoding": "sendonce chooses the encoding; remove it",
}

// normalized is an Email whose addresses are parsed.
type normalized struct {
	Email
	from    *mail.Address
	to      []*mail.Address
	cc      []*mail.Address
	bcc     []*mail.Address
	replyTo []*mail.Address
}

func (e *Email) isZero() bool {
	return e.From == "" && len(e.To) == 0 && len(e.Cc) == 0 && len(e.Bcc) == 0 && e.ReplyTo == "" &&
		e.Subject == "" && e.Text == "" && e.HTML == "" && len(e.Headers) == 0 && len(e.Tags) == 0
}

// Validate checks e and returns a *FieldError naming the first problem.
func (e *Email) Validate() error {
	_, err := e.normalize()
	return err
}

func parseAddr(field, s string) (*mail.Address, error) {
	if strings.ContainsAny(s, "\r\n") {
		return nil, fieldErr(field, "contains a line break (CR or LF); an address must be on one line")
	}
	if strings.TrimSpace(s) == "" {
		return nil, fieldErr(field, "is empty; give an address like \"Ann <ann@example.com>\" or \"ann@example.com\"")
	}
	a, err := mail.ParseAddress(s)
	if err != nil {
		return nil, fieldErr(field, "%q is not a valid email address (%v); use \"Name <user@example.com>\" or \"user@example.com\"", s, err)
	}
	at := strings.LastIndexByte(a.Address, '@')
	if at <= 0 || at == len(a.Address)-1 {
		return nil, fieldErr(field, "%q has no domain; use user@example.com", s)
	}
	if len(a.Address) > 254 {
		return nil, fieldErr(field, "the address is %d bytes long; the maximum is 254 (RFC 5321)", len(a.Address))
	}
	for _, c := range []byte(a.Address) {
		if c < 0x21 || c > 0x7e {
			return nil, fieldErr(field, "%q contains a character that is not printable ASCII; internationalised addresses are not supported yet", a.Address)
		}
	}
	return a, nil
}

func parseList(field string, in []string) ([]*mail.Address, error) {
	out := make([]*mail.Address, 0, len(in))
	for i, s := range in {
		a, err := parseAddr(fmt.Sprintf("%s[%d]", field, i), s)
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, nil
}

func isHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 33 || c > 126 || c == ':' {
			return false
		}
	}
	return true
}

func (e *Email) normalize() (*normalized, error) {
	n := &normalized{Email: *e}
	var err error
	if n.from, err = parseAddr("from", e.From); err != nil {
		return nil, err
	}
	if n.to, err = parseList("to", e.To); err != nil {
		return nil, err
	}
	if n.cc, err = parseList("cc", e.Cc); err != nil {
		return nil, err
	}
	if n.bcc, err = parseList("bcc", e.Bcc); err != nil {
		return nil, err
	}
	total := len(n.to) + len(n.cc) + len(n.bcc)
	if total == 0 {
		return nil, fieldErr("to", "no recipient; give at least one address in \"to\", \"cc\" or \"bcc\"")
	}
	if total > MaxRecipients {
		return nil, fieldErr("to", "%d recipients; the maximum is %d per email", total, MaxRecipients)
	}
	if e.ReplyTo != "" {
		a, err := parseAddr("reply_to", e.ReplyTo)
		if err != nil {
			return nil, err
		}
		n.replyTo = []*mail.Address{a}
	}
	if strings.TrimSpace(e.Subject) == "" {
		return nil, fieldErr("subject", "is required; give the email a subject")
	}
	if strings.ContainsAny(e.Subject, "\r\n") {
		return nil, fieldErr("subject", "contains a line break (CR or LF), which would let it inject headers; put the subject on one line")
	}
	if len(e.Subject) > MaxSubjectLen {
		return nil, fieldErr("subject", "is %d bytes long; the maximum is %d", len(e.Subject), MaxSubjectLen)
	}
	for _, f := range [...]struct{ name, value string }{{"subject", e.Subject}, {"text", e.Text}, {"html", e.HTML}} {
		if !utf8.ValidString(f.value) {
			return nil, fieldErr(f.name, "is not valid UTF-8")
		}
	}
	if len(e.Headers) > MaxHeaders {
		return nil, fieldErr("headers", "%d headers; the maximum is %d", len(e.Headers), MaxHeaders)
	}
	for _, name := range sortedKeys(e.Headers) {
		field := "headers." + name
		if !isHeaderName(name) {
			return nil, fieldErr(field, "%q is not a valid header name; use printable ASCII without spaces or colons, like X-Campaign", name)
		}
		if why, ok := reservedHeaders[strings.ToLower(name)]; ok {
			return nil, fieldErr(field, "cannot be set as an extra header: %s", why)
		}
		v := e.Headers[name]
		if strings.ContainsAny(v, "\r\n") {
			return nil, fieldErr(field, "the value contains a line break (CR or LF), which would let it inject headers; put it on one line")
		}
		if len(v) > MaxHeaderValue {
			return nil, fieldErr(field, "the value is %d bytes long; the maximum is %d", len(v), MaxHeaderValue)
		}
		if !utf8.ValidString(v) {
			return nil, fieldErr(field, "the value is not valid UTF-8")
		}
	}
	if len(e.Tags) > MaxTags {
		return nil, fieldErr("tags", "%d tags; the maximum is %d", len(e.Tags), MaxTags)
	}
	for _, k := range sortedKeys(e.Tags) {
		if k == "" || len(k) > 64 || strings.ContainsAny(k, "\r\n\x00") {
			return nil, fieldErr("tags."+k, "a tag name must be 1 to 64 characters without line breaks")
		}
		if v := e.Tags[k]; len(v) > MaxTagLen || strings.ContainsAny(v, "\r\n\x00") {
			return nil, fieldErr("tags."+k, "a tag value must be at most %d characters without line breaks", MaxTagLen)
		}
	}
	return n, nil
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// Fingerprint is the canonical hash of the email's payload: two submissions
// under one key are the same email exactly when their fingerprints match.
// Addresses are compared in their parsed form, so "ann@example.com" and
// "<ann@example.com>" are the same; header names are case-insensitive.
func (e *Email) Fingerprint() (string, error) {
	n, err := e.normalize()
	if err != nil {
		return "", err
	}
	return n.fingerprint(), nil
}

func (n *normalized) fingerprint() string {
	addrs := func(l []*mail.Address) []string {
		out := make([]string, len(l))
		for i, a := range l {
			out[i] = a.String()
		}
		return out
	}
	headers := make(map[string]string, len(n.Headers))
	for k, v := range n.Headers {
		headers[strings.ToLower(k)] = v
	}
	canon := struct {
		From    string            `json:"from"`
		To      []string          `json:"to"`
		Cc      []string          `json:"cc"`
		Bcc     []string          `json:"bcc"`
		ReplyTo []string          `json:"reply_to"`
		Subject string            `json:"subject"`
		Text    string            `json:"text"`
		HTML    string            `json:"html"`
		Headers map[string]string `json:"headers"`
		Tags    map[string]string `json:"tags"`
	}{n.from.String(), addrs(n.to), addrs(n.cc), addrs(n.bcc), addrs(n.replyTo), n.Subject, n.Text, n.HTML, headers, n.Tags}
	b, _ := json.Marshal(canon) // cannot fail: strings and maps of strings
	sum := sha256.Sum256(b)
	return "v1:" + hex.EncodeToString(sum[:])
}

func toGoMessage(l []*mail.Address) []*gomail.Address {
	out := make([]*gomail.Address, len(l))
	for i, a := range l {
		out[i] = &gomail.Address{Name: a.Name, Address: a.Address}
	}
	return out
}

// render writes the RFC 5322 message. It is called once, at admission; the
// stored bytes are what every attempt sends.
func (n *normalized) render(messageID string, date time.Time) ([]byte, error) {
	// go-message writes header fields in the reverse order of setting
	// them; set them last-first so the message reads Date, From, To, ...
	var h gomail.Header
	extra := sortedKeys(n.Headers)
	for i := len(extra) - 1; i >= 0; i-- {
		h.SetText(extra[i], n.Headers[extra[i]])
	}
	h.SetMessageID(strings.Trim(messageID, "<>"))
	h.SetSubject(n.Subject)
	if len(n.replyTo) > 0 {
		h.SetAddressList("Reply-To", toGoMessage(n.replyTo))
	}
	if len(n.cc) > 0 {
		h.SetAddressList("Cc", toGoMessage(n.cc))
	}
	if len(n.to) > 0 {
		h.SetAddressList("To", toGoMessage(n.to))
	}
	h.SetAddressList("From", toGoMessage([]*mail.Address{n.from}))
	h.SetDate(date)
	var buf bytes.Buffer
	// encode decides a body's transfer encoding once, on the body as it
	// will be written (ending with a line break, RFC 5322 §2.3). Short
	// ASCII lines go as 7bit, readable and without the cost of
	// quoted-printable (a sixth of an admission's CPU for a 4 KiB body),
	// with CRLF line ends since no encoder will add them; anything else
	// keeps go-message's quoted-printable.
	encode := func(s string) (cte, body string) {
		if !strings.HasSuffix(s, "\n") {
			s += "\n"
		}
		if plain7bit(s) {
			return "7bit", crlf(s)
		}
		return "quoted-printable", s
	}
	part := func(w io.WriteCloser, body string) error {
		if _, err := io.WriteString(w, body); err != nil {
			return err
		}
		return w.Close()
	}
	switch {
	case n.HTML != "" && n.Text != "":
		w, err := gomail.CreateInlineWriter(&buf, h)
		if err != nil {
			return nil, err
		}
		for _, p := range []struct{ ct, body string }{{"text/plain", n.Text}, {"text/html", n.HTML}} {
			cte, body := encode(p.body)
			var ph gomail.InlineHeader
			ph.SetContentType(p.ct, map[string]string{"charset": "utf-8"})
			ph.Set("Content-Transfer-Encoding", cte)
			pw, err := w.CreatePart(ph)
			if err != nil {
				return nil, err
			}
			if err := part(pw, body); err != nil {
				return nil, err
			}
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
	default:
		ct, body := "text/plain", n.Text
		if n.HTML != "" {
			ct, body = "text/html", n.HTML
		}
		cte, body := encode(body)
		h.SetContentType(ct, map[string]string{"charset": "utf-8"})
		h.Set("Content-Transfer-Encoding", cte)
		if cte == "7bit" && renderDirect {
			// What CreateSingleInlineWriter writes, without its 7bit line
			// wrapper copying the body line by line: plain7bit has already
			// checked every line's length.
			if !h.Has("Mime-Version") {
				h.Set("MIME-Version", "1.0")
			}
			buf.Grow(len(body) + 1024)
			if err := textproto.WriteHeader(&buf, h.Header.Header); err != nil {
				return nil, err
			}
			buf.WriteString(body)
			return buf.Bytes(), nil
		}
		w, err := gomail.CreateSingleInlineWriter(&buf, h)
		if err != nil {
			return nil, err
		}
		if err := part(w, body); err != nil {
			return nil, err
		}
	}
	return buf.Bytes(), nil
}

// renderDirect lets render write a single 7bit part itself; a test turns
// it off to check the bytes against go-message's writer.
var renderDirect = true

// plain7bit reports whether s can be sent as 7bit (RFC 2045 §2.7): ASCII
// without NUL or a lone CR, every line at most 998 bytes, and no line
// ending in white space (which some relays strip, changing the body).
func plain7bit(s string) bool {
	line := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 0x80 || c == 0:
			return false
		case c == '\r':
			if i+1 >= len(s) || s[i+1] != '\n' {
				return false
			}
		case c == '\n':
			if j := i - 1; j >= 0 && s[j] == '\r' {
				j--
				if j >= 0 && (s[j] == ' ' || s[j] == '\t') {
					return false
				}
			} else if j >= 0 && (s[j] == ' ' || s[j] == '\t') {
				return false
			}
			line = 0
			continue
		}
		if line++; line > 998 {
			return false
		}
	}
	return true
}

// crlf returns s with every line ending CRLF; s has no lone CR. It copies
// whole lines, not bytes: it runs on every body at admission.
func crlf(s string) string {
	n := strings.Count(s, "\n") - strings.Count(s, "\r\n")
	if n == 0 {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + n)
	for {
		i := strings.IndexByte(s, '\n')
		if i < 0 {
			b.WriteString(s)
			return b.String()
		}
		if i > 0 && s[i-1] == '\r' {
			b.WriteString(s[:i+1])
		} else {
			b.WriteString(s[:i])
			b.WriteString("\r\n")
		}
		s = s[i+1:]
	}
}

// recipients is the envelope: every To, Cc and Bcc address, each once.
func (n *normalized) recipients() []string {
	seen := make(map[string]bool)
	var out []string
	for _, l := range [][]*mail.Address{n.to, n.cc, n.bcc} {
		for _, a := range l {
			k := strings.ToLower(a.Address)
			if !seen[k] {
				seen[k] = true
				out = append(out, a.Address)
			}
		}
	}
	return out
}

func domainOf(addr string) string {
	if i := strings.LastIndexByte(addr, '@'); i >= 0 {
		return strings.ToLower(addr[i+1:])
	}
	return ""
}
