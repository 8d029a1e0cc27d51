package store

import (
	"errors"
	"testing"
)

func TestCursorIsOpaqueAndChecked(t *testing.T) {
	for _, id := range []int64{1, 42, 1 << 40} {
		got, err := DecodeCursor(EncodeCursor(id))
		if err != nil || got != id {
			t.Errorf("cursor of %d decodes to %d, %v", id, got, err)
		}
	}
	for _, c := range []string{"", "x", EncodeCursor(0), "djE6LTE"} {
		if _, err := DecodeCursor(c); !errors.Is(err, ErrBadCursor) {
			t.Errorf("DecodeCursor(%q): %v, want ErrBadCursor", c, err)
		}
	}
}

func TestPageLimit(t *testing.T) {
	for in, want := range map[int]int{0: DefaultListLimit, -1: DefaultListLimit, 7: 7, MaxListLimit + 1: MaxListLimit} {
		if got := (Filter{Limit: in}).PageLimit(); got != want {
			t.Errorf("PageLimit(%d) = %d, want %d", in, got, want)
		}
	}
}
