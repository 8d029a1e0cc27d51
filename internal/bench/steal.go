package bench

import (
	"bytes"
	"os"
	"runtime"
	"strconv"
	"time"
)

// stealSeconds is the CPU time this machine's hypervisor has given to
// others while its CPUs wanted to run, summed over the CPUs: the steal
// column of /proc/stat's cpu line, in USER_HZ ticks of 1/100 s. ok is
// false where there is no /proc/stat.
func stealSeconds() (s float64, ok bool) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, false
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := bytes.Fields(line)
	// cpu user nice system idle iowait irq softirq steal ...
	if len(f) < 9 || string(f[0]) != "cpu" {
		return 0, false
	}
	n, err := strconv.ParseInt(string(f[8]), 10, 64)
	if err != nil {
		return 0, false
	}
	return float64(n) / 100, true
}

// stealMeter measures the share of the machine's CPU time stolen during a
// phase: a virtual machine whose host is busy runs everything slower,
// ceilings included, and the number says how much.
type stealMeter struct {
	start time.Time
	s0    float64
	ok    bool
}

func startSteal() stealMeter {
	s0, ok := stealSeconds()
	return stealMeter{start: time.Now(), s0: s0, ok: ok}
}

// pct is the stolen CPU time since start as a percentage of all the CPU
// time the machine had, or -1 where it cannot be known.
func (m stealMeter) pct() float64 {
	s1, ok := stealSeconds()
	wall := time.Since(m.start).Seconds()
	if !m.ok || !ok || wall <= 0 {
		return -1
	}
	// The counter moves in ticks of 10 ms: over a short phase one tick can
	// read as more than all the time there was.
	return min(100, max(0, 100*(s1-m.s0)/(wall*float64(runtime.NumCPU()))))
}
