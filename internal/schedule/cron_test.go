package schedule

import (
	"strings"
	"testing"
	"time"
)

func mustLoc(t *testing.T, name string) *time.Location {
	t.Helper()
	loc, err := time.LoadLocation(name)
	if err != nil {
		t.Skipf("SKIPPED: time zone %s not available: %v", name, err)
	}
	return loc
}

func mustCron(t *testing.T, expr string) *Cron {
	t.Helper()
	c, err := ParseCron(expr)
	if err != nil {
		t.Fatalf("ParseCron(%q): %v", expr, err)
	}
	return c
}

func utc(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t.UTC()
}

// fires lists the fire instants of c in loc within (from, to].
func fires(c *Cron, loc *time.Location, from, to time.Time) []string {
	var out []string
	for t := c.Next(from, loc); !t.IsZero() && !t.After(to); t = c.Next(t, loc) {
		out = append(out, t.UTC().Format(time.RFC3339))
	}
	return out
}

func wantFires(t *testing.T, what string, got []string, want ...string) {
	t.Helper()
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("%s:\n got  %v\n want %v", what, got, want)
	}
}

// Spring forward: a local time in the skipped hour fires once, at the end
// of the gap; several skipped times and the first valid one are one fire.
func TestCronDSTSpringForward(t *testing.T) {
	for _, tc := range []struct {
		zone                 string
		dayBefore, gap, next string // 02:30 local on the day before, on the gap day (the transition), the day after
		q1, q2, q3           string // */15: the last quarter before the gap, the transition, the quarter after it
	}{
		// Europe/Berlin, 2030-03-31: 02:00 CET jumps to 03:00 CEST (01:00Z).
		{"Europe/Berlin", "2030-03-30T01:30:00Z", "2030-03-31T01:00:00Z", "2030-04-01T00:30:00Z",
			"2030-03-31T00:45:00Z", "2030-03-31T01:00:00Z", "2030-03-31T01:15:00Z"},
		// America/New_York, 2030-03-10: 02:00 EST jumps to 03:00 EDT (07:00Z).
		{"America/New_York", "2030-03-09T07:30:00Z", "2030-03-10T07:00:00Z", "2030-03-11T06:30:00Z",
			"2030-03-10T06:45:00Z", "2030-03-10T07:00:00Z", "2030-03-10T07:15:00Z"},
	} {
		t.Run(tc.zone, func(t *testing.T) {
			loc := mustLoc(t, tc.zone)
			daily := mustCron(t, "30 2 * * *")
			wantFires(t, "daily 02:30", fires(daily, loc, utc(tc.dayBefore).Add(-time.Hour), utc(tc.next)),
				tc.dayBefore, tc.gap, tc.next)
			quarter := mustCron(t, "*/15 * * * *")
			wantFires(t, "every 15 minutes across the gap", fires(quarter, loc, utc(tc.q1).Add(-time.Minute), utc(tc.q3)),
				tc.q1, tc.q2, tc.q3)
			// Seconds resolution: every second of the skipped hour is one
			// fire at the transition.
			secs := mustCron(t, "* * 2 * * *")
			got := fires(secs, loc, utc(tc.gap).Add(-time.Hour), utc(tc.gap).Add(time.Hour))
			wantFires(t, "every second of 02:xx on the gap day", got, tc.gap)
		})
	}
}

// Fall back: a local time in the repeated hour fires once, at its first
// occurrence; the second pass through the hour fires nothing.
func TestCronDSTFallBack(t *testing.T) {
	for _, tc := range []struct {
		zone          string
		first, nextDy string // 02:30 local, first occurrence; 02:30 the next day
		halfHours     []string
	}{
		// Europe/Berlin, 2030-10-27: 03:00 CEST goes back to 02:00 CET (01:00Z).
		{"Europe/Berlin", "2030-10-27T00:30:00Z", "2030-10-28T01:30:00Z",
			[]string{"2030-10-26T23:30:00Z", "2030-10-27T00:00:00Z", "2030-10-27T00:30:00Z", "2030-10-27T02:00:00Z", "2030-10-27T02:30:00Z"}},
		// America/New_York, 2030-11-03: 02:00 EDT goes back to 01:00 EST (06:00Z);
		// 02:30 exists once there, 01:30 twice.
		{"America/New_York", "2030-11-03T07:30:00Z", "2030-11-04T07:30:00Z",
			[]string{"2030-11-03T04:30:00Z", "2030-11-03T05:00:00Z", "2030-11-03T05:30:00Z", "2030-11-03T07:00:00Z", "2030-11-03T07:30:00Z"}},
	} {
		t.Run(tc.zone, func(t *testing.T) {
			loc := mustLoc(t, tc.zone)
			daily := mustCron(t, "30 2 * * *")
			wantFires(t, "daily 02:30", fires(daily, loc, utc(tc.first).Add(-2*time.Hour), utc(tc.nextDy)), tc.first, tc.nextDy)
			if tc.zone == "America/New_York" {
				// The repeated hour there is 01:xx.
				daily = mustCron(t, "30 1 * * *")
				wantFires(t, "daily 01:30", fires(daily, loc, utc("2030-11-03T04:00:00Z"), utc("2030-11-03T12:00:00Z")), "2030-11-03T05:30:00Z")
			}
			half := mustCron(t, "*/30 * * * *")
			h := tc.halfHours
			wantFires(t, "every 30 minutes across the repeated hour", fires(half, loc, utc(h[0]).Add(-time.Minute), utc(h[len(h)-1])), h...)
			// Asked from inside the second pass, the next fire is after it.
			second := utc(h[2]).Add(time.Hour + 10*time.Minute) // the repeated hour, second time round
			if got := half.Next(second, loc).UTC().Format(time.RFC3339); got != h[3] {
				t.Fatalf("Next from inside the repeated hour: %s, want %s", got, h[3])
			}
		})
	}
}

func TestCronFields(t *testing.T) {
	loc := time.UTC
	from := utc("2030-01-01T00:00:00Z") // a Tuesday
	for _, tc := range []struct{ expr, want string }{
		{"0 9 * * mon-fri", "2030-01-01T09:00:00Z"},
		{"0 9 * * 0", "2030-01-06T09:00:00Z"},
		{"0 9 * * 7", "2030-01-06T09:00:00Z"},
		{"@monthly", "2030-02-01T00:00:00Z"},
		{"0 0 1 jan *", "2031-01-01T00:00:00Z"},
		{"15,45 */6 * * *", "2030-01-01T00:15:00Z"},
		{"0 12 13 * fri", "2030-01-04T12:00:00Z"}, // day-of-month OR day-of-week
		{"*/20 * * * * *", "2030-01-01T00:00:20Z"},
		{"0 0 29 2 *", "2032-02-29T00:00:00Z"},
	} {
		if got := mustCron(t, tc.expr).Next(from, loc).Format(time.RFC3339); got != tc.want {
			t.Errorf("%q after %v: %s, want %s", tc.expr, from, got, tc.want)
		}
	}
}

func TestCronErrorsNameTheField(t *testing.T) {
	for expr, want := range map[string]string{
		"* * * *":     "has 4 fields",
		"61 * * * *":  "minute field",
		"* 24 * * *":  "hour field",
		"* * 0 * *":   "day-of-month field",
		"* * * 13 *":  "month field",
		"* * * * 8":   "day-of-week field",
		"*/0 * * * *": "step",
		"0 0 30 2 *":  "never matches",
		"x * * * *":   "not a number",
		"5-1 * * * *": "empty range",
	} {
		_, err := ParseCron(expr)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseCron(%q): %v, want an error containing %q", expr, err, want)
		}
	}
}
