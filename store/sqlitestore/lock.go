package sqlitestore

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/sendonce/sendonce/store"
)

// dirLock is an exclusive flock(2) on dir/LOCK. flock locks belong to the
// open file description, so a second Open in the same process conflicts just
// like another process does, and the kernel drops the lock when the holder
// dies, however it dies: there is never a stale lock to clean up.
type dirLock struct {
	f *os.File
}

func lockDir(dir string) (*dirLock, error) {
	path := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("sqlitestore: open lock file %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder := readHolder(f)
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, &lockedError{dir: dir, pid: holder, path: path}
		}
		return nil, fmt.Errorf("sqlitestore: lock %s: %w", path, err)
	}
	// The pid is for the error message of the next would-be owner only; the
	// lock itself is the flock.
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("sqlitestore: write pid to %s: %w", path, err)
		}
	}
	return &dirLock{f: f}, nil
}

// lockedError says who holds the directory and what to do about it, and is
// store.ErrLocked for errors.Is.
type lockedError struct{ dir, pid, path string }

func (e *lockedError) Error() string {
	return fmt.Sprintf("store: data directory %q is in use by process %s (lock file %s); stop that process or use another --data directory",
		e.dir, e.pid, e.path)
}

func (e *lockedError) Unwrap() error { return store.ErrLocked }

func readHolder(f *os.File) string {
	b, err := io.ReadAll(io.NewSectionReader(f, 0, 64))
	pid := strings.TrimSpace(string(b))
	if err != nil || pid == "" {
		return "(unknown pid)"
	}
	return pid
}

// release drops the lock. The file stays: removing it would let a process
// that opened the old file lock it while a third one locks a new file.
func (l *dirLock) release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the last descriptor releases the flock
	l.f = nil
	return err
}
