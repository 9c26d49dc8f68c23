#!/usr/bin/env bash
# CI step for the `parse` fuzz target: install cargo-fuzz if missing, build
# the target, seed the corpus from the RFC 4475/5118 conformance set, and fuzz
# for a short while (FUZZ_SECONDS, default 30). Fails on any crash.
#
# Works on a clean machine with stable Rust only: cargo-fuzz passes nightly
# flags (-Zsanitizer=address, sanitizer coverage) to rustc, which stable
# accepts with RUSTC_BOOTSTRAP=1. Nothing else needs nightly.
#
# Cost on the 2-core build machine (2026-11-23): `cargo install cargo-fuzz
# --locked` ~40 s (fresh crates.io index), first build of the target ~50 s,
# then the fuzzing time.
#
# Environment:
#   FUZZ_SECONDS    fuzzing time in seconds (default 30; 0 = build only)
#   FUZZ_SANITIZER  address (default) or none, passed to --sanitizer
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
secs="${FUZZ_SECONDS:-30}"
sanitizer="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1 CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "ci.sh: installing cargo-fuzz"
    start=$SECONDS
    cargo install cargo-fuzz --locked
    echo "ci.sh: cargo-fuzz installed in $((SECONDS - start)) s"
fi
cargo fuzz --version

# cargo-fuzz looks for fuzz/ under the current directory: run from sip/.
cd "$here/.."
start=$SECONDS
cargo fuzz build --sanitizer "$sanitizer" parse
echo "ci.sh: fuzz target built in $((SECONDS - start)) s"

if [ "$secs" -gt 0 ]; then
    "$here/seed.sh"
    # libFuzzer exits non-zero and leaves the input in fuzz/artifacts/parse/
    # on a crash, which fails this step.
    cargo fuzz run --sanitizer "$sanitizer" parse -- \
        -max_total_time="$secs" -print_final_stats=1
fi
