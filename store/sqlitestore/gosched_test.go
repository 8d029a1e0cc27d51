package sqlitestore

import "runtime"

// runtimeGosched yields while a test waits for another goroutine to reach a
// state it can observe (a queue length, a flag): waiting on a condition,
// never on a duration.
func runtimeGosched() { runtime.Gosched() }
