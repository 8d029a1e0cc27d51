package httpapi

import (
	"bytes"
	"context"
	"io"
	"mime"
	"net/http"
	"time"

	"github.com/emersion/go-message"
	"github.com/emersion/go-message/mail"

	"github.com/sendonce/sendonce/internal/metrics"
	"github.com/sendonce/sendonce/store"
)

// MessageView is an email's stored message made readable: its header
// fields in order, and its text and HTML parts decoded.
type MessageView struct {
	Headers [][2]string `json:"headers"`
	Text    string      `json:"text"`
	HTML    string      `json:"html"`
	// Purged: the body was dropped after sending (purge_body_on_send).
	Purged bool `json:"purged"`
}

// maxViewPart bounds what one part contributes to a view.
const maxViewPart = 1 << 20

func (a *API) message(w http.ResponseWriter, r *http.Request) {
	key := r.PathValue("key")
	data, err := a.cfg.Client.Message(r.Context(), callerOf(r).tenant, key)
	if err != nil {
		a.lookupError(w, err, key)
		return
	}
	writeJSON(w, http.StatusOK, viewMessage(data))
}

// viewMessage decodes what it can; a part it cannot decode is shown raw
// rather than hidden.
func viewMessage(data []byte) MessageView {
	v := MessageView{Headers: [][2]string{}}
	if len(data) == 0 {
		v.Purged = true
		return v
	}
	mr, err := mail.CreateReader(bytes.NewReader(data))
	if err != nil && !message.IsUnknownCharset(err) && !message.IsUnknownEncoding(err) {
		v.Text = string(data)
		return v
	}
	defer mr.Close()
	fields := mr.Header.Fields()
	for fields.Next() {
		val, err := fields.Text()
		if err != nil {
			val = fields.Value()
		}
		v.Headers = append(v.Headers, [2]string{fields.Key(), val})
	}
	for {
		p, err := mr.NextPart()
		if err != nil {
			break // io.EOF, or a part that cannot be parsed: show what we have
		}
		h, ok := p.Header.(*mail.InlineHeader)
		if !ok {
			continue // attachments are not shown
		}
		ct, _, _ := mime.ParseMediaType(h.Get("Content-Type"))
		b, _ := io.ReadAll(io.LimitReader(p.Body, maxViewPart))
		switch {
		case ct == "text/html" && v.HTML == "":
			v.HTML = string(b)
		case (ct == "text/plain" || ct == "") && v.Text == "":
			v.Text = string(b)
		}
	}
	return v
}

// EventJSON is one entry of an email's timeline.
type EventJSON struct {
	At      time.Time `json:"at"`
	Kind    string    `json:"kind"`
	State   string    `json:"state"`
	Attempt int       `json:"attempt"`
	Detail  string    `json:"detail,omitempty"`
}

func (a *API) events(w http.ResponseWriter, r *http.Request) {
	key := r.PathValue("key")
	evs, err := a.cfg.Client.Events(r.Context(), callerOf(r).tenant, key)
	if err != nil {
		a.lookupError(w, err, key)
		return
	}
	out := struct {
		Events []EventJSON `json:"events"`
	}{make([]EventJSON, len(evs))}
	for i, e := range evs {
		out.Events[i] = EventJSON{At: e.At.UTC(), Kind: string(e.Kind), State: string(e.State), Attempt: e.Attempt, Detail: e.Detail}
	}
	writeJSON(w, http.StatusOK, out)
}

// Activity is the per-minute history the dashboard charts.
type Activity interface {
	LastHour(tenant string) []metrics.Minute
}

// StatsJSON is the answer of GET /v1/stats.
type StatsJSON struct {
	// Counts are the caller's tenant's emails per state.
	Counts map[string]int64 `json:"counts"`
	// Activity is the tenant's last hour on this node, per minute, oldest
	// first (empty when the server keeps no history).
	Activity []metrics.Minute `json:"activity"`
	Now      time.Time        `json:"now"`
}

func (a *API) stats(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	counts, err := a.cfg.Client.Counts(ctx, callerOf(r).tenant)
	if err != nil {
		a.lookupError(w, err, "")
		return
	}
	out := StatsJSON{Counts: map[string]int64{}, Activity: []metrics.Minute{}, Now: time.Now().UTC()}
	for _, st := range []store.State{store.StateQueued, store.StateSending, store.StateSent, store.StateFailed, store.StateInDoubt} {
		out.Counts[string(st)] = counts[st]
	}
	if a.cfg.Activity != nil {
		out.Activity = a.cfg.Activity.LastHour(callerOf(r).tenant)
	}
	writeJSON(w, http.StatusOK, out)
}
