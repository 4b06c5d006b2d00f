#!/usr/bin/env bash
# Full-screen update throughput of the display worker at 1024x768 and 1920x1080, raw and
# ZRLE: frames per second, worker CPU time per frame (utime + stime from /proc, 10 ms
# ticks), bytes per update. Builds in release; SECONDS per run from $1 (default 3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${1:-3}
cargo build --release -q -p bulkhead-workers --bin bulkhead-worker
cargo build --release -q -p bulkhead-tests --example display_bench
bench=${CARGO_TARGET_DIR:-target}/release/examples/display_bench
for mode in "1024 768" "1920 1080"; do
    for encoding in raw zrle; do
        # shellcheck disable=SC2086 # mode is two words on purpose
        "$bench" $mode "$encoding" "$seconds"
    done
done
