package smtp

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
)

// endpoint is what a smarthost URL says.
type endpoint struct {
	addr        string // host:port
	host        string
	implicitTLS bool
	user, pass  string
}

// parseURL reads smtp://[user:pass@]host:port or smtps://... Errors name the
// problem and the fix, and never repeat the password.
func parseURL(raw string) (endpoint, error) {
	shown := redact(raw)
	fail := func(format string, args ...any) (endpoint, error) {
		return endpoint{}, fmt.Errorf("smtp transport: URL %q: %s", shown, fmt.Sprintf(format, args...))
	}
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // url.Error repeats the URL, password included
		}
		return fail("%v", err)
	}
	var ep endpoint
	switch u.Scheme {
	case "smtp":
	case "smtps":
		ep.implicitTLS = true
	case "":
		return fail("missing scheme; use smtp://host:587 (STARTTLS) or smtps://host:465 (implicit TLS)")
	default:
		return fail("unsupported scheme %q; use smtp:// (STARTTLS) or smtps:// (implicit TLS)", u.Scheme)
	}
	example := "smtp://host:587"
	if ep.implicitTLS {
		example = "smtps://host:465"
	}
	if u.Opaque != "" {
		return fail("missing \"//\" after the scheme; use %s", example)
	}
	ep.host = u.Hostname()
	if ep.host == "" {
		return fail("missing host; use %s", example)
	}
	port := u.Port()
	if port == "" {
		if strings.HasSuffix(u.Host, ":") {
			return fail("empty port; use %s", example)
		}
		return fail("missing port; use %s", strings.Replace(example, "host", ep.host, 1))
	}
	if u.Path != "" && u.Path != "/" {
		return fail("unexpected path %q; a smarthost URL is only scheme, credentials, host and port", u.Path)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return fail("unexpected query or fragment; set options in smtp.Options")
	}
	if u.User != nil {
		ep.user = u.User.Username()
		ep.pass, _ = u.User.Password()
		if ep.user == "" {
			return fail("empty user name before \"@\"")
		}
		if ep.pass == "" {
			return fail("user %q has no password; use %s://user:password@%s (percent-encode special characters)", ep.user, u.Scheme, u.Host)
		}
	}
	ep.addr = net.JoinHostPort(ep.host, port)
	return ep, nil
}

// redact hides the credentials of a URL that may not even parse.
func redact(raw string) string {
	i := strings.Index(raw, "://")
	if i < 0 {
		return raw
	}
	rest := raw[i+3:]
	end := strings.IndexAny(rest, "/?#")
	if end < 0 {
		end = len(rest)
	}
	at := strings.LastIndex(rest[:end], "@")
	if at < 0 {
		return raw
	}
	user := rest[:at]
	if c := strings.Index(user, ":"); c >= 0 {
		user = user[:c] + ":xxxxx"
	}
	return raw[:i+3] + user + rest[at:]
}

// isLoopback reports whether host names this machine, where a clear-text
// password cannot be sniffed on the way.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
