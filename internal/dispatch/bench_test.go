package dispatch_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
	"github.com/sendonce/sendonce/store/sqlitestore"
)

// BenchmarkClaimComplete is the dispatcher's durable cycle per email on
// SQLite: claim one due record, write the commit marker, complete it as
// sent, with 16 callers (the default Workers) and b.N+10,000 records
// admitted beforehand.
func BenchmarkClaimComplete(b *testing.B) {
	ctx := context.Background()
	st, err := sqlitestore.Open(ctx, b.TempDir(), sqlitestore.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	now := time.Now()
	data := make([]byte, 4096)
	total := b.N + 10_000
	for i := 0; i < total; i += 500 {
		batch := make([]store.Admission, 0, 500)
		for j := i; j < min(total, i+500); j++ {
			key := fmt.Sprintf("key-%d", j)
			batch = append(batch, store.Admission{
				Tenant: "t", Key: key, Fingerprint: "fp-" + key, MessageID: "<" + key + "@x>",
				From: "a@example.com", To: []string{"b@example.com"}, Subject: "s", Data: data, Now: now,
			})
		}
		if _, err := st.Admit(ctx, batch); err != nil {
			b.Fatal(err)
		}
	}
	b.SetParallelism(8) // 16 callers on 2 cores
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			t := time.Now()
			recs, err := st.Claim(ctx, store.ClaimRequest{Owner: "bench", Now: t, Lease: time.Minute, Limit: 1})
			if err != nil || len(recs) != 1 {
				b.Errorf("claim: %d records, %v", len(recs), err)
				return
			}
			l := store.Lease{ID: recs[0].ID, Fence: recs[0].Fence}
			if err := st.MarkCommitting(ctx, l, t); err != nil {
				b.Error(err)
				return
			}
			if err := st.Complete(ctx, store.Completion{Lease: l, Result: store.ResultSent, Now: t}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
