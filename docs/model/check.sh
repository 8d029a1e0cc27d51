#!/usr/bin/env bash
# Exhaustively model-check docs/model/sendonce.pml with spin.
#
#   bash docs/model/check.sh            the correct model: every run must report errors: 0
#   bash docs/model/check.sh --broken   the broken variants: every run must find a counterexample
#
# Works from any directory; builds in a temporary directory and leaves nothing behind.
# Exit status: 0 when every run gave the expected answer, 1 otherwise.
# Without spin: installs it with apt-get when root; otherwise says so and exits
# 1 under CI=true, 0 (skipped) elsewhere.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
model=$here/sendonce.pml
mode=correct
case "${1:-}" in
"") ;;
--broken) mode=broken ;;
-h | --help) sed -n '2,10p' "$0"; exit 0 ;;
*) echo "usage: $0 [--broken]" >&2; exit 2 ;;
esac

missing() {
	echo "check.sh: $1" >&2
	if [ "${CI:-}" = true ]; then exit 1; fi
	echo "check.sh: SKIPPED (not under CI=true)" >&2
	exit 0
}
if ! command -v spin >/dev/null 2>&1; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "check.sh: spin not found; installing the Debian package" >&2
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq spin) >&2 ||
			missing "installing spin with apt-get failed"
	else
		missing "spin is not installed (Debian/Ubuntu: apt-get install spin)"
	fi
fi
command -v gcc >/dev/null 2>&1 || missing "gcc is not installed"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sendonce-model.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cp "$model" "$tmp/sendonce.pml"
cd "$tmp"

status=0
# run NAME EXPECT(pass|fail) "SPIN -D FLAGS" "GCC FLAGS" "PAN FLAGS"
run() {
	local name=$1 expect=$2 sflags=$3 cflags=$4 pflags=$5
	rm -rf "$tmp/$name" && mkdir "$tmp/$name" && cp sendonce.pml "$tmp/$name/"
	(
		cd "$tmp/$name"
		# shellcheck disable=SC2086
		spin -a $sflags sendonce.pml >spin.log 2>&1 || { cat spin.log; exit 3; }
		# shellcheck disable=SC2086
		gcc -w -O2 $cflags -o pan pan.c >gcc.log 2>&1 || { cat gcc.log; exit 3; }
		local t0 t1
		t0=$(date +%s.%N)
		# shellcheck disable=SC2086
		./pan $pflags >pan.out 2>&1 || true
		t1=$(date +%s.%N)
		awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", b - a }' >wall
	) || { echo "FAIL $name: could not build the verifier"; status=1; return; }
	local d=$tmp/$name out=$tmp/$name/pan.out
	local errors states depth wall
	errors=$(sed -n 's/.*errors: \([0-9][0-9]*\).*/\1/p' "$out" | tail -1)
	states=$(awk '/states, stored/ { print $1; exit }' "$out")
	depth=$(sed -n 's/.*depth reached \([0-9][0-9]*\).*/\1/p' "$out" | tail -1)
	wall=$(cat "$d/wall")
	printf '%-22s spin %-28s pan %-26s states stored %-10s depth %-5s errors %-3s %ss\n' \
		"$name" "${sflags:--}" "${pflags:--}" "${states:-?}" "${depth:-?}" "${errors:-?}" "$wall"
	if [ -z "$errors" ] || grep -qE 'max search depth too small|out of memory|pan: error|search not completed' "$out"; then
		echo "FAIL $name: the search did not complete:"; sed 's/^/    /' "$out"; status=1; return
	fi
	if [ "$expect" = pass ]; then
		if [ "$errors" != 0 ]; then
			echo "FAIL $name: counterexample found:"
			sed 's/^/    /' "$out"
			# shellcheck disable=SC2086
			(cd "$d" && spin -t -p $sflags sendonce.pml | tail -60 | sed 's/^/    /') || true
			status=1
		fi
	else
		if [ "$errors" = 0 ]; then
			echo "FAIL $name: the broken variant was NOT caught"; status=1; return
		fi
		local steps=? what
		[ -f "$d/sendonce.pml.trail" ] && steps=$(grep -c '^-\?[0-9]' "$d/sendonce.pml.trail")
		what=$(grep -m1 -E 'assertion violated|acceptance cycle|invalid end state' "$out" | sed 's/^pan:[0-9]*: *//')
		echo "    caught: $what; trail $steps steps (replay: spin -t -p $sflags sendonce.pml)"
	fi
}

start=$(date +%s)
if [ "$mode" = correct ]; then
	# 1. Safety (properties 1-3 as assertions, plus the quiescence check: when
	#    nothing can move, every email is sent or failed) and the invariant
	#    "sent (not by mark_sent) implies delivered" as a never claim.
	run safety pass "" "-DSAFETY -DCOLLAPSE" "-m200000 -N sent_delivered"
	# 2. Without the operator: every email ends sent, failed or in_doubt.
	run safety-no-operator pass "-DNO_OPERATOR" "-DSAFETY -DNOCLAIM -DCOLLAPSE" "-m200000"
	# 3. Liveness: <>[] every email sent or failed, checked for acceptance
	#    cycles WITHOUT a fairness assumption (every loop of the model is
	#    bounded, so no fairness is needed; LIVE_FAIR=1 adds weak fairness,
	#    same states, ~7x slower). Crashes bounded by LIVE_MAXCRASH (default 1:
	#    one crash per worker, at any step; the safety run's quiescence
	#    assertion covers terminal states with 2 crashes per worker).
	if [ "${LIVE_FAIR:-0}" = 1 ]; then fair="-f"; nfair="-DNFAIR=3"; else fair=""; nfair=""; fi
	run liveness pass "-DMAXCRASH=${LIVE_MAXCRASH:-1}" "$nfair -DCOLLAPSE" "-m200000 -a $fair -N live"
else
	run broken-no-marker fail "-DBROKEN_NO_MARKER" "-DSAFETY -DNOCLAIM" "-m200000"
	run broken-no-fence fail "-DBROKEN_NO_FENCE" "-DSAFETY -DNOCLAIM" "-m200000"
fi
echo "model check ($mode): $([ $status = 0 ] && echo ok || echo FAILED) in $(($(date +%s) - start))s"
exit $status
