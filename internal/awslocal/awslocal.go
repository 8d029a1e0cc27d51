// Package awslocal starts local servers that speak the real AWS wire
// protocols, for tests: aws-ses-v2-local for SES (API v2) and fauxqs for
// SQS. Both are npm packages pinned in tools/awslocal/package.json and
// installed with
//
//	cd tools/awslocal && npm ci
//
// (scripts/test does it). StartSES and StartSQS work alike:
//
//   - Each call starts a new server as a child process, on a port the
//     kernel chose, listening on 127.0.0.1 only, and returns its endpoint
//     URL, for the SDK's BaseEndpoint (or Options.Endpoint of a transport).
//     Servers keep everything in memory, so tests that each start their own
//     share nothing and may run in parallel.
//   - The server is killed, by its process id, when the test ends
//     (t.Cleanup).
//   - If node or the npm package is missing, the test is skipped with a
//     message that says how to install it; when the environment variable
//     CI is "true" it fails instead, so that CI cannot pass by testing
//     nothing.
//
// Use any region and fake static credentials with them, e.g.
// credentials.NewStaticCredentialsProvider("test", "test", ""): the servers
// require a SigV4 Authorization header but do not check it.
package awslocal

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// startTimeout bounds how long a server may take to say it listens.
const startTimeout = 30 * time.Second

// StartSES starts aws-ses-v2-local and returns its endpoint, e.g.
// "http://127.0.0.1:40123". Besides the SES v1 and v2 APIs it answers
// GET /store with every email it received, as JSON ({"emails": [...]},
// each with its SES messageId, from, destination, subject and parsed
// body), POST /clear-store, and GET /health-check. For a raw email it
// keeps only what it parsed from the message: not its other headers.
func StartSES(t testing.TB) (endpoint string) {
	t.Helper()
	dir, node := locate(t, "aws-ses-v2-local")
	bin := filepath.Join(dir, "node_modules", ".bin", "aws-ses-v2-local")
	if _, err := os.Stat(bin); err != nil {
		absent(t, fmt.Sprintf("aws-ses-v2-local's command %s is missing (%v)", bin, err))
	}
	// --port 0 lets the kernel choose; the server prints the address:
	// "aws-ses-v2-local: server running at http://localhost:40123".
	cmd := exec.Command(node, bin, "--host", "127.0.0.1", "--port", "0")
	return start(t, "aws-ses-v2-local", cmd, regexp.MustCompile(`server running at http://[^\s:]+:(\d+)`))
}

// fauxqsMain runs fauxqs on 127.0.0.1. Its own command (node_modules/.bin/
// fauxqs, startFauxqs) always listens on 0.0.0.0, reachable from the
// network; buildApp is the same server without that listen call, as its
// README describes for library use.
const fauxqsMain = `
import { buildApp } from "fauxqs";
const app = buildApp({ logger: false });
const address = await app.listen({ port: 0, host: "127.0.0.1" });
console.log("fauxqs: listening at " + address);
`

// StartSQS starts fauxqs and returns its endpoint, e.g.
// "http://127.0.0.1:40123". It speaks the SQS JSON protocol (and SNS and
// S3, unused here) and answers GET /health. Queues it creates have URLs
// such as http://sqs.us-east-1.localhost:40123/000000000000/name; the Go
// SDK sends every request to the endpoint, whatever host the queue URL
// names.
func StartSQS(t testing.TB) (endpoint string) {
	t.Helper()
	dir, node := locate(t, "fauxqs")
	cmd := exec.Command(node, "--input-type=module", "--eval", fauxqsMain)
	cmd.Dir = dir // where the bare import "fauxqs" resolves
	return start(t, "fauxqs", cmd, regexp.MustCompile(`fauxqs: listening at http://127\.0\.0\.1:(\d+)`))
}

// locate returns tools/awslocal and the path of node, or skips the test.
func locate(t testing.TB, pkg string) (dir, node string) {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		absent(t, "node is not installed")
	}
	root, err := moduleRoot()
	if err != nil {
		t.Fatalf("awslocal: %v", err)
	}
	dir = filepath.Join(root, "tools", "awslocal")
	if _, err := os.Stat(filepath.Join(dir, "node_modules", pkg, "package.json")); err != nil {
		absent(t, fmt.Sprintf("the npm package %s is not installed in %s", pkg, dir))
	}
	return dir, node
}

func absent(t testing.TB, what string) {
	t.Helper()
	msg := what + "; run `cd tools/awslocal && npm ci` (needs node and npm) to test against the local AWS servers"
	if os.Getenv("CI") == "true" {
		t.Fatal("awslocal: CI=true, and " + msg)
	}
	t.Skip("SKIPPED: " + msg)
}

// moduleRoot walks up from the working directory (a test's package
// directory) to the directory holding go.mod.
func moduleRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("no go.mod in %s or any directory above it", wd)
		}
	}
}

// start runs cmd, waits until a line of its output matches ready (whose
// first group is the port) and the port accepts connections, and kills it
// at the end of the test.
func start(t testing.TB, name string, cmd *exec.Cmd, ready *regexp.Regexp) string {
	t.Helper()
	out := &output{ready: ready, port: make(chan string, 1)}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = 5 * time.Second // in case something else holds the pipes
	setParentDeathSignal(cmd)
	if err := cmd.Start(); err != nil {
		t.Fatalf("awslocal: start %s: %v", name, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill() // by pid; a process that already exited is fine
		<-exited
	})

	var port string
	timer := time.NewTimer(startTimeout)
	defer timer.Stop()
	select {
	case port = <-out.port:
	case <-exited:
		t.Fatalf("awslocal: %s (pid %d) exited before it listened: %v\n%s", name, cmd.Process.Pid, waitErr, out)
	case <-timer.C:
		t.Fatalf("awslocal: %s (pid %d) did not say it listens within %s\n%s", name, cmd.Process.Pid, startTimeout, out)
	}
	addr := net.JoinHostPort("127.0.0.1", port)
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("awslocal: %s says it listens on %s, but: %v\n%s", name, addr, err, out)
	}
	c.Close()
	return "http://" + addr
}

// output collects a server's output for error messages, and reports the
// port from the first line that matches ready.
type output struct {
	ready *regexp.Regexp
	port  chan string

	mu    sync.Mutex
	buf   bytes.Buffer
	line  []byte
	found bool
}

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.buf.Len() < 64<<10 {
		o.buf.Write(p)
	}
	if o.found {
		return len(p), nil
	}
	o.line = append(o.line, p...)
	for {
		i := bytes.IndexByte(o.line, '\n')
		if i < 0 {
			break
		}
		if m := o.ready.FindSubmatch(o.line[:i]); m != nil {
			o.found = true
			o.port <- string(m[1])
			o.line = nil
			break
		}
		o.line = o.line[i+1:]
	}
	return len(p), nil
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := strings.TrimSpace(o.buf.String())
	if s == "" {
		return "(no output)"
	}
	return "output:\n" + s
}
