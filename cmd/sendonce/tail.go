package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// tailEvent is one change tail saw.
type tailEvent struct {
	Time       time.Time `json:"time"`
	Key        string    `json:"key"`
	Event      string    `json:"event"` // accepted, duplicate, state
	State      string    `json:"state"`
	Duplicates int64     `json:"duplicates,omitempty"`
	Attempts   int       `json:"attempts,omitempty"`
	Detail     string    `json:"detail,omitempty"`
}

// tailer remembers what it showed of each recent email, so each poll
// prints only what changed.
type tailer struct {
	seen map[string]record
}

// diff compares a page (newest first) with what was seen, and returns the
// changes oldest first.
func (t *tailer) diff(page []record, first bool) []tailEvent {
	var evs []tailEvent
	for i := len(page) - 1; i >= 0; i-- {
		r := page[i]
		prev, ok := t.seen[r.Key]
		t.seen[r.Key] = r
		if first {
			continue
		}
		if !ok {
			evs = append(evs, tailEvent{Time: r.CreatedAt, Key: r.Key, Event: "accepted", State: r.State, Detail: "via " + r.Source + " to " + strings.Join(r.To, ",")})
			if r.State == "queued" {
				continue
			}
			prev = record{State: "queued"}
		}
		if r.Duplicates > prev.Duplicates {
			evs = append(evs, tailEvent{Time: r.UpdatedAt, Key: r.Key, Event: "duplicate", State: r.State, Duplicates: r.Duplicates, Detail: "suppressed"})
		}
		if r.State != prev.State || (r.Attempts != prev.Attempts && r.State != "sending") {
			detail := r.Reply
			if r.State != "sent" && r.LastError != "" {
				detail = r.LastError
			}
			if r.ResolvedBy != "" && r.ResolvedBy != prev.ResolvedBy {
				detail = "resolved: " + r.ResolvedBy
			}
			evs = append(evs, tailEvent{Time: r.UpdatedAt, Key: r.Key, Event: "state", State: r.State, Attempts: r.Attempts, Detail: detail})
		}
	}
	return evs
}

func newTail() *cobra.Command {
	var server, state string
	var window int
	var interval time.Duration
	var asJSON, history bool
	cmd := &cobra.Command{
		Use:   "tail",
		Short: "Follow new emails and their changes live (acceptance, duplicates, attempts, outcomes)",
		Long: `Follow the ledger live: every new email, every suppressed duplicate and
every change of state of the most recent --window emails, one line each,
until interrupted. It polls the API every --interval.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newAPIClient(server)
			if err != nil {
				return err
			}
			if window < 1 || window > 1000 {
				return fmt.Errorf("--window is %d; use 1 to 1000", window)
			}
			if interval <= 0 {
				return fmt.Errorf("--interval is %v; use a positive duration like 1s", interval)
			}
			q := url.Values{"limit": {fmt.Sprint(window)}}
			if state != "" {
				q.Set("state", state)
			}
			t := &tailer{seen: map[string]record{}}
			out := cmd.OutOrStdout()
			first := !history
			tick := time.NewTicker(interval)
			defer tick.Stop()
			for {
				var page struct {
					Emails []record `json:"emails"`
				}
				_, err := c.do(cmd.Context(), http.MethodGet, "/v1/emails?"+q.Encode(), nil, nil, &page)
				switch {
				case cmd.Context().Err() != nil:
					return nil
				case err != nil:
					return err
				}
				for _, ev := range t.diff(page.Emails, first) {
					printTail(out, ev, asJSON)
				}
				if first {
					fmt.Fprintf(cmd.ErrOrStderr(), "following the %d most recent emails (%d now); interrupt to stop\n", window, len(page.Emails))
				}
				first = false
				select {
				case <-cmd.Context().Done():
					return nil
				case <-tick.C:
				}
			}
		},
	}
	addServerFlag(cmd, &server)
	cmd.Flags().StringVar(&state, "state", "", "follow only emails in this state")
	cmd.Flags().IntVar(&window, "window", 200, "how many of the most recent emails to watch (1-1000)")
	cmd.Flags().DurationVar(&interval, "interval", time.Second, "how often to poll")
	cmd.Flags().BoolVar(&history, "history", false, "also print the emails already there when tail starts")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per line")
	return cmd
}

func printTail(w io.Writer, ev tailEvent, asJSON bool) {
	if asJSON {
		_ = json.NewEncoder(w).Encode(ev)
		return
	}
	what := ev.Event
	switch ev.Event {
	case "duplicate":
		what = fmt.Sprintf("duplicate #%d suppressed", ev.Duplicates)
	case "state":
		what = ev.State
		if ev.Attempts > 0 {
			what += fmt.Sprintf(" (attempt %d)", ev.Attempts)
		}
	}
	line := fmt.Sprintf("%s  %-24s  %s", ev.Time.Local().Format("15:04:05.000"), ev.Key, what)
	if ev.Detail != "" && ev.Event != "duplicate" {
		line += "  " + ev.Detail
	}
	fmt.Fprintln(w, line)
}
