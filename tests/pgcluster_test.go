package tests

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"testing"
)

// pgCluster is a PostgreSQL server of the test's own: initdb'd into a
// temporary directory, listening on a free loopback port, so that the
// torture's nemesis can crash and restart a real database server without
// disturbing the machine's shared one or any other test.
type pgCluster struct {
	bin   string // the directory of initdb and pg_ctl
	data  string
	port  int
	runAs []string // "runuser -u postgres --" when the test runs as root
	logf  string
}

// startPGCluster creates and starts a private cluster, or skips (fails
// under CI=true) when the PostgreSQL server binaries are not installed.
func startPGCluster(t *testing.T) *pgCluster {
	t.Helper()
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_ctl")
	if len(bins) == 0 {
		if p, err := exec.LookPath("pg_ctl"); err == nil {
			bins = []string{p}
		}
	}
	if len(bins) == 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("no pg_ctl (PostgreSQL server binaries) found; CI=true requires them")
		}
		t.Skip("SKIPPED: no pg_ctl (PostgreSQL server binaries) found: install postgresql to restart a private database server")
	}
	sort.Strings(bins)
	c := &pgCluster{bin: filepath.Dir(bins[len(bins)-1])}
	// initdb refuses to run as root: the cluster then belongs to postgres.
	base, err := os.MkdirTemp("", "sendonce-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Skipf("SKIPPED: running as root and no postgres user to own a private cluster: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(base, uid, gid); err != nil {
			t.Fatal(err)
		}
		c.runAs = []string{"runuser", "-u", "postgres", "--"}
	}
	c.data = filepath.Join(base, "data")
	c.logf = filepath.Join(base, "postgres.log")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c.port = ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	if err := c.run("initdb", "-D", c.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-instructions"); err != nil {
		t.Fatal(err)
	}
	if err := c.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.run("pg_ctl", "-D", c.data, "-w", "stop", "-m", "fast") })
	return c
}

// run runs one of the server's tools; its error carries the tool's output
// and the server's log. It may be called from any goroutine.
func (c *pgCluster) run(tool string, args ...string) error {
	argv := append(append(append([]string{}, c.runAs...), filepath.Join(c.bin, tool)), args...)
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(c.logf)
		return fmt.Errorf("%s %v: %v\n%s\n%s", tool, args, err, out, log)
	}
	return nil
}

// start starts the server and waits until it accepts connections. Its
// settings are the durable defaults (fsync, synchronous_commit on).
func (c *pgCluster) start() error {
	return c.run("pg_ctl", "-D", c.data, "-l", c.logf, "-w", "-t", "120", "start",
		"-o", fmt.Sprintf("-p %d -c listen_addresses=127.0.0.1 -k %s -c max_connections=300", c.port, filepath.Dir(c.data)))
}

// crash stops the server the way a power cut would look to its clients:
// immediate mode ends every backend without a shutdown checkpoint, and
// the next start replays the WAL.
func (c *pgCluster) crash() error {
	return c.run("pg_ctl", "-D", c.data, "-w", "stop", "-m", "immediate")
}

// addr is the server's host:port, for cutProxy.
func (c *pgCluster) addr() string { return fmt.Sprintf("127.0.0.1:%d", c.port) }

// url is the URL of the cluster's postgres database.
func (c *pgCluster) url() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
}
