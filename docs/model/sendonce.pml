/*
 * sendonce: the claim / fence / commit-marker / in-doubt protocol.
 *
 * Two dispatcher workers, two emails, one store (every store call is one
 * atomic step, as the store.Store contract promises), an SMTP upstream
 * (the "sink") that counts what it accepted, a lease clock that may expire
 * a held lease at any moment (the worker does not know), a crasher that
 * kills a worker between any two of its steps, and an operator that
 * resolves in_doubt records. See README.md for the mapping to the Go code.
 *
 * Switches (spin -D...):
 *   -DBROKEN_NO_MARKER  the worker performs the irreversible step without
 *                       MarkCommitting (lease expiry then requeues an email
 *                       the upstream may already have)
 *   -DBROKEN_NO_FENCE   the store's MarkCommitting skips the fence / lease
 *                       check (a stale worker's marker is accepted)
 *   -DNO_OPERATOR       nobody resolves in_doubt: liveness is then "every
 *                       email ends sent, failed or in_doubt"
 *   -DMAXCRASH=n -DMAXPAUSE=n -DMAXRESEND=n -DMAXATT=n   bounds
 */

#define NE 2            /* emails */
#define NW 2            /* workers */
#ifndef MAXCRASH
#define MAXCRASH 2      /* crashes per worker */
#endif
#ifndef MAXPAUSE
#define MAXPAUSE 1      /* lease expiries under a live (paused) holder, per email */
#endif
#ifndef MAXRESEND
#define MAXRESEND 1     /* operator resends per email */
#endif
#ifndef MAXATT
#define MAXATT 2        /* Config.MaxAttempts */
#endif

/* record states (store.State) */
#define QUEUED  0
#define SENDING 1
#define SENT    2
#define FAILED  3
#define INDOUBT 4

/* completion results (store.Result) */
#define R_SENT    1
#define R_FAILED  2
#define R_RETRY   3
#define R_INDOUBT 4

/* ---- the store: one record per email ---- */
byte st[NE];            /* state */
bit  committing[NE];    /* commit marker for the current fence */
bit  expired[NE];       /* lease_expiry <= now (abstract clock) */
byte attempts[NE];

/* ---- ghosts: the sink and the history ---- */
byte delivered[NE];     /* copies the upstream accepted */
byte resends[NE];       /* operator resends */
bit  marksent[NE];      /* operator chose mark_sent */
byte pauses[NE];        /* premature expiries used */

/* ---- worker locals, global so the clock / crasher / asserts can see them ---- */
byte wcur[NW];          /* email+1 under attempt, 0 idle */
bit  wstale[NW];        /* its fence is no longer the record's fence (see README: the
                           fence abstracted to "current or stale" per holder) */
bit  wcommitted[NW];    /* its marker was accepted */
bit  wrejected[NW];     /* its marker was refused */
bit  wlost[NW];         /* it learned the lease was lost */
byte crashes[NW];

#define FINAL(e)   (st[e] == SENT || st[e] == FAILED)
#ifdef NO_OPERATOR
#define SETTLED(e) (FINAL(e) || st[e] == INDOUBT)
#else
#define SETTLED(e) FINAL(e)
#endif
#define ALLSETTLED (SETTLED(0) && SETTLED(1))

/* the lease of e is held by a live worker attempt */
#define HELD(e) ((wcur[0] == e+1 && !wstale[0]) || (wcur[1] == e+1 && !wstale[1]))

#define CLAIMABLE(e) (st[e] == QUEUED || (st[e] == SENDING && expired[e] && !committing[e]))
#define TO_INDOUBT(e) (st[e] == SENDING && expired[e] && committing[e])
#define CLAIM_ENABLED (CLAIMABLE(0) || CLAIMABLE(1) || TO_INDOUBT(0) || TO_INDOUBT(1))

/* The fence. A claim or a resolve of e advances fence[e]: every worker
 * attempt on e that held the previous fence now holds a stale one. Only
 * equality with the current fence is ever compared, so "stale" is all the
 * model keeps of the fence number. */
#define ADVANCE_FENCE(e) \
	if :: wcur[0] == e+1 -> wstale[0] = 1 :: else -> skip fi; \
	if :: wcur[1] == e+1 -> wstale[1] = 1 :: else -> skip fi

/* the store's compare-and-set on (ID, Fence) */
#define FENCE_OK(e, w) (!wstale[w])

/* ---------------- store operations (each called inside atomic) ---------------- */

/* Store.Claim: moves expired+marked sending records to in_doubt, then takes
 * one claimable record (or none) with a new lease and fence+1. */
inline Claim(w, e) {
	if
	:: TO_INDOUBT(0) -> st[0] = INDOUBT
	:: else -> skip
	fi;
	if
	:: TO_INDOUBT(1) -> st[1] = INDOUBT
	:: else -> skip
	fi;
	if
	:: CLAIMABLE(0) -> e = 0
	:: CLAIMABLE(1) -> e = 1
	:: else -> e = NE
	fi;
	if
	:: e < NE ->
		ADVANCE_FENCE(e);
		st[e] = SENDING; if :: attempts[e] < MAXATT -> attempts[e]++ :: else -> skip fi;
		committing[e] = 0; expired[e] = 0;
		wcur[w] = e+1; wstale[w] = 0;
		wcommitted[w] = 0; wrejected[w] = 0; wlost[w] = 0
	:: else -> skip
	fi
}

/* Store.Renew: CAS on (fence, sending, lease not expired). Does not make
 * the clock forget: a renewed lease may still expire at any moment. */
inline Renew(w, e) {
	if
	:: FENCE_OK(e, w) && st[e] == SENDING && !expired[e] ->
		assert(!wstale[w])
	:: else -> wlost[w] = 1
	fi
}

/* Store.MarkCommitting: CAS on (fence, sending, lease not expired). */
inline MarkCommitting(w, e) {
	if
#ifdef BROKEN_NO_FENCE
	:: st[e] == SENDING ->
#else
	:: FENCE_OK(e, w) && st[e] == SENDING && !expired[e] ->
#endif
		/* property 2: a write with a stale fence is never accepted */
		assert(!wstale[w] && !expired[e]);
		committing[e] = 1; wcommitted[w] = 1
	:: else -> wrejected[w] = 1; wlost[w] = 1
	fi
}

/* Store.Complete, exactly store.Completion.Decide + the write. */
inline Complete(w, e, res) {
	if
	:: !FENCE_OK(e, w) -> skip                 /* ErrLeaseLost */
	:: else ->
		assert(!wstale[w]);                  /* property 2 */
		if
		:: st[e] == SENT || st[e] == FAILED || st[e] == QUEUED ->
			skip                                        /* idempotent repeat or ErrInvalidState */
		:: st[e] == SENDING || st[e] == INDOUBT ->
			if
			:: res == R_SENT ->
				assert(delivered[e] > 0);               /* property 3 */
				st[e] = SENT
			:: res == R_FAILED -> st[e] = FAILED
			:: res == R_RETRY ->
				st[e] = QUEUED; committing[e] = 0
			:: res == R_INDOUBT -> st[e] = INDOUBT
			fi
		fi
	fi
}

/* Store.Resolve on an in_doubt record: fence+1, marker cleared. */
inline Resolve(e) {
	ADVANCE_FENCE(e); committing[e] = 0;
	if
	:: resends[e] < MAXRESEND -> st[e] = QUEUED; resends[e]++      /* ActionResend */
	:: st[e] = SENT; marksent[e] = 1                                /* ActionMarkSent */
	:: st[e] = FAILED                                               /* ActionFail */
	fi
}

/* ---------------- the dispatcher worker ---------------- */

/* classify: a temporary refusal is Retry until MaxAttempts, then Failed */
#define TEMP(e) (attempts[e] >= MAXATT -> R_FAILED : R_RETRY)

/* A crash may replace any step of a busy worker: every store call is atomic,
 * so "crash between step k and k+1" is "step k+1 is a crash". The worker
 * loses its attempt and restarts idle; its lease stays in the store. */
#define CRASH  crashes[w] < MAXCRASH -> crashes[w]++; goto crashed

/* the end of an attempt: Dispatcher.complete, Store.Complete (a refusal is final) */
#define FINISH(r) true -> Complete(w, e, r); goto done

proctype Worker(byte w) {
	byte e = NE;
end_idle:
	do
	:: /* Dispatcher.Run: Store.Claim */
	   atomic { CLAIM_ENABLED -> Claim(w, e); if :: e == NE -> goto done :: else -> skip fi };

	   /* Dispatcher.deliver before the marker: the renewal goroutine may
	    * find the lease lost (abandon, write nothing); the transport may fail
	    * on its own before the irreversible step (4xx / 5xx before DATA's ".") */
	   atomic {
		if
		:: CRASH
		:: true -> Renew(w, e); if :: wlost[w] -> goto done :: else -> skip fi
		:: FINISH(TEMP(e))
		:: FINISH(R_FAILED)
		:: skip
		fi
	   };

#ifndef BROKEN_NO_MARKER
	   /* attempt.commit: by its own clock the margin may look fine and be
	    * wrong (a paused worker), so the store's CAS is the guard. The renewal
	    * commit() makes when the margin is short has the marker's own guard
	    * (fence, sending, not expired), so the marker subsumes it here. */
	   atomic {
		if
		:: CRASH
		:: true -> MarkCommitting(w, e);
		   if :: wrejected[w] -> goto done     /* !committed && lost: abandon */
		      :: else -> skip
		   fi
		fi
	   };
#endif

	   /* the irreversible step (SMTP's final "."), then the answer if any */
	   atomic {
		if
		:: CRASH
		:: assert(!wrejected[w]);              /* property 2 */
		   delivered[e]++;
		   assert(delivered[e] <= 1 + resends[e])    /* property 1 */
		:: FINISH(TEMP(e))                     /* 4xx after the ".": not taken */
		:: FINISH(R_FAILED)                    /* 5xx after the ".": not taken */
		:: FINISH(R_INDOUBT)                   /* lost before the upstream took it */
		fi
	   };
	   atomic {
		if
		:: CRASH
		:: FINISH(R_SENT)                      /* 250 */
		:: FINISH(R_INDOUBT)                   /* lost after the upstream took it */
		fi
	   };
crashed:
done:
	   atomic { wcur[w] = 0; e = NE; wstale[w] = 0; wcommitted[w] = 0; wrejected[w] = 0; wlost[w] = 0 }
	od
}

/* ---------------- the environment ---------------- */

/* The clock: a held lease expires at any moment. Under a live holder this
 * is a pause (bounded); under a dead or departed holder it always comes. */
#define EXPIRE(e) \
	atomic { st[e] == SENDING && !expired[e] && (!HELD(e) || pauses[e] < MAXPAUSE) -> \
		if :: HELD(e) -> pauses[e]++ :: else -> skip fi; \
		expired[e] = 1 }

active proctype Clock() {
end_clock:
	do
	:: EXPIRE(0)
	:: EXPIRE(1)
	od
}

#ifndef NO_OPERATOR
/* An operator (or the resend policy) resolves in_doubt records. */
active proctype Operator() {
end_op:
	do
	:: atomic { st[0] == INDOUBT -> Resolve(0) }
	:: atomic { st[1] == INDOUBT -> Resolve(1) }
	od
}
#endif

/* When nothing can move any more, every email must be settled. */
active proctype Quiescence() {
	timeout -> assert(ALLSETTLED)
}

init {
	atomic { run Worker(0); run Worker(1) }
}

/* Property 3 as an invariant, property 4 as liveness. */
ltl sent_delivered { [] ((st[0] == SENT && !marksent[0] -> delivered[0] > 0) &&
                         (st[1] == SENT && !marksent[1] -> delivered[1] > 0)) }
ltl live { <> [] ALLSETTLED }
