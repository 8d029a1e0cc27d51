package source_test

import (
	"fmt"

	"github.com/sendonce/sendonce/source"
)

func ExampleParseJob() {
	body := []byte(`{"from": "noreply@example.org", "to": ["ann@example.com"], "subject": "Your monthly reminder"}`)

	// A FIFO queue's MessageDeduplicationId is the key of a job without one.
	sub, err := source.ParseJob(body, source.KeyHints{DedupID: "reminder/ann/2013-12", DedupName: "MessageDeduplicationId"})
	fmt.Println(sub.Key, err)

	// Without any key, identical jobs share a fingerprint: one email.
	a, _ := source.ParseJob(body, source.KeyHints{})
	b, _ := source.ParseJob([]byte(`{"subject":"Your monthly reminder","to":["ann@example.com"],"from":"noreply@example.org"}`), source.KeyHints{})
	fmt.Println(a.Key == b.Key)

	// A job cannot pick its tenant.
	_, err = source.ParseJob([]byte(`{"tenant": "acme", "from": "noreply@example.org", "to": ["ann@example.com"], "subject": "Hi"}`), source.KeyHints{})
	fmt.Println(err)
	// Output:
	// reminder/ann/2013-12 <nil>
	// true
	// job: tenant: a job cannot choose its tenant: the source's configuration sets it, so that no producer can write into another tenant's keys; remove the field
}
