package smtpd

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"mime"
	"net/mail"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/sendonce/sendonce"
)

// KeyHeaderField is the header field that carries an explicit idempotency key.
const KeyHeaderField = "X-Idempotency-Key"

// message is a submitted message as key derivation reads it. The bytes
// themselves are submitted as received.
type message struct {
	header mail.Header
	data   []byte // the message with CRLF line endings
	body   []byte // the part of data after the header
}

// contentError is the 550 5.6.0 reply to a message that is not one.
func contentError(format string, args ...any) *smtp.SMTPError {
	return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: oneLine(fmt.Sprintf(format, args...))}
}

// parseMessage checks what go-smtp lets through and the ledger would only
// repair or half-accept, and returns the message with CRLF line endings:
//
//   - NUL bytes (RFC 5322 forbids them).
//   - Line endings: all CRLF, as SMTP requires, or all bare LF, which some
//     clients send (Python's smtplib given bytes) and which are turned into
//     CRLF, as Postfix does by default. A bare CR, or a bare LF among CRLF
//     lines, is refused: that is how a header injection ("Subject:
//     hi<CR>Bcc: ...") and SMTP smuggling look. The end of DATA is only ever
//     CRLF.CRLF (go-smtp), and the transport dot-stuffs the stored message
//     again, so a normalized "<LF>.<LF>" cannot end a message downstream.
//   - Lines over maxLine bytes with their CRLF (go-smtp's own limit is a
//     looser backstop, and does not apply to BDAT).
//   - A header that net/mail cannot read, or without From.
//
// Every error is a *smtp.SMTPError with code 550 5.6.0.
func parseMessage(data []byte, maxLine int) (*message, error) {
	if len(data) == 0 {
		return nil, contentError("the message is empty; send header fields (From, To, Subject), a blank line, then the body")
	}
	// The CRLF before the final dot is SMTP's, whatever the client's own
	// line endings are (Python's smtplib adds it to an LF-only message).
	core := bytes.TrimSuffix(data, []byte("\r\n"))
	line, crlf, bareLF, firstLF := 1, 0, 0, 0
	for i := 0; i < len(core); i++ {
		switch core[i] {
		case 0:
			return nil, contentError("line %d has a NUL byte; RFC 5322 forbids them: encode binary content (base64)", line)
		case '\r':
			if i+1 >= len(data) || data[i+1] != '\n' {
				return nil, contentError("line %d has a bare CR (carriage return without line feed); end every line with CRLF", line)
			}
		case '\n':
			if i > 0 && core[i-1] == '\r' {
				crlf++
			} else if bareLF++; bareLF == 1 {
				firstLF = line
			}
			line++
		}
	}
	if bareLF > 0 {
		if crlf > 0 {
			return nil, contentError("line %d ends with a bare LF among lines that end with CRLF; end every line with CRLF (RFC 5321 2.3.8)", firstLF)
		}
		fixed := bytes.ReplaceAll(core, []byte("\n"), []byte("\r\n"))
		data = append(fixed, data[len(core):]...)
	}
	line, start := 1, 0
	for i := 0; i <= len(data); i++ {
		if i < len(data) && data[i] != '\n' {
			continue
		}
		if n := i + 1 - start; i == len(data) && n > 1 {
			n-- // the last line has no LF
			if n > maxLine {
				return nil, contentError("line %d is %d bytes long; the limit is %d with its CRLF (RFC 5322 2.1.1): encode long lines (quoted-printable or base64)", line, n, maxLine)
			}
		} else if n > maxLine {
			return nil, contentError("line %d is %d bytes long; the limit is %d with its CRLF (RFC 5322 2.1.1): encode long lines (quoted-printable or base64)", line, n, maxLine)
		}
		line, start = line+1, i+1
	}
	msg, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		return nil, contentError("this is not an RFC 5322 message (%v): send header fields such as From and Subject, a blank line, then the body", err)
	}
	if strings.TrimSpace(msg.Header.Get("From")) == "" {
		return nil, contentError("the message has no From header field; RFC 5322 requires one")
	}
	m := &message{header: msg.Header, data: data}
	if i := bytes.Index(data, []byte("\r\n\r\n")); i >= 0 {
		m.body = data[i+4:]
	}
	return m, nil
}

// subject is the decoded Subject, as the ledger records it.
func (m *message) subject() string {
	s := m.header.Get("Subject")
	if d, err := new(mime.WordDecoder).DecodeHeader(s); err == nil {
		return d
	}
	return s
}

// headerKey returns the X-Idempotency-Key, "" without one, or the 550
// reply to an invalid one.
func (m *message) headerKey() (string, error) {
	vals := m.header[KeyHeaderField]
	switch len(vals) {
	case 0:
		return "", nil
	case 1:
	default:
		return "", contentError("the %s header field appears %d times; send it once", KeyHeaderField, len(vals))
	}
	k := strings.TrimSpace(vals[0])
	if err := sendonce.ValidateKey(k); err != nil {
		msg := err.Error()
		if fe, ok := err.(*sendonce.FieldError); ok {
			msg = fe.Message
		}
		return "", contentError("%s: %s", KeyHeaderField, msg)
	}
	return k, nil
}

// messageIDKey returns "message-id:" + the Message-ID, or "" without one.
// An ID that cannot be a key as it is (too long, not ASCII) is hashed.
func (m *message) messageIDKey() string {
	id := strings.TrimSpace(m.header.Get("Message-Id"))
	if id == "" {
		return ""
	}
	k := "message-id:" + id
	if sendonce.ValidateKey(k) != nil {
		sum := sha256.Sum256([]byte(id))
		k = "message-id:sha256:" + hex.EncodeToString(sum[:])
	}
	return k
}

// fingerprintKeys returns the key of the message's content in the window
// that holds now, and the key the same content had in the window before.
func (m *message) fingerprintKeys(from string, rcpts []string, window time.Duration, now time.Time) (cur, prev string) {
	fp := m.fingerprint(from, rcpts)
	n := now.UnixNano()
	start := n - n%int64(window)
	if n < 0 && n%int64(window) != 0 {
		start -= int64(window)
	}
	key := func(start int64) string {
		return "fingerprint:" + fp + "@" + strconv.FormatInt(start/int64(time.Second), 10)
	}
	return key(start), key(start - int64(window))
}

// fingerprint is the message's content fingerprint (see
// sendonce.ContentFingerprint): the ledger's own test of "the same email".
func (m *message) fingerprint(from string, rcpts []string) string {
	return sendonce.ContentFingerprint(from, rcpts, m.header, m.body)
}

// oneLine keeps a reply text on one line: go-smtp turns a LF into a new
// reply line, and a CR would corrupt the reply.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' {
			return ' '
		}
		return r
	}, s)
}
