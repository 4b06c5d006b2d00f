#!/usr/bin/env bash
# bulkhead's 9P2000.L server against diod, side by side in one run, through the same
# client (tests/src/bin/p9-bench.rs: one connection, one request at a time) over a Unix
# socket each: bulkhead-worker p9 --listen unix:PATH (sandboxed, as served) and
# diod -f -n -N -l PATH -e DIR. Both share a directory on the same file system.
#
#   bash bench/p9.sh    # FILES=2000 MIB=128 MSIZE=65536 ROUNDS=3 by default
#
# diod agrees to an msize of 64 KiB at most; asking both for the same keeps the data
# figures comparable (MSIZE=524288 shows bulkhead's own ceiling, diod stays at 64 KiB).
#
# Prints each server's figures and bulkhead/diod ratios (above 1: bulkhead is faster).
# TMPDIR=/dev/shm puts both shares on tmpfs, measuring the servers rather than a disk.
# DIOD=path and P9_BENCH_BIN=dir (holding bulkhead-worker and p9-bench) run prebuilt
# binaries, without cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

FILES=${FILES:-2000}
MIB=${MIB:-128}
MSIZE=${MSIZE:-65536}
ROUNDS=${ROUNDS:-3}

DIOD=${DIOD:-diod}
command -v "$DIOD" >/dev/null || { echo "bench/p9.sh: diod is not installed (apt-get install diod)" >&2; exit 1; }
if [ -n "${P9_BENCH_BIN:-}" ]; then
    # Prebuilt bulkhead-worker and p9-bench (to run on another machine).
    bin=$P9_BENCH_BIN
else
    cargo build --quiet --release -p bulkhead-workers --bin bulkhead-worker
    cargo build --quiet --release -p bulkhead-tests --bin p9-bench
    bin=${CARGO_TARGET_DIR:-target}/release
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/p9bench.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/ours" "$work/diod"

"$bin/bulkhead-worker" p9 --listen "unix:$work/ours.sock" --dir "$work/ours" 2>"$work/ours.log" &
pids+=($!)
"$DIOD" -f -n -N -l "$work/diod.sock" -e "$work/diod" 2>"$work/diod.log" &
pids+=($!)
for sock in ours diod; do
    for _ in $(seq 100); do [ -S "$work/$sock.sock" ] && break; sleep 0.05; done
    [ -S "$work/$sock.sock" ] || { echo "no $sock socket:"; cat "$work/$sock.log"; exit 1; } >&2
done

# Alternate the servers each round, keep each one's best figure (the machine is shared).
for round in $(seq "$ROUNDS"); do
    "$bin/p9-bench" "$work/ours.sock" ours "$FILES" "$MIB" "$MSIZE" >>"$work/ours.txt"
    "$bin/p9-bench" "$work/diod.sock" "$work/diod" "$FILES" "$MIB" "$MSIZE" >>"$work/diod.txt"
done

echo "9P2000.L, one client, one request in flight, Unix socket; $FILES files, $MIB MiB, best of $ROUNDS"
awk '
    FNR == 1 { server = (FILENAME ~ /ours/) ? "ours" : "diod" }
    { if (!(($1, server) in best) || $2 > best[$1, server]) best[$1, server] = $2 }
    END {
        split("msize create_per_s stat_per_s unlink_per_s meta_ops_per_s write_mb_s read_mb_s", keys, " ")
        printf "%-16s %12s %12s %8s\n", "figure", "bulkhead", "diod", "ratio"
        for (i = 1; i <= 7; i++) {
            k = keys[i]; o = best[k, "ours"]; d = best[k, "diod"]
            printf "%-16s %12s %12s %8s\n", k, o, d, (k == "msize" || d == 0) ? "" : sprintf("%.2f", o / d)
        }
    }' "$work/ours.txt" "$work/diod.txt"
