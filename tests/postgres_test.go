package tests

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/store/pgstore"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// postgresURL returns the URL of a fresh, empty database for this test,
// dropped when it ends. Without a reachable PostgreSQL the test is skipped
// loudly, or fails under CI=true.
func postgresURL(t *testing.T) string {
	t.Helper()
	base := os.Getenv("SENDONCE_TEST_POSTGRES")
	if base == "" {
		base = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	return postgresURLAt(t, base)
}

// postgresURLAt is postgresURL on the server of base, a URL of a database
// on it that the test may create databases from.
func postgresURLAt(t *testing.T, base string) string {
	t.Helper()
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, base)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no PostgreSQL at %s (CI=true requires one): %v", base, err)
		}
		t.Skipf("SKIPPED: no PostgreSQL at %s: set SENDONCE_TEST_POSTGRES=postgres://... (%v)", base, err)
	}
	b := make([]byte, 6)
	rand.Read(b)
	name := "sendonce_e2e_" + hex.EncodeToString(b)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		admin.Close(ctx)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		admin.Exec(context.Background(), "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
		admin.Close(context.Background())
	})
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

// cutProxy forwards TCP connections to a target and can cut them all at
// once and refuse new ones, as a network partition from the database would.
type cutProxy struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]bool
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target, conns: map[net.Conn]bool{}}
	go p.serve()
	t.Cleanup(func() { ln.Close(); p.setCut(true) })
	return p
}

func (p *cutProxy) Addr() string { return p.ln.Addr().String() }

func (p *cutProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.cut {
			p.mu.Unlock()
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns[c], p.conns[up] = true, true
		p.mu.Unlock()
		go func() { io.Copy(up, c); up.Close(); c.Close() }()
		go func() { io.Copy(c, up); up.Close(); c.Close() }()
	}
}

// setCut closes every open connection and refuses new ones (true), or
// lets connections through again (false).
func (p *cutProxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for c := range p.conns {
			c.Close()
		}
		p.conns = map[net.Conn]bool{}
	}
}

// viaProxy rewrites a PostgreSQL URL to go through the proxy.
func viaProxy(t *testing.T, raw, proxyAddr string) string {
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = proxyAddr
	return u.String()
}

// TestSubmitTxOutbox: an email submitted in the caller's transaction exists
// if and only if that transaction commits, and is then delivered.
func TestSubmitTxOutbox(t *testing.T) {
	storeURL := postgresURL(t)
	ctx := context.Background()
	if err := pgstore.Migrate(ctx, storeURL, pgstore.Options{}); err != nil {
		t.Fatal(err)
	}
	st, err := pgstore.Open(ctx, storeURL, pgstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, err := sendonce.New(sendonce.Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, storeURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `CREATE TABLE orders (id int PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	email := sendonce.Email{From: "shop@example.org", To: []string{"ann@example.com"}, Subject: "Your order", Text: "Thanks"}
	for i, commit := range []bool{false, true} {
		tx, err := conn.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO orders VALUES ($1)`, i); err != nil {
			t.Fatal(err)
		}
		key := fmt.Sprintf("order/%d", i)
		if _, err := c.SubmitTx(ctx, tx, sendonce.Submission{Key: key, Email: email}); err != nil {
			t.Fatal(err)
		}
		if commit {
			err = tx.Commit(ctx)
		} else {
			err = tx.Rollback(ctx)
		}
		if err != nil {
			t.Fatal(err)
		}
		_, gerr := c.Get(ctx, "", key)
		if commit && gerr != nil {
			t.Fatalf("committed order's email missing: %v", gerr)
		}
		if !commit && !errors.Is(gerr, sendonce.ErrNotFound) {
			t.Fatalf("rolled-back order's email exists: %v", gerr)
		}
	}
	// The SQLite store cannot take part in a caller's transaction, and says so.
	lite, err := sendonce.New(sendonce.Config{Store: openSQLite(t)})
	if err != nil {
		t.Fatal(err)
	}
	tx, _ := conn.Begin(ctx)
	defer tx.Rollback(ctx)
	if _, err := lite.SubmitTx(ctx, tx, sendonce.Submission{Key: "x", Email: email}); !errors.Is(err, sendonce.ErrTxUnsupported) {
		t.Fatalf("SubmitTx on SQLite: %v, want ErrTxUnsupported", err)
	}
}

func openSQLite(t *testing.T) *sqlitestore.Store {
	st, err := sqlitestore.Open(context.Background(), t.TempDir(), sqlitestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}
