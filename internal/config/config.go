// Package config reads sendonce's configuration: defaults, then a YAML file,
// then SENDONCE_* environment variables, then command-line flags, each
// overriding the one before. Every error names the setting, the value and
// what is allowed.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/mail"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/goccy/go-yaml"

	"github.com/sendonce/sendonce/internal/schedule"
)

// Config is the whole configuration of `sendonce serve`.
type Config struct {
	// Data is the data directory: the SQLite ledger and, by default, the
	// maildir.
	Data string `yaml:"data"`
	// Store is the ledger: empty for SQLite in Data (one node), or a
	// postgres:// URL that every node shares.
	Store string `yaml:"store"`
	// Migrate applies the PostgreSQL schema migrations at start.
	Migrate bool `yaml:"migrate"`
	HTTP    HTTP `yaml:"http"`
	// Transport is "maildir" (into <data>/maildir), "maildir:/some/dir", or
	// an smtp:// or smtps:// smarthost URL.
	Transport string `yaml:"transport"`
	SMTP      SMTP   `yaml:"smtp"`
	// MessageIDDomain is the domain of derived Message-IDs; empty means the
	// domain of each email's From address.
	MessageIDDomain string `yaml:"message_id_domain"`
	// Retention is how long sent and failed records are kept (and repeats
	// of their keys recognised). Default 30 days; 0 keeps them forever.
	Retention Duration `yaml:"retention"`
	// PurgeBodyOnSend drops a message's body once it is sent or failed.
	PurgeBodyOnSend bool     `yaml:"purge_body_on_send"`
	MaxMessageBytes int      `yaml:"max_message_bytes"`
	Dispatch        Dispatch `yaml:"dispatch"`
	Tokens          []Token  `yaml:"tokens"`
	// Sources are the broker consumers that feed the ledger.
	Sources []Source `yaml:"sources"`
	SES     SES      `yaml:"ses"`
	// Submission is the SMTP submission front door.
	Submission Submission `yaml:"submission"`
	// Tenants tunes key derivation per tenant (SMTP submission).
	Tenants map[string]Tenant `yaml:"tenants"`
	Log     Log               `yaml:"log"`
	// Schedules are recurring campaigns, each fired once per scheduled
	// instant however many nodes run (docs/scheduler.md).
	Schedules []Schedule `yaml:"schedules"`
	// Scheduler tunes how nodes run the schedules.
	Scheduler Scheduler `yaml:"scheduler"`
}

// Schedule is one recurring campaign.
type Schedule struct {
	// Name identifies the schedule; it is part of every fire's and every
	// email's idempotency key, so renaming a schedule starts it afresh.
	Name string `yaml:"name"`
	// Cron is "minute hour day-of-month month day-of-week", optionally
	// with a leading seconds field, or @daily, @hourly, ...
	Cron string `yaml:"cron"`
	// TimeZone is an IANA zone (Europe/Berlin) the cron expression is read
	// in. Default UTC.
	TimeZone   string             `yaml:"time_zone"`
	Recipients ScheduleRecipients `yaml:"recipients"`
	Template   ScheduleTemplate   `yaml:"template"`
	From       string             `yaml:"from"`
	ReplyTo    string             `yaml:"reply_to"`
	// CatchUp is what happens to fires missed while no node ran: skip
	// (default), latest, or all (within MaxLag).
	CatchUp string   `yaml:"catch_up"`
	MaxLag  Duration `yaml:"max_lag"`
	// Tenant owns the emails' keys. Default "default".
	Tenant string `yaml:"tenant"`
}

// ScheduleRecipients is a schedule's recipient source; exactly one of
// File, URL and SQL is set.
type ScheduleRecipients struct {
	// File is a .csv file with a header row or a .jsonl file.
	File string `yaml:"file"`
	// URL returns JSON Lines to a GET.
	URL     string            `yaml:"url"`
	Headers map[string]string `yaml:"headers"`
	// SQL is a query run on PostgreSQL (Postgres, default the store).
	SQL      string `yaml:"sql"`
	Postgres string `yaml:"postgres"`
}

// ScheduleTemplate names a schedule's template files: Subject, and Text,
// HTML or both.
type ScheduleTemplate struct {
	Subject string `yaml:"subject"`
	Text    string `yaml:"text"`
	HTML    string `yaml:"html"`
}

// Scheduler tunes how nodes run schedules. Zero values take the defaults
// of internal/schedule.
type Scheduler struct {
	// Lease is how long a node holds a fire after its last batch; a node
	// that dies leaves its fire to the others this long after.
	Lease        Duration `yaml:"lease"`
	PollInterval Duration `yaml:"poll_interval"`
	BatchSize    int      `yaml:"batch_size"`
	// OnTime is how late a fire may start and still count as on time.
	OnTime      Duration `yaml:"on_time"`
	BackoffBase Duration `yaml:"backoff_base"`
	BackoffMax  Duration `yaml:"backoff_max"`
}

// Submission configures the SMTP submission server.
type Submission struct {
	// Addr is where it listens; "off" disables it. Without users it must
	// be a loopback address.
	Addr string `yaml:"addr"`
	// TLSCert and TLSKey are PEM files; with them STARTTLS is offered (or
	// required from the first byte with ImplicitTLS, port 465 style).
	TLSCert         string     `yaml:"tls_cert"`
	TLSKey          string     `yaml:"tls_key"`
	ImplicitTLS     bool       `yaml:"implicit_tls"`
	MaxMessageBytes int64      `yaml:"max_message_bytes"`
	MaxRecipients   int        `yaml:"max_recipients"`
	MaxConnsPerIP   int        `yaml:"max_conns_per_ip"`
	Users           []SMTPUser `yaml:"users"`
}

// SMTPUser may submit mail as a tenant.
type SMTPUser struct {
	Name   string `yaml:"name"`
	Tenant string `yaml:"tenant"`
	// PasswordHash is a bcrypt hash ($2a$, $2b$ or $2y$).
	PasswordHash string `yaml:"password_hash"`
}

// Tenant tunes how the keys of a tenant's SMTP submissions are derived.
type Tenant struct {
	// KeyFromHeader uses the X-Idempotency-Key header (default true).
	KeyFromHeader *bool `yaml:"key_from_header"`
	// KeyFromMessageID uses the message's own Message-ID (default false:
	// many clients make a new one per attempt).
	KeyFromMessageID bool `yaml:"key_from_message_id"`
	// FingerprintWindow, when set, treats the same content within the
	// window as one email.
	FingerprintWindow Duration `yaml:"fingerprint_window"`
}

// Source is one broker consumer. Exactly one kind (sqs, amqp, nats,
// redis) is set. The settings of the amqp, nats and redis kinds may also
// be given as query parameters of their URL
// (redis://host:6379/0?stream=emails&group=sendonce); see source.go.
type Source struct {
	// SQS is a queue URL as SQS returns it
	// (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME).
	SQS string `yaml:"sqs"`
	// AMQP is a RabbitMQ URL, amqp://user:password@host:5672/vhost.
	AMQP string `yaml:"amqp"`
	// NATS is a NATS URL with JetStream, nats://host:4222.
	NATS string `yaml:"nats"`
	// Redis is a Redis URL, redis://[user:password@]host:6379[/db].
	Redis string `yaml:"redis"`
	// Tenant owns the keys of the jobs; default "default".
	Tenant      string `yaml:"tenant"`
	Concurrency int    `yaml:"concurrency"`
	// WaitTime is the long-polling wait (at most 20s). SQS.
	WaitTime          Duration `yaml:"wait_time"`
	VisibilityTimeout Duration `yaml:"visibility_timeout"`
	// DeadLetterQueue receives invalid jobs with the reason; without it
	// the queue needs a redrive policy. SQS.
	DeadLetterQueue string `yaml:"dead_letter_queue"`
	// BatchSize is how many messages are admitted with one commit.
	// amqp, nats, redis.
	BatchSize int `yaml:"batch_size"`
	// Queue is the queue to consume. amqp, required.
	Queue string `yaml:"queue"`
	// Prefetch is the basic.qos prefetch count. amqp.
	Prefetch int `yaml:"prefetch"`
	// DeadLetterExchange receives invalid jobs with the reason. amqp,
	// required unless RejectWithoutDeadLetterExchange.
	DeadLetterExchange   string `yaml:"dead_letter_exchange"`
	DeadLetterRoutingKey string `yaml:"dead_letter_routing_key"`
	// RejectWithoutDeadLetterExchange rejects invalid jobs to the queue's
	// own x-dead-letter-exchange (dropped if it has none). amqp.
	RejectWithoutDeadLetterExchange bool `yaml:"reject_without_dead_letter_exchange"`
	// Stream is the JetStream stream (nats) or the stream's key (redis).
	// Required.
	Stream string `yaml:"stream"`
	// Consumer is the durable consumer (nats) or this node's consumer
	// name in the group (redis).
	Consumer string `yaml:"consumer"`
	// Group is the consumer group. redis.
	Group string `yaml:"group"`
	// DeadLetterSubject receives invalid jobs; a stream must capture it.
	// nats.
	DeadLetterSubject string `yaml:"dead_letter_subject"`
	// AckWait of a consumer sendonce creates. nats.
	AckWait Duration `yaml:"ack_wait"`
	// DeadLetterStream receives invalid jobs. redis.
	DeadLetterStream string `yaml:"dead_letter_stream"`
	// ClaimIdle is how long an entry stays pending before another
	// consumer claims it. redis.
	ClaimIdle Duration `yaml:"claim_idle"`
	// MaxDeliveries: redis dead-letters an entry delivered more often;
	// nats creates its consumer with this MaxDeliver.
	MaxDeliveries int `yaml:"max_deliveries"`
}

// SES configures the ses transport. Region, credentials and endpoint
// otherwise follow the AWS SDK's standard configuration (AWS_REGION, the
// credentials chain, AWS_ENDPOINT_URL_SESV2).
type SES struct {
	Region           string            `yaml:"region"`
	Endpoint         string            `yaml:"endpoint"`
	ConfigurationSet string            `yaml:"configuration_set"`
	Tags             map[string]string `yaml:"tags"`
	// RatePerSecond caps sends to the account's maximum send rate; 0 is
	// no cap.
	RatePerSecond  float64  `yaml:"rate_per_second"`
	RequestTimeout Duration `yaml:"request_timeout"`
}

// HTTP configures the API listener.
type HTTP struct {
	Addr         string `yaml:"addr"`
	MaxBodyBytes int64  `yaml:"max_body_bytes"`
	// MaxInFlight bounds the submissions served at once; past it the API
	// answers 503 with Retry-After. 0 means 1024.
	MaxInFlight int `yaml:"max_in_flight"`
}

// SMTP configures the smtp:// transport.
type SMTP struct {
	Helo               string   `yaml:"helo"`
	InsecureSkipVerify bool     `yaml:"insecure_skip_verify"`
	MaxIdleConns       int      `yaml:"max_idle_conns"`
	MaxMessagesPerConn int      `yaml:"max_messages_per_conn"`
	DialTimeout        Duration `yaml:"dial_timeout"`
	CommandTimeout     Duration `yaml:"command_timeout"`
	FinalDotTimeout    Duration `yaml:"final_dot_timeout"`
	// AllowInsecureAuth permits AUTH without TLS to a loopback relay only.
	AllowInsecureAuth bool `yaml:"allow_insecure_auth"`
	// NoPipelining sends MAIL, RCPT and DATA one at a time even to a relay
	// that offers PIPELINING, for relays that offer it and get it wrong.
	NoPipelining bool `yaml:"no_pipelining"`
}

// Dispatch tunes delivery.
type Dispatch struct {
	Workers         int      `yaml:"workers"`
	PollInterval    Duration `yaml:"poll_interval"`
	Lease           Duration `yaml:"lease"`
	LeaseMargin     Duration `yaml:"lease_margin"`
	MaxAttempts     int      `yaml:"max_attempts"`
	BackoffBase     Duration `yaml:"backoff_base"`
	BackoffMax      Duration `yaml:"backoff_max"`
	InDoubt         string   `yaml:"in_doubt"`
	ShutdownTimeout Duration `yaml:"shutdown_timeout"`
	// InDoubtRules settle in-doubt emails automatically once they have
	// waited long enough (file only); see docs/configuration.md.
	InDoubtRules []InDoubtRule `yaml:"in_doubt_rules"`
	// RulesInterval is how often the rules are applied. Default 1m.
	RulesInterval Duration `yaml:"rules_interval"`
}

// InDoubtRule: an email in doubt for at least After gets Action. When
// several rules match, the longest After wins.
type InDoubtRule struct {
	After  Duration `yaml:"after"`
	Action string   `yaml:"action"` // resend, mark_sent or fail
	// Tenant limits the rule to one tenant; empty means all.
	Tenant string `yaml:"tenant"`
	// MaxAttempts stops a resend rule once an email has had this many
	// attempts. Default 3.
	MaxAttempts int `yaml:"max_attempts"`
}

// Token lets one API caller in as a tenant.
type Token struct {
	Name   string `yaml:"name"`
	Tenant string `yaml:"tenant"`
	// Secret is the bearer token itself; SecretEnv names an environment
	// variable holding it instead, to keep it out of the file.
	Secret    string `yaml:"secret"`
	SecretEnv string `yaml:"secret_env"`
}

// Log configures logging.
type Log struct {
	Format string `yaml:"format"` // text or json
	Level  string `yaml:"level"`  // debug, info, warn, error
}

// Duration is a time.Duration written as "30s", "2m", "1h30m".
type Duration time.Duration

// UnmarshalYAML reads a duration string.
func (d *Duration) UnmarshalYAML(b []byte) error {
	s := strings.Trim(strings.TrimSpace(string(b)), `"'`)
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration; write it like 30s, 2m or 1h", s)
	}
	*d = Duration(v)
	return nil
}

// Default returns the out-of-the-box configuration: a SQLite ledger in
// ./sendonce-data, the API on loopback, delivery into a maildir.
func Default() Config {
	return Config{
		Data:       "./sendonce-data",
		HTTP:       HTTP{Addr: "127.0.0.1:7070", MaxBodyBytes: 32 << 20},
		Transport:  "maildir",
		Submission: Submission{Addr: "127.0.0.1:2525"},
		Log:        Log{Format: "text", Level: "info"},
		Dispatch:   Dispatch{InDoubt: "hold"},
		Retention:  Duration(30 * 24 * time.Hour),
	}
}

// Load builds the configuration from the file (if path is not empty), the
// environment (environ, as os.Environ gives it) and flag overrides (setting
// name to value, e.g. "http.addr" to "127.0.0.1:8080"), then validates it.
// Sources given as flags ("sqs:URL") are added to those of the file.
// Unknown SENDONCE_* variables are returned as warnings.
func Load(path string, environ []string, overrides map[string]string, sources ...string) (Config, []string, error) {
	c := Default()
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return c, nil, fmt.Errorf("config: %w", err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b), yaml.DisallowUnknownField())
		if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) { // an empty file is an empty configuration
			return c, nil, fmt.Errorf("config file %s: %s", path, yaml.FormatError(err, false, true))
		}
	}
	var warnings []string
	known := c.settings()
	for _, kv := range environ {
		name, val, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(name, "SENDONCE_") {
			continue
		}
		if name == "SENDONCE_SERVER" || name == "SENDONCE_TOKEN" {
			continue // for the client commands
		}
		s, ok := known[EnvName(name)]
		if !ok {
			warnings = append(warnings, fmt.Sprintf("environment variable %s is not a setting and was ignored; known: %s", name, strings.Join(envNames(known), ", ")))
			continue
		}
		if err := s.set(val); err != nil {
			return c, warnings, fmt.Errorf("environment variable %s=%q: %w", name, val, err)
		}
	}
	for _, name := range sortedNames(overrides) {
		s, ok := known[name]
		if !ok {
			return c, warnings, fmt.Errorf("unknown setting %q", name)
		}
		if err := s.set(overrides[name]); err != nil {
			return c, warnings, fmt.Errorf("flag for %s=%q: %w", name, overrides[name], err)
		}
	}
	for _, src := range sources {
		s, err := ParseSourceFlag(src)
		if err != nil {
			return c, warnings, err
		}
		c.Sources = append(c.Sources, s)
	}
	if path != "" {
		c.resolvePaths(filepath.Dir(path))
	}
	for i := range c.Tokens {
		if t := &c.Tokens[i]; t.SecretEnv != "" && t.Secret == "" {
			t.Secret = os.Getenv(t.SecretEnv)
		}
	}
	return c, warnings, c.Validate()
}

// EnvName maps SENDONCE_HTTP_ADDR to the setting name http.addr.
func EnvName(env string) string {
	s := strings.ToLower(strings.TrimPrefix(env, "SENDONCE_"))
	for _, sec := range []string{"http", "smtp", "ses", "submission", "dispatch", "log", "scheduler"} {
		if rest, ok := strings.CutPrefix(s, sec+"_"); ok {
			return sec + "." + rest
		}
	}
	return s
}

func envNames(m map[string]setting) []string {
	var out []string
	for name := range m {
		out = append(out, "SENDONCE_"+strings.ToUpper(strings.ReplaceAll(name, ".", "_")))
	}
	sort.Strings(out)
	return out
}

func sortedNames(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// setting is one scalar setting, addressable by its YAML path.
type setting struct {
	ptr reflect.Value
}

func (s setting) set(v string) error {
	switch p := s.ptr.Interface().(type) {
	case *string:
		*p = v
	case *int:
		n, err := strconv.Atoi(v)
		if err != nil {
			return errors.New("must be a whole number")
		}
		*p = n
	case *int64:
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return errors.New("must be a whole number")
		}
		*p = n
	case *float64:
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return errors.New("must be a number")
		}
		*p = f
	case *bool:
		b, err := strconv.ParseBool(v)
		if err != nil {
			return errors.New("must be true or false")
		}
		*p = b
	case *Duration:
		d, err := time.ParseDuration(v)
		if err != nil {
			return errors.New("must be a duration like 30s, 2m or 1h")
		}
		*p = Duration(d)
	default:
		return fmt.Errorf("cannot be set from a string")
	}
	return nil
}

// settings lists every scalar setting by its YAML path ("dispatch.workers").
func (c *Config) settings() map[string]setting {
	out := make(map[string]setting)
	var walk func(prefix string, v reflect.Value)
	walk = func(prefix string, v reflect.Value) {
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name := strings.Split(f.Tag.Get("yaml"), ",")[0]
			if name == "" || name == "-" {
				continue
			}
			fv := v.Field(i)
			switch {
			case f.Type.Kind() == reflect.Struct:
				walk(prefix+name+".", fv)
			case f.Type.Kind() == reflect.Slice, f.Type.Kind() == reflect.Map:
				// lists and maps (tokens, sources, tags) come only from the file
			default:
				out[prefix+name] = setting{fv.Addr()}
			}
		}
	}
	walk("", reflect.ValueOf(c).Elem())
	return out
}

var tenantRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$`)

// Validate checks the configuration; each error names the setting and
// what is allowed.
func (c *Config) Validate() error {
	var errs []error
	bad := func(setting, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", setting, fmt.Sprintf(format, args...)))
	}
	if strings.TrimSpace(c.Data) == "" {
		bad("data", "is empty; give a directory for the ledger, such as ./sendonce-data")
	}
	if c.Store != "" && !strings.HasPrefix(c.Store, "postgres://") && !strings.HasPrefix(c.Store, "postgresql://") {
		bad("store", "%q is not a store; leave it empty for SQLite in the data directory, or give postgres://user:pass@host:5432/db", redact(c.Store))
	}
	if c.Migrate && c.Store == "" {
		bad("migrate", "applies to a PostgreSQL store; the SQLite store migrates itself")
	}
	host, port, err := net.SplitHostPort(c.HTTP.Addr)
	if err != nil {
		bad("http.addr", "%q is not host:port; use for example 127.0.0.1:7070", c.HTTP.Addr)
	} else if _, err := strconv.Atoi(port); err != nil {
		bad("http.addr", "%q has no numeric port; use for example 127.0.0.1:7070", c.HTTP.Addr)
	} else if len(c.Tokens) == 0 && !IsLoopback(host) {
		bad("http.addr", "%q is not a loopback address and no tokens are configured, so anyone who can reach it could send email as you; configure tokens: in the config file, or listen on 127.0.0.1", c.HTTP.Addr)
	}
	if c.HTTP.MaxBodyBytes < 1024 {
		bad("http.max_body_bytes", "is %d; use at least 1024 bytes (default 33554432)", c.HTTP.MaxBodyBytes)
	}
	switch {
	case c.Transport == "maildir", strings.HasPrefix(c.Transport, "maildir:"):
	case strings.HasPrefix(c.Transport, "smtp://"), strings.HasPrefix(c.Transport, "smtps://"):
	case c.Transport == "ses":
	default:
		bad("transport", "%q is not a transport; use maildir, maildir:/path/to/dir, smtp://[user:pass@]host:port, smtps://[user:pass@]host:port or ses", c.Transport)
	}
	c.validateSubmission(bad)
	if c.SES.RatePerSecond < 0 {
		bad("ses.rate_per_second", "is negative; use the account's maximum send rate, or 0 for no cap")
	}
	if c.SES.RequestTimeout < 0 {
		bad("ses.request_timeout", "is negative; use a duration like 30s, or 0 for the default")
	}
	for i := range c.Sources {
		c.Sources[i].validate(fmt.Sprintf("sources[%d]", i), bad)
	}
	if c.Retention < 0 {
		bad("retention", "is negative; use a duration like 720h (30 days), or 0 to keep records forever")
	} else if c.Retention > 0 && c.Retention < Duration(24*time.Hour) {
		bad("retention", "is %s; a repeat is recognised only within the retention window, and queues redeliver for days (SQS: up to 14); use at least 24h", time.Duration(c.Retention))
	}
	if c.MaxMessageBytes < 0 {
		bad("max_message_bytes", "is negative; use a size in bytes, or 0 for the default (10 MiB)")
	}
	d := c.Dispatch
	if d.InDoubt != "hold" && d.InDoubt != "resend" {
		bad("dispatch.in_doubt", "%q is not a policy; use hold (an operator decides) or resend", d.InDoubt)
	}
	for i, r := range d.InDoubtRules {
		at := fmt.Sprintf("dispatch.in_doubt_rules[%d]", i)
		if r.After <= 0 {
			bad(at+".after", "is %s; use a positive duration like 24h (how long an email waits in doubt before the rule acts)", time.Duration(r.After))
		}
		switch r.Action {
		case "resend", "mark_sent", "fail":
		default:
			bad(at+".action", "%q is not an action; use resend, mark_sent or fail", r.Action)
		}
		if r.Tenant != "" && !tenantRE.MatchString(r.Tenant) {
			bad(at+".tenant", "%q is not a tenant name; use 1-64 letters, digits, '.', '_' or '-', or leave it out for every tenant", r.Tenant)
		}
		if r.MaxAttempts < 0 {
			bad(at+".max_attempts", "is %d; use a positive number, or 0 for the default (3)", r.MaxAttempts)
		}
	}
	if d.RulesInterval < 0 {
		bad("dispatch.rules_interval", "is negative; use a duration like 1m, or 0 for the default")
	}
	for name, n := range map[string]int{"dispatch.workers": d.Workers, "dispatch.max_attempts": d.MaxAttempts, "http.max_in_flight": c.HTTP.MaxInFlight, "smtp.max_messages_per_conn": c.SMTP.MaxMessagesPerConn} {
		if n < 0 {
			bad(name, "is %d; use a positive number, or 0 for the default", n)
		}
	}
	for name, v := range map[string]Duration{"dispatch.poll_interval": d.PollInterval, "dispatch.lease": d.Lease, "dispatch.lease_margin": d.LeaseMargin,
		"dispatch.backoff_base": d.BackoffBase, "dispatch.backoff_max": d.BackoffMax, "dispatch.shutdown_timeout": d.ShutdownTimeout,
		"smtp.dial_timeout": c.SMTP.DialTimeout, "smtp.command_timeout": c.SMTP.CommandTimeout, "smtp.final_dot_timeout": c.SMTP.FinalDotTimeout} {
		if v < 0 {
			bad(name, "is negative; use a duration like 30s, or 0 for the default")
		}
	}
	if d.Lease > 0 && d.Lease < 5*Duration(time.Second) {
		bad("dispatch.lease", "is %s; use at least 5s so renewals can keep up", time.Duration(d.Lease))
	}
	if d.Lease > 0 && d.LeaseMargin >= d.Lease {
		bad("dispatch.lease_margin", "%s must be shorter than dispatch.lease %s", time.Duration(d.LeaseMargin), time.Duration(d.Lease))
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		bad("log.format", "%q is not a format; use text or json", c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q is not a level; use debug, info, warn or error", c.Log.Level)
	}
	secrets := map[string]bool{}
	for i, t := range c.Tokens {
		at := fmt.Sprintf("tokens[%d]", i)
		if t.Name == "" {
			bad(at+".name", "is empty; name the caller, e.g. billing-app (it is recorded with its actions)")
		}
		if !tenantRE.MatchString(t.Tenant) {
			bad(at+".tenant", "%q is not a tenant name; use 1-64 letters, digits, '.', '_' or '-'", t.Tenant)
		}
		switch {
		case t.Secret == "" && t.SecretEnv != "":
			bad(at+".secret_env", "environment variable %s is empty or unset", t.SecretEnv)
		case t.Secret == "":
			bad(at+".secret", "is empty; set secret (or secret_env) to a random string of at least 16 characters, e.g. from `openssl rand -hex 24`")
		case len(t.Secret) < 16:
			bad(at+".secret", "is %d characters; use at least 16 random characters", len(t.Secret))
		case secrets[t.Secret]:
			bad(at+".secret", "is the same as an earlier token's; every token needs its own secret")
		}
		secrets[t.Secret] = true
	}
	c.validateSchedules(bad)
	sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
	return errors.Join(errs...)
}

func (c *Config) validateSubmission(bad func(setting, format string, args ...any)) {
	sub := c.Submission
	if sub.Addr != "off" {
		host, port, err := net.SplitHostPort(sub.Addr)
		if err != nil {
			bad("submission.addr", "%q is not host:port or off; use for example 127.0.0.1:2525", sub.Addr)
		} else if _, err := strconv.Atoi(port); err != nil {
			bad("submission.addr", "%q has no numeric port; use for example 127.0.0.1:2525", sub.Addr)
		} else if len(sub.Users) == 0 && !IsLoopback(host) {
			bad("submission.addr", "%q is not a loopback address and no users are configured, so it would be an open relay; configure submission.users, or listen on 127.0.0.1", sub.Addr)
		}
	}
	if (sub.TLSCert == "") != (sub.TLSKey == "") {
		bad("submission.tls_cert", "give both tls_cert and tls_key, or neither")
	}
	if sub.ImplicitTLS && sub.TLSCert == "" {
		bad("submission.implicit_tls", "needs tls_cert and tls_key")
	}
	for name, n := range map[string]int{"submission.max_recipients": sub.MaxRecipients, "submission.max_conns_per_ip": sub.MaxConnsPerIP} {
		if n < 0 {
			bad(name, "is %d; use a positive number, or 0 for the default", n)
		}
	}
	if sub.MaxMessageBytes < 0 {
		bad("submission.max_message_bytes", "is negative; use a size in bytes, or 0 for the default (25 MiB)")
	}
	names := map[string]bool{}
	for i, u := range sub.Users {
		at := fmt.Sprintf("submission.users[%d]", i)
		if u.Name == "" || names[u.Name] {
			bad(at+".name", "%q is empty or used twice; every user needs its own name", u.Name)
		}
		names[u.Name] = true
		if !tenantRE.MatchString(u.Tenant) {
			bad(at+".tenant", "%q is not a tenant name; use 1-64 letters, digits, '.', '_' or '-'", u.Tenant)
		}
		if !strings.HasPrefix(u.PasswordHash, "$2a$") && !strings.HasPrefix(u.PasswordHash, "$2b$") && !strings.HasPrefix(u.PasswordHash, "$2y$") {
			bad(at+".password_hash", "is not a bcrypt hash; make one with `htpasswd -bnBC 12 \"\" PASSWORD | tr -d ':\\n'`")
		}
	}
	for name, t := range c.Tenants {
		if !tenantRE.MatchString(name) {
			bad("tenants."+name, "is not a tenant name; use 1-64 letters, digits, '.', '_' or '-'")
		}
		if t.FingerprintWindow < 0 {
			bad("tenants."+name+".fingerprint_window", "is negative; use a duration like 10m, or 0 to switch fingerprinting off")
		}
	}
}

// redact hides a password in a URL for error messages.
func redact(raw string) string {
	if u, err := url.Parse(raw); err == nil {
		return u.Redacted()
	}
	return "(unparsable)"
}

// IsLoopback reports whether host names only this machine.
func IsLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// resolvePaths makes the schedules' relative file names relative to the
// configuration file's directory, so the file works from any directory.
func (c *Config) resolvePaths(dir string) {
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	for i := range c.Schedules {
		s := &c.Schedules[i]
		abs(&s.Recipients.File)
		abs(&s.Template.Subject)
		abs(&s.Template.Text)
		abs(&s.Template.HTML)
	}
}

func (c *Config) validateSchedules(bad func(setting, format string, args ...any)) {
	names := map[string]bool{}
	for i := range c.Schedules {
		s := &c.Schedules[i]
		at := fmt.Sprintf("schedules[%d]", i)
		if !tenantRE.MatchString(s.Name) || names[s.Name] {
			bad(at+".name", "%q is empty, used twice or not a name; use 1-64 letters, digits, '.', '_' or '-' (it is part of every email's key)", s.Name)
		}
		names[s.Name] = true
		if _, err := schedule.ParseCron(s.Cron); err != nil {
			bad(at+".cron", "%v", err)
		}
		if s.TimeZone == "" {
			s.TimeZone = "UTC"
		}
		if _, err := time.LoadLocation(s.TimeZone); err != nil {
			bad(at+".time_zone", "%q is not a time zone; use an IANA name such as Europe/Berlin or America/New_York", s.TimeZone)
		}
		r := s.Recipients
		n := 0
		for _, v := range []string{r.File, r.URL, r.SQL} {
			if v != "" {
				n++
			}
		}
		switch {
		case n != 1:
			bad(at+".recipients", "give exactly one of file (.csv or .jsonl), url (JSON Lines over HTTP) or sql (a PostgreSQL query)")
		case r.File != "":
			if _, err := schedule.NewFileSource(r.File); err != nil {
				bad(at+".recipients.file", "%v", err)
			} else if _, err := os.Stat(r.File); err != nil {
				bad(at+".recipients.file", "%v", err)
			}
		case r.URL != "":
			if u, err := url.Parse(r.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				bad(at+".recipients.url", "%q is not an http:// or https:// URL", r.URL)
			}
		case r.SQL != "":
			if r.Postgres == "" && c.Store == "" {
				bad(at+".recipients.sql", "needs PostgreSQL: set store to a postgres:// URL, or recipients.postgres")
			}
			if r.Postgres != "" && !strings.HasPrefix(r.Postgres, "postgres://") && !strings.HasPrefix(r.Postgres, "postgresql://") {
				bad(at+".recipients.postgres", "%q is not a postgres:// URL", redact(r.Postgres))
			}
		}
		if s.Template.Subject == "" {
			bad(at+".template.subject", "is empty; give the file of the subject template")
		}
		if s.Template.Text == "" && s.Template.HTML == "" {
			bad(at+".template", "give a text or an html template file, or both")
		}
		for name, f := range map[string]string{"subject": s.Template.Subject, "text": s.Template.Text, "html": s.Template.HTML} {
			if f == "" {
				continue
			}
			if _, err := os.Stat(f); err != nil {
				bad(at+".template."+name, "%v", err)
			}
		}
		if _, err := mail.ParseAddress(s.From); err != nil {
			bad(at+".from", "%q is not an address; use \"Name <noreply@example.com>\" or noreply@example.com", s.From)
		}
		if s.ReplyTo != "" {
			if _, err := mail.ParseAddress(s.ReplyTo); err != nil {
				bad(at+".reply_to", "%q is not an address", s.ReplyTo)
			}
		}
		switch s.CatchUp {
		case "":
			s.CatchUp = "skip"
		case "skip", "latest", "all":
		default:
			bad(at+".catch_up", "%q is not a policy; use skip, latest or all", s.CatchUp)
		}
		if s.MaxLag < 0 {
			bad(at+".max_lag", "is negative; use a duration like 6h, or 0 for the default (24h)")
		}
		if s.Tenant == "" {
			s.Tenant = "default"
		}
		if !tenantRE.MatchString(s.Tenant) {
			bad(at+".tenant", "%q is not a tenant name; use 1-64 letters, digits, '.', '_' or '-'", s.Tenant)
		}
	}
	sc := c.Scheduler
	for name, v := range map[string]Duration{"scheduler.lease": sc.Lease, "scheduler.poll_interval": sc.PollInterval,
		"scheduler.on_time": sc.OnTime, "scheduler.backoff_base": sc.BackoffBase, "scheduler.backoff_max": sc.BackoffMax} {
		if v < 0 {
			bad(name, "is negative; use a duration like 30s, or 0 for the default")
		}
	}
	if sc.Lease > 0 && sc.Lease < Duration(time.Second) {
		bad("scheduler.lease", "is %s; use at least 1s", time.Duration(sc.Lease))
	}
	if sc.BatchSize < 0 || sc.BatchSize > 10000 {
		bad("scheduler.batch_size", "is %d; use 1 to 10000, or 0 for the default (500)", sc.BatchSize)
	}
}
