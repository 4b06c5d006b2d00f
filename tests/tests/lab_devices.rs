//! Worker-served devices in a real Linux guest, inside the nested lab: one L1 boot, one L2
//! boot with a virtio-rng device whose worker L1 kills while the guest reads.
//!
//! The guest finds the device through ACPI (no command-line hints), reads 1 MiB from
//! /dev/hwrng, then announces a series of reads; L1 kills the worker with SIGKILL as they
//! start. The supervisor must restart it and hand it the running queue, so that every
//! read completes, and the audit log must tell the story.
//!
//! Known problem, not yet solved, so both tests are ignored in CI (run them with
//! `cargo test --release -p bulkhead-tests --test lab_devices -- --ignored`): in about a
//! third of the boots the guest never gets a request back after the worker's restart
//! (once it triple-faulted instead, and once the device did not show up at all), while
//! the same replacement, driven from the userspace harness the way Linux drives it, works
//! every time (`rng_worker.rs`). Until the cause - bulkhead's restart path or nested
//! KVM's interrupt delivery - is found, these boots are evidence, not a gate.

use bulkhead_tests::bulkhead_bin;
use bulkhead_tests::lab::{random_token, Guest, Lab, LabReport, Run, RunReport, Scenario};

const RNG_IMAGE: &str = "/rng.cpio";
const AUDIT_LOG: &str = "/tmp/audit.jsonl";
/// Bytes the guest reads in one go.
const BIG_READ: u32 = 1 << 20;
/// Reads of 512 bytes, 0.2 s apart, during which the worker is killed and replaced.
const PACED_READS: u32 = 30;

/// Reports the device and 1 MiB of its output, then reads while L1 kills the worker: in
/// small paced reads, or (`continuous`) as one more 1 MiB read.
fn rng_init(continuous: bool) -> String {
    let count = BIG_READ / 4096;
    let big_read =
        format!("dd if=/dev/hwrng bs=4096 count={count} iflag=fullblock 2>/dev/null | wc -c");
    let during_kill = if continuous {
        format!("echo \"GUEST: read_bytes=$({big_read})\"")
    } else {
        format!(
            r#"ok=0
for i in $(seq 1 {PACED_READS}); do
    [ "$(head -c 512 /dev/hwrng | wc -c)" = 512 ] && ok=$((ok + 1))
    sleep 0.2
done
echo "GUEST: reads_ok=$ok""#
        )
    };
    format!(
        r#"
echo "GUEST: hwrng=$(cat /sys/class/misc/hw_random/rng_current)"
echo "GUEST: irq=$(grep virtio /proc/interrupts | tr -s ' ')"
echo "GUEST: random=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
echo "GUEST: big_read=$({big_read})"
echo "GUEST: reading"
{during_kill}
poweroff -f
"#
    )
}

/// Boots the rng guest once, killing its worker when the guest starts reading.
fn boot_and_kill_the_worker(name: &str, continuous: bool) -> (LabReport, RunReport) {
    let token = random_token().unwrap_or_else(|e| panic!("{e}"));
    let cmdline = format!("console=ttyS0 panic=-1 bulkhead.token={token}");
    let args = [
        "run",
        "--kernel",
        "/vmlinux",
        "--initrd",
        RNG_IMAGE,
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--rng",
        "--audit-log",
        AUDIT_LOG,
        "--cmdline",
        &cmdline,
    ];
    let scenario = Scenario::new(name)
        .guest(Guest::new(RNG_IMAGE, &rng_init(continuous)).modules(&["virtio_mmio", "virtio_rng"]))
        .run(
            Run::new("rng", args)
                .when_output_contains("GUEST: reading", "killall -9 bulkhead-worker")
                .then_in_l1(&format!("sed 's/^/LAB: audit /' {AUDIT_LOG}")),
        );
    let lab = Lab::new().unwrap_or_else(|e| panic!("cannot start the nested lab: {e}"));
    let report = lab
        .run(&scenario, &bulkhead_bin())
        .unwrap_or_else(|e| panic!("nested lab boot failed: {e}"));
    eprintln!("{}", report.timings());
    let run = report
        .run("rng")
        .cloned()
        .unwrap_or_else(|| panic!("{}", report.explain("the rng run never started")));
    (report, run)
}

/// Checks what every rng boot must show: the device, its output, the kill landing while
/// the guest was reading, and the audit trail of the crash and the restart.
fn check_rng_run(report: &LabReport, run: &RunReport, read_done_marker: &str) {
    let fail = |problem: &str| -> ! { panic!("{}", report.explain(problem)) };
    if run.exit != Some(0) {
        fail(&format!("bulkhead exited with {:?}", run.exit));
    }
    let hwrng = run.guest("hwrng").unwrap_or_default();
    if !hwrng.starts_with("virtio_rng") {
        fail(&format!("the guest's hwrng is {hwrng:?}, not virtio_rng"));
    }
    let random = run.guest("random").unwrap_or_default();
    if random.len() != 64 || random.chars().all(|c| c == '0') {
        fail(&format!("the first read gave {random:?}"));
    }
    if run.guest("big_read") != Some(&BIG_READ.to_string()) {
        fail(&format!(
            "the guest read {:?} of {BIG_READ} bytes",
            run.guest("big_read")
        ));
    }
    // L1 reports the kill before the guest reports the reads' result.
    let position = |needle: &str| report.lines.iter().position(|l| l.text.contains(needle));
    match (position("LAB: run rng: triggered"), position(read_done_marker)) {
        (Some(killed), Some(read)) if killed < read => {}
        (killed, read) => fail(&format!(
            "the worker was not killed during the reads (kill at line {killed:?}, reads done at line {read:?})"
        )),
    }
    let audit: Vec<&str> = report
        .lines
        .iter()
        .filter_map(|line| line.text.split_once("LAB: audit ").map(|(_, json)| json))
        .collect();
    let has = |event: &str, detail: &str| {
        audit
            .iter()
            .any(|line| line.contains(&format!(r#""event":"{event}""#)) && line.contains(detail))
    };
    if !has("spawn", r#""device":"rng0""#) || !has("policy", "sha256:") {
        fail(&format!(
            "the audit log lacks the spawn or policy record: {audit:?}"
        ));
    }
    let crashes = audit
        .iter()
        .filter(|l| l.contains(r#""event":"crash""#))
        .count();
    let restarts = audit
        .iter()
        .filter(|l| l.contains(r#""event":"restart""#))
        .count();
    if crashes != 1
        || !has("crash", r#""signal":9"#)
        || !has("crash", r#""seccomp_violation":false"#)
    {
        fail(&format!(
            "the audit log should show exactly one SIGKILL crash: {audit:?}"
        ));
    }
    if restarts != 1 || !has("restart", r#""attempt":1"#) {
        fail(&format!(
            "the audit log should show exactly one restart: {audit:?}"
        ));
    }
}

#[test]
#[ignore = "known problem: see the module documentation"]
fn rng_worker_serves_a_linux_guest_and_survives_a_kill() {
    let (report, run) = boot_and_kill_the_worker("devices", false);
    check_rng_run(&report, &run, "GUEST: reads_ok=");
    if run.guest("reads_ok") != Some(&PACED_READS.to_string()) {
        panic!(
            "{}",
            report.explain(&format!(
                "only {:?} of {PACED_READS} reads completed around the worker's restart",
                run.guest("reads_ok")
            ))
        );
    }
}

#[test]
#[ignore = "known problem: see the module documentation"]
fn kill_during_a_continuous_read() {
    let (report, run) = boot_and_kill_the_worker("devices-continuous", true);
    check_rng_run(&report, &run, "GUEST: read_bytes=");
    if run.guest("read_bytes") != Some(&BIG_READ.to_string()) {
        panic!(
            "{}",
            report.explain(&format!(
                "the guest read {:?} of {BIG_READ} bytes across the worker's restart",
                run.guest("read_bytes")
            ))
        );
    }
}
