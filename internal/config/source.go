package config

import (
	"fmt"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"time"
)

// Kind is the broker of a source: "sqs", "amqp", "nats" or "redis"; ""
// when none is set or more than one.
func (s *Source) Kind() string {
	kind := ""
	for k, v := range map[string]string{"sqs": s.SQS, "amqp": s.AMQP, "nats": s.NATS, "redis": s.Redis} {
		if v != "" {
			if kind != "" {
				return ""
			}
			kind = k
		}
	}
	return kind
}

// ParseSourceFlag reads one --source flag: sqs:QUEUE_URL,
// amqp://...?queue=NAME, nats://...?stream=NAME&consumer=NAME or
// redis://...?stream=NAME&group=NAME. The query parameters are checked
// with the rest of the configuration.
func ParseSourceFlag(flag string) (Source, error) {
	scheme, rest, _ := strings.Cut(flag, ":")
	switch scheme {
	case "sqs":
		return Source{SQS: rest}, nil
	case "amqp", "amqps":
		return Source{AMQP: flag}, nil
	case "nats", "tls":
		return Source{NATS: flag}, nil
	case "redis", "rediss":
		return Source{Redis: flag}, nil
	}
	return Source{}, fmt.Errorf("--source %q: unknown kind %q; use sqs:QUEUE_URL, amqp://user:pass@host:5672/vhost?queue=NAME&dead_letter_exchange=DLX, nats://host:4222?stream=NAME&consumer=NAME or redis://host:6379/0?stream=NAME&group=NAME (docs/jobs.md)", redact(flag), scheme)
}

// sourceSetting is one setting of a source: its YAML name (and URL query
// parameter) and the kinds it applies to.
type sourceSetting struct {
	name  string
	kinds string // space-separated
	param bool   // may be given in the URL's query
}

var sourceSettings = []sourceSetting{
	{"tenant", "sqs amqp nats redis", true},
	{"concurrency", "sqs amqp nats redis", true},
	{"wait_time", "sqs", false},
	{"visibility_timeout", "sqs", false},
	{"dead_letter_queue", "sqs", false},
	{"batch_size", "amqp nats redis", true},
	{"queue", "amqp", true},
	{"prefetch", "amqp", true},
	{"dead_letter_exchange", "amqp", true},
	{"dead_letter_routing_key", "amqp", true},
	{"reject_without_dead_letter_exchange", "amqp", true},
	{"stream", "nats redis", true},
	{"consumer", "nats redis", true},
	{"group", "redis", true},
	{"dead_letter_subject", "nats", true},
	{"ack_wait", "nats", true},
	{"dead_letter_stream", "redis", true},
	{"claim_idle", "redis", true},
	{"max_deliveries", "nats redis", true},
}

// field returns the setting's field of s.
func (s *Source) field(name string) reflect.Value {
	v := reflect.ValueOf(s).Elem()
	t := v.Type()
	for i := range t.NumField() {
		if strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0] == name {
			return v.Field(i)
		}
	}
	panic("config: no source setting " + name)
}

// validate checks one source, after moving the settings given as query
// parameters of its URL into their fields (the URL keeps the parameters
// that are not sendonce's, for the broker's client library).
func (s *Source) validate(at string, bad func(setting, format string, args ...any)) {
	kind := s.Kind()
	if kind == "" {
		var set []string
		for _, k := range []string{"sqs", "amqp", "nats", "redis"} {
			if s.field(k).String() != "" {
				set = append(set, k)
			}
		}
		if len(set) == 0 {
			bad(at, "names no broker; give one of sqs: QUEUE_URL, amqp: amqp://..., nats: nats://... or redis: redis://...")
		} else {
			bad(at, "sets %s; give exactly one broker per source", strings.Join(set, " and "))
		}
		return
	}
	if kind != "sqs" {
		s.takeParams(at, kind, bad)
	}
	for _, st := range sourceSettings {
		if strings.Contains(" "+st.kinds+" ", " "+kind+" ") {
			continue
		}
		if f := s.field(st.name); !f.IsZero() {
			bad(at+"."+st.name, "applies to %s sources only, and this is a %s source; remove it", strings.ReplaceAll(st.kinds, " ", ", "), kind)
		}
	}
	if s.Tenant == "" {
		s.Tenant = "default"
	}
	if !tenantRE.MatchString(s.Tenant) {
		bad(at+".tenant", "%q is not a tenant name; use 1-64 letters, digits, '.', '_' or '-'", s.Tenant)
	}
	for _, name := range []string{"concurrency", "batch_size", "prefetch", "max_deliveries"} {
		if n := s.field(name).Int(); n < 0 {
			bad(at+"."+name, "is %d; use a positive number, or 0 for the default", n)
		}
	}
	for _, name := range []string{"ack_wait", "claim_idle"} {
		if d := time.Duration(s.field(name).Int()); d < 0 {
			bad(at+"."+name, "is negative; use a duration like 30s, or 0 for the default")
		}
	}
	switch kind {
	case "sqs":
		u, err := url.Parse(s.SQS)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || strings.Trim(u.Path, "/") == "" {
			bad(at+".sqs", "%q is not a queue URL; give it as SQS returns it, e.g. https://sqs.us-east-1.amazonaws.com/123456789012/emails", s.SQS)
		}
		if s.WaitTime < 0 || s.WaitTime > Duration(20*time.Second) {
			bad(at+".wait_time", "is %s; SQS long polling waits 0s to 20s", time.Duration(s.WaitTime))
		}
		if s.VisibilityTimeout < 0 || s.VisibilityTimeout > Duration(12*time.Hour) {
			bad(at+".visibility_timeout", "is %s; SQS allows 0s to 12h", time.Duration(s.VisibilityTimeout))
		}
	case "amqp":
		if s.Queue == "" {
			bad(at+".queue", "is empty; name the queue to consume, e.g. amqp://guest:guest@127.0.0.1:5672/?queue=emails&dead_letter_exchange=emails.dlx")
		}
		if s.DeadLetterExchange == "" && !s.RejectWithoutDeadLetterExchange {
			bad(at+".dead_letter_exchange", "is empty, so an invalid job would have nowhere to go with its reason; name the exchange sendonce publishes invalid jobs to "+
				"(the queue's x-dead-letter-exchange), or set reject_without_dead_letter_exchange: true to reject them to the queue's own dead-letter exchange (dropped if it has none)")
		}
		if s.Prefetch > 65535 {
			bad(at+".prefetch", "is %d; AMQP allows at most 65535", s.Prefetch)
		}
	case "nats":
		if s.Stream == "" {
			bad(at+".stream", "is empty; name the JetStream stream of the jobs, e.g. nats://127.0.0.1:4222?stream=EMAILS&consumer=sendonce")
		}
		if s.AckWait > 0 && s.AckWait < Duration(time.Second) {
			bad(at+".ack_wait", "is %s; use at least 1s", time.Duration(s.AckWait))
		}
	case "redis":
		if s.Stream == "" {
			bad(at+".stream", "is empty; name the stream's key, e.g. redis://127.0.0.1:6379/0?stream=emails&group=sendonce")
		}
		if s.DeadLetterStream != "" && s.DeadLetterStream == s.Stream {
			bad(at+".dead_letter_stream", "is the stream itself; invalid jobs would come back forever: use another key")
		}
	}
}

// takeParams moves sendonce's query parameters from the source's URL into
// their fields. A parameter that is also set in the file must agree.
func (s *Source) takeParams(at, kind string, bad func(setting, format string, args ...any)) {
	urlField := s.field(kind)
	u, err := url.Parse(urlField.String())
	if err != nil || u.Host == "" {
		bad(at+"."+kind, "%q is not a URL; give it as %s", redact(urlField.String()), map[string]string{
			"amqp": "amqp://user:password@host:5672/vhost?queue=NAME", "nats": "nats://host:4222?stream=NAME&consumer=NAME", "redis": "redis://host:6379/0?stream=NAME&group=NAME",
		}[kind])
		return
	}
	q := u.Query()
	for _, st := range sourceSettings {
		if !st.param || !q.Has(st.name) {
			continue
		}
		v := q.Get(st.name)
		q.Del(st.name)
		where := at + "." + kind + "?" + st.name
		if !strings.Contains(" "+st.kinds+" ", " "+kind+" ") {
			bad(where, "applies to %s sources only; remove it", strings.ReplaceAll(st.kinds, " ", ", "))
			continue
		}
		f := s.field(st.name)
		was := f.Interface()
		var perr error
		switch p := f.Addr().Interface().(type) {
		case *string:
			*p = v
		case *int:
			*p, perr = strconv.Atoi(v)
		case *bool:
			*p, perr = strconv.ParseBool(v)
		case *Duration:
			var d time.Duration
			d, perr = time.ParseDuration(v)
			*p = Duration(d)
		}
		if perr != nil {
			bad(where, "%q is not a valid %s; write it as in the file's %s setting", v, reflect.TypeOf(was).Name(), st.name)
			continue
		}
		if !reflect.ValueOf(was).IsZero() && !reflect.DeepEqual(was, f.Interface()) {
			bad(where, "is %q in the URL but %v in %s.%s; give it once", v, was, at, st.name)
		}
	}
	u.RawQuery = q.Encode()
	urlField.SetString(u.String())
}
