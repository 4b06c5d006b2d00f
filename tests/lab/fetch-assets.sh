#!/usr/bin/env bash
# Fetch what the nested lab boots: a Debian 6.1 kernel (for L1 and L2), its modules, and a
# static busybox. Everything comes from Debian's archive through apt; nothing is built.
#
#   tests/lab/fetch-assets.sh [DIR]    (default: $BULKHEAD_LAB_DIR/assets, where
#                                       BULKHEAD_LAB_DIR defaults to <repo>/target/lab)
#
# Produces in DIR:
#   vmlinuz             the bzImage, booted by QEMU as the L1 kernel
#   vmlinux             the uncompressed ELF inside it, booted by bulkhead as the L2 kernel
#   busybox             static busybox, the whole userland of both levels
#   modules/*.ko        flat copies of the modules L1 and L2 insmod, plus their dependencies
#   modules/modules.dep "a.ko: b.ko c.ko" direct dependencies, for computing insmod order
#   VERSION             the kernel release (e.g. 6.1.0-56-amd64); written last, so its presence
#                       means the directory is complete and a rerun is a no-op
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dir=${1:-${BULKHEAD_LAB_DIR:-$repo/target/lab}/assets}

# Modules wanted by name (as in `lsmod`; '-' and '_' are interchangeable). Dependencies are
# added automatically from each module's .modinfo.
#   L1: irqbypass, kvm, kvm-amd give L1 its /dev/kvm (kvm-amd also pulls in ccp).
#   L2: the virtio transports and devices bulkhead offers its guests, and the ACPI power
#       button with evdev, through which `bulkhead stop` reaches the guest's init.
wanted_modules=(
    irqbypass kvm kvm_amd
    virtio_mmio virtio_pci virtio_blk virtio_net virtio_rng
    9pnet_virtio 9p tun virtio_gpu virtio_input
    button evdev
)

# A directory from before a module was added to the list is fetched again.
have_all_modules() {
    local module
    for module in "${wanted_modules[@]}"; do
        [[ -f $dir/modules/$module.ko || -f $dir/modules/${module//_/-}.ko ]] || return 1
    done
}
if [[ -s $dir/VERSION && -f $dir/vmlinuz && -f $dir/vmlinux && -x $dir/busybox &&
    -f $dir/modules/modules.dep ]] && have_all_modules; then
    echo "lab assets already in $dir (kernel $(cat "$dir/VERSION"))"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb xz objcopy od; do
    command -v "$tool" >/dev/null || {
        echo "fetch-assets: '$tool' is missing (run tests/lab/install-packages.sh)" >&2
        exit 1
    }
done

# The generic flavour: the cloud one lacks kvm-amd's friends 9p and virtio-gpu.
newest_kernel_package() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$' |
        awk '{print $1}' | sort -V | tail -n 1
}
kernel_pkg=$(newest_kernel_package)
if [[ -z $kernel_pkg ]]; then
    apt-get update -qq
    kernel_pkg=$(newest_kernel_package)
fi
if [[ -z $kernel_pkg ]]; then
    echo "fetch-assets: apt knows no linux-image-6.1.0-*-amd64-unsigned" >&2
    exit 1
fi
release=${kernel_pkg#linux-image-}
release=${release%-unsigned}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "fetching $kernel_pkg and busybox-static"
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kernel_pkg" busybox-static)
for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
done

mkdir -p "$dir"
rm -rf "$dir/modules" "$dir/VERSION"
install -m 0644 "$work/root/boot/vmlinuz-$release" "$dir/vmlinuz"
install -m 0755 "$work/root/bin/busybox" "$dir/busybox"

# --- vmlinux: unwrap the bzImage ---------------------------------------------------------
# Boot protocol header: setup_sects at 0x1f1 (0 means 4), payload_offset at 0x248 and
# payload_length at 0x24c, both relative to the start of the protected-mode code, which
# follows the (setup_sects + 1) * 512 bytes of real-mode setup.
u8_at() { od -An -t u1 -j "$2" -N 1 "$1" | tr -d ' '; }
u32_at() { od -An -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
bz=$dir/vmlinuz
setup_sects=$(u8_at "$bz" $((0x1f1)))
if ((setup_sects == 0)); then setup_sects=4; fi
payload_start=$(((setup_sects + 1) * 512 + $(u32_at "$bz" $((0x248)))))
payload_length=$(u32_at "$bz" $((0x24c)))
dd if="$bz" of="$work/payload" iflag=skip_bytes,count_bytes skip="$payload_start" \
    count="$payload_length" status=none
magic=$(od -An -t x1 -N 6 "$work/payload" | tr -d ' ')
[[ $magic == fd377a585a00 ]] || {
    echo "fetch-assets: the bzImage payload is not XZ (magic $magic)" >&2
    exit 1
}
# The kernel build appends the decompressed size (4 bytes) after the XZ stream;
# --single-stream stops at the end of the stream instead of calling that garbage.
xz -dc --single-stream "$work/payload" >"$dir/vmlinux.tmp"
[[ $(od -An -t x1 -N 4 "$dir/vmlinux.tmp" | tr -d ' ') == 7f454c46 ]] || {
    echo "fetch-assets: the decompressed payload is not an ELF file" >&2
    exit 1
}
mv "$dir/vmlinux.tmp" "$dir/vmlinux"

# --- modules: the wanted ones and their dependency closure, flattened ---------------------
moddir=$work/root/lib/modules/$release/kernel
declare -A path_of # module name (underscores) -> path of its .ko
while IFS= read -r -d '' ko; do
    name=$(basename "$ko" .ko)
    path_of[${name//-/_}]=$ko
done < <(find "$moddir" -name '*.ko' -print0)
# Debian 6.1 ships plain .ko files; busybox insmod could not load .ko.xz, so refuse those.
if [[ ${#path_of[@]} -eq 0 ]]; then
    echo "fetch-assets: no plain .ko files under $moddir (compressed modules?)" >&2
    exit 1
fi

modinfo_depends() {
    objcopy -O binary --only-section=.modinfo "$1" /dev/stdout | tr '\0' '\n' |
        sed -n 's/^depends=//p' | tr ',' ' '
}

mkdir -p "$dir/modules"
declare -A done_modules
queue=("${wanted_modules[@]}")
while ((${#queue[@]})); do
    name=${queue[0]//-/_}
    queue=("${queue[@]:1}")
    [[ -n ${done_modules[$name]:-} ]] && continue
    done_modules[$name]=1
    ko=${path_of[$name]:-}
    [[ -n $ko ]] || { echo "fetch-assets: module $name not found in $kernel_pkg" >&2; exit 1; }
    install -m 0644 "$ko" "$dir/modules/"
    deps=()
    for dep in $(modinfo_depends "$ko"); do
        dep=${dep//-/_}
        deps+=("$(basename "${path_of[$dep]}")")
        queue+=("$dep")
    done
    echo "$(basename "$ko"): ${deps[*]}" >>"$dir/modules/modules.dep"
done
sort -o "$dir/modules/modules.dep" "$dir/modules/modules.dep"

echo "$release" >"$dir/VERSION"
modules=("$dir"/modules/*.ko)
echo "lab assets for kernel $release in $dir (${#modules[@]} modules)"
