# The two commands of a fresh machine: `make demo` (the main job) and `make test` (the suite).
.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	cargo run --release --bin postcopy-broker -- probe

test: setup
	cargo test --release

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
