#!/usr/bin/env bash
# Bounded fuzzing of every target in crates/postcopy-broker/fuzz/ (the library's; cargo-fuzz /
# libFuzzer, AddressSanitizer, debug assertions): scripts/fuzz.sh [seconds per target]
# [target...]. Default 40 s each, 4 targets:
# under 3 minutes of fuzzing (plus the first build). Fails if any target finds a crash, a timeout
# or an out-of-memory input; the input is left in
# crates/postcopy-broker/fuzz/artifacts/<target>/. See docs/fuzzing.md.
#
# Idempotent setup from crates.io and Debian: cargo-fuzz (pinned) and a C++ compiler for libFuzzer.
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags.
set -euo pipefail

secs=${1:-40}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)
fuzz=$root/crates/postcopy-broker/fuzz
CARGO_FUZZ_VERSION=0.13.2

if ! command -v c++ >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "fuzz: libFuzzer needs a C++ compiler; as root: apt-get install g++" >&2
    exit 1
  fi
  echo "fuzz: installing g++ (libFuzzer is C++)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version 2>/dev/null | grep -q "cargo-fuzz $CARGO_FUZZ_VERSION\$"; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

export RUSTC_BOOTSTRAP=1
# Its own target dir: sanitizer flags would otherwise force rebuilds of the main build's artifacts.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$fuzz/target}
# The same flags for build and run, so `run` does not rebuild: release, debug assertions, ASan.
flags=(-O -a --sanitizer address)

cd "$fuzz"
cargo fuzz build "${flags[@]}"
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi

failed=()
summary=()
for t in "${targets[@]}"; do
  # New inputs go to a scratch corpus (kept between runs on this machine); the seeds under
  # version control in crates/postcopy-broker/fuzz/corpus/<target> are only read.
  work="$CARGO_TARGET_DIR/corpus/$t"
  log="$CARGO_TARGET_DIR/fuzz-$t.log"
  mkdir -p "$work" "$fuzz/artifacts/$t"
  echo "fuzz: $t for ${secs}s"
  rc=0
  seeds=(); [ -d "corpus/$t" ] && seeds=("corpus/$t")
  cargo fuzz run "${flags[@]}" "$t" "$work" "${seeds[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1 || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)
  summary+=("$(printf '%-16s %10s execs  cov %5s  %s' "$t" "${execs:-?}" "${cov:-?}" "$([ $rc -eq 0 ] && echo ok || echo FAILED)")")
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    grep -E -A25 "panicked at|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY:" "$log" | head -n 60 >&2 || tail -n 40 "$log" >&2
    echo "fuzz: $t FAILED (exit $rc); full log $log; inputs in $fuzz/artifacts/$t/" >&2
    echo "fuzz: reproduce: (cd $fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${flags[*]} $t artifacts/$t/<crash file>)" >&2
  fi
done

printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} target(s), ${secs}s each: no crash"
