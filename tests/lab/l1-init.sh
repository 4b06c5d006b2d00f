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

# A heartbeat on the console, so that the harness can tell L1 frozen (silent) from L1
# busy with a quiet run, and kill a frozen one early (tests/src/lab/qemu.rs). One fork
# every ten seconds: not the churn that once made L2 guests die.
while sleep 10; do echo "LAB: alive"; done </dev/null &

# lab_trigger MARKER ACTION
# Arms a trigger for the next lab_run: once that run's output contains MARKER, L1 runs the
# shell command ACTION, once. A run may arm several; each fires on its own marker. This is
# how a scenario acts at the moment the guest chooses, by printing MARKER: kill a device
# worker, or set up the host end of a TAP and start listeners. ACTION runs while the
# guest's output waits behind it, so what takes long goes in the background (`... &`), with
# its stdin redirected: it would otherwise inherit, and eat, the copied output stream.
# The pairs go to a file, a marker line then an action line, which the awk reads once.
lab_triggers=/tmp/lab-triggers
: >"$lab_triggers"
lab_trigger() {
    case "$1$2" in
    *'
'*) lab_fail "lab_trigger: a marker or action spans lines" ;;
    esac
    printf '%s\n%s\n' "$1" "$2" >>"$lab_triggers"
}

# lab_threads LABEL PID
# Where each thread of process PID is: its state, its CPU time so far and the part of it
# spent running a guest (clock ticks), and its kernel stack, innermost frame first (empty
# while the thread is on a CPU). Printed for a run that hangs, before L1 kills it: a vCPU
# thread inside KVM_RUN (kvm_arch_vcpu_ioctl_run on its stack, or guest time growing) is
# L1's KVM's to run, while one asleep elsewhere is waiting on bulkhead itself.
lab_threads() {
    for task in /proc/"$2"/task/*; do
        read -r name <"$task/comm" || continue
        # /proc/PID/stat fields 3 on (those after "(comm)") become $2 on: utime and stime
        # (fields 14, 15) are ${13} and ${14}, guest_time (field 43) is ${42}.
        stat=$(cat "$task/stat") || continue
        set -- "$1" ${stat##*) }
        stack=$(sed 's/^\[<[0-9a-f]*>\] //; s/+0x.*//' "$task/stack" 2>/dev/null | tr '\n' '<')
        echo "LAB: run $1: thread $name state=$2 ticks=$((${13} + ${14})) guest=${42} stack=${stack%<}"
    done
}

# lab_watchdog LABEL SECONDS PID
# Kills PID after SECONDS, but first says where its threads are, twice, two seconds apart.
lab_watchdog() {
    sleep "$2"
    kill -0 "$3" 2>/dev/null || return
    echo "LAB: run $1: timeout"
    lab_threads "$1" "$3"
    sleep 2
    lab_threads "$1" "$3"
    kill -KILL "$3"
}

# lab_run LABEL SECONDS STDIN COMMAND...
# One bulkhead run (one L2 boot), killed after SECONDS so that a hung guest costs one run,
# not the whole boot. bulkhead writes the L2 console to its stdout, which goes to this
# console, so the L2 guest's output lands between the two markers. The watchdog writes
# to the console directly (fd 4), not into the pipe: its `sleep`, left behind when the run
# ends in time, must not hold the pipe open.
#
# The armed triggers are watched in that stream by the one awk that copies it: no polling.
# An earlier version polled a file with grep and sleep, forking twenty processes a second
# in L1, and under that churn L2 guests triple-faulted in about a third of the boots.
lab_run() {
    label=$1 seconds=$2 stdin=$3
    shift 3
    mv "$lab_triggers" /tmp/lab-run.triggers
    : >"$lab_triggers"
    echo "LAB: run $label: begin"
    # ash has no PIPESTATUS: the status travels through a file.
    exec 4>&1
    {
        "$@" <"$stdin" &
        pid=$!
        lab_watchdog "$label" "$seconds" "$pid" >&4 2>&4 </dev/null &
        watchdog=$!
        wait "$pid"
        echo $? >/tmp/lab-run.status
        kill "$watchdog" 2>/dev/null
    } |
        LAB_TRIGGERS=/tmp/lab-run.triggers LAB_LABEL=$label awk '
            BEGIN {
                while ((getline marker <ENVIRON["LAB_TRIGGERS"]) > 0) {
                    if ((getline action <ENVIRON["LAB_TRIGGERS"]) <= 0) break
                    armed++
                    markers[armed] = marker
                    actions[armed] = action
                }
            }
            { print; fflush() }
            armed {
                for (i = 1; i in markers; i++) {
                    if (!fired[i] && index($0, markers[i])) {
                        fired[i] = 1
                        system(actions[i])
                        print "LAB: run " ENVIRON["LAB_LABEL"] ": triggered " i
                        fflush()
                    }
                }
            }'
    status=$(cat /tmp/lab-run.status)
    # The guest's last line may lack a newline; keep the marker at the start of a line.
    echo
    echo "LAB: run $label: exit=$status"
}

# shellcheck source=/dev/null  # generated per scenario
. /lab/scenario.sh
lab_finish
