//go:build !linux

package awslocal

import "os/exec"

// setParentDeathSignal does nothing where the kernel offers no such signal;
// t.Cleanup still kills the server when the test ends normally.
func setParentDeathSignal(cmd *exec.Cmd) {}
