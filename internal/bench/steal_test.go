package bench

import (
	"runtime"
	"testing"
)

// On Linux the steal column is read, and a phase's share is a percentage.
func TestStealMeter(t *testing.T) {
	if runtime.GOOS != "linux" {
		if m := startSteal(); m.pct() != -1 {
			t.Fatalf("steal %% = %v without /proc/stat, want -1 (unknown)", m.pct())
		}
		return
	}
	if _, ok := stealSeconds(); !ok {
		t.Fatal("/proc/stat's steal column not read")
	}
	m := startSteal()
	if p := m.pct(); p < 0 || p > 100 {
		t.Fatalf("steal %% = %v, want 0 to 100", p)
	}
}
