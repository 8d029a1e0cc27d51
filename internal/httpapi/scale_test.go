package httpapi_test

import (
	"fmt"
	"net/http"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

// TestListAtScale measures the list and search queries of the dashboard
// on a large SQLite ledger. It measures and asserts no time; run it with
//
//	SENDONCE_SCALE=1000000 go test -run TestListAtScale -v ./internal/httpapi
//
// (docs/dashboard.md has the numbers of one run).
func TestListAtScale(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("SENDONCE_SCALE"))
	if n <= 0 {
		t.Skip("set SENDONCE_SCALE=<records> to measure list and search on a large ledger")
	}
	e := newEnv(t)
	base := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	start := time.Now()
	const batch = 1000
	for i := 0; i < n; i += batch {
		adms := make([]store.Admission, 0, batch)
		for j := i; j < min(i+batch, n); j++ {
			rcpt := fmt.Sprintf("user%d@example.net", j%5000)
			if j == n/10 {
				rcpt = "rare@example.net"
			}
			adms = append(adms, store.Admission{
				Tenant: "default", Key: fmt.Sprintf("order-%08d", j), Fingerprint: "fp", MessageID: fmt.Sprintf("<%d@example.com>", j),
				From: "app@example.com", To: []string{rcpt}, Subject: "Order confirmation", Source: "scale",
				Data: []byte("Subject: x\r\n\r\nbody\r\n"), Now: base.Add(time.Duration(j) * time.Second),
				NotBefore: base.Add(1000 * time.Hour), // never claimed
			})
		}
		if _, err := e.store.Admit(t.Context(), adms); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("loaded %d records in %v", n, time.Since(start).Round(time.Millisecond))
	mid := base.Add(time.Duration(n/2) * time.Second).Format(time.RFC3339)
	midEnd := base.Add(time.Duration(n/2+3600) * time.Second).Format(time.RFC3339)
	queries := []struct{ name, path string }{
		{"first page (50)", "/v1/emails"},
		{"first page (1000)", "/v1/emails?limit=1000"},
		{"state queued", "/v1/emails?state=queued"},
		{"state in_doubt (none)", "/v1/emails?state=in_doubt"},
		{"key prefix", "/v1/emails?key_prefix=order-0005"},
		{"common recipient (1 in 5000)", "/v1/emails?recipient=user42@example.net"},
		{"rare recipient (1 record)", "/v1/emails?recipient=rare@example.net"},
		{"an hour in the middle", "/v1/emails?created_after=" + mid + "&created_before=" + midEnd},
		{"stats (counts per state)", "/v1/stats"},
	}
	for _, q := range queries {
		best := time.Duration(1 << 62)
		for range 3 {
			t0 := time.Now()
			r := e.do("GET", q.path, nil, "")
			if r.status != http.StatusOK {
				t.Fatalf("%s: %d %s", q.path, r.status, r.raw)
			}
			best = min(best, time.Since(t0))
		}
		t.Logf("%-30s %8.1f ms", q.name, float64(best.Microseconds())/1000)
	}
}
