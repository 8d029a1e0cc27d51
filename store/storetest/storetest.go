// Package storetest is the conformance suite of store.Store: every store
// runs it, and a store that passes it keeps the contract that sendonce's
// promise rests on (see package store). A new behaviour of the contract is a
// new case here first.
//
// A store runs the suite from a test of its own:
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) store.Store { return openFresh(t) })
//	}
//
// The suite never sleeps and never reads the wall clock for the store: it
// passes explicit times (see Epoch) and moves them forward itself.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sendonce/sendonce/store"
)

// Epoch is the suite's "now" at the start of every case: a fixed instant,
// so failures are reproducible, with a nanosecond part, so a store that
// truncates times fails.
var Epoch = time.Date(2030, time.March, 4, 5, 6, 7, 123456789, time.UTC)

// Run runs every conformance case against fresh stores. open must return a
// new, empty store each time it is called (a new directory, database or
// schema); it may register its own cleanup, and the suite also calls Close
// when the case ends (Close must therefore tolerate a second call).
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	t.Helper()
	cases := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"Admit/NewRecordIsQueuedWithAdmittedFields", testAdmitNew},
		{"Admit/NotBeforeSetsNextAttempt", testAdmitNotBefore},
		{"Admit/200ConcurrentSameKeyExactlyOneNew", testAdmitConcurrent},
		{"Admit/SameKeyInTwoTenantsIsTwoRecords", testAdmitTwoTenants},
		{"Admit/OtherFingerprintIsConflictAndChangesNothing", testAdmitConflict},
		{"Admit/BatchMixedOutcomesInOrder", testAdmitBatch},
		{"Admit/EmptyBatch", testAdmitEmpty},
		{"Claim/ReturnsDataLeaseAndNewFence", testClaimFields},
		{"Claim/ConcurrentClaimsTakeEachRecordOnce", testClaimExclusive},
		{"Claim/NotBeforeAndNextAttemptRespected", testClaimDue},
		{"Claim/OldestDueFirstAndLimit", testClaimOrder},
		{"Claim/OnlyQueuedAndExpiredUnmarkedSending", testClaimStates},
		{"Lease/RenewExtendsAndFailsAfterExpiry", testRenew},
		{"Lease/StaleFenceRejectedEverywhere", testStaleFence},
		{"Lease/ExpiredWithoutMarkerIsReclaimed", testReclaimUnmarked},
		{"Lease/ExpiredWithMarkerMovesToInDoubtNotReclaimed", testExpiredMarkedInDoubt},
		{"Lease/LateCompleteAfterInDoubtIsRecorded", testLateComplete},
		{"Lease/MarkCommittingFailsWhenLeaseExpired", testMarkExpired},
		{"Lease/MarkCommittingIsIdempotent", testMarkIdempotent},
		{"Complete/Sent", testCompleteSent},
		{"Complete/Failed", testCompleteFailed},
		{"Complete/RetryRequeuesAtRetryAt", testCompleteRetry},
		{"Complete/InDoubt", testCompleteInDoubt},
		{"Complete/ReleaseRequeuesWithoutCountingAttempt", testCompleteRelease},
		{"Complete/ReleaseAfterMarkerIsInvalidState", testReleaseAfterMarker},
		{"Complete/RepeatIsNoOpOtherResultInvalid", testCompleteRepeat},
		{"Complete/AttemptsCounting", testAttempts},
		{"Resolve/ResendRequeuesAndAdvancesFence", testResolveResend},
		{"Resolve/MarkSent", testResolveMarkSent},
		{"Resolve/Fail", testResolveFail},
		{"Resolve/NotInDoubtIsInvalidState", testResolveNotInDoubt},
		{"Resolve/UnknownKeyAndOtherTenantNotFound", testResolveNotFound},
		{"Resolve/InvalidActionRefused", testResolveBadAction},
		{"List/NewestFirstWithoutData", testListOrder},
		{"List/StateFilter", testListState},
		{"List/TenantIsolation", testListTenant},
		{"List/CursorVisitsEveryRecordOnce", testListPaging},
		{"List/BadCursor", testListBadCursor},
		{"List/LimitDefaultsAndMaximum", testListLimits},
		{"List/SearchByKeyPrefixRecipientTimeAndAllTenants", testListSearch},
		{"List/OldestFirstPagingAcrossTenants", testListOldestPaging},
		{"Counts/PerStatePerTenantAndAll", testCounts},
		{"Message/StoredDataPerTenantAndPurged", testMessage},
		{"Events/TimelineOfEveryChange", testEventsTimeline},
		{"Events/LeaseExpiryResolveAndSweep", testEventsExpiryAndSweep},
		{"Events/LatestMaxEventsOldestFirst", testEventsLimit},
		{"Tenant/GetOfOtherTenantNotFound", testTenantGet},
		{"Close/CallsAfterCloseReturnErrClosed", testClosed},
		{"Ping", testPing},
		{"Sweep/FinalRecordsBeforeCutoffInBatches", testSweep},
		{"Simulation/RandomOperationsMatchModel", testSimulation},
		{"Fire/ClaimCreatesRunningFire", testFireClaimCreates},
		{"Fire/ConcurrentClaimsOneWins", testFireConcurrentClaims},
		{"Fire/ExpiredLeaseTakenOverWithCursorStaleFenceRefused", testFireLeaseTakeover},
		{"Fire/FinishRetryWaitsThenDoneIsFinal", testFireFinishAndRetry},
		{"Fire/ListFiltersLatestFirst", testFireList},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := open(t)
			t.Cleanup(func() { s.Close() })
			c.fn(t, s)
		})
	}
}

// RunDurability checks that records survive Close and a reopen. fresh is
// called once per case and returns an opener; every call of that opener
// must open the same data (same directory, same database schema).
//
//	storetest.RunDurability(t, func(t *testing.T) func() store.Store {
//		dir := t.TempDir()
//		return func() store.Store { return mustOpen(t, dir) }
//	})
func RunDurability(t *testing.T, fresh func(t *testing.T) (open func() store.Store)) {
	t.Helper()
	cases := []struct {
		name string
		fn   func(t *testing.T, open func() store.Store)
	}{
		{"Durability/RecordsSurviveCloseAndReopen", testReopen},
		{"Durability/LeasesAndFencesSurviveReopen", testReopenLeases},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.fn(t, fresh(t)) })
	}
}

// ---- helpers ----

func ctx(t *testing.T) context.Context { return t.Context() }

const (
	tenantA = "tenant-a"
	tenantB = "tenant-b"
	lease   = time.Minute
)

func admission(tenant, key, fp string, now time.Time) store.Admission {
	return store.Admission{
		Tenant:      tenant,
		Key:         key,
		Fingerprint: fp,
		MessageID:   fmt.Sprintf("<%s.%s@sendonce.test>", key, tenant),
		From:        "sender@example.com",
		To:          []string{"a@example.net", "b@example.org"},
		Subject:     "Subject of " + key,
		Tags:        map[string]string{"campaign": "spring", "key": key},
		Source:      "storetest",
		Data:        []byte("From: sender@example.com\r\nSubject: " + key + "\r\n\r\nbody " + fp + "\r\n"),
		Now:         now,
	}
}

func admit(t *testing.T, s store.Store, a ...store.Admission) []store.AdmitResult {
	t.Helper()
	res, err := s.Admit(ctx(t), a)
	if err != nil {
		t.Fatalf("Admit: %v", err)
	}
	if len(res) != len(a) {
		t.Fatalf("Admit returned %d results for %d admissions", len(res), len(a))
	}
	return res
}

// admitNew admits one email under tenantA and requires it to be new.
func admitNew(t *testing.T, s store.Store, key string, now time.Time) store.Record {
	t.Helper()
	r := admit(t, s, admission(tenantA, key, "fp-1", now))[0]
	if r.Outcome != store.OutcomeNew {
		t.Fatalf("Admit %q: outcome %v, want new", key, r.Outcome)
	}
	return r.Record
}

func claim(t *testing.T, s store.Store, now time.Time, limit int) []store.Record {
	t.Helper()
	recs, err := s.Claim(ctx(t), store.ClaimRequest{Owner: "worker-1", Now: now, Lease: lease, Limit: limit})
	if err != nil {
		t.Fatalf("Claim at %v: %v", now, err)
	}
	return recs
}

// claimOne claims at now and requires exactly the record id.
func claimOne(t *testing.T, s store.Store, now time.Time, id int64) store.Record {
	t.Helper()
	recs := claim(t, s, now, 10)
	if len(recs) != 1 || recs[0].ID != id {
		t.Fatalf("Claim at %v: got %v, want only record %d", now, ids(recs), id)
	}
	return recs[0]
}

func leaseOf(r store.Record) store.Lease { return store.Lease{ID: r.ID, Fence: r.Fence} }

func get(t *testing.T, s store.Store, tenant, key string) store.Record {
	t.Helper()
	r, err := s.Get(ctx(t), tenant, key)
	if err != nil {
		t.Fatalf("Get(%q, %q): %v", tenant, key, err)
	}
	return r
}

func complete(t *testing.T, s store.Store, c store.Completion) {
	t.Helper()
	if err := s.Complete(ctx(t), c); err != nil {
		t.Fatalf("Complete(%v, %v): %v", c.Lease, c.Result, err)
	}
}

func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("%s: error %v, want %v", what, err, want)
	}
}

func wantState(t *testing.T, r store.Record, st store.State) {
	t.Helper()
	if r.State != st {
		t.Fatalf("record %q: state %s, want %s", r.Key, r.State, st)
	}
}

func ids(recs []store.Record) []int64 {
	out := make([]int64, len(recs))
	for i, r := range recs {
		out[i] = r.ID
	}
	return out
}

// diff describes how two records differ, ignoring Data; "" when they match.
func diff(got, want store.Record) string {
	var d []string
	add := func(field string, g, w any) { d = append(d, fmt.Sprintf("%s: got %v, want %v", field, g, w)) }
	eq := func(field string, g, w any) {
		if g != w {
			add(field, g, w)
		}
	}
	teq := func(field string, g, w time.Time) {
		if !g.Equal(w) {
			add(field, g, w)
		}
	}
	eq("ID", got.ID, want.ID)
	eq("Tenant", got.Tenant, want.Tenant)
	eq("Key", got.Key, want.Key)
	eq("Fingerprint", got.Fingerprint, want.Fingerprint)
	eq("MessageID", got.MessageID, want.MessageID)
	eq("From", got.From, want.From)
	if !slices.Equal(got.To, want.To) {
		add("To", got.To, want.To)
	}
	eq("Subject", got.Subject, want.Subject)
	if !maps.Equal(got.Tags, want.Tags) {
		add("Tags", got.Tags, want.Tags)
	}
	eq("Source", got.Source, want.Source)
	eq("State", got.State, want.State)
	eq("Attempts", got.Attempts, want.Attempts)
	eq("Duplicates", got.Duplicates, want.Duplicates)
	eq("LastError", got.LastError, want.LastError)
	eq("Reply", got.Reply, want.Reply)
	eq("Fence", got.Fence, want.Fence)
	eq("LeaseOwner", got.LeaseOwner, want.LeaseOwner)
	teq("LeaseExpiry", got.LeaseExpiry, want.LeaseExpiry)
	eq("Committing", got.Committing, want.Committing)
	teq("NextAttempt", got.NextAttempt, want.NextAttempt)
	teq("CreatedAt", got.CreatedAt, want.CreatedAt)
	teq("UpdatedAt", got.UpdatedAt, want.UpdatedAt)
	teq("SentAt", got.SentAt, want.SentAt)
	eq("ResolvedBy", got.ResolvedBy, want.ResolvedBy)
	return strings.Join(d, "; ")
}

func wantSame(t *testing.T, what string, got, want store.Record) {
	t.Helper()
	if d := diff(got, want); d != "" {
		t.Fatalf("%s: record changed: %s", what, d)
	}
}
