# vhost-tmem entry points. `make test` and `make demo` work on a fresh Debian 12 machine.
SHELL := /bin/bash
# A failing cargo test must fail its recipe even when piped into tee.
.SHELLFLAGS := -o pipefail -c
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)
# The daemon the tests and the demo start (release: the tests push 100k+ pages through it).
export VHOST_TMEM_BIN := $(CURDIR)/target/release/vhost-tmem

.PHONY: all deps build lint test unit-test e2e-test bench bench-quick vm-images vm-test demo demo-userspace fuzz clean help

all: build

help:
	@echo "make test   - install what is missing, lint, run every test"
	@echo "make demo   - a real guest (QEMU) swapping into the daemon, with both sides' stats"
	@echo "make vm-images - build QEMU, the guest kernel, tmem.ko and the initramfs (cached)"
	@echo "make vm-test - the guest scenarios (part of make test)"
	@echo "make demo-userspace - the daemon serving two userspace guests, with stats"
	@echo "make build  - release build of the daemon and the test guest"
	@echo "make lint   - cargo fmt --check and clippy -D warnings"
	@echo "make bench  - the full benchmark: store, limits, vhost-user; report in target/bench, README results"
	@echo "make bench-quick - the benchmark's smoke run (seconds; part of make test, no timing asserted)"
	@echo "make fuzz   - each fuzz target for FUZZ_SECONDS (60) with cargo-fuzz (nightly; not part of make test)"

deps:
	@bash .ci/install-deps.sh

build: deps
	@echo "== build (release)"
	$(CARGO) build --release --workspace --bins

lint: deps
	@echo "== lint"
	$(CARGO) fmt --all -- --check
	rustfmt --edition 2021 --check guest-driver/*.rs
	$(CARGO) clippy --workspace --all-targets -- -D warnings

TEST_LOG := target/test-summary.log

unit-test: build
	@echo "== unit and doc tests"
	$(CARGO) test --release --workspace --lib --bins 2>&1 | tee -a $(TEST_LOG)
	$(CARGO) test --release -p vhost-tmem --test '*' 2>&1 | tee -a $(TEST_LOG)
	$(CARGO) test --release --workspace --doc 2>&1 | tee -a $(TEST_LOG)

e2e-test: build
	@echo "== end-to-end tests (real daemon, vhost-user, userspace guest)"
	$(CARGO) test --release -p tmem-testguest --tests 2>&1 | tee -a $(TEST_LOG)

# The full benchmark (a few minutes): target/bench/report.{md,json,svg} and the README's results.
bench: build
	@echo "== benchmark (full)"
	./target/release/tmem-bench --out target/bench --readme README.md

# Smoke run of the benchmark with tiny corpora, so the suite cannot rot; asserts no timing.
bench-quick: build
	@echo "== benchmark (quick smoke run)"
	./target/release/tmem-bench --quick --out target/bench-quick 2>&1 | tee -a $(TEST_LOG)
	@echo "bench-quick: pass" | tee -a $(TEST_LOG)

# Guest images: QEMU with the vhost-user test device patch, the patched 6.12 kernel, tmem.ko
# and the initramfs, cached in ~/.cache/vhost-tmem by a hash of their inputs.
vm-images: deps
	@echo "== guest images"
	bash vm-images/build.sh

vm-test: build vm-images
	@echo "== VM scenarios (QEMU guests swapping and caching file pages through tmem.ko into the daemon)"
	./target/release/tmem-vmtest 2>&1 | tee -a $(TEST_LOG)

# Every test; the last line sums cargo's test results and the VM scenarios.
test: lint
	@mkdir -p target && : > $(TEST_LOG)
	@$(MAKE) --no-print-directory unit-test e2e-test bench-quick vm-test
	@awk '/^test result:/ { p += $$4; f += $$6 } /^scenario .*: pass$$/ { p++ } /^bench-quick: pass$$/ { p++ } /^scenario .*: FAIL/ { f++ } END { printf "%d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' $(TEST_LOG)

# Fuzzing (nightly, cargo-fuzz; installed if missing): FUZZ_SECONDS per target, FUZZ_TARGETS to
# pick some. Not part of `make test`, whose unit tests run every target over its seed corpus.
FUZZ_SECONDS ?= 60
fuzz: deps
	@echo "== fuzzing ($(FUZZ_SECONDS) s per target)"
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash .ci/fuzz.sh

demo: build vm-images
	./target/release/tmem-vmtest --demo

demo-userspace: build
	./target/release/tmem-demo

clean:
	$(CARGO) clean
