// Package saslogin is the server side of the SASL LOGIN mechanism:
// obsolete, but still the one some clients (Outlook, older PHP mailers)
// use, and go-sasl implements only its client side.
package saslogin

import "github.com/emersion/go-sasl"

// NewServer returns a LOGIN server that asks for the user name, then the
// password, and hands both to check.
func NewServer(check func(user, pass string) error) sasl.Server {
	return &server{check: check}
}

type server struct {
	check    func(user, pass string) error
	user     string
	gotUser  bool
	finished bool
}

func (l *server) Next(response []byte) ([]byte, bool, error) {
	switch {
	case l.finished:
		return nil, true, sasl.ErrUnexpectedClientResponse
	case !l.gotUser && response == nil:
		return []byte("Username:"), false, nil
	case !l.gotUser:
		l.user, l.gotUser = string(response), true
		return []byte("Password:"), false, nil
	default:
		l.finished = true
		return nil, true, l.check(l.user, string(response))
	}
}
