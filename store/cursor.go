package store

import (
	"encoding/base64"
	"strconv"
	"strings"
)

// The cursor of List is the ID of the last record of the previous page,
// with a version prefix so a future format can be told apart. Every store
// lists by descending ID, so they share it.
const cursorPrefix = "v1:"

// EncodeCursor makes the cursor that continues after the record lastID.
func EncodeCursor(lastID int64) string {
	return base64.RawURLEncoding.EncodeToString([]byte(cursorPrefix + strconv.FormatInt(lastID, 10)))
}

// DecodeCursor returns the ID a cursor continues after, or ErrBadCursor.
func DecodeCursor(c string) (int64, error) {
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil {
		return 0, ErrBadCursor
	}
	rest, ok := strings.CutPrefix(string(b), cursorPrefix)
	if !ok {
		return 0, ErrBadCursor
	}
	id, err := strconv.ParseInt(rest, 10, 64)
	if err != nil || id <= 0 {
		return 0, ErrBadCursor
	}
	return id, nil
}

// PageLimit is the page size List uses for f: DefaultListLimit when unset,
// at most MaxListLimit.
func (f Filter) PageLimit() int {
	switch {
	case f.Limit <= 0:
		return DefaultListLimit
	case f.Limit > MaxListLimit:
		return MaxListLimit
	}
	return f.Limit
}

// PrefixEnd is the least string greater than every string that starts with
// prefix, for a range scan on an index (key >= prefix AND key < end). ok is
// false when there is none (the prefix is all 0xff bytes): scan to the end.
func PrefixEnd(prefix string) (end string, ok bool) {
	b := []byte(prefix)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] < 0xff {
			b[i]++
			return string(b[:i+1]), true
		}
	}
	return "", false
}
