# The two commands of a fresh machine: `make demo` (the main job) and `make test` (the suite).
# The workspace: crates/postcopy-broker (the library), crates/postcopy-broker-cli (the daemon,
# the demo, the benchmark, the helpers, the examples and the integration tests).
.PHONY: setup demo test features lint bench

setup:
	@bash scripts/setup.sh

# A whole local migration of 1 GiB (source, destination broker, vhost-user-blk backend, guest
# driver doing I/O during postcopy); DEMO_ARGS="--size 256M --backend qsd --keep" to vary it.
demo: setup
	cargo build --release --workspace --bins --examples
	target/release/postcopy-broker demo $(DEMO_ARGS)

test: setup features
	cargo test --release --workspace
	bash scripts/fuzz.sh $${FUZZ_SECONDS:-40}

# The library builds without its default features and with each one alone.
features:
	bash scripts/features.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --lib

# The benchmark against the reference floor programs (BENCH_ARGS="--runs 3" to vary it).
bench: setup
	cargo build --release --workspace --bins
	target/release/postcopy-broker bench $(BENCH_ARGS)
