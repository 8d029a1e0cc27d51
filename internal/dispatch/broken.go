//go:build sendonce_broken

package dispatch

import "github.com/sendonce/sendonce/transport"

// brokenOutcome makes this build of the dispatcher deliberately wrong, so
// that the torture run (tests/torture_test.go) can show that its checker
// catches a broken promise. NEVER ship a binary built with
// -tags sendonce_broken.
//
// The bug is the classic at-least-once one: an attempt whose outcome is
// unknown (the connection broke or timed out after the final dot, or any
// error after the commit marker) is treated as a plain temporary failure
// and retried, as if the marker had never been written. The upstream may
// well have the message already, so the retry sends it a second time.
func brokenOutcome(committed bool, err error) (bool, error) {
	if err == nil {
		return committed, nil
	}
	if committed || transport.KindOf(err) == transport.Ambiguous {
		return false, transport.Wrap(transport.Temporary, "broken", 0, err)
	}
	return committed, err
}
