package config

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestDefaultsAreValidAndLoopback(t *testing.T) {
	c, warnings, err := Load("", nil, nil)
	if err != nil || len(warnings) != 0 {
		t.Fatalf("defaults: %v %v", err, warnings)
	}
	if c.HTTP.Addr != "127.0.0.1:7070" || c.Data != "./sendonce-data" || c.Transport != "maildir" || c.Dispatch.InDoubt != "hold" {
		t.Fatalf("unexpected defaults %+v", c)
	}
}

func TestPrecedenceFileEnvFlags(t *testing.T) {
	file := filepath.Join(t.TempDir(), "sendonce.yaml")
	os.WriteFile(file, []byte("data: /from/file\nhttp:\n  addr: 127.0.0.1:1111\ndispatch:\n  workers: 3\n  lease: 90s\n"), 0o600)
	env := []string{"SENDONCE_HTTP_ADDR=127.0.0.1:2222", "SENDONCE_DISPATCH_WORKERS=5", "SENDONCE_SERVER=http://x", "PATH=/bin"}
	c, warnings, err := Load(file, env, map[string]string{"http.addr": "127.0.0.1:3333"})
	if err != nil || len(warnings) != 0 {
		t.Fatalf("%v %v", err, warnings)
	}
	if c.Data != "/from/file" || c.HTTP.Addr != "127.0.0.1:3333" || c.Dispatch.Workers != 5 || time.Duration(c.Dispatch.Lease) != 90*time.Second {
		t.Fatalf("precedence broken: %+v", c)
	}
}

func TestErrorsNameTheSetting(t *testing.T) {
	cases := []struct {
		name, yaml string
		env        []string
		want       string
	}{
		{"public address without tokens", "http:\n  addr: 0.0.0.0:7070\n", nil, "http.addr"},
		{"all interfaces without tokens", "http:\n  addr: :7070\n", nil, "http.addr"},
		{"bad transport", "transport: sendmail\n", nil, "transport"},
		{"bad policy", "dispatch:\n  in_doubt: retry\n", nil, "dispatch.in_doubt"},
		{"bad duration", "dispatch:\n  lease: soon\n", nil, "duration"},
		{"unknown key", "htpp:\n  addr: x\n", nil, "htpp"},
		{"bad env number", "", []string{"SENDONCE_DISPATCH_WORKERS=many"}, "SENDONCE_DISPATCH_WORKERS"},
		{"short secret", "tokens:\n  - name: a\n    tenant: acme\n    secret: short\n", nil, "tokens[0].secret"},
		{"bad tenant", "tokens:\n  - name: a\n    tenant: \"a b\"\n    secret: 0123456789abcdef0\n", nil, "tokens[0].tenant"},
		{"margin over lease", "dispatch:\n  lease: 10s\n  lease_margin: 20s\n", nil, "dispatch.lease_margin"},
		{"log format", "log:\n  format: xml\n", nil, "log.format"},
		{"open relay", "submission:\n  addr: 0.0.0.0:25\n", nil, "submission.addr"},
		{"not bcrypt", "submission:\n  users:\n    - name: app\n      tenant: acme\n      password_hash: secret\n", nil, "submission.users[0].password_hash"},
		{"half tls", "submission:\n  tls_cert: a.pem\n", nil, "submission.tls_cert"},
		{"bad queue url", "sources:\n  - sqs: not-a-url\n", nil, "sources[0].sqs"},
		{"long poll", "sources:\n  - sqs: http://127.0.0.1:1/q\n    wait_time: 30s\n", nil, "sources[0].wait_time"},
		{"rule without after", "dispatch:\n  in_doubt_rules:\n    - action: fail\n", nil, "dispatch.in_doubt_rules[0].after"},
		{"rule action", "dispatch:\n  in_doubt_rules:\n    - after: 1h\n      action: retry\n", nil, "dispatch.in_doubt_rules[0].action"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "c.yaml")
			os.WriteFile(file, []byte(tc.yaml), 0o600)
			_, _, err := Load(file, tc.env, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one naming %q", err, tc.want)
			}
		})
	}
}

func TestPublicAddressWithTokens(t *testing.T) {
	file := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(file, []byte("http:\n  addr: 0.0.0.0:7070\ntokens:\n  - name: app\n    tenant: acme\n    secret_env: TEST_SENDONCE_SECRET\n"), 0o600)
	t.Setenv("TEST_SENDONCE_SECRET", "0123456789abcdef0123")
	c, _, err := Load(file, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Tokens[0].Secret != "0123456789abcdef0123" {
		t.Fatal("secret_env not read")
	}
}

func TestUnknownEnvIsAWarning(t *testing.T) {
	_, warnings, err := Load("", []string{"SENDONCE_HTTP_ADRR=x"}, nil)
	if err != nil || len(warnings) != 1 || !strings.Contains(warnings[0], "SENDONCE_HTTP_ADRR") {
		t.Fatalf("%v %v", err, warnings)
	}
}

func TestBrokerSourcesFromFlagsAndFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(file, []byte("sources:\n  - redis: redis://127.0.0.1:6379/0?stream=emails&dial_timeout=3s\n    group: mailers\n    claim_idle: 2m\n"), 0o600)
	c, _, err := Load(file, nil, nil,
		"amqp://guest:guest@127.0.0.1:5672/?queue=emails&dead_letter_exchange=emails.dlx&prefetch=100&heartbeat=5",
		"nats://127.0.0.1:4222?stream=EMAILS&consumer=sendonce&ack_wait=1m",
		"sqs:https://sqs.us-east-1.amazonaws.com/1/emails")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Sources) != 4 {
		t.Fatalf("%d sources", len(c.Sources))
	}
	r, a, n, q := c.Sources[0], c.Sources[1], c.Sources[2], c.Sources[3]
	if r.Kind() != "redis" || r.Stream != "emails" || r.Group != "mailers" || time.Duration(r.ClaimIdle) != 2*time.Minute || r.Redis != "redis://127.0.0.1:6379/0?dial_timeout=3s" {
		t.Errorf("redis source %+v", r)
	}
	if a.Kind() != "amqp" || a.Queue != "emails" || a.DeadLetterExchange != "emails.dlx" || a.Prefetch != 100 || a.AMQP != "amqp://guest:guest@127.0.0.1:5672/?heartbeat=5" {
		t.Errorf("amqp source %+v", a)
	}
	if n.Kind() != "nats" || n.Stream != "EMAILS" || n.Consumer != "sendonce" || time.Duration(n.AckWait) != time.Minute || n.NATS != "nats://127.0.0.1:4222" {
		t.Errorf("nats source %+v", n)
	}
	if q.Kind() != "sqs" || q.Tenant != "default" {
		t.Errorf("sqs source %+v", q)
	}
}

func TestBrokerSourceErrorsNameTheSetting(t *testing.T) {
	for _, tc := range []struct {
		yaml  string
		flags []string
		want  string
	}{
		{"sources:\n  - tenant: acme\n", nil, "sources[0]: names no broker"},
		{"sources:\n  - sqs: https://sqs.x/1/q\n    redis: redis://127.0.0.1:6379\n", nil, "give exactly one broker"},
		{"", []string{"amqp://127.0.0.1:5672/?dead_letter_exchange=x"}, "sources[0].queue: is empty"},
		{"", []string{"amqp://127.0.0.1:5672/?queue=q"}, "sources[0].dead_letter_exchange: is empty"},
		{"", []string{"amqp://127.0.0.1:5672/?queue=q&reject_without_dead_letter_exchange=maybe"}, "sources[0].amqp?reject_without_dead_letter_exchange"},
		{"", []string{"nats://127.0.0.1:4222?consumer=c"}, "sources[0].stream: is empty"},
		{"", []string{"nats://127.0.0.1:4222?stream=S&group=g"}, "sources[0].nats?group: applies to redis sources only"},
		{"", []string{"redis://127.0.0.1:6379?group=g"}, "sources[0].stream: is empty"},
		{"", []string{"redis://127.0.0.1:6379?stream=s&dead_letter_stream=s"}, "sources[0].dead_letter_stream"},
		{"", []string{"redis://127.0.0.1:6379?stream=s&claim_idle=soon"}, "sources[0].redis?claim_idle"},
		{"sources:\n  - redis: redis://127.0.0.1:6379?stream=a\n    stream: b\n", nil, "give it once"},
		{"sources:\n  - redis: redis://127.0.0.1:6379?stream=a\n    wait_time: 5s\n", nil, "sources[0].wait_time: applies to sqs sources only"},
		{"sources:\n  - sqs: https://sqs.x/1/q\n    queue: q\n", nil, "sources[0].queue: applies to amqp sources only"},
		{"", []string{"kafka://127.0.0.1:9092"}, "unknown kind \"kafka\""},
	} {
		file := filepath.Join(t.TempDir(), "c.yaml")
		os.WriteFile(file, []byte(tc.yaml), 0o600)
		_, _, err := Load(file, nil, nil, tc.flags...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q %v: error %v, want one saying %q", tc.yaml, tc.flags, err, tc.want)
		}
	}
}
func TestSchedules(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"r.jsonl", "subject.tmpl", "text.tmpl"} {
		os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600)
	}
	file := filepath.Join(dir, "c.yaml")
	good := `schedules:
  - name: monthly
    cron: "0 9 1 * *"
    time_zone: Europe/Berlin
    recipients: {file: r.jsonl}
    template: {subject: subject.tmpl, text: text.tmpl}
    from: "Reminders <noreply@example.org>"
    catch_up: latest
    max_lag: 6h
scheduler:
  lease: 10s
`
	os.WriteFile(file, []byte(good), 0o600)
	c, _, err := Load(file, []string{"SENDONCE_SCHEDULER_BATCH_SIZE=200"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := c.Schedules[0]
	if s.Recipients.File != filepath.Join(dir, "r.jsonl") || s.Template.Text != filepath.Join(dir, "text.tmpl") || s.Tenant != "default" ||
		time.Duration(s.MaxLag) != 6*time.Hour || c.Scheduler.BatchSize != 200 || time.Duration(c.Scheduler.Lease) != 10*time.Second {
		t.Fatalf("schedule not loaded as written (paths relative to the file): %+v %+v", s, c.Scheduler)
	}
	for _, tc := range []struct{ edit, want string }{
		{`s/"0 9 1 \* \*"/"0 9 31 2 *"/`, "schedules[0].cron"},
		{`s/Europe\/Berlin/Mars\/Olympus/`, "schedules[0].time_zone"},
		{`s/{file: r.jsonl}/{file: r.jsonl, url: "http:\/\/x"}/`, "schedules[0].recipients"},
		{`s/{file: r.jsonl}/{sql: "SELECT 1"}/`, "schedules[0].recipients.sql"},
		{`s/r.jsonl/r.txt/`, "schedules[0].recipients.file"},
		{`s/subject: subject.tmpl/subject: missing.tmpl/`, "schedules[0].template.subject"},
		{`s/catch_up: latest/catch_up: sometimes/`, "schedules[0].catch_up"},
		{`s/name: monthly/name: "two words"/`, "schedules[0].name"},
		{`s/noreply@example.org/nobody/`, "schedules[0].from"},
		{`s/lease: 10s/lease: -1s/`, "scheduler.lease"},
	} {
		y := sedLike(t, good, tc.edit)
		os.WriteFile(file, []byte(y), 0o600)
		_, _, err := Load(file, nil, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want+":") {
			t.Errorf("%s: %v, want an error naming %s", tc.edit, err, tc.want)
		}
	}
}

// sedLike applies one s/old/new/ (old a regexp) to s.
func sedLike(t *testing.T, s, expr string) string {
	t.Helper()
	parts := regexp.MustCompile(`(?:[^/\\]|\\.)+|//`).FindAllString(strings.TrimSuffix(strings.TrimPrefix(expr, "s/"), "/"), -1)
	if len(parts) != 2 {
		t.Fatalf("bad edit %q", expr)
	}
	return regexp.MustCompile(parts[0]).ReplaceAllString(s, strings.ReplaceAll(parts[1], `\/`, "/"))
}
func TestInDoubtRulesFromFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "sendonce.yaml")
	os.WriteFile(file, []byte("dispatch:\n  in_doubt_rules:\n    - after: 1h\n      action: resend\n    - after: 24h\n      action: fail\n      tenant: acme\n"), 0o600)
	c, _, err := Load(file, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := c.Dispatch.InDoubtRules
	if len(r) != 2 || time.Duration(r[0].After) != time.Hour || r[0].Action != "resend" || r[1].Tenant != "acme" || r[1].Action != "fail" {
		t.Fatalf("rules: %+v", r)
	}
}
