package config

import (
	"os"
	"path/filepath"
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
