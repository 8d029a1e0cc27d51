package sendonce

import (
	"bytes"
	"fmt"
	"mime"
	"net/mail"
	"strings"
	"time"
)

// Raw is a complete RFC 5322 message with its envelope, submitted as it is
// (an SMTP submission, a broker job carrying "raw"). sendonce changes it
// only where it must: line endings become CRLF, a missing Date or
// Message-ID is added (the Message-ID derived from tenant and key, like any
// other), and Bcc fields are removed so that no recipient sees them.
type Raw struct {
	// From is the envelope sender (MAIL FROM); "" is the null sender.
	From string
	// To are the envelope recipients (RCPT TO).
	To []string
	// Data is the message: header fields, a blank line, the body.
	Data []byte
}

// rawField names the fields of a raw submission in errors, as the JSON job
// format names them.
const (
	rawFieldData = "raw"
	rawFieldFrom = "mail_from"
	rawFieldTo   = "rcpt_to"
)

func parseAddrSpec(field, s string) (string, error) {
	a, err := parseAddr(field, s)
	if err != nil {
		return "", err
	}
	if a.Name != "" {
		return "", fieldErr(field, "%q has a display name; the envelope takes a bare address like user@example.com", s)
	}
	return a.Address, nil
}

// normalizeCRLF turns bare LF and bare CR into CRLF.
func normalizeCRLF(b []byte) []byte {
	if !bytes.ContainsAny(b, "\r\n") {
		return b
	}
	out := make([]byte, 0, len(b)+len(b)/32)
	for i := 0; i < len(b); i++ {
		switch c := b[i]; c {
		case '\r':
			out = append(out, '\r', '\n')
			if i+1 < len(b) && b[i+1] == '\n' {
				i++
			}
		case '\n':
			out = append(out, '\r', '\n')
		default:
			out = append(out, c)
		}
	}
	return out
}

// headerFields splits a header block (without the blank line) into fields,
// each with its continuation lines and its final CRLF.
func headerFields(h []byte) [][]byte {
	var fields [][]byte
	for len(h) > 0 {
		end := bytes.Index(h, []byte("\r\n"))
		if end < 0 {
			end = len(h)
		} else {
			end += 2
		}
		if len(fields) > 0 && (h[0] == ' ' || h[0] == '\t') {
			fields[len(fields)-1] = append(fields[len(fields)-1], h[:end]...)
		} else {
			fields = append(fields, append([]byte(nil), h[:end]...))
		}
		h = h[end:]
	}
	return fields
}

func fieldName(f []byte) string {
	i := bytes.IndexByte(f, ':')
	if i < 0 {
		return ""
	}
	return strings.ToLower(strings.TrimSpace(string(f[:i])))
}

// preparedRaw is a validated raw submission.
type preparedRaw struct {
	from        string
	to          []string
	data        []byte // normalized, before Date/Message-ID are added
	header      mail.Header
	fields      [][]byte
	body        []byte
	fingerprint string
}

func prepareRaw(r *Raw, maxBytes int) (*preparedRaw, error) {
	p := &preparedRaw{}
	if r.From != "" {
		a, err := parseAddrSpec(rawFieldFrom, r.From)
		if err != nil {
			return nil, err
		}
		p.from = a
	}
	if len(r.To) == 0 {
		return nil, fieldErr(rawFieldTo, "no recipient; give at least one envelope recipient")
	}
	if len(r.To) > MaxRecipients {
		return nil, fieldErr(rawFieldTo, "%d recipients; the maximum is %d per email", len(r.To), MaxRecipients)
	}
	seen := map[string]bool{}
	for i, s := range r.To {
		a, err := parseAddrSpec(fmt.Sprintf("%s[%d]", rawFieldTo, i), s)
		if err != nil {
			return nil, err
		}
		if k := strings.ToLower(a); !seen[k] {
			seen[k] = true
			p.to = append(p.to, a)
		}
	}
	if len(r.Data) == 0 {
		return nil, fieldErr(rawFieldData, "the message is empty; give a complete RFC 5322 message (header fields, a blank line, the body)")
	}
	if len(r.Data) > maxBytes {
		return nil, fmt.Errorf("%w: the message is %d bytes; the limit is %d", ErrTooLarge, len(r.Data), maxBytes)
	}
	p.data = normalizeCRLF(r.Data)
	msg, err := mail.ReadMessage(bytes.NewReader(p.data))
	if err != nil {
		return nil, fieldErr(rawFieldData, "is not an RFC 5322 message (%v); it needs header fields such as From and Subject, a blank line, then the body", err)
	}
	p.header = msg.Header
	if msg.Header.Get("From") == "" {
		return nil, fieldErr(rawFieldData, "the message has no From header field; RFC 5322 requires one")
	}
	split := bytes.Index(p.data, []byte("\r\n\r\n"))
	var head []byte
	if split < 0 { // header only, no body
		head, p.body = p.data, nil
		if !bytes.HasSuffix(head, []byte("\r\n")) {
			head = append(head, '\r', '\n')
		}
	} else {
		head, p.body = p.data[:split+2], p.data[split+4:]
	}
	p.fields = headerFields(head)
	if id := msg.Header.Get("Message-Id"); id != "" {
		if !strings.HasPrefix(strings.TrimSpace(id), "<") || !strings.HasSuffix(strings.TrimSpace(id), ">") || strings.ContainsAny(strings.TrimSpace(id), " \t") {
			return nil, fieldErr(rawFieldData, "the Message-ID %q is not of the form <id@domain>; fix it or leave it out and sendonce derives one from the key", id)
		}
	}
	// The same content rebuilt for a retry (new Date, Message-ID, MIME
	// boundary) is the same email, not a key reused for another one.
	p.fingerprint = "raw2:" + ContentFingerprint(p.from, p.to, p.header, p.body)
	return p, nil
}

// render returns the message to store and its Message-ID: Bcc removed, a
// Date and Message-ID added where missing.
func (p *preparedRaw) render(derivedID string, now time.Time) ([]byte, string) {
	var out bytes.Buffer
	out.Grow(len(p.data) + 128)
	mid := strings.TrimSpace(p.header.Get("Message-Id"))
	if mid == "" {
		mid = derivedID
		out.WriteString("Message-ID: " + mid + "\r\n")
	}
	if p.header.Get("Date") == "" {
		out.WriteString("Date: " + now.Format(time.RFC1123Z) + "\r\n")
	}
	for _, f := range p.fields {
		if fieldName(f) == "bcc" {
			continue
		}
		out.Write(f)
	}
	out.WriteString("\r\n")
	out.Write(p.body)
	return out.Bytes(), mid
}

// subject decodes the Subject field for listing.
func (p *preparedRaw) subject() string {
	s := p.header.Get("Subject")
	if d, err := new(mime.WordDecoder).DecodeHeader(s); err == nil {
		return d
	}
	return s
}
