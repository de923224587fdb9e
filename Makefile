# The two commands of the README, plus helpers. Cargo's target directory lives outside
# the checkout so fresh clones (and CI) reuse the compiled llama.cpp.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/isotope-target
BIN := $(CARGO_TARGET_DIR)/release/isotope

.PHONY: setup run test lint bench

setup:
	scripts/setup.sh

## The main job on embedded defaults.
run: setup
	$(BIN) serve

## The whole test suite, optimised (llama.cpp as a debug build makes model tests crawl).
test:
	SKIP_BUILD=1 scripts/setup.sh
	cargo fmt --all --check
	cargo test --release --locked --workspace
	$(MAKE) lint

lint:
	cargo clippy --release --locked --workspace --all-targets -- -D warnings

bench: setup
	$(BIN) bench
