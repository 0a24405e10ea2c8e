# The two commands of a fresh machine: `make demo` (the main job) and `make test` (the suite).
.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

# A whole local migration of 1 GiB (source, destination broker, vhost-user-blk backend, guest
# driver doing I/O during postcopy); DEMO_ARGS="--size 256M --backend qsd --keep" to vary it.
demo: setup
	cargo build --release --bins --examples
	target/release/postcopy-broker demo $(DEMO_ARGS)

test: setup
	cargo test --release
	bash scripts/fuzz.sh $${FUZZ_SECONDS:-40}

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
