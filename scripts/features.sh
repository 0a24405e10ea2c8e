#!/usr/bin/env bash
# The library's feature combinations: without default features (the core alone), each feature
# alone, all but one (the defaults less the Firecracker handshake), and all. `cargo check` only
# (no code generation); tests/workspace.rs checks what each combination pulls in, and that the
# handshake's code is absent without its feature.
set -euo pipefail
cd "$(dirname "$0")/.."
for features in "" vhost-user migration firecracker "vhost-user migration"; do
  echo "features: postcopy-broker --no-default-features --features '$features'"
  cargo check --release -p postcopy-broker --lib --no-default-features --features "$features"
done
cargo check --release -p postcopy-broker --lib --all-features
