package storetest

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

// fireStore returns s as a FireStore, or skips the case for stores
// without the add-on.
func fireStore(t *testing.T, s store.Store) store.FireStore {
	t.Helper()
	fs, ok := s.(store.FireStore)
	if !ok {
		t.Skipf("%T does not implement store.FireStore", s)
	}
	return fs
}

func fireClaim(name string, at, now time.Time, owner string) store.FireClaim {
	return store.FireClaim{Key: store.FireKey(name, at), Schedule: name, ScheduledAt: at, Owner: owner, Now: now, Lease: lease}
}

func claimFire(t *testing.T, fs store.FireStore, c store.FireClaim) store.Fire {
	t.Helper()
	f, err := fs.ClaimFire(ctx(t), c)
	if err != nil {
		t.Fatalf("ClaimFire(%q) by %s at %v: %v", c.Key, c.Owner, c.Now, err)
	}
	return f
}

func fireLease(f store.Fire) store.FireLease { return store.FireLease{Key: f.Key, Fence: f.Fence} }

// testFireClaimCreates: the first claim creates a running fire with fence
// 1, the caller's lease and the scheduled instant in UTC.
func testFireClaimCreates(t *testing.T, s store.Store) {
	fs := fireStore(t, s)
	at := time.Date(2030, 3, 31, 1, 0, 0, 0, time.UTC)
	f := claimFire(t, fs, fireClaim("monthly", at, Epoch, "node-1"))
	if f.Key != "monthly@2030-03-31T01:00:00Z" || f.Schedule != "monthly" || !f.ScheduledAt.Equal(at) ||
		f.State != store.FireRunning || f.Fence != 1 || f.Owner != "node-1" || !f.LeaseExpiry.Equal(Epoch.Add(lease)) ||
		f.Attempts != 1 || f.Cursor != "" || !f.CreatedAt.Equal(Epoch) {
		t.Fatalf("claimed fire: %+v", f)
	}
	got, err := fs.GetFire(ctx(t), f.Key)
	if err != nil || got.Fence != 1 || got.State != store.FireRunning {
		t.Fatalf("GetFire: %+v, %v", got, err)
	}
	if _, err := fs.GetFire(ctx(t), "monthly@2000-01-01T00:00:00Z"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetFire of an unknown key: %v, want ErrNotFound", err)
	}
}

// testFireConcurrentClaims: of many concurrent claims of one new fire,
// exactly one succeeds; the others see ErrFireBusy.
func testFireConcurrentClaims(t *testing.T, s store.Store) {
	fs := fireStore(t, s)
	at := Epoch.Truncate(time.Minute)
	const n = 50
	var wg sync.WaitGroup
	errs := make([]error, n)
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			_, errs[i] = fs.ClaimFire(ctx(t), fireClaim("every-minute", at, Epoch, fmt.Sprintf("node-%d", i)))
		})
	}
	close(start)
	wg.Wait()
	won := 0
	for i, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, store.ErrFireBusy):
			t.Errorf("claim %d: %v, want nil or ErrFireBusy", i, err)
		}
	}
	if won != 1 {
		t.Fatalf("%d claims of one fire succeeded, want exactly 1", won)
	}
}

// testFireLeaseTakeover: a held lease cannot be taken; once it expires a
// claim takes the fire with a new fence and the recorded cursor, and the
// old runner can write nothing any more.
func testFireLeaseTakeover(t *testing.T, s store.Store) {
	fs := fireStore(t, s)
	at := Epoch.Truncate(time.Hour)
	a := claimFire(t, fs, fireClaim("daily", at, Epoch, "node-a"))
	if _, err := fs.ClaimFire(ctx(t), fireClaim("daily", at, Epoch.Add(lease-time.Nanosecond), "node-b")); !errors.Is(err, store.ErrFireBusy) {
		t.Fatalf("claim of a held fire: %v, want ErrFireBusy", err)
	}
	t1 := Epoch.Add(time.Second)
	if err := fs.ProgressFire(ctx(t), store.FireProgress{Lease: fireLease(a), Cursor: "row:500", Admitted: 480, Duplicates: 15, Rejected: 5, Now: t1, Extend: lease}); err != nil {
		t.Fatalf("ProgressFire: %v", err)
	}
	// The progress extended the lease to t1+lease.
	if _, err := fs.ClaimFire(ctx(t), fireClaim("daily", at, Epoch.Add(lease), "node-b")); !errors.Is(err, store.ErrFireBusy) {
		t.Fatalf("claim after progress extended the lease: %v, want ErrFireBusy", err)
	}
	t2 := t1.Add(lease)
	b := claimFire(t, fs, fireClaim("daily", at, t2, "node-b"))
	if b.Fence != 2 || b.Owner != "node-b" || b.Cursor != "row:500" || b.Admitted != 480 || b.Duplicates != 15 || b.Rejected != 5 || b.Attempts != 2 {
		t.Fatalf("taken-over fire: %+v", b)
	}
	for what, err := range map[string]error{
		"renew":    fs.RenewFire(ctx(t), fireLease(a), t2, lease),
		"progress": fs.ProgressFire(ctx(t), store.FireProgress{Lease: fireLease(a), Cursor: "row:999", Now: t2, Extend: lease}),
		"finish":   fs.FinishFire(ctx(t), store.FireFinish{Lease: fireLease(a), Done: true, Now: t2}),
	} {
		wantErr(t, "stale "+what, err, store.ErrLeaseLost)
	}
	if err := fs.RenewFire(ctx(t), fireLease(b), t2, lease); err != nil {
		t.Fatalf("RenewFire by the holder: %v", err)
	}
	// A lease that expired cannot be renewed, even by its holder.
	wantErr(t, "renew after expiry", fs.RenewFire(ctx(t), fireLease(b), t2.Add(lease), lease), store.ErrLeaseLost)
	got, _ := fs.GetFire(ctx(t), b.Key)
	if got.Cursor != "row:500" || got.Fence != 2 {
		t.Fatalf("a stale runner changed the fire: %+v", got)
	}
}

// testFireFinishAndRetry: a run stopped by an error waits until its retry
// time with the error recorded; a done fire can never be claimed again.
func testFireFinishAndRetry(t *testing.T, s store.Store) {
	fs := fireStore(t, s)
	at := Epoch.Truncate(time.Hour)
	a := claimFire(t, fs, fireClaim("weekly", at, Epoch, "node-a"))
	retryAt := Epoch.Add(10 * time.Minute)
	if err := fs.FinishFire(ctx(t), store.FireFinish{Lease: fireLease(a), Error: "template text.tmpl:3: boom", RetryAt: retryAt, Now: Epoch}); err != nil {
		t.Fatalf("FinishFire(retry): %v", err)
	}
	w, _ := fs.GetFire(ctx(t), a.Key)
	if w.State != store.FireWaiting || w.LastError != "template text.tmpl:3: boom" || !w.NextAttempt.Equal(retryAt) {
		t.Fatalf("waiting fire: %+v", w)
	}
	if _, err := fs.ClaimFire(ctx(t), fireClaim("weekly", at, retryAt.Add(-time.Nanosecond), "node-b")); !errors.Is(err, store.ErrFireBusy) {
		t.Fatalf("claim before the retry time: %v, want ErrFireBusy", err)
	}
	b := claimFire(t, fs, fireClaim("weekly", at, retryAt, "node-b"))
	if b.Fence != 2 || b.State != store.FireRunning || b.Attempts != 2 {
		t.Fatalf("retried fire: %+v", b)
	}
	if err := fs.FinishFire(ctx(t), store.FireFinish{Lease: fireLease(b), Done: true, Now: retryAt}); err != nil {
		t.Fatalf("FinishFire(done): %v", err)
	}
	d, _ := fs.GetFire(ctx(t), a.Key)
	if d.State != store.FireDone || d.LastError != "" || !d.FinishedAt.Equal(retryAt) {
		t.Fatalf("done fire: %+v", d)
	}
	if _, err := fs.ClaimFire(ctx(t), fireClaim("weekly", at, retryAt.Add(24*time.Hour), "node-c")); !errors.Is(err, store.ErrFireDone) {
		t.Fatalf("claim of a done fire: %v, want ErrFireDone", err)
	}
	wantErr(t, "finish twice", fs.FinishFire(ctx(t), store.FireFinish{Lease: fireLease(b), Done: true, Now: retryAt}), store.ErrLeaseLost)
}

// testFireList: ListFires filters by schedule, instant and state, latest
// first.
func testFireList(t *testing.T, s store.Store) {
	fs := fireStore(t, s)
	base := Epoch.Truncate(time.Hour)
	for i := range 5 {
		f := claimFire(t, fs, fireClaim("hourly", base.Add(time.Duration(i)*time.Hour), Epoch, "n"))
		if i < 3 {
			if err := fs.FinishFire(ctx(t), store.FireFinish{Lease: fireLease(f), Done: true, Now: Epoch}); err != nil {
				t.Fatal(err)
			}
		}
	}
	claimFire(t, fs, fireClaim("other", base, Epoch, "n"))
	all, err := fs.ListFires(ctx(t), store.FireFilter{Schedule: "hourly"})
	if err != nil || len(all) != 5 {
		t.Fatalf("ListFires(hourly): %d fires, %v; want 5", len(all), err)
	}
	for i, f := range all {
		if want := base.Add(time.Duration(4-i) * time.Hour); !f.ScheduledAt.Equal(want) {
			t.Fatalf("fire %d scheduled at %v, want %v (latest first)", i, f.ScheduledAt, want)
		}
	}
	open, _ := fs.ListFires(ctx(t), store.FireFilter{Schedule: "hourly", Unfinished: true})
	if len(open) != 2 {
		t.Fatalf("unfinished fires: %d, want 2", len(open))
	}
	since, _ := fs.ListFires(ctx(t), store.FireFilter{Schedule: "hourly", Since: base.Add(3 * time.Hour)})
	if len(since) != 2 {
		t.Fatalf("fires since +3h: %d, want 2", len(since))
	}
	one, _ := fs.ListFires(ctx(t), store.FireFilter{Limit: 1})
	if len(one) != 1 || one[0].Schedule != "hourly" {
		t.Fatalf("ListFires(limit 1, any schedule): %+v", one)
	}
	everything, _ := fs.ListFires(ctx(t), store.FireFilter{})
	if len(everything) != 6 {
		t.Fatalf("ListFires(any schedule): %d, want 6", len(everything))
	}
}
