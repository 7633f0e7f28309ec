#!/usr/bin/env bash
# `make fuzz`: runs each cargo-fuzz target (fuzz/) for FUZZ_SECONDS (default 60), one libFuzzer
# process at a time, after installing what it needs: a nightly toolchain (rustup) and
# cargo-fuzz. New corpus entries go to target/fuzz-corpus/TARGET (the committed seeds in
# fuzz/corpus/TARGET are read, never written); crashes go to fuzz/artifacts/TARGET/.
# FUZZ_TARGETS="device control" limits the run; extra libFuzzer flags go in FUZZ_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."

secs=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-device vhost_user control config}
say() { printf 'fuzz: %s\n' "$*"; }

if ! cargo +nightly --version >/dev/null 2>&1; then
    say "rustup toolchain install nightly (minimal profile)"
    rustup toolchain install nightly --profile minimal || exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "cargo install cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 1
fi

say "building the targets ($(cargo +nightly --version))"
cargo +nightly fuzz build || exit 1

failed=()
mkdir -p target/fuzz-logs
for t in $targets; do
    corpus=target/fuzz-corpus/$t
    mkdir -p "$corpus"
    dict=()
    [ -f "fuzz/dict/$t.dict" ] && dict=("-dict=fuzz/dict/$t.dict")
    log=target/fuzz-logs/$t.log
    say "$t: ${secs}s (log: $log)"
    # -timeout: one input running longer than this is a hang (a crash, with its input saved).
    # shellcheck disable=SC2086
    cargo +nightly fuzz run "$t" "$corpus" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
        "${dict[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1
    rc=$?
    # The last status line: executions, coverage (cov: edges, ft: features), exec/s.
    grep -E '^#[0-9]+' "$log" | tail -1 | sed "s/^/fuzz: $t: /"
    if [ $rc -ne 0 ]; then
        say "$t: FAILED (exit $rc): the input is in fuzz/artifacts/$t/, the report in $log"
        grep -E 'panicked at|SUMMARY|Test unit written' "$log" | head -5 | sed "s/^/fuzz: $t:   /"
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    say "crashed: ${failed[*]}"
    exit 1
fi
say "no crash in: $targets"
