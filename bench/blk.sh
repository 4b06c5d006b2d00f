#!/usr/bin/env bash
# bulkhead-worker blk vs qemu-storage-daemon's vhost-user-blk export, side by side: the same
# userspace frontend (tests/src/bin/blk-bench.rs) drives each backend on the same images
# in the same directory, and the raw-file limit: the same workloads straight on a raw file
# of the same file system (tests/src/bin/file-bench.rs: pread/pwrite, one thread per
# request in flight, like fio's psync engine with numjobs = queue depth). Prints one table
# with the three figures, our/QEMU and our/limit ratios.
#
#   bash bench/blk.sh [DIR] [SECONDS]     DIR: where the images go (default: a temp dir)
#
# The worker's I/O knobs pass through from the environment (BULKHEAD_BLK_IO=sync|uring,
# BULKHEAD_BLK_URING_PUNT, BULKHEAD_BLK_URING_INLINE_WRITES; see the README).
#
# Images (1 GiB): raw (fully allocated), qcow2 fresh (so the writes allocate), qcow2 fully
# allocated (preallocation=full). Each backend gets a fresh copy of each image.
# Not a test: figures depend on the host and on whatever else runs on it.
set -euo pipefail

cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
SECONDS_PER=${2:-3}
SIZE=$((1 << 30))
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --quiet --profile "$PROFILE" -p bulkhead-workers -p bulkhead-tests --bin bulkhead-worker --bin blk-bench --bin file-bench
BIN=$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
command -v qemu-storage-daemon >/dev/null || { echo "needs qemu-storage-daemon (qemu-system-common / qemu-utils)"; exit 1; }

DIR=${1:-$(mktemp -d /var/tmp/bulkhead-bench.XXXXXX)}
mkdir -p "$DIR"
RESULTS=$DIR/results
LIMIT=$DIR/limit
: >"$RESULTS"
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

make_image() { # kind path
    rm -f "$2"
    case $1 in
    raw) fallocate -l "$SIZE" "$2" ;;
    qcow2-fresh) qemu-img create -q -f qcow2 "$2" "$SIZE" ;;
    qcow2-full) qemu-img create -q -f qcow2 -o preallocation=full "$2" "$SIZE" ;;
    esac
}

wait_socket() { for _ in $(seq 100); do [ -S "$1" ] && return; sleep 0.1; done; echo "no socket $1"; exit 1; }

for kind in raw qcow2-fresh qcow2-full; do
    fmt=${kind%%-*}
    for backend in bulkhead qemu; do
        img=$DIR/disk.$kind
        sock=$DIR/$backend.sock
        rm -f "$sock"
        make_image "$kind" "$img"
        case $backend in
        bulkhead)
            "$BIN/bulkhead-worker" blk --socket "$sock" --image "$img" --format "$fmt" &
            ;;
        qemu)
            qemu-storage-daemon \
                --blockdev "driver=file,node-name=file,filename=$img,aio=threads" \
                --blockdev "driver=$fmt,node-name=disk,file=file" \
                --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$sock,writable=on" &
            ;;
        esac
        PID=$!
        wait_socket "$sock"
        "$BIN/blk-bench" --socket "$sock" --size "$SIZE" --seconds "$SECONDS_PER" |
            sed "s/^/$kind $backend /" >>"$RESULTS"
        kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    done
done

# The raw-file limit, once, on a fresh raw image: the ceiling of every row.
make_image raw "$DIR/limit.raw"
"$BIN/file-bench" --file "$DIR/limit.raw" --size "$SIZE" --seconds "$SECONDS_PER" >"$LIMIT"
rm -f "$DIR/limit.raw"

awk '
FNR == NR { limit[$1] = $2; next }
{ key = $1 " " $3; v[key, $2] = $4; m[key, $2] = $5; if (!(key in seen)) { seen[key] = 1; order[n++] = key } }
END {
    printf "%-12s %-18s %12s %12s %7s %12s %7s %10s %10s\n", "image", "workload", "bulkhead IOPS", "qemu IOPS", "ratio", "limit IOPS", "/limit", "bulk MiB/s", "qemu MiB/s"
    for (i = 0; i < n; i++) {
        k = order[i]; split(k, p, " ")
        b = v[k, "bulkhead"]; q = v[k, "qemu"]; l = limit[p[2]]
        printf "%-12s %-18s %12d %12d %6.2fx %12d %6.2fx %10.1f %10.1f\n", p[1], p[2], b, q, (q > 0 ? b / q : 0), l, (l > 0 ? b / l : 0), m[k, "bulkhead"], m[k, "qemu"]
    }
}' "$LIMIT" "$RESULTS"
