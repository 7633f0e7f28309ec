# vhost-tmem entry points. `make test` and `make demo` work on a fresh Debian 12 machine.
SHELL := /bin/bash
# A failing cargo test must fail its recipe even when piped into tee.
.SHELLFLAGS := -o pipefail -c
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)
# The daemon the tests and the demo start (release: the tests push 100k+ pages through it).
export VHOST_TMEM_BIN := $(CURDIR)/target/release/vhost-tmem

.PHONY: all deps build lint test unit-test e2e-test bench bench-quick bench-instructions vm-images vm-test vm-test-kasan demo demo-userspace clean help install uninstall install-check fuzz experiment

all: build

help:
	@echo "make test   - install what is missing, lint, run every test"
	@echo "make demo   - a real guest (QEMU) swapping into the daemon, with both sides' stats"
	@echo "make vm-images - build QEMU, the guest kernel, tmem.ko and the initramfs (cached)"
	@echo "make vm-test - the guest scenarios and the lab's smoke run (part of make test)"
	@echo "make vm-test-kasan - the guest scenarios on a KASAN kernel (clang-built; not part of make test)"
	@echo "make experiment - the default overcommit experiment, disk/zswap/zram/tmem (about 10 minutes): target/experiment"
	@echo "make demo-userspace - the daemon serving two userspace guests, with stats"
	@echo "make build  - release build of the daemon and the test guest"
	@echo "make lint   - cargo fmt --check and clippy -D warnings"
	@echo "make bench  - the full benchmark: store, limits, vhost-user; report in target/bench, README results"
	@echo "make bench-quick - the benchmark's smoke run (seconds; part of make test, no timing asserted)"
	@echo "make bench-instructions - instructions per put/get/flush vs the bare codec under callgrind (into target/bench/report.json)"
	@echo "make install - the daemon, its man pages and bash/zsh/fish completions (PREFIX=$(PREFIX), DESTDIR)"
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

# Instructions per put/get/flush against the bare codec on the same pages (lz4, every corpus),
# counted by callgrind: repeatable on a loaded machine, unlike time. Adds `instructions` to
# target/bench/report.json (when make bench wrote one) and writes target/bench/instructions.json.
bench-instructions: build
	@command -v valgrind >/dev/null 2>&1 || { \
		echo "== installing valgrind"; \
		sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends valgrind; }
	@echo "== benchmark (instruction counts under callgrind)"
	./target/release/tmem-bench --instructions --out target/bench

# Guest images: QEMU with the vhost-user test device patch, the patched 6.12 kernel, tmem.ko
# and the initramfs, cached in ~/.cache/vhost-tmem by a hash of their inputs.
vm-images: deps
	@echo "== guest images"
	bash vm-images/build.sh

vm-test: build vm-images
	@echo "== VM scenarios (QEMU guests swapping and caching file pages through tmem.ko into the daemon)"
	./target/release/tmem-vmtest 2>&1 | tee -a $(TEST_LOG)
	@echo "== overcommit lab, smoke run (one small guest, tmem: boots, samples, verifies, reports)"
	./target/release/vhost-tmem-lab run experiments/smoke.toml --out target/lab-smoke 2>&1 | tee -a $(TEST_LOG)
	@echo "scenario lab-smoke: pass" | tee -a $(TEST_LOG)
	@echo "== overcommit lab, interrupted (SIGINT while the guest runs: guests stopped, partial data kept)"
	bash lab/interrupt-test.sh 2>&1 | tee -a $(TEST_LOG)

# The VM scenarios on a KASAN kernel (clang-built, cached beside the plain one; guests get
# 72 MiB more RAM for KASAN's own use). Not part of `make test`: see docs/guest.md, Testing it.
vm-test-kasan: build
	@echo "== guest images with KASAN"
	KASAN=1 bash vm-images/build.sh
	@echo "== VM scenarios on the KASAN kernel"
	./target/release/tmem-vmtest --images target/vm/images-kasan.env

# An overcommit experiment (default: experiments/default.toml, about 10 minutes on 2 cores):
# report.md, data.csv, result.json and plots in EXPERIMENT_OUT.
EXPERIMENT ?= experiments/default.toml
EXPERIMENT_OUT ?= target/experiment
experiment: build vm-images
	@echo "== overcommit experiment $(EXPERIMENT)"
	./target/release/vhost-tmem-lab run $(EXPERIMENT) --out $(EXPERIMENT_OUT)

# Installation: `make build` as the user who builds, then `make install` (as root for /usr/local)
# only copies the release binary and writes the man pages and completions, generated from the
# clap definitions by xtask. PREFIX and DESTDIR as usual.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
DATADIR ?= $(PREFIX)/share
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
ZSHCOMPDIR ?= $(DATADIR)/zsh/site-functions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d
RELEASE_BINS := target/release/vhost-tmem target/release/xtask

$(RELEASE_BINS):
	$(CARGO) build --release -p vhost-tmem -p xtask --bins

install: $(RELEASE_BINS)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && set -e && \
	target/release/xtask man "$$tmp/man" && \
	target/release/xtask completion bash "$$tmp/vhost-tmem" && \
	target/release/xtask completion zsh "$$tmp/_vhost-tmem" && \
	target/release/xtask completion fish "$$tmp/vhost-tmem.fish" && \
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(MANDIR)/man1" "$(DESTDIR)$(BASHCOMPDIR)" \
		"$(DESTDIR)$(ZSHCOMPDIR)" "$(DESTDIR)$(FISHCOMPDIR)" && \
	install -m 0755 target/release/vhost-tmem "$(DESTDIR)$(BINDIR)/vhost-tmem" && \
	install -m 0644 "$$tmp"/man/*.1 "$(DESTDIR)$(MANDIR)/man1/" && \
	install -m 0644 "$$tmp/vhost-tmem" "$(DESTDIR)$(BASHCOMPDIR)/vhost-tmem" && \
	install -m 0644 "$$tmp/_vhost-tmem" "$(DESTDIR)$(ZSHCOMPDIR)/_vhost-tmem" && \
	install -m 0644 "$$tmp/vhost-tmem.fish" "$(DESTDIR)$(FISHCOMPDIR)/vhost-tmem.fish" && \
	echo "installed vhost-tmem in $(DESTDIR)$(BINDIR), $$(ls "$$tmp/man" | wc -l) man pages in $(DESTDIR)$(MANDIR)/man1, completions for bash, zsh and fish"

uninstall:
	rm -f "$(DESTDIR)$(BINDIR)/vhost-tmem" "$(DESTDIR)$(MANDIR)"/man1/vhost-tmem.1 \
		"$(DESTDIR)$(MANDIR)"/man1/vhost-tmem-*.1 "$(DESTDIR)$(BASHCOMPDIR)/vhost-tmem" \
		"$(DESTDIR)$(ZSHCOMPDIR)/_vhost-tmem" "$(DESTDIR)$(FISHCOMPDIR)/vhost-tmem.fish"

# `make install DESTDIR=<empty dir>` installs exactly the expected files, and `make uninstall`
# takes them all away again; the systemd units in contrib/systemd verify.
install-check: build
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && set -e && \
	$(MAKE) --no-print-directory install DESTDIR="$$tmp" PREFIX=/usr >/dev/null && \
	bash .ci/check-install.sh "$$tmp" /usr && \
	$(MAKE) --no-print-directory uninstall DESTDIR="$$tmp" PREFIX=/usr >/dev/null && \
	left=$$(find "$$tmp" -type f) && [ -z "$$left" ] || { echo "uninstall left: $$left"; exit 1; }
	@bash .ci/check-systemd.sh target/release/vhost-tmem
	@echo "install-check: pass" | tee -a $(TEST_LOG)

# Every test; the last line sums cargo's test results and the VM scenarios.
test: lint
	@mkdir -p target && : > $(TEST_LOG)
	@$(MAKE) --no-print-directory unit-test e2e-test bench-quick install-check vm-test
	@awk '/^test result:/ { p += $$4; f += $$6 } /^scenario .*: pass$$/ { p++ } /^bench-quick: pass$$/ { p++ } /^install-check: pass$$/ { p++ } /^scenario .*: FAIL/ { f++ } END { printf "%d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' $(TEST_LOG)

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
