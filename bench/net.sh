#!/usr/bin/env bash
# Net worker throughput, side by side with the limit of plain TAP I/O on the same machine.
#
# Builds the worker and the harness driver (tests/src/bin/net-bench.rs) in release mode,
# then, in a network namespace of its own with a link-local TAP, measures packets/s and
# Gbit/s for 64-byte, 1500-byte and 64 KiB TSO frames, transmit and receive:
#
#   worker  the harness plays the guest (userspace vhost-user frontend, split queues over
#           memfd memory) against a launched `bulkhead-worker net` on the TAP
#   plain   one process doing write(2)/read(2) of the same frames on the same TAP
#
# and prints the ratio. Each cell is the median of NET_BENCH_RUNS (default 3) alternating
# runs of NET_BENCH_SECONDS (default 1). Needs root, /dev/net/tun and iproute2.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p bulkhead-workers --bin bulkhead-worker
cargo build --release -q -p bulkhead-tests --bin net-bench
target_dir="${CARGO_TARGET_DIR:-target}"
echo "# $(nproc) CPUs, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"
BULKHEAD_WORKER_BIN="$target_dir/release/bulkhead-worker" "$target_dir/release/net-bench"
