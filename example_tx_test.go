package sendonce_test

import (
	"context"
	"log"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store/pgstore"
)

// The transactional outbox: the order and its confirmation email are
// written in one transaction, so neither exists without the other. Run it
// against a database migrated with `sendonce migrate --postgres URL`.
func ExampleClient_SubmitTx() {
	ctx := context.Background()
	url := os.Getenv("DATABASE_URL")
	st, err := pgstore.Open(ctx, url, pgstore.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer st.Close()
	c, err := sendonce.New(sendonce.Config{Store: st})
	if err != nil {
		log.Fatal(err)
	}
	db, err := pgxpool.New(ctx, url)
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()

	tx, err := db.Begin(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback(ctx) // a no-op after Commit
	if _, err := tx.Exec(ctx, `INSERT INTO orders (id, customer) VALUES ($1, $2)`, 1042, "ann@example.com"); err != nil {
		log.Fatal(err)
	}
	if _, err := c.SubmitTx(ctx, tx, sendonce.Submission{
		Key: "order-confirmation/1042",
		Email: sendonce.Email{
			From: "shop@example.org", To: []string{"ann@example.com"},
			Subject: "Your order 1042", Text: "Thank you for your order.",
		},
	}); err != nil {
		log.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		log.Fatal(err) // neither the order nor the email exists
	}
}
