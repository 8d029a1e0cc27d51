package smtpd

import "net"

// SetIsLocal replaces the loopback rule, so a test on 127.0.0.1 can play
// a remote client.
func SetIsLocal(c *Config, f func(net.Addr) bool) { c.isLocal = f }

// ParseMessage, HeaderKey and Fingerprint expose the parsing path to the
// fuzz test.
func ParseMessage(data []byte, maxLine int) (headerKey string, fingerprint string, messageIDKey string, err error) {
	m, err := parseMessage(data, maxLine)
	if err != nil {
		return "", "", "", err
	}
	k, err := m.headerKey()
	if err != nil {
		return "", "", "", err
	}
	return k, m.fingerprint("sender@example.com", []string{"rcpt@example.com"}), m.messageIDKey(), nil
}
