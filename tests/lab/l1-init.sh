#!/bin/sh
# /init of the nested lab's L1 guest: a Debian kernel under QEMU TCG.
#
# Loads kvm-amd so that L1 gets a /dev/kvm backed by QEMU's emulated SVM, then sources
# /lab/scenario.sh, which the harness (tests/src/lab) generates: one `lab_run` line per
# bulkhead run. The harness parses the lines that start with "LAB: ".
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "LAB: init"

lab_finish() {
    echo "LAB: done"
    poweroff -f
}

lab_fail() {
    echo "LAB: error $*"
    lab_finish
}

# Module files in load order (dependencies first), computed by the harness.
while read -r module; do
    insmod "/lab/modules/$module" || lab_fail "insmod $module failed"
done </lab/modules.order
[ -c /dev/kvm ] || lab_fail "no /dev/kvm after loading kvm-amd (does QEMU's -cpu offer svm?)"
echo "LAB: kvm ready"

# lab_run LABEL SECONDS STDIN COMMAND...
# One bulkhead run (one L2 boot), killed after SECONDS so that a hung guest costs one run,
# not the whole boot. bulkhead writes the L2 console to its stdout, which is this console,
# so the L2 guest's output lands between the two markers.
lab_run() {
    label=$1 seconds=$2 stdin=$3
    shift 3
    echo "LAB: run $label: begin"
    timeout -s KILL "$seconds" "$@" <"$stdin"
    status=$?
    # The guest's last line may lack a newline; keep the marker at the start of a line.
    echo
    echo "LAB: run $label: exit=$status"
}

# shellcheck source=/dev/null  # generated per scenario
. /lab/scenario.sh
lab_finish
