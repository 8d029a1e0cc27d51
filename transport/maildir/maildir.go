// Package maildir delivers messages into a Maildir, the default sink of
// sendonce. It is idempotent by construction: the file of a message is named
// after its (Tenant, Key), and delivering is a hard link that fails if that
// name exists, so repeating a Send can never make a second copy.
//
// Delivery of one message:
//
//  1. If new/<name> or cur/<name>:2,... exists (a mail client moves read
//     mail to cur/), it was delivered before: success.
//  2. The data is written to tmp/<name>.<random> and fsync'd.
//  3. commit is called; if it fails, the tmp file is removed.
//  4. The irreversible step: os.Link to new/<name>. If the name exists, a
//     concurrent Send won: success, still one file.
//  5. The tmp file is removed and new/ is fsync'd, so the link survives a
//     crash. Only a failure here is Ambiguous, and since the transport is
//     Idempotent, the dispatcher simply retries it.
//
// A message's file name is FileName(tenant, key); the Message-ID is not
// used, so two keys never share a file even if their Message-IDs collide.
//
// One residual race remains, outside this package's control: if two Sends
// of the same message run at once and a mail client moves the first copy to
// cur/ between the second Send's check and its link, the second link
// succeeds. Send re-checks cur/ after linking and removes its own copy in
// that case, which narrows the window to the client's next scan.
package maildir

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/sendonce/sendonce/transport"
)

// Transport delivers into one Maildir. It is safe for concurrent use, also
// by several processes sharing the directory.
type Transport struct {
	dir string
}

var (
	_ transport.Transport  = (*Transport)(nil)
	_ transport.Idempotent = (*Transport)(nil)
)

// New returns a transport delivering into dir, creating dir and its tmp,
// new and cur subdirectories (mode 0700) if needed.
func New(dir string) (*Transport, error) {
	for _, sub := range []string{"", "tmp", "new", "cur"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("maildir transport: create %s: %w", filepath.Join(dir, sub), err)
		}
	}
	return &Transport{dir: dir}, nil
}

var b32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// FileName returns the base name of the file of (tenant, key) in new/; in
// cur/ a mail client appends ":2,<flags>".
func FileName(tenant, key string) string {
	h := sha256.Sum256([]byte(tenant + "\x00" + key))
	return "sendonce-" + toLower(b32.EncodeToString(h[:]))
}

func toLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// Name implements transport.Transport.
func (t *Transport) Name() string { return "maildir" }

// Idempotent implements transport.Idempotent: a repeated Send never makes
// a second file.
func (t *Transport) Idempotent() bool { return true }

// Close implements transport.Transport; there is nothing to release.
func (t *Transport) Close() error { return nil }

// Send implements transport.Transport; see the package documentation. When
// the message was already delivered, Send still calls commit before it
// reports success, so that a successful Send has always called commit once.
func (t *Transport) Send(ctx context.Context, msg *transport.Message, commit transport.CommitFunc) (transport.Receipt, error) {
	if err := ctx.Err(); err != nil {
		return transport.Receipt{}, temporary("prepare", err)
	}
	name := FileName(msg.Tenant, msg.Key)
	newPath := filepath.Join(t.dir, "new", name)

	if where, err := t.delivered(name); err != nil {
		return transport.Receipt{}, temporary("prepare", err)
	} else if where != "" {
		if err := commit(ctx); err != nil {
			return transport.Receipt{}, err
		}
		return transport.Receipt{Reply: "maildir: already delivered as " + where}, nil
	}

	tmpPath, err := t.writeTmp(name, msg.Data)
	if err != nil {
		return transport.Receipt{}, temporary("write", err)
	}
	defer os.Remove(tmpPath) // after the link, new/<name> keeps the data

	if err := commit(ctx); err != nil {
		return transport.Receipt{}, err
	}
	if err := ctx.Err(); err != nil {
		return transport.Receipt{}, temporary("commit", err)
	}

	err = os.Link(tmpPath, newPath)
	switch {
	case errors.Is(err, fs.ErrExist):
		return transport.Receipt{Reply: "maildir: already delivered as new/" + name}, nil
	case err != nil:
		// The link did not happen: nothing was delivered.
		return transport.Receipt{}, temporary("link", err)
	}
	if where, err := t.inCur(name); err == nil && where != "" {
		// Another Send delivered it and a mail client already moved that
		// copy to cur/ since our check: ours is the duplicate.
		os.Remove(newPath)
		syncDir(filepath.Join(t.dir, "new"))
		return transport.Receipt{Reply: "maildir: already delivered as " + where}, nil
	}
	if err := syncDir(filepath.Join(t.dir, "new")); err != nil {
		// The link exists but may not survive a crash.
		return transport.Receipt{}, transport.Wrap(transport.Ambiguous, "sync", 0,
			fmt.Errorf("maildir transport: sync %s: %w", filepath.Join(t.dir, "new"), err))
	}
	return transport.Receipt{Reply: "maildir: delivered new/" + name}, nil
}

// delivered returns where the message already is ("new/<name>" or
// "cur/<name>:2,S"), or "". new/ is checked first: a mail client moves new
// to cur, so in this order a file being moved is seen in one of them.
func (t *Transport) delivered(name string) (string, error) {
	if _, err := os.Lstat(filepath.Join(t.dir, "new", name)); err == nil {
		return "new/" + name, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	return t.inCur(name)
}

func (t *Transport) inCur(name string) (string, error) {
	cur := filepath.Join(t.dir, "cur")
	if _, err := os.Lstat(filepath.Join(cur, name)); err == nil {
		return "cur/" + name, nil
	}
	// name is base32 and "sendonce-", free of glob metacharacters.
	m, err := filepath.Glob(filepath.Join(cur, name+":*"))
	if err != nil || len(m) == 0 {
		return "", err
	}
	return "cur/" + filepath.Base(m[0]), nil
}

func (t *Transport) writeTmp(name string, data []byte) (string, error) {
	var r [8]byte
	rand.Read(r[:])
	path := filepath.Join(t.dir, "tmp", name+"."+hex.EncodeToString(r[:]))
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", err
	}
	return path, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// temporary classifies a failure before the link: nothing was delivered,
// and a full disk or a permission problem may be fixed.
func temporary(step string, err error) error {
	return transport.Wrap(transport.Temporary, step, 0, fmt.Errorf("maildir transport: %s: %w", step, err))
}
