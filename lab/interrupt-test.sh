#!/usr/bin/env bash
# The lab's Ctrl-C, as `make test` checks it: SIGINT once the guest has been sampled for a
# while. The run must stop its guests within seconds and keep the data so far, marked
# incomplete. Prints `scenario lab-interrupt: pass`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/lab-interrupt
log=target/lab-interrupt.log
rm -rf "$out"
: >"$log"
fail() {
	echo "scenario lab-interrupt: FAIL ($*)"
	sed 's/^/    /' "$log" | tail -20
	exit 1
}
# The smoke experiment with far more accesses than it can make before the signal.
exp=target/lab-interrupt.toml
sed 's/^ops = .*/ops = 100000000/' experiments/smoke.toml >"$exp"
grep -q '^ops = 100000000$' "$exp" || fail "cannot make the experiment"
./target/release/vhost-tmem-lab run "$exp" --out "$out" >"$log" 2>&1 &
pid=$!
# A progress line of 10 s or more: the guest is running and has been sampled.
for _ in $(seq 1 300); do
	grep -Eq '\[tmem\] g: +[1-9][0-9]* s,' "$log" && break
	kill -0 "$pid" 2>/dev/null || fail "the run ended before it was interrupted"
	sleep 1
done
kill -INT "$pid"
for _ in $(seq 1 60); do
	kill -0 "$pid" 2>/dev/null || break
	sleep 1
done
kill -0 "$pid" 2>/dev/null && fail "still running 60 s after SIGINT"
wait "$pid" || true
pgrep -f "tmem.scenario=lab" >/dev/null && fail "a guest outlived the run"
grep -q "(incomplete)" "$out/report.md" || fail "report.md does not say the data is incomplete"
[ "$(wc -l <"$out/data.csv")" -gt 2 ] || fail "data.csv kept no samples"
grep -q '"complete": false' "$out/result.json" || fail "result.json does not say incomplete"
echo "scenario lab-interrupt: pass"
