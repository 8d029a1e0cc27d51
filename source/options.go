package source

import (
	"fmt"
	"slices"
	"time"
)

// CheckCounts and CheckDurations are what every source's Options
// validation shares: a negative count or duration is refused with an error
// that names the field and the fix (0 means the default). Fields are
// checked in name order, so that the error is the same on every run.
func CheckCounts(pkg string, fields map[string]int) error {
	for _, name := range sortedNames(fields) {
		if n := fields[name]; n < 0 {
			return fmt.Errorf("%s: Options.%s is %d; use a positive number, or 0 for the default", pkg, name, n)
		}
	}
	return nil
}

// CheckDurations: see CheckCounts.
func CheckDurations(pkg string, fields map[string]time.Duration) error {
	for _, name := range sortedNames(fields) {
		if d := fields[name]; d < 0 {
			return fmt.Errorf("%s: Options.%s is %v; use a positive duration, or 0 for the default", pkg, name, d)
		}
	}
	return nil
}

func sortedNames[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	slices.Sort(names)
	return names
}
