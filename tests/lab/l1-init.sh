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

# lab_trigger MARKER ACTION
# Arms a trigger for the next lab_run: once that run's output contains MARKER, L1 runs the
# shell command ACTION. This is how a scenario injects a fault (kill a device worker) at
# the moment the guest chooses, by printing MARKER.
trigger_marker='' trigger_action=''
lab_trigger() {
    trigger_marker=$1 trigger_action=$2
}

# lab_run LABEL SECONDS STDIN COMMAND...
# One bulkhead run (one L2 boot), killed after SECONDS so that a hung guest costs one run,
# not the whole boot. bulkhead writes the L2 console to its stdout, which goes to this
# console (and to a file the trigger watches), so the L2 guest's output lands between the
# two markers.
lab_run() {
    label=$1 seconds=$2 stdin=$3
    shift 3
    out=/tmp/lab-run.out
    : >"$out"
    watcher=''
    if [ -n "$trigger_marker" ]; then
        (
            while ! grep -qF "$trigger_marker" "$out"; do sleep 0.1; done
            eval "$trigger_action"
            echo "LAB: run $label: triggered"
        ) &
        watcher=$!
    fi
    trigger_marker='' trigger_action=''
    echo "LAB: run $label: begin"
    # ash has no PIPESTATUS: the status travels through a file.
    { timeout -s KILL "$seconds" "$@" <"$stdin"; echo $? >/tmp/lab-run.status; } | tee "$out"
    status=$(cat /tmp/lab-run.status)
    [ -n "$watcher" ] && kill "$watcher" 2>/dev/null
    # The guest's last line may lack a newline; keep the marker at the start of a line.
    echo
    echo "LAB: run $label: exit=$status"
}

# shellcheck source=/dev/null  # generated per scenario
. /lab/scenario.sh
lab_finish
