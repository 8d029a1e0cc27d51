package sendonce_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// A queue that delivers the same job twice submits the same email twice;
// the second submission is answered from the ledger and nothing new is
// accepted.
func ExampleClient_Submit() {
	dir, _ := os.MkdirTemp("", "sendonce-example-")
	defer os.RemoveAll(dir)
	ctx := context.Background()
	st, err := sqlitestore.Open(ctx, dir, sqlitestore.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer st.Close()
	c, err := sendonce.New(sendonce.Config{Store: st})
	if err != nil {
		log.Fatal(err)
	}
	job := sendonce.Submission{
		Key: "tasks.cron_monthly_email_reminder[a9e5a73a]",
		Email: sendonce.Email{
			From:    "Difio <noreply@example.org>",
			To:      []string{"ann@example.com"},
			Subject: "Your monthly reminder",
			Text:    "Hello Ann",
		},
	}
	for i := 0; i < 2; i++ { // the queue redelivers
		rc, err := c.Submit(ctx, job)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("duplicate=%v state=%s duplicates=%d\n", rc.Duplicate, rc.Record.State, rc.Record.Duplicates)
	}

	// The same key with another email is refused; the first one is kept.
	job.Email.Text = "Hello again"
	_, err = c.Submit(ctx, job)
	fmt.Println(errors.Is(err, sendonce.ErrKeyReused))
	// Output:
	// duplicate=false state=queued duplicates=0
	// duplicate=true state=queued duplicates=1
	// true
}
