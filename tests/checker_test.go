package tests

import (
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/sendonce/sendonce/transport/transporttest"
)

// tortureRecord is what the checker needs of one ledger record.
type tortureRecord struct {
	Key        string `json:"key"`
	State      string `json:"state"`
	MessageID  string `json:"message_id"`
	ResolvedBy string `json:"resolved_by,omitempty"`
}

// checkInput is everything the checker compares: what producers were told,
// what the ledger says and what the sink got.
type checkInput struct {
	// Submitted lists every key a producer tried to submit.
	Submitted []string
	// Acked holds the keys a producer got an acknowledgement for (HTTP
	// 202/200, SMTP 250).
	Acked map[string]bool
	// Records are the ledger's records, by key.
	Records map[string]tortureRecord
	// AtSink counts, per Message-ID, the copies the sink may have
	// delivered: accepted with 250, or taken in and never answered (a drop
	// or a stall after the final dot: the server has the message).
	AtSink map[string]int
}

// tortureReport is the checker's verdict; it is written as JSON.
type tortureReport struct {
	Seed            uint64         `json:"seed"`
	Emails          int            `json:"emails"`
	Nodes           int            `json:"nodes"`
	Store           string         `json:"store"`
	InDoubtPolicy   string         `json:"in_doubt_policy"`
	Race            bool           `json:"race_detector"`
	DurationSeconds float64        `json:"duration_seconds"`
	Submissions     int            `json:"submissions"`      // submission attempts that got an answer or an error
	DuplicateSubmit int            `json:"duplicate_submit"` // planned repeats of a key
	Faults          map[string]int `json:"faults"`
	// RecordsBySource counts the records by the front door that admitted them.
	RecordsBySource map[string]int `json:"records_by_source"`

	Acknowledged   int `json:"acknowledged"`
	Unacknowledged int `json:"unacknowledged"`
	DeliveredOnce  int `json:"delivered_once"`
	// DuplicatedAtSink counts Message-IDs the sink got more than once:
	// InDoubtResends of them after an in-doubt record was resent by policy
	// (allowed: same Message-ID, receivers discard it), RealDuplicates the
	// rest (a broken promise).
	DuplicatedAtSink int `json:"duplicated_at_sink"`
	InDoubtResends   int `json:"in_doubt_resends"`
	RealDuplicates   int `json:"real_duplicates"`
	// Lost: an acknowledged key with no record, or a sent record the sink
	// does not have.
	Lost              int `json:"lost"`
	LostNoRecord      int `json:"lost_no_record"`
	LostSentNotAtSink int `json:"lost_sent_not_at_sink"`
	// NotSettled: an acknowledged key still queued or sending at the end.
	NotSettled    int `json:"not_settled"`
	InDoubt       int `json:"in_doubt"`
	InDoubtAtSink int `json:"in_doubt_at_sink"`
	Failed        int `json:"failed"`
	FailedAtSink  int `json:"failed_at_sink"`
	// UnknownAtSink: Message-IDs at the sink that no record has.
	UnknownAtSink int      `json:"unknown_at_sink"`
	Examples      []string `json:"examples,omitempty"`
}

// ok reports whether the promise held: no duplicate outside an in-doubt
// resend, nothing lost, nothing left unsettled, nothing the ledger does not
// know about.
func (r *tortureReport) ok() bool {
	return r.RealDuplicates == 0 && r.Lost == 0 && r.NotSettled == 0 && r.UnknownAtSink == 0
}

func (r *tortureReport) example(format string, args ...any) {
	if len(r.Examples) < 20 {
		r.Examples = append(r.Examples, fmt.Sprintf(format, args...))
	}
}

// summary is the human report.
func (r *tortureReport) summary() string {
	var b strings.Builder
	verdict := "PASS"
	if !r.ok() {
		verdict = "FAIL"
	}
	build := "race-built"
	if !r.Race {
		build = "built without -race"
	}
	fmt.Fprintf(&b, "torture %s: seed=%d emails=%d nodes=%d (%s) in_doubt=%s, %s binary, in %.1fs\n", verdict, r.Seed, r.Emails, r.Nodes, r.Store, r.InDoubtPolicy, build, r.DurationSeconds)
	fmt.Fprintf(&b, "  submissions %d (planned repeats %d); acknowledged %d, unacknowledged %d; records by front door %v\n", r.Submissions, r.DuplicateSubmit, r.Acknowledged, r.Unacknowledged, r.RecordsBySource)
	fmt.Fprintf(&b, "  delivered once %d; duplicated at the sink %d (in-doubt resends %d, REAL duplicates %d)\n", r.DeliveredOnce, r.DuplicatedAtSink, r.InDoubtResends, r.RealDuplicates)
	fmt.Fprintf(&b, "  LOST %d (no record %d, sent but not at the sink %d); not settled %d; unknown at the sink %d\n", r.Lost, r.LostNoRecord, r.LostSentNotAtSink, r.NotSettled, r.UnknownAtSink)
	fmt.Fprintf(&b, "  in_doubt %d (of which the sink received %d); failed permanently %d (at the sink %d)\n", r.InDoubt, r.InDoubtAtSink, r.Failed, r.FailedAtSink)
	kinds := make([]string, 0, len(r.Faults))
	for k := range r.Faults {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	fmt.Fprintf(&b, "  faults:")
	for _, k := range kinds {
		fmt.Fprintf(&b, " %s=%d", k, r.Faults[k])
	}
	b.WriteString("\n")
	for _, e := range r.Examples {
		fmt.Fprintf(&b, "  example: %s\n", e)
	}
	return b.String()
}

// sinkDeliveries counts what the sink may have delivered, per Message-ID:
// a message rejected at the final dot (4xx/5xx) was not delivered.
func sinkDeliveries(msgs []transporttest.Received) map[string]int {
	n := map[string]int{}
	for _, m := range msgs {
		if !m.Answered || m.Code == 250 {
			n[m.MessageID]++
		}
	}
	return n
}

// check is the checker: pure, deterministic, no I/O.
func check(in checkInput, r *tortureReport) {
	byMID := make(map[string]tortureRecord, len(in.Records))
	for _, rec := range in.Records {
		byMID[rec.MessageID] = rec
	}
	seen := map[string]bool{}
	for _, k := range in.Submitted {
		if seen[k] {
			continue
		}
		seen[k] = true
		if !in.Acked[k] {
			r.Unacknowledged++
		}
	}
	keys := make([]string, 0, len(in.Acked))
	for k, ok := range in.Acked {
		if ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	r.Acknowledged = len(keys)
	for _, k := range keys {
		rec, ok := in.Records[k]
		if !ok {
			r.Lost++
			r.LostNoRecord++
			r.example("lost: %s was acknowledged but has no record", k)
			continue
		}
		n := in.AtSink[rec.MessageID]
		switch rec.State {
		case "sent":
			switch {
			case n == 0:
				r.Lost++
				r.LostSentNotAtSink++
				r.example("lost: %s is sent but %s is not at the sink", k, rec.MessageID)
			case n == 1:
				r.DeliveredOnce++
			}
		case "in_doubt":
			r.InDoubt++
			if n > 0 {
				r.InDoubtAtSink++
			}
		case "failed":
			r.Failed++
			if n > 0 {
				r.FailedAtSink++
			}
		default:
			r.NotSettled++
			r.example("not settled: %s is %s", k, rec.State)
		}
	}
	mids := make([]string, 0, len(in.AtSink))
	for mid := range in.AtSink {
		mids = append(mids, mid)
	}
	sort.Strings(mids)
	for _, mid := range mids {
		n := in.AtSink[mid]
		rec, ok := byMID[mid]
		if !ok {
			r.UnknownAtSink++
			r.example("unknown: the sink got %s (%d times), which no record has", mid, n)
			continue
		}
		if n < 2 {
			continue
		}
		r.DuplicatedAtSink++
		if strings.HasPrefix(rec.ResolvedBy, "resend") {
			r.InDoubtResends++
			continue
		}
		r.RealDuplicates++
		r.example("duplicate: %s (%s, %s) reached the sink %d times", rec.Key, mid, rec.State, n)
	}
}

func TestChecker(t *testing.T) {
	rec := func(k, state, resolved string) tortureRecord {
		return tortureRecord{Key: k, State: state, MessageID: "<" + k + "@x>", ResolvedBy: resolved}
	}
	in := checkInput{
		Submitted: []string{"once", "dup", "resent", "nor", "gone", "doubt", "doubt2", "fail", "late", "unack", "unack", "queued"},
		Acked: map[string]bool{"once": true, "dup": true, "resent": true, "nor": true, "gone": true, "doubt": true,
			"doubt2": true, "fail": true, "late": true, "queued": true},
		Records: map[string]tortureRecord{
			"once": rec("once", "sent", ""), "dup": rec("dup", "sent", ""), "resent": rec("resent", "sent", "resend by policy:resend"),
			"gone": rec("gone", "sent", ""), "doubt": rec("doubt", "in_doubt", ""), "doubt2": rec("doubt2", "in_doubt", ""),
			"fail": rec("fail", "failed", ""), "late": rec("late", "sent", ""), "unack": rec("unack", "sent", ""),
			"queued": rec("queued", "queued", ""),
		},
		AtSink: sinkDeliveries([]transporttest.Received{
			{MessageID: "<once@x>", Answered: true, Code: 250},
			{MessageID: "<dup@x>", Answered: true, Code: 250}, {MessageID: "<dup@x>", Answered: true, Code: 250},
			{MessageID: "<resent@x>"}, {MessageID: "<resent@x>", Answered: true, Code: 250},
			{MessageID: "<doubt@x>"},
			{MessageID: "<fail@x>", Answered: true, Code: 550}, // rejected: not delivered
			{MessageID: "<late@x>", Answered: true, Code: 451}, {MessageID: "<late@x>", Answered: true, Code: 250},
			{MessageID: "<unack@x>", Answered: true, Code: 250},
			{MessageID: "<stranger@x>", Answered: true, Code: 250},
		}),
	}
	var r tortureReport
	check(in, &r)
	want := tortureReport{
		Acknowledged: 10, Unacknowledged: 1, DeliveredOnce: 2, DuplicatedAtSink: 2, InDoubtResends: 1, RealDuplicates: 1,
		Lost: 2, LostNoRecord: 1, LostSentNotAtSink: 1, NotSettled: 1, InDoubt: 2, InDoubtAtSink: 1, Failed: 1, UnknownAtSink: 1,
	}
	r.Examples = nil
	if fmt.Sprintf("%+v", r) != fmt.Sprintf("%+v", want) {
		t.Errorf("report\n got %+v\nwant %+v", r, want)
	}
	if r.ok() {
		t.Error("a report with a duplicate and a loss is ok")
	}
	clean := tortureReport{Acknowledged: 3, DeliveredOnce: 2, InDoubt: 1, DuplicatedAtSink: 1, InDoubtResends: 1}
	if !clean.ok() {
		t.Error("in-doubt resends alone must pass")
	}
}
