package tests

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce/transport/transporttest"
)

// scheduleCluster is three `sendonce serve` nodes on one PostgreSQL
// ledger, all running the same schedules from one configuration file.
type scheduleCluster struct {
	*cluster
	config string
}

func (c *scheduleCluster) start(i int) {
	s := startServerArgs(c.t, c.dirs[i], []string{"--config", c.config, "--store", c.store, "--transport", c.sink.URL(), "--smtp", "off"},
		"SENDONCE_DISPATCH_LEASE=5s", "SENDONCE_DISPATCH_POLL_INTERVAL=100ms", "SENDONCE_DISPATCH_WORKERS=32")
	c.mu.Lock()
	c.nodes[i] = s
	c.mu.Unlock()
}

type fireRow struct {
	key, state, owner string
	at                time.Time
	admitted, dups    int64
	attempts          int
}

func listFires(t *testing.T, conn *pgx.Conn, schedule string) []fireRow {
	t.Helper()
	rows, err := conn.Query(context.Background(), `SELECT fire_key, state, owner, scheduled_at, admitted, duplicates, attempts
		FROM sendonce_fires WHERE schedule = $1 ORDER BY scheduled_at`, schedule)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []fireRow
	for rows.Next() {
		var f fireRow
		var at int64
		if err := rows.Scan(&f.key, &f.state, &f.owner, &at, &f.admitted, &f.dups, &f.attempts); err != nil {
			t.Fatal(err)
		}
		f.at = time.Unix(0, at).UTC()
		out = append(out, f)
	}
	return out
}

// TestScheduleMultiNodeKill: three nodes on PostgreSQL run the same two
// schedules: "often" fires every 2 seconds to 20 recipients, "big" fires
// once to 50,000 (SENDONCE_SCHEDULE_RECIPIENTS scales it). While "big"
// is expanding, the node running it is killed with SIGKILL and restarted;
// another node takes the fire over when its lease expires and resumes at
// its last recorded batch. At the end every fire is done, and every
// recipient of every fire has exactly one email in the ledger and at most
// one copy at the SMTP sink (exactly one for each email recorded sent):
// none skipped, none twice.
func TestScheduleMultiNodeKill(t *testing.T) {
	storeURL := postgresURL(t)
	nBig := 50000 // the size; about 95 s on an idle 2-core machine
	if s := os.Getenv("SENDONCE_SCHEDULE_RECIPIENTS"); s != "" {
		nBig, _ = strconv.Atoi(s)
	}
	const nOften = 20
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	rcpts := func(name, prefix string, n int) {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, `{"email": "%s%06d@example.com", "name": "User %d"}`+"\n", prefix, i, i)
		}
		write(name, b.String())
	}
	rcpts("big.jsonl", "big", nBig)
	rcpts("often.jsonl", "often", nOften)
	write("subject.tmpl", "Your reminder for {{.Fire.At.Format \"2006-01-02 15:04:05\"}}\n")
	write("text.tmpl", "Hello {{.name}},\nthis is your reminder.\n")
	write("html.tmpl", "<p>Hello {{.name}}</p>\n")
	// "big" fires once, a few seconds after the nodes start (a six-field
	// cron naming one second of one day).
	bigAt := time.Now().UTC().Add(8 * time.Second).Truncate(time.Second)
	config := func(oftenCron string) string {
		return fmt.Sprintf(`schedules:
  - name: often
    cron: %q
    recipients: {file: often.jsonl}
    template: {subject: subject.tmpl, text: text.tmpl, html: html.tmpl}
    from: "Reminders <noreply@example.org>"
  - name: big
    cron: "%d %d %d %d %d *"
    recipients: {file: big.jsonl}
    template: {subject: subject.tmpl, text: text.tmpl}
    from: "Reminders <noreply@example.org>"
scheduler:
  lease: 3s
  poll_interval: 200ms
  batch_size: 1000
`, oftenCron, bigAt.Second(), bigAt.Minute(), bigAt.Hour(), bigAt.Day(), int(bigAt.Month()))
	}
	cfg1 := write("sendonce.yaml", config("*/2 * * * * *"))

	out, err := exec.Command(binary, "migrate", "--postgres", storeURL).CombinedOutput()
	if err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	sink := transporttest.NewSink(t)
	c := &scheduleCluster{cluster: &cluster{t: t, store: storeURL, sink: sink, nodes: make([]*server, 3), dirs: make([]string, 3)}, config: cfg1}
	for i := range 3 {
		c.dirs[i] = t.TempDir()
		c.start(i)
	}
	started := time.Now()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, storeURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)

	// Kill the node running "big" once it has admitted a fifth of it,
	// preferably in the window between admitting a batch and recording its
	// cursor (more emails in the ledger than the fire has recorded): the
	// node that takes over then admits that batch again, as duplicates.
	// Past half of the fire, kill it wherever it is.
	var victim int
	var killedAt fireRow
	var inWindow int64
	eventually(t, 2*time.Minute, "the big fire a fifth done", func() (bool, string) {
		fs := listFires(t, conn, "big")
		if len(fs) == 0 {
			return false, "no fire yet"
		}
		f := fs[0]
		if f.state != "running" || f.admitted < int64(nBig/5) {
			return f.state == "done", fmt.Sprintf("%+v", f)
		}
		var emails int64
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM sendonce_emails WHERE tenant = 'default' AND idem_key >= 'big@' AND idem_key < 'big@~'").Scan(&emails); err != nil {
			return false, err.Error()
		}
		if emails == f.admitted && f.admitted < int64(nBig/2) {
			return false, "between batches"
		}
		pid, _ := strconv.Atoi(f.owner[strings.LastIndexByte(f.owner, '/')+1:])
		for i := range 3 {
			if n := c.node(i); n.cmd.Process.Pid == pid {
				n.kill()
				// The node may have recorded its batch between the reads
				// above and the kill; read both again now that it is dead
				// (no other node takes the fire before its lease expires).
				err := conn.QueryRow(ctx, `SELECT f.admitted, (SELECT count(*) FROM sendonce_emails
					WHERE tenant = 'default' AND idem_key >= 'big@' AND idem_key < 'big@~')
					FROM sendonce_fires f WHERE f.fire_key = $1 AND f.owner = $2`, f.key, f.owner).Scan(&f.admitted, &emails)
				if err != nil {
					t.Fatalf("reading the fire after the kill (taken over already?): %v", err)
				}
				victim, killedAt, inWindow = i, f, emails-f.admitted
				return true, ""
			}
		}
		return false, "owner " + f.owner + " is no node of ours"
	})
	if killedAt.key == "" {
		t.Fatalf("the big fire finished before a node could be killed in it; raise SENDONCE_SCHEDULE_RECIPIENTS")
	}
	t.Logf("%s: killed node %d running %s after %d recorded as admitted, %d more admitted but not yet recorded",
		time.Since(started).Round(time.Second), victim, killedAt.key, killedAt.admitted, inWindow)
	c.start(victim)

	// Let "often" fire a while longer on the three nodes.
	eventually(t, 3*time.Minute, "the big fire done and 5 fires of often since it began", func() (bool, string) {
		big := listFires(t, conn, "big")
		done := 0
		for _, f := range listFires(t, conn, "often") {
			if f.state == "done" && f.at.After(bigAt) {
				done++
			}
		}
		return len(big) == 1 && big[0].state == "done" && done >= 5, fmt.Sprintf("big %+v, often done since %d", big, done)
	})

	t.Logf("%s: big done", time.Since(started).Round(time.Second))
	// Stop "often" firing: restart the nodes with its cron moved to a
	// far date. Its name is unchanged, so a fire a stopping node handed
	// back is still finished by the restarted nodes.
	for i := range 3 {
		c.node(i).stop()
	}
	c.config = write("sendonce-2.yaml", config("0 0 0 1 1 *"))
	for i := range 3 {
		c.start(i)
	}
	t.Logf("%s: restarted without new fires of often", time.Since(started).Round(time.Second))
	eventually(t, 5*time.Minute, "every fire done and every email settled", func() (bool, string) {
		var open, unsettled int
		conn.QueryRow(ctx, "SELECT count(*) FROM sendonce_fires WHERE state <> 'done'").Scan(&open)
		conn.QueryRow(ctx, "SELECT count(*) FROM sendonce_emails WHERE state IN ('queued', 'sending')").Scan(&unsettled)
		return open == 0 && unsettled == 0, fmt.Sprintf("%d fires open, %d emails unsettled", open, unsettled)
	})
	// A node killed with SIGKILL may die after a commit marker and before
	// the sink's answer: those emails are in_doubt, held for a decision
	// (docs/guarantees.md). Decide them as an operator would, from the
	// receiving side's evidence: mark sent what arrived, resend the rest.
	resolved := resolveInDoubt(t, conn, c.node(0).base, sink)
	eventually(t, 2*time.Minute, "resent emails settled", func() (bool, string) {
		var unsettled int
		conn.QueryRow(ctx, "SELECT count(*) FROM sendonce_emails WHERE state <> 'sent'").Scan(&unsettled)
		return unsettled == 0, fmt.Sprintf("%d emails not sent", unsettled)
	})
	elapsed := time.Since(started)

	// Every fire: one record per recipient, every key of the fire present.
	type rec struct{ state, messageID string }
	byFire := map[string]map[string]rec{}
	rows, err := conn.Query(ctx, "SELECT idem_key, state, message_id, rcpt_to->>0 FROM sendonce_emails")
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]int{}
	for rows.Next() {
		var key, state, mid, to string
		if err := rows.Scan(&key, &state, &mid, &to); err != nil {
			t.Fatal(err)
		}
		fire, addr, _ := strings.Cut(key, "/")
		if addr != to {
			t.Errorf("email %s is addressed to %s", key, to)
		}
		if byFire[fire] == nil {
			byFire[fire] = map[string]rec{}
		}
		byFire[fire][addr] = rec{state, mid}
		states[state]++
	}
	rows.Close()
	atSink := sink.CountByMessageID()
	check := func(schedule, prefix string, n int) int {
		fires := listFires(t, conn, schedule)
		for _, f := range fires {
			got := byFire[f.key]
			if len(got) != n {
				t.Errorf("fire %s: %d recipients have an email, want %d", f.key, len(got), n)
			}
			for i := range n {
				addr := fmt.Sprintf("%s%06d@example.com", prefix, i)
				r, ok := got[addr]
				switch {
				case !ok:
					t.Errorf("fire %s skipped %s", f.key, addr)
				case atSink[r.messageID] > 1:
					t.Errorf("fire %s: %s received %d copies", f.key, addr, atSink[r.messageID])
				case r.state != "sent" || atSink[r.messageID] != 1:
					t.Errorf("fire %s: %s is %s and the sink has %d copies, want sent and 1", f.key, addr, r.state, atSink[r.messageID])
				}
			}
		}
		return len(fires)
	}
	nb := check("big", "big", nBig)
	if nb != 1 {
		t.Errorf("%d fires of big, want 1", nb)
	}
	no := check("often", "often", nOften)
	// None of "often"'s instants was skipped while the nodes ran: from its
	// first fire to its last, one fire every 2 seconds.
	of := listFires(t, conn, "often")
	for i := 1; i < len(of); i++ {
		if gap := of[i].at.Sub(of[i-1].at); gap != 2*time.Second {
			t.Errorf("often: %s follows %s: %v apart, want 2s (a fire was skipped)", of[i].key, of[i-1].key, gap)
		}
	}
	if len(byFire) != nb+no {
		t.Errorf("emails of %d fires in the ledger, want %d", len(byFire), nb+no)
	}
	big := listFires(t, conn, "big")[0]
	t.Logf("%d recipients in big (run %d times, %d duplicates re-admitted); %d fires of often; ledger %v; in doubt after the kill: %v; %d messages at the sink; %s",
		nBig, big.attempts, big.dups, no, states, resolved, len(atSink), elapsed.Round(time.Second))
	if big.attempts < 2 {
		t.Errorf("the big fire ran %d times; the kill should have made another node resume it", big.attempts)
	}
	if big.dups < inWindow {
		t.Errorf("the batch admitted but not recorded before the kill (%d emails) was re-admitted as %d duplicates", inWindow, big.dups)
	}
}

// resolveInDoubt resolves every in_doubt email through the API: mark_sent
// if its Message-ID reached the sink, resend otherwise. It returns how many
// of each.
func resolveInDoubt(t *testing.T, conn *pgx.Conn, base string, sink *transporttest.Sink) map[string]int {
	t.Helper()
	rows, err := conn.Query(context.Background(), "SELECT idem_key, message_id FROM sendonce_emails WHERE state = 'in_doubt'")
	if err != nil {
		t.Fatal(err)
	}
	type doubt struct{ key, mid string }
	var ds []doubt
	for rows.Next() {
		var d doubt
		rows.Scan(&d.key, &d.mid)
		ds = append(ds, d)
	}
	rows.Close()
	atSink := sink.CountByMessageID()
	out := map[string]int{}
	for _, d := range ds {
		action := "resend"
		if atSink[d.mid] > 0 {
			action = "mark_sent"
		}
		resp, err := http.Post(base+"/v1/emails/"+url.PathEscape(d.key)+"/resolve", "application/json", strings.NewReader(`{"action": "`+action+`"}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("resolve %s %s: %s", d.key, action, resp.Status)
		}
		out[action]++
	}
	return out
}

// TestScheduleCommands: preview renders without admitting, run fires an
// instant with that instant's keys (twice is once), list shows the fire
// and its progress, serve delivers what run admitted, and a template that
// does not parse stops serve at start naming its file and line.
func TestScheduleCommands(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("r.csv", "email,name\nann@example.com,<Ann>\nbob@example.com,Bob\n")
	write("s.tmpl", "Reminder for {{.name}}\n")
	write("t.tmpl", "Hello {{.name}}\n")
	write("h.tmpl", "<p>Hello {{.name}}</p>\n")
	write("c.yaml", `schedules:
  - name: cron_monthly_email_reminder
    cron: "0 9 1 * *"
    time_zone: Europe/Berlin
    recipients: {file: r.csv}
    template: {subject: s.tmpl, text: t.tmpl, html: h.tmpl}
    from: "Reminders <noreply@example.org>"
`)
	data := filepath.Join(dir, "data")
	cli := func(args ...string) string {
		t.Helper()
		args = append(args, "--config", filepath.Join(dir, "c.yaml"), "--data", data)
		out, err := exec.Command(binary, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("sendonce %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	out := cli("schedule", "preview", "cron_monthly_email_reminder", "--to", "ann@example.com")
	if !strings.Contains(out, "Subject: Reminder for <Ann>") || !strings.Contains(out, "<p>Hello &lt;Ann&gt;</p>") {
		t.Fatalf("preview:\n%s", out)
	}
	out = cli("schedule", "run", "cron_monthly_email_reminder", "--at", "2026-12-01 09:00")
	if !strings.Contains(out, "fire cron_monthly_email_reminder@2026-12-01T08:00:00Z: 2 admitted") {
		t.Fatalf("run:\n%s", out)
	}
	out = cli("schedule", "run", "cron_monthly_email_reminder", "--at", "2026-12-01T08:00:00Z")
	if !strings.Contains(out, "already done; nothing admitted") {
		t.Fatalf("second run of the same instant:\n%s", out)
	}
	out = cli("schedule", "list")
	if !strings.Contains(out, "cron_monthly_email_reminder@2026-12-01T08:00:00Z") || !strings.Contains(out, "done") || !strings.Contains(out, "2 admitted") {
		t.Fatalf("list:\n%s", out)
	}

	s := startServerArgs(t, data, []string{"--config", filepath.Join(dir, "c.yaml"), "--transport", "maildir"})
	eventually(t, 30*time.Second, "both emails sent", func() (bool, string) {
		r, err := s.get("cron_monthly_email_reminder@2026-12-01T08:00:00Z/bob@example.com")
		return err == nil && r.State == "sent", fmt.Sprint(r, err)
	})
	s.stop()
	files, _ := filepath.Glob(filepath.Join(data, "maildir", "new", "*"))
	if len(files) != 2 {
		t.Fatalf("maildir/new has %d files, want 2", len(files))
	}

	write("h.tmpl", "<p>\n{{.name}\n</p>\n")
	cmd := exec.Command(binary, "serve", "--config", filepath.Join(dir, "c.yaml"), "--data", data, "--http", "127.0.0.1:0", "--smtp", "off")
	b, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(b), "h.tmpl:2") || !strings.Contains(string(b), "schedules[0]") {
		t.Fatalf("serve with a broken template: %v\n%s", err, b)
	}
}
