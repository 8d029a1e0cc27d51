package service_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/sendonce/sendonce"
	"github.com/sendonce/sendonce/internal/config"
	"github.com/sendonce/sendonce/internal/service"
)

// postgresURL is a fresh database on the machine's PostgreSQL, dropped
// when the test ends; without a server the test is skipped loudly (fails
// under CI=true).
func postgresURL(t *testing.T) string {
	t.Helper()
	base := os.Getenv("SENDONCE_TEST_POSTGRES")
	if base == "" {
		base = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, base)
	if err != nil {
		msg := "SKIPPED: no PostgreSQL at " + base + ": set SENDONCE_TEST_POSTGRES=postgres://... (" + err.Error() + ")"
		if os.Getenv("CI") == "true" {
			t.Fatal("CI=true and " + msg)
		}
		t.Skip(msg)
	}
	b := make([]byte, 6)
	rand.Read(b)
	name := "sendonce_svc_" + hex.EncodeToString(b)
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

// The commit hook of OpenStore sees the commits of either store, so the
// sendonce_store_commit_* metrics are not SQLite's alone.
func TestOpenStoreCommitHook(t *testing.T) {
	for name, cfg := range map[string]func(t *testing.T) config.Config{
		"sqlite":   func(t *testing.T) config.Config { return config.Config{Data: t.TempDir()} },
		"postgres": func(t *testing.T) config.Config { return config.Config{Store: postgresURL(t), Migrate: true} },
	} {
		t.Run(name, func(t *testing.T) {
			var mu sync.Mutex
			var commits, requests int
			st, err := service.OpenStore(t.Context(), cfg(t), slog.New(slog.DiscardHandler), func(n int, d time.Duration) {
				mu.Lock()
				defer mu.Unlock()
				commits++
				requests += n
				if d < 0 {
					t.Errorf("negative commit duration %v", d)
				}
			})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			c, err := sendonce.New(sendonce.Config{Store: st})
			if err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			before := requests
			mu.Unlock()
			if _, err := c.Submit(t.Context(), sendonce.Submission{Key: "k1", Email: sendonce.Email{From: "a@example.com", To: []string{"b@example.net"}, Subject: "x", Text: "y"}}); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			defer mu.Unlock()
			if commits == 0 || requests-before != 1 {
				t.Fatalf("after one submission the hook saw %d commits, %d requests more; want the admission's commit", commits, requests-before)
			}
		})
	}
}
