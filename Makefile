# vhost-tmem entry points. `make test` and `make demo` work on a fresh Debian 12 machine.
SHELL := /bin/bash
# A failing cargo test must fail its recipe even when piped into tee.
.SHELLFLAGS := -o pipefail -c
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)
# The daemon the tests and the demo start (release: the tests push 100k+ pages through it).
export VHOST_TMEM_BIN := $(CURDIR)/target/release/vhost-tmem

.PHONY: all deps build lint test unit-test e2e-test demo clean help

all: build

help:
	@echo "make test   - install what is missing, lint, run every test"
	@echo "make demo   - the daemon serving two userspace guests under memory pressure, with stats"
	@echo "make build  - release build of the daemon and the test guest"
	@echo "make lint   - cargo fmt --check and clippy -D warnings"

deps:
	@bash .ci/install-deps.sh

build: deps
	@echo "== build (release)"
	$(CARGO) build --release --workspace --bins

lint: deps
	@echo "== lint"
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

TEST_LOG := target/test-summary.log

unit-test: build
	@echo "== unit and doc tests"
	$(CARGO) test --release --workspace --lib --bins 2>&1 | tee -a $(TEST_LOG)
	$(CARGO) test --release --workspace --doc 2>&1 | tee -a $(TEST_LOG)

e2e-test: build
	@echo "== end-to-end tests (real daemon, vhost-user, userspace guest)"
	$(CARGO) test --release -p tmem-testguest --tests 2>&1 | tee -a $(TEST_LOG)

test: lint
	@mkdir -p target && : > $(TEST_LOG)
	@$(MAKE) --no-print-directory unit-test e2e-test
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "%d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' $(TEST_LOG)

demo: build
	./target/release/tmem-demo

clean:
	$(CARGO) clean
