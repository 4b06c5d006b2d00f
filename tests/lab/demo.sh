#!/usr/bin/env bash
# The demo: boot a Debian Linux guest with bulkhead and show its console.
#
#   tests/lab/demo.sh
#
# With hardware virtualization (VMX/SVM and a usable /dev/kvm) bulkhead runs right here.
# Without it - as on the project's development machines, whose /dev/kvm is PVM and would take
# minutes to boot a stock kernel - the same guest boots inside the nested lab: QEMU TCG runs
# an L1 Linux with kvm-amd, and bulkhead runs there. At a terminal the guest gives you a
# shell (`poweroff -f` to leave); otherwise it prints a banner and powers off.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

hardware_virtualization() {
    [[ $(grep -cE 'vmx|svm' /proc/cpuinfo) -gt 0 && -r /dev/kvm && -w /dev/kvm ]]
}

missing_tools() {
    local tool
    for tool in qemu-system-x86_64 xz objcopy; do
        command -v "$tool" >/dev/null || return 0
    done
    return 1
}

if missing_tools; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "demo: QEMU or tools are missing; run tests/lab/install-packages.sh as root" >&2
        exit 1
    fi
    bash tests/lab/install-packages.sh
fi
cargo build --release -p bulkhead-vmm -p bulkhead-tests --bins
bash tests/lab/fetch-assets.sh

if hardware_virtualization; then
    echo "demo: this host has hardware virtualization; running bulkhead directly"
    exec target/release/bulkhead-lab demo --direct
fi
cat <<'NOTE'
demo: this host has no hardware virtualization (no vmx/svm in /proc/cpuinfo, or no usable
      /dev/kvm), so a stock Linux kernel would crawl under bulkhead here. Running the demo
      inside the nested lab instead: QEMU TCG boots an L1 Linux with kvm-amd (emulated SVM),
      and bulkhead boots the guest inside it. Expect about a minute before the guest's banner.
NOTE
exec target/release/bulkhead-lab demo
