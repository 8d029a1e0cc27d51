package sendonce

import (
	"math/rand/v2"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// unanchoredBoundaryRE is the expression findBoundaries stands for: every
// match of it over the whole text, left to right.
var unanchoredBoundaryRE = regexp.MustCompile(`(?i)boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))`)

func boundariesByRegexp(s string, limit int) []string {
	var out []string
	for _, m := range unanchoredBoundaryRE.FindAllStringSubmatch(s, limit) {
		out = append(out, m[1]+m[2])
	}
	return out
}

// findBoundaries finds exactly the boundaries that running the
// case-insensitive expression over the whole text finds, on texts made to
// be hard for it: parameters in every case, split words, quotes, white
// space, overlapping "boundaryboundary=", non-ASCII and the limit.
func TestFindBoundariesMatchesTheRegexp(t *testing.T) {
	pieces := []string{
		"boundary", "BOUNDARY", "BoUnDaRy", "bound", "ary", "b", "B", "=", " = ", "\t", "\r\n", "\n", `"`, `"q-1"`,
		"abc", ";", "x", "ſ", "K", "é", "--", "Content-Type: multipart/mixed; ", "boundaryboundary=", strings.Repeat("z", 210),
	}
	rng := rand.New(rand.NewPCG(7, 2026))
	for i := range 20000 {
		var sb strings.Builder
		for range rng.IntN(30) {
			sb.WriteString(pieces[rng.IntN(len(pieces))])
		}
		s := sb.String()
		limit := 64
		if i%5 == 0 {
			limit = 1 + rng.IntN(3)
		}
		var got []string
		findBoundaries(s, limit, func(b string) { got = append(got, b) })
		if want := boundariesByRegexp(s, limit); !slices.Equal(got, want) {
			t.Fatalf("findBoundaries(%q, %d) = %q, want %q", s, limit, got, want)
		}
	}
}
