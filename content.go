package sendonce

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"mime"
	"net/mail"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// ContentFingerprint hashes what makes two raw submissions the same email
// to a reader:
// the envelope (so that the same text sent to other Bcc recipients is not
// taken for a repeat), From, To, Cc, Reply-To and Subject, decoded and with their
// whitespace normalized, and the body with its MIME boundaries replaced by
// placeholders, since mail libraries draw a random boundary per attempt.
// Date, Message-ID, Received and every other field are left out: a sender
// that builds the message again for a retry (a task run twice) makes a new
// Date, Message-ID and boundary, and that is not another email.
func ContentFingerprint(mailFrom string, rcptTo []string, header mail.Header, body []byte) string {
	h := sha256.New()
	env := make([]string, len(rcptTo))
	for i, r := range rcptTo {
		env[i] = strings.ToLower(r)
	}
	slices.Sort(env)
	env = slices.Compact(env)
	fmt.Fprintf(h, "content/v1\x00%s\x00%s\x00", strings.ToLower(mailFrom), strings.Join(env, ","))
	for _, f := range []string{"From", "To", "Cc", "Reply-To"} {
		fmt.Fprintf(h, "%s\x00%s\x00", f, canonicalAddresses(header[f]))
	}
	fmt.Fprintf(h, "Subject\x00%s\x00", canonicalText(strings.Join(header["Subject"], " ")))
	h.Write(canonicalBody(header, body))
	return hex.EncodeToString(h.Sum(nil))
}

// canonicalAddresses is the sorted, lower-cased addresses of an address
// list, or its normalized text when it does not parse.
func canonicalAddresses(vals []string) string {
	if len(vals) == 0 {
		return ""
	}
	raw := strings.Join(vals, ", ")
	list, err := mail.ParseAddressList(raw)
	if err != nil {
		return "?" + strings.ToLower(canonicalText(raw))
	}
	out := make([]string, len(list))
	for i, a := range list {
		out[i] = strings.ToLower(a.Address)
	}
	slices.Sort(out)
	return strings.Join(out, ",")
}

// canonicalText decodes RFC 2047 encoded words and collapses whitespace.
func canonicalText(s string) string {
	if d, err := new(mime.WordDecoder).DecodeHeader(s); err == nil {
		s = d
	}
	return strings.Join(strings.Fields(s), " ")
}

// boundaryRE matches a boundary parameter where one starts: at an
// occurrence of "boundary" in any case, which findBoundaries finds first.
// Running the unanchored expression over a whole body cost five times the
// rest of the fingerprint: a case-insensitive pattern has no literal prefix
// for the regexp engine to skip to.
var boundaryRE = regexp.MustCompile(`^(?i)boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))`)

// findBoundaries calls fn with each boundary parameter's value in s, left
// to right, at most limit of them: the matches of boundaryRE without its
// anchor, found the way FindAllStringSubmatch finds them.
func findBoundaries(s string, limit int, fn func(string)) {
	for i, n := 0, 0; n < limit; {
		j := indexBoundaryFold(s[i:])
		if j < 0 {
			return
		}
		i += j
		if m := boundaryRE.FindStringSubmatch(s[i:]); m != nil {
			fn(m[1] + m[2])
			n++
			i += len(m[0])
		} else {
			i++
		}
	}
}

// indexBoundaryFold is the index of the first "boundary" in s in any ASCII
// case, or -1. No letter of "boundary" has a non-ASCII case fold, so this
// finds every place where boundaryRE's (?i) can match.
func indexBoundaryFold(s string) int {
	const word = "boundary"
	for i := 0; i+len(word) <= len(s); i++ {
		k := strings.IndexAny(s[i:len(s)-len(word)+1], "bB")
		if k < 0 {
			return -1
		}
		i += k
		if strings.EqualFold(s[i:i+len(word)], word) {
			return i
		}
	}
	return -1
}

// maxBoundaries bounds the work a hostile message can make canonicalBody do.
const maxBoundaries = 64

// canonicalBody replaces each MIME boundary, declared in the header or in
// a part's header, by a placeholder numbered in order of appearance. A
// placeholder holds a NUL, which parseMessage keeps out of every body, so
// two different bodies never become the same.
func canonicalBody(h mail.Header, body []byte) []byte {
	var found []string
	add := func(s string) {
		findBoundaries(s, maxBoundaries, func(b string) {
			if len(found) < maxBoundaries && !slices.Contains(found, b) {
				found = append(found, b)
			}
		})
	}
	for _, v := range h["Content-Type"] {
		add(v)
	}
	add(string(body))
	if len(found) == 0 {
		return body
	}
	order := slices.Clone(found)
	// At one position the first matching old string wins: try the longer
	// of two boundaries that share a prefix first.
	slices.SortStableFunc(order, func(a, b string) int { return len(b) - len(a) })
	pairs := make([]string, 0, 2*len(order))
	for _, b := range order {
		pairs = append(pairs, b, "\x00boundary"+strconv.Itoa(slices.Index(found, b))+"\x00")
	}
	return []byte(strings.NewReplacer(pairs...).Replace(string(body)))
}
