//! Managing a running Linux guest, inside the nested lab: one L1 boot, one L2 boot.
//!
//! The guest prints a tick every second. When the third appears, L1 pauses the VM through
//! its control socket, resumes it five seconds later, asks for its status, and stops it:
//! `bulkhead stop` presses the ACPI power button, Linux's button driver reports the key on
//! an input device, and the guest's init, waiting on that device, powers off. The ticks
//! must stop while the VM is paused and carry on after, and bulkhead must end cleanly.

use std::time::Duration;

use bulkhead_tests::lab::{
    boot_scenario, random_token, Guest, LabReport, Run, RunReport, Scenario,
};

const IMAGE: &str = "/manage.cpio";
const NAME: &str = "lab-vm";
/// L1's own lines about the management commands it ran.
const MANAGE: &str = "LAB-MANAGE: ";
const TICK: &str = "GUEST: tick=";
const PAUSE_SECONDS: u32 = 5;

/// Finds the power button's input device, waits on it in the background (any event is the
/// key: the device reports nothing else), and ticks meanwhile.
fn guest_init() -> String {
    r#"
ev=
for d in /sys/class/input/event*; do
    [ "$(cat "$d/device/name" 2>/dev/null)" = "Power Button" ] && ev=/dev/input/${d##*/}
done
echo "GUEST: button=$ev"
if [ -n "$ev" ]; then
    ( head -c 1 "$ev" >/dev/null && echo "GUEST: power_button=pressed" && poweroff -f ) &
fi
i=0
while true; do
    i=$((i + 1))
    echo "GUEST: tick=$i"
    sleep 1
done
"#
    .to_owned()
}

/// What L1 does once the guest ticks: in the background, so that the guest's output keeps
/// flowing to the console (and its arrival times mean something) while the commands run.
fn l1_management() -> String {
    format!(
        "( bulkhead pause {NAME} && echo '{MANAGE}paused' && sleep {PAUSE_SECONDS} && \
           bulkhead resume {NAME} && echo '{MANAGE}resumed' && sleep 4 && \
           echo \"{MANAGE}status $(bulkhead status {NAME} --json | tr -d ' \\n')\" && \
           bulkhead stop {NAME} --timeout 60 && echo '{MANAGE}stopped' ) &"
    )
}

fn manage_run(cmdline: &str) -> Run {
    let args = [
        "run",
        "--name",
        NAME,
        "--kernel",
        "/vmlinux",
        "--initrd",
        IMAGE,
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--rng",
        "--cmdline",
        cmdline,
    ];
    Run::new("manage", args)
        .timeout(Duration::from_secs(240))
        .when_output_contains(&format!("{TICK}3"), &l1_management())
}

fn line_index(report: &LabReport, needle: &str) -> Result<usize, String> {
    report
        .lines
        .iter()
        .position(|line| line.text.contains(needle))
        .ok_or_else(|| format!("the console never showed {needle:?}"))
}

fn ticks_between(report: &LabReport, from: usize, to: usize) -> usize {
    report.lines[from..to]
        .iter()
        .filter(|line| line.text.contains(TICK))
        .count()
}

fn check(report: &LabReport, run: &RunReport) -> Result<(), String> {
    if run.guest("button").is_none_or(str::is_empty) {
        return Err("the guest has no Power Button input device".into());
    }
    let paused = line_index(report, &format!("{MANAGE}paused"))?;
    let resumed = line_index(report, &format!("{MANAGE}resumed"))?;
    let stopped = line_index(report, &format!("{MANAGE}stopped"))?;
    // A tick already on its way out when the vCPUs stopped may still arrive.
    let while_paused = ticks_between(report, paused, resumed);
    if while_paused > 1 {
        return Err(format!(
            "{while_paused} ticks arrived during a {PAUSE_SECONDS} s pause"
        ));
    }
    if ticks_between(report, resumed, stopped) == 0 {
        return Err("the guest did not tick again after resume".into());
    }
    let status = report
        .lines
        .iter()
        .find_map(|line| line.text.split_once(&format!("{MANAGE}status ")))
        .map(|(_, json)| json)
        .ok_or("no status reply")?;
    if !status.contains(&format!(r#""name":"{NAME}""#))
        || !status.contains(r#""state":"running""#)
        || !status.contains(r#""rng0""#)
    {
        return Err(format!("unexpected status: {status}"));
    }
    if run.guest("power_button") != Some("pressed") {
        return Err("the guest never saw the power button".into());
    }
    if run.exit != Some(0) {
        return Err(format!("bulkhead exited with {:?}", run.exit));
    }
    Ok(())
}

#[test]
fn stop_pause_and_resume_a_linux_guest() {
    let token = random_token().unwrap_or_else(|e| panic!("{e}"));
    let cmdline = format!("console=ttyS0 panic=-1 bulkhead.token={token}");
    let scenario = Scenario::new("manage")
        .guest(Guest::new(IMAGE, &guest_init()).modules(&[
            "button",
            "evdev",
            "virtio_mmio",
            "virtio_rng",
        ]))
        .run(manage_run(&cmdline));
    let report = boot_scenario(&scenario);
    let run = report.started_run("manage");
    check(&report, run).unwrap_or_else(|problem| panic!("{}", report.explain(&problem)));
}
