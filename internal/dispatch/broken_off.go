//go:build !sendonce_broken

package dispatch

// brokenOutcome is the test-only switch of the torture's self-check (see
// broken.go, built with -tags sendonce_broken). In every real build it
// changes nothing.
func brokenOutcome(committed bool, err error) (bool, error) { return committed, err }
