package schedule

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Cron is a parsed cron expression: five fields (minute hour day-of-month
// month day-of-week), or six with a leading seconds field. It matches local
// wall-clock times in a time zone; Next turns them into instants with the
// daylight-saving rules documented on Next.
type Cron struct {
	expr                            string
	sec, min, hour, dom, month, dow uint64 // bit i set: value i matches
	domStar, dowStar                bool
}

var monthNames = map[string]int{"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12}
var dayNames = map[string]int{"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}

var macros = map[string]string{
	"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
	"@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}

// ParseCron parses a cron expression: "m h dom mon dow", "s m h dom mon
// dow", or one of @yearly, @monthly, @weekly, @daily, @hourly. Fields take
// *, numbers, ranges a-b, steps */n and a-b/n, comma lists, and month and
// day names (jan, mon). Day-of-week 0 and 7 are Sunday. As in Vixie cron,
// when both day-of-month and day-of-week are restricted, a day matching
// either matches.
func ParseCron(expr string) (*Cron, error) {
	e := strings.TrimSpace(expr)
	if m, ok := macros[strings.ToLower(e)]; ok {
		e = m
	}
	f := strings.Fields(e)
	if len(f) == 5 {
		f = append([]string{"0"}, f...)
	}
	if len(f) != 6 {
		return nil, fmt.Errorf("%q has %d fields; write 5 (minute hour day-of-month month day-of-week), 6 with leading seconds, or @daily/@hourly/...", expr, len(strings.Fields(e)))
	}
	c := &Cron{expr: expr}
	specs := []struct {
		name   string
		dst    *uint64
		lo, hi int
		names  map[string]int
		star   *bool
	}{
		{"seconds", &c.sec, 0, 59, nil, nil},
		{"minute", &c.min, 0, 59, nil, nil},
		{"hour", &c.hour, 0, 23, nil, nil},
		{"day-of-month", &c.dom, 1, 31, nil, &c.domStar},
		{"month", &c.month, 1, 12, monthNames, nil},
		{"day-of-week", &c.dow, 0, 7, dayNames, &c.dowStar},
	}
	for i, s := range specs {
		bits, star, err := parseField(f[i], s.lo, s.hi, s.names)
		if err != nil {
			return nil, fmt.Errorf("%q: %s field %q: %w", expr, s.name, f[i], err)
		}
		*s.dst = bits
		if s.star != nil {
			*s.star = star
		}
	}
	if c.dow&(1<<7) != 0 {
		c.dow |= 1 // 7 is Sunday too
	}
	// A day-of-month that no month has (Feb 30) would never fire: refuse it
	// now rather than wait forever.
	if _, ok := c.next(time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC), time.UTC); !ok {
		return nil, fmt.Errorf("%q never matches a date (a day-of-month no month has?)", expr)
	}
	return c, nil
}

func parseField(s string, lo, hi int, names map[string]int) (bits uint64, star bool, err error) {
	for _, part := range strings.Split(s, ",") {
		rng, stepStr, hasStep := strings.Cut(part, "/")
		step := 1
		if hasStep {
			step, err = strconv.Atoi(stepStr)
			if err != nil || step <= 0 {
				return 0, false, fmt.Errorf("step %q is not a positive number", stepStr)
			}
		}
		var a, b int
		switch {
		case rng == "*":
			a, b = lo, hi
			if !hasStep {
				star = true
			}
		default:
			x, y, isRange := strings.Cut(rng, "-")
			if a, err = value(x, names); err != nil {
				return 0, false, err
			}
			b = a
			if isRange {
				if b, err = value(y, names); err != nil {
					return 0, false, err
				}
			} else if hasStep {
				b = hi // "5/15" means 5-hi/15
			}
		}
		if a < lo || b > hi || a > b {
			return 0, false, fmt.Errorf("%q is outside %d-%d or an empty range", part, lo, hi)
		}
		for v := a; v <= b; v += step {
			bits |= 1 << v
		}
	}
	if bits == 0 {
		return 0, false, errors.New("matches nothing")
	}
	return bits, star, nil
}

func value(s string, names map[string]int) (int, error) {
	if v, ok := names[strings.ToLower(s)]; ok {
		return v, nil
	}
	v, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a number or a name", s)
	}
	return v, nil
}

// String returns the expression as written.
func (c *Cron) String() string { return c.expr }

func (c *Cron) dayMatches(t time.Time) bool {
	if c.month&(1<<int(t.Month())) == 0 {
		return false
	}
	domOK := c.dom&(1<<t.Day()) != 0
	dowOK := c.dow&(1<<int(t.Weekday())) != 0
	switch {
	case c.domStar && c.dowStar:
		return true
	case c.domStar:
		return dowOK
	case c.dowStar:
		return domOK
	}
	return domOK || dowOK
}

// Next returns the first fire instant strictly after after, for the wall
// clock of loc. Daylight saving:
//
//   - A local time that does not exist (the hour skipped in spring) fires
//     once, at the first instant after the gap (the transition itself). If
//     several skipped times, or a skipped time and the first valid one, map
//     to that instant, it is one fire.
//   - A local time that exists twice (the hour repeated in autumn) fires
//     once, at its first occurrence; the repeated hour fires nothing.
//
// So each local time the expression names fires exactly once, and fire
// instants strictly increase.
func (c *Cron) Next(after time.Time, loc *time.Location) time.Time {
	t, _ := c.next(after, loc)
	return t
}

// next searches up to eight years ahead (a Feb 29 on a given weekday can
// take that long).
func (c *Cron) next(after time.Time, loc *time.Location) (time.Time, bool) {
	w := after.In(loc)
	day := time.Date(w.Year(), w.Month(), w.Day(), 0, 0, 0, 0, time.UTC) // a calendar date, zone-free
	startH, startM, startS := w.Hour(), w.Minute(), w.Second()
	first := true
	for i := 0; i < 366*8+2; i, day = i+1, day.AddDate(0, 0, 1) {
		if !c.dayMatches(day) {
			first = false
			continue
		}
		for h := 0; h < 24; h++ {
			if c.hour&(1<<h) == 0 || (first && h < startH) {
				continue
			}
			for m := 0; m < 60; m++ {
				if c.min&(1<<m) == 0 || (first && h == startH && m < startM) {
					continue
				}
				for s := 0; s < 60; s++ {
					if c.sec&(1<<s) == 0 || (first && h == startH && m == startM && s < startS) {
						continue
					}
					// Resolved instants never decrease as the wall time
					// grows, so earlier wall times cannot be after
					// after; later ones may still resolve to it or before
					// (the repeated hour), hence the check.
					if inst := resolve(day.Year(), day.Month(), day.Day(), h, m, s, loc); inst.After(after) {
						return inst, true
					}
				}
			}
		}
		first = false
	}
	return time.Time{}, false
}

// resolve maps a local wall time to an instant: its first occurrence when
// it exists once or twice, or the end of the gap when daylight saving
// skipped it.
func resolve(y int, mo time.Month, d, h, mi, s int, loc *time.Location) time.Time {
	naive := time.Date(y, mo, d, h, mi, s, 0, time.UTC)
	var best time.Time
	seen := map[int]bool{}
	// The zone offsets in force around that wall time: any occurrence of it
	// uses one of them.
	for _, probe := range []time.Duration{-26 * time.Hour, -13 * time.Hour, 0, 13 * time.Hour, 26 * time.Hour} {
		_, off := naive.Add(probe).In(loc).Zone()
		if seen[off] {
			continue
		}
		seen[off] = true
		inst := naive.Add(-time.Duration(off) * time.Second)
		lw := inst.In(loc)
		if lw.Year() == y && lw.Month() == mo && lw.Day() == d && lw.Hour() == h && lw.Minute() == mi && lw.Second() == s {
			if best.IsZero() || inst.Before(best) {
				best = inst
			}
		}
	}
	if !best.IsZero() {
		return best
	}
	// A gap: read with the offset before the transition, the wall time
	// lands after the gap; the zone that instant is in began at the
	// transition, the first valid instant after the skipped time.
	_, before := naive.Add(-26 * time.Hour).In(loc).Zone()
	inst := naive.Add(-time.Duration(before) * time.Second)
	start, _ := inst.In(loc).ZoneBounds()
	if start.IsZero() || start.After(inst) {
		return inst
	}
	return start
}
