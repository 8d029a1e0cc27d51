package sendonce

import (
	"crypto/sha256"
	"encoding/base32"
	"strings"
)

// MaxKeyLen is the longest idempotency key accepted, in bytes.
const MaxKeyLen = 255

// ValidateKey checks an idempotency key: 1 to 255 printable ASCII characters
// (0x20 to 0x7E), not starting or ending with a space. Keys are compared
// byte for byte: "A" and "a" are different keys.
func ValidateKey(key string) error {
	if key == "" {
		return fieldErr("key", "the idempotency key is empty; send 1 to %d printable ASCII characters, for example a job ID", MaxKeyLen)
	}
	if len(key) > MaxKeyLen {
		return fieldErr("key", "the idempotency key is %d bytes long; the maximum is %d (hash a longer identifier)", len(key), MaxKeyLen)
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < 0x20 || c > 0x7e {
			return fieldErr("key", "the idempotency key has a byte 0x%02x at position %d; only printable ASCII (0x20-0x7E) is allowed", c, i)
		}
	}
	if key[0] == ' ' || key[len(key)-1] == ' ' {
		return fieldErr("key", "the idempotency key starts or ends with a space; trim it")
	}
	return nil
}

// DefaultTenant is the tenant of callers that are not authenticated as any
// other (the out-of-the-box, single-tenant setup).
const DefaultTenant = "default"

// DefaultMessageIDDomain is used when neither the configuration nor the
// email's From address gives a domain.
const DefaultMessageIDDomain = "sendonce.invalid"

var b32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// MessageID derives the Message-ID of the email of (tenant, key):
// "<" + base32(sha256("sendonce/v1" NUL tenant NUL key)) + "@" + domain + ">".
// Every attempt of one email, on any node, carries this same identity, so a
// receiver that deduplicates by Message-ID discards any resend.
func MessageID(tenant, key, domain string) string {
	h := sha256.New()
	h.Write([]byte("sendonce/v1\x00"))
	h.Write([]byte(tenant))
	h.Write([]byte{0})
	h.Write([]byte(key))
	if domain == "" {
		domain = DefaultMessageIDDomain
	}
	return "<" + strings.ToLower(b32.EncodeToString(h.Sum(nil))) + "@" + domain + ">"
}
