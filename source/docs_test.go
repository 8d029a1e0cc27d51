package source

import (
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestDocExamplesParse: every ```json block of docs/jobs.md is a valid job.
func TestDocExamplesParse(t *testing.T) {
	doc, err := os.ReadFile("../docs/jobs.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```json\n(.*?)```").FindAllSubmatch(doc, -1)
	if len(blocks) < 3 {
		t.Fatalf("docs/jobs.md has %d json examples; want the email, smallest and raw jobs at least", len(blocks))
	}
	for i, b := range blocks {
		sub, err := ParseJob(b[1], KeyHints{})
		if err != nil {
			t.Errorf("example %d of docs/jobs.md does not parse: %v\n%s", i+1, err, b[1])
			continue
		}
		if sub.Raw != nil && !strings.HasPrefix(string(sub.Raw.Data), "From: ") {
			t.Errorf("example %d: the raw message does not decode to a message: %q", i+1, sub.Raw.Data)
		}
	}
}

// jsonNames are the JSON field names of a struct, with its embedded
// structs' fields in place, as encoding/json sees them.
func jsonNames(t reflect.Type) []string {
	var out []string
	for f := range t.Fields() {
		if f.Anonymous && f.Type.Kind() == reflect.Struct {
			out = append(out, jsonNames(f.Type)...)
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		out = append(out, name)
	}
	return out
}

// TestSchemaMatchesParser: docs/job.schema.json is valid JSON Schema
// 2020-12 whose properties are exactly the fields ParseJob accepts, and
// those are exactly the JSON tags of Job; so none of the three can drift.
func TestSchemaMatchesParser(t *testing.T) {
	b, err := os.ReadFile("../docs/job.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	var schema struct {
		Schema     string                     `json:"$schema"`
		Type       string                     `json:"type"`
		Additional *bool                      `json:"additionalProperties"`
		Properties map[string]json.RawMessage `json:"properties"`
	}
	if err := json.Unmarshal(b, &schema); err != nil {
		t.Fatalf("docs/job.schema.json is not valid JSON: %v", err)
	}
	if schema.Schema != "https://json-schema.org/draft/2020-12/schema" {
		t.Errorf("$schema %q, want draft 2020-12", schema.Schema)
	}
	if schema.Type != "object" || schema.Additional == nil || *schema.Additional {
		t.Errorf("the schema must be an object with additionalProperties false, as ParseJob refuses unknown fields")
	}
	var props []string
	for name := range schema.Properties {
		props = append(props, name)
	}
	slices.Sort(props)
	tags := jsonNames(reflect.TypeFor[Job]())
	slices.Sort(tags)
	if !slices.Equal(props, tags) {
		t.Errorf("schema properties %v\nJob's JSON fields   %v", props, tags)
	}
	var j Job
	for _, name := range tags {
		if j.field(name) == nil {
			t.Errorf("ParseJob does not accept %q, a JSON field of Job", name)
		}
	}
	for _, name := range []string{"tenant", "Key", "idempotency_key", ""} {
		if j.field(name) != nil {
			t.Errorf("ParseJob accepts %q", name)
		}
	}
}
