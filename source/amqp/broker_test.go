package amqp

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// privateBroker is a RabbitMQ node of the test's own: its own node name,
// ports and data directory, so that the test can kill and restart a real
// broker without touching the machine's shared one.
type privateBroker struct {
	bin  string
	dir  string
	addr string
	env  []string
	cmd  *exec.Cmd
	done chan struct{}
}

// startPrivateBroker starts a node, or skips (fails under CI=true) when
// the RabbitMQ server is not installed.
func startPrivateBroker(t *testing.T) *privateBroker {
	t.Helper()
	bin := "/usr/lib/rabbitmq/bin/rabbitmq-server"
	if _, err := os.Stat(bin); err != nil {
		if p, lerr := exec.LookPath("rabbitmq-server"); lerr == nil {
			bin = p
		} else {
			if os.Getenv("CI") == "true" {
				t.Fatalf("no rabbitmq-server to run a private node (CI=true requires one): %v", err)
			}
			t.Skipf("SKIPPED: no rabbitmq-server to run a private node: %v", err)
		}
	}
	dir, err := os.MkdirTemp("", "sendonce-rabbitmq-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o777) // the server may run as the rabbitmq user
	plugins := filepath.Join(dir, "enabled_plugins")
	if err := os.WriteFile(plugins, []byte("[].\n"), 0o666); err != nil {
		t.Fatal(err)
	}
	port, dist := freePort(t), freePort(t)
	b := &privateBroker{bin: bin, dir: dir, addr: "127.0.0.1:" + strconv.Itoa(port)}
	b.env = append(os.Environ(),
		"HOME="+dir, // its Erlang cookie
		fmt.Sprintf("RABBITMQ_NODENAME=sendonce-test-%d@localhost", port),
		"RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
		"RABBITMQ_NODE_PORT="+strconv.Itoa(port),
		"RABBITMQ_DIST_PORT="+strconv.Itoa(dist),
		"RABBITMQ_MNESIA_BASE="+filepath.Join(dir, "mnesia"),
		"RABBITMQ_LOG_BASE="+filepath.Join(dir, "log"),
		"RABBITMQ_ENABLED_PLUGINS_FILE="+plugins,
		"RABBITMQ_PID_FILE="+filepath.Join(dir, "pid"),
		"RABBITMQ_CONFIG_FILE="+filepath.Join(dir, "none"),
	)
	b.start(t)
	t.Cleanup(func() { b.kill(t) })
	return b
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// start starts the node on its data and waits until it takes AMQP
// connections.
func (b *privateBroker) start(t *testing.T) {
	t.Helper()
	cmd := exec.Command(b.bin)
	cmd.Dir = b.dir
	cmd.Env = b.env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	logf, err := os.OpenFile(filepath.Join(b.dir, "server.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting a private RabbitMQ node: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	b.cmd, b.done = cmd, done
	deadline := time.Now().Add(2 * time.Minute)
	for {
		conn, err := amqp091.DialConfig(brokerURL(b.addr), amqp091.Config{Dial: amqp091.DefaultDial(time.Second)})
		if err == nil {
			conn.Close()
			return
		}
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(b.dir, "server.log"))
			t.Fatalf("the private RabbitMQ node exited while starting:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(b.dir, "server.log"))
			t.Fatalf("the private RabbitMQ node did not take connections within 2 minutes: %v\n%s", err, log)
		}
		time.Sleep(100 * time.Millisecond) // polling a port that is not open yet
	}
}

// kill ends the node with SIGKILL (every process of its group: the Erlang
// VM and its helpers), as a crash would, and waits for it to be gone.
func (b *privateBroker) kill(t *testing.T) {
	t.Helper()
	if b.cmd == nil {
		return
	}
	syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
	if pid, err := os.ReadFile(filepath.Join(b.dir, "pid")); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(pid))); err == nil {
			syscall.Kill(n, syscall.SIGKILL)
		}
	}
	select {
	case <-b.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the private RabbitMQ node did not exit after SIGKILL")
	}
	b.cmd = nil
}

// dial connects to the node.
func (b *privateBroker) dial(t *testing.T) *amqp091.Connection {
	t.Helper()
	conn, err := amqp091.Dial(brokerURL(b.addr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}
