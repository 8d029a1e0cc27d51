package maildir_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/sendonce/sendonce/transport"
	"github.com/sendonce/sendonce/transport/maildir"
	"github.com/sendonce/sendonce/transport/transporttest"
)

func newTransport(t *testing.T) (*maildir.Transport, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "Maildir")
	tr, err := maildir.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	return tr, dir
}

// files lists the entries of dir/sub.
func files(t *testing.T, dir, sub string) []string {
	t.Helper()
	es, err := os.ReadDir(filepath.Join(dir, sub))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// countingCommit counts its calls.
type countingCommit struct {
	n   atomic.Int32
	err error
}

func (c *countingCommit) fn(context.Context) error {
	c.n.Add(1)
	return c.err
}

func send(t *testing.T, tr transport.Transport, msg *transport.Message) {
	t.Helper()
	if _, err := tr.Send(context.Background(), msg, (&countingCommit{}).fn); err != nil {
		t.Fatalf("Send: %v", err)
	}
}

func TestNewCreatesPrivateMaildir(t *testing.T) {
	_, dir := newTransport(t)
	for _, sub := range []string{"tmp", "new", "cur"} {
		fi, err := os.Stat(filepath.Join(dir, sub))
		if err != nil {
			t.Fatal(err)
		}
		if perm := fi.Mode().Perm(); perm != 0o700 {
			t.Errorf("%s has mode %o, want 700", sub, perm)
		}
	}
}

func TestDeliversOneByteIdenticalFile(t *testing.T) {
	tr, dir := newTransport(t)
	msg := transporttest.NewMessage("k1")
	c := &countingCommit{}
	rcpt, err := tr.Send(context.Background(), msg, c.fn)
	if err != nil {
		t.Fatal(err)
	}
	if c.n.Load() != 1 {
		t.Errorf("commit called %d times, want 1", c.n.Load())
	}
	name := maildir.FileName(msg.Tenant, msg.Key)
	if got := files(t, dir, "new"); len(got) != 1 || got[0] != name {
		t.Fatalf("new/ holds %v, want [%s]", got, name)
	}
	data, err := os.ReadFile(filepath.Join(dir, "new", name))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data, msg.Data) {
		t.Error("file content differs from the message data")
	}
	if got := files(t, dir, "tmp"); len(got) != 0 {
		t.Errorf("tmp/ not cleaned: %v", got)
	}
	if rcpt.Reply == "" {
		t.Error("empty receipt")
	}
	if !transport.IsIdempotent(tr) {
		t.Error("maildir transport does not declare itself idempotent")
	}
}

func TestSameMessageTwiceIsOneFile(t *testing.T) {
	tr, dir := newTransport(t)
	msg := transporttest.NewMessage("twice")
	send(t, tr, msg)
	send(t, tr, msg)
	if got := files(t, dir, "new"); len(got) != 1 {
		t.Fatalf("new/ holds %d files, want 1", len(got))
	}
}

func TestSameKeyOtherTenantIsAnotherFile(t *testing.T) {
	tr, dir := newTransport(t)
	a := transporttest.NewMessage("shared-key")
	b := transporttest.NewMessage("shared-key")
	b.Tenant = "other"
	send(t, tr, a)
	send(t, tr, b)
	if got := files(t, dir, "new"); len(got) != 2 {
		t.Fatalf("new/ holds %d files, want 2", len(got))
	}
}

func TestConcurrentSendsMakeOneFile(t *testing.T) {
	tr, dir := newTransport(t)
	msg := transporttest.NewMessage("concurrent")
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, 50)
	for range 50 {
		wg.Go(func() {
			<-start
			if _, err := tr.Send(context.Background(), msg, (&countingCommit{}).fn); err != nil {
				errs <- err
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := files(t, dir, "new"); len(got) != 1 {
		t.Fatalf("new/ holds %d files, want 1", len(got))
	}
	if got := files(t, dir, "tmp"); len(got) != 0 {
		t.Errorf("tmp/ not cleaned: %v", got)
	}
	data, err := os.ReadFile(filepath.Join(dir, "new", maildir.FileName(msg.Tenant, msg.Key)))
	if err != nil || !bytes.Equal(data, msg.Data) {
		t.Errorf("file content differs from the message data (err %v)", err)
	}
}

func TestReadByMailClientThenResentIsStillOne(t *testing.T) {
	tr, dir := newTransport(t)
	msg := transporttest.NewMessage("read")
	send(t, tr, msg)
	name := maildir.FileName(msg.Tenant, msg.Key)
	// What a mail client does with a message it has shown.
	if err := os.Rename(filepath.Join(dir, "new", name), filepath.Join(dir, "cur", name+":2,S")); err != nil {
		t.Fatal(err)
	}
	send(t, tr, msg)
	if got := files(t, dir, "new"); len(got) != 0 {
		t.Errorf("resend created %v in new/", got)
	}
	if got := files(t, dir, "cur"); len(got) != 1 {
		t.Errorf("cur/ holds %v, want one file", got)
	}
}

func TestCommitErrorDeliversNothing(t *testing.T) {
	tr, dir := newTransport(t)
	boom := errors.New("marker not written")
	c := &countingCommit{err: boom}
	_, err := tr.Send(context.Background(), transporttest.NewMessage("commit-error"), c.fn)
	if !errors.Is(err, boom) {
		t.Fatalf("Send = %v, want the commit error", err)
	}
	if c.n.Load() != 1 {
		t.Errorf("commit called %d times, want 1", c.n.Load())
	}
	if got := files(t, dir, "new"); len(got) != 0 {
		t.Errorf("new/ holds %v after a failed commit", got)
	}
	if got := files(t, dir, "tmp"); len(got) != 0 {
		t.Errorf("tmp/ not cleaned: %v", got)
	}
}

func TestCancelledContextIsTemporary(t *testing.T) {
	tr, dir := newTransport(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c := &countingCommit{}
	_, err := tr.Send(ctx, transporttest.NewMessage("cancelled"), c.fn)
	if err == nil || transport.KindOf(err) != transport.Temporary || !transport.Classified(err) {
		t.Fatalf("Send = %v, want a classified temporary error", err)
	}
	if c.n.Load() != 0 || len(files(t, dir, "new")) != 0 {
		t.Error("a cancelled Send went on")
	}
}

func TestUnwritableMaildirIsTemporary(t *testing.T) {
	tr, dir := newTransport(t)
	// Replacing tmp/ with a file makes every write fail, even as root.
	if err := os.Remove(filepath.Join(dir, "tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "tmp"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c := &countingCommit{}
	_, err := tr.Send(context.Background(), transporttest.NewMessage("unwritable"), c.fn)
	if err == nil || transport.KindOf(err) != transport.Temporary || !transport.Classified(err) {
		t.Fatalf("Send = %v, want a classified temporary error", err)
	}
	if c.n.Load() != 0 {
		t.Error("commit called although nothing could be written")
	}
}
