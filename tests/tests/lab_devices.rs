//! Worker-served devices in a real Linux guest, inside the nested lab: one L1 boot, two
//! L2 boots with a virtio-rng device, the second with its worker killed while the guest
//! reads.
//!
//! The guest finds the device through ACPI (no command-line hints), checks that it gives
//! random bytes, announces a 1 MiB read from /dev/hwrng and starts it. In the second boot
//! L1 kills the worker with SIGKILL the moment the announcement appears. The supervisor
//! must restart the worker and hand it the running queue, so that the read completes with
//! every byte, the device keeps serving small paced reads afterwards, and the audit log
//! tells the story: one crash, one restart. The first boot, without the kill, is the
//! baseline that tells a broken device from a broken restart.
//!
//! The boots run one after the other in one L1: two L1s side by side on a 2-core host
//! halve each other's speed.

use std::time::Duration;

use bulkhead_tests::lab::{
    boot_scenario, random_token, AuditRecords, Guest, LabReport, Run, RunReport, Scenario,
};

const IMAGE: &str = "/rng.cpio";
/// Bytes the guest reads through the kill.
const BIG_READ: u32 = 1 << 20;
/// Reads of 512 bytes after the restart, 0.2 s apart, each with a timeout, so that a stuck
/// device shows as a count rather than a hang.
const PACED_READS: u32 = 10;
/// Linux's virtio-rng asks for 64 bytes at a time and each request costs nested exits:
/// 1 MiB takes about 15 s in the lab on an idle machine; leave room for a busy one.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn guest_init() -> String {
    let count = BIG_READ / 4096;
    format!(
        r#"
echo "GUEST: hwrng=$(cat /sys/class/misc/hw_random/rng_current)"
echo "GUEST: random=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
echo "GUEST: reading"
echo "GUEST: big_read=$(dd if=/dev/hwrng bs=4096 count={count} iflag=fullblock 2>/dev/null | wc -c)"
ok=0
for i in $(seq 1 {PACED_READS}); do
    [ "$(timeout 5 head -c 512 /dev/hwrng | wc -c)" = 512 ] && ok=$((ok + 1))
    sleep 0.2
done
echo "GUEST: reads_ok=$ok"
echo "GUEST: irq=$(grep virtio /proc/interrupts | tr -s ' ')"
poweroff -f
"#
    )
}

/// The run's label, which also names its audit log and the prefix of its audit records.
fn label(kill: bool) -> &'static str {
    if kill {
        "rng-kill"
    } else {
        "rng"
    }
}

fn audit_prefix(kill: bool) -> String {
    format!("LAB: audit {} ", label(kill))
}

fn rng_run(cmdline: &str, kill: bool) -> Run {
    let audit_log = format!("/tmp/{}.audit.jsonl", label(kill));
    let args = [
        "run",
        "--kernel",
        "/vmlinux",
        "--initrd",
        IMAGE,
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--rng",
        "--audit-log",
        &audit_log,
        "--cmdline",
        cmdline,
    ];
    let run = Run::new(label(kill), args).timeout(RUN_TIMEOUT);
    let run = if kill {
        run.when_output_contains("GUEST: reading", "killall -9 bulkhead-worker")
    } else {
        run
    };
    run.then_in_l1(&format!("sed 's/^/{}/' {audit_log}", audit_prefix(kill)))
}

fn check_reads(run: &RunReport) -> Result<(), String> {
    if run.exit != Some(0) {
        return Err(format!("bulkhead exited with {:?}", run.exit));
    }
    let hwrng = run.guest("hwrng").unwrap_or_default();
    if !hwrng.starts_with("virtio_rng") {
        return Err(format!("the guest's hwrng is {hwrng:?}, not virtio_rng"));
    }
    let random = run.guest("random").unwrap_or_default();
    if random.len() != 64 || random.chars().all(|c| c == '0') {
        return Err(format!("the first read gave {random:?}"));
    }
    let expect = |key: &str, want: u32| match run.guest(key) {
        Some(value) if value == want.to_string() => Ok(()),
        other => Err(format!("{key} is {other:?}, expected {want}")),
    };
    expect("big_read", BIG_READ)?;
    expect("reads_ok", PACED_READS)
}

/// L1 must report the kill before the guest reports the end of the read, both within the
/// kill run (the first run reads the same way).
fn check_kill_during_read(report: &LabReport) -> Result<(), String> {
    let begin = report
        .lines
        .iter()
        .position(|l| l.text.contains("LAB: run rng-kill: begin"))
        .ok_or("the kill run has no begin marker")?;
    let position = |needle: &str| {
        report.lines[begin..]
            .iter()
            .position(|l| l.text.contains(needle))
            .map(|at| at + begin)
    };
    match (
        position("LAB: run rng-kill: triggered"),
        position("GUEST: big_read="),
    ) {
        (Some(killed), Some(read)) if killed < read => Ok(()),
        (killed, read) => Err(format!(
            "the worker was not killed during the read (kill at line {killed:?}, read done at line {read:?})"
        )),
    }
}

fn check_audit(report: &LabReport, kill: bool) -> Result<(), String> {
    let audit = AuditRecords::of(report, &audit_prefix(kill));
    audit.spawned("rng0")?;
    if kill {
        audit.one_kill_one_restart("rng0")
    } else {
        audit.calm()
    }
}

/// Boots the rng guest twice in one L1: as is, then with its worker killed mid-read.
#[test]
fn rng_worker_serves_a_linux_guest_and_survives_a_kill() {
    let token = random_token().unwrap_or_else(|e| panic!("{e}"));
    let cmdline = format!("console=ttyS0 panic=-1 bulkhead.token={token}");
    let scenario = Scenario::new("devices")
        .guest(Guest::new(IMAGE, &guest_init()).modules(&["virtio_mmio", "virtio_rng"]))
        .run(rng_run(&cmdline, false))
        .run(rng_run(&cmdline, true));
    let report = boot_scenario(&scenario);
    for kill in [false, true] {
        let run = report.started_run(label(kill));
        check_reads(run)
            .and_then(|()| {
                if kill {
                    check_kill_during_read(&report)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| check_audit(&report, kill))
            .unwrap_or_else(|problem| {
                panic!(
                    "{}",
                    report.explain(&format!("run {}: {problem}", label(kill)))
                )
            });
    }
}
