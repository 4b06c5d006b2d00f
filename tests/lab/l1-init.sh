#!/bin/sh
# /init of the nested lab's L1 guest: a Debian kernel under QEMU TCG.
#
# Loads kvm-amd so that L1 gets a /dev/kvm backed by QEMU's emulated SVM, then sources
# /lab/scenario.sh, which the harness (tests/src/lab) generates: one `lab_run` line per
# bulkhead run. The harness parses the lines that start with "LAB: ".
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# The VMM's and workers' lifecycle logs (device activation, restarts and the ring
# indexes they resume at) belong in the lab log: they are what explains a failed run.
export BULKHEAD_LOG=info

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
# console, so the L2 guest's output lands between the two markers.
#
# The armed trigger is watched in that stream by the one awk that copies it: no polling.
# An earlier version polled a file with grep and sleep, forking twenty processes a second
# in L1, and under that churn L2 guests triple-faulted in about a third of the boots.
lab_run() {
    label=$1 seconds=$2 stdin=$3
    shift 3
    marker=$trigger_marker action=$trigger_action
    trigger_marker='' trigger_action=''
    echo "LAB: run $label: begin"
    # ash has no PIPESTATUS: the status travels through a file.
    { timeout -s KILL "$seconds" "$@" <"$stdin"; echo $? >/tmp/lab-run.status; } |
        LAB_MARKER=$marker LAB_ACTION=$action LAB_LABEL=$label awk '
            { print; fflush() }
            ENVIRON["LAB_MARKER"] != "" && !fired && index($0, ENVIRON["LAB_MARKER"]) {
                fired = 1
                system(ENVIRON["LAB_ACTION"])
                print "LAB: run " ENVIRON["LAB_LABEL"] ": triggered"
                fflush()
            }'
    status=$(cat /tmp/lab-run.status)
    # The guest's last line may lack a newline; keep the marker at the start of a line.
    echo
    echo "LAB: run $label: exit=$status"
}

# shellcheck source=/dev/null  # generated per scenario
. /lab/scenario.sh
lab_finish
