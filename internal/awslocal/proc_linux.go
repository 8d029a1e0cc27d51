package awslocal

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal kills the server if the test binary dies without
// running its cleanups (a panic, go test's -timeout), so no server is left
// running behind.
func setParentDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
