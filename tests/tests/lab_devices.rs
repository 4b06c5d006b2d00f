//! Worker-served devices in a real Linux guest, inside the nested lab: one L1 boot, one L2
//! boot with a virtio-rng device whose worker L1 kills in the middle of the guest's reads.
//!
//! The guest finds the device through ACPI (no command-line hints), reads /dev/hwrng,
//! then announces a 1 MiB read; L1 kills the worker with SIGKILL during it. The
//! supervisor must restart it and hand it the running queue, so that the read completes
//! in full, and the audit log must tell the story.

use bulkhead_tests::bulkhead_bin;
use bulkhead_tests::lab::{random_token, Guest, Lab, Run, Scenario};

const RNG_IMAGE: &str = "/rng.cpio";
const AUDIT_LOG: &str = "/tmp/audit.jsonl";
/// Bytes the guest reads while its worker is killed and restarted.
const BIG_READ: u32 = 1 << 20;

fn rng_init() -> String {
    format!(
        r#"
echo "GUEST: hwrng=$(cat /sys/class/misc/hw_random/rng_current)"
echo "GUEST: random=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
echo "GUEST: reading"
start=$(cut -d' ' -f1 /proc/uptime)
echo "GUEST: read_bytes=$(dd if=/dev/hwrng bs=4096 count={count} iflag=fullblock 2>/dev/null | wc -c)"
echo "GUEST: read_started=$start read_ended=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"#,
        count = BIG_READ / 4096
    )
}

#[test]
fn rng_worker_serves_a_linux_guest_and_survives_a_kill() {
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
    let scenario = Scenario::new("devices")
        .guest(Guest::new(RNG_IMAGE, &rng_init()).modules(&["virtio_mmio", "virtio_rng"]))
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
    let fail = |problem: &str| -> ! { panic!("{}", report.explain(problem)) };

    let run = report
        .run("rng")
        .unwrap_or_else(|| fail("the rng run never started"));
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
    if run.guest("read_bytes") != Some(&BIG_READ.to_string()) {
        fail(&format!(
            "the guest read {:?} of {BIG_READ} bytes across the worker's restart",
            run.guest("read_bytes")
        ));
    }

    // The kill must land while the read is still going: L1 reports it before the guest
    // reports the read's result.
    let position = |needle: &str| report.lines.iter().position(|l| l.text.contains(needle));
    match (position("LAB: run rng: triggered"), position("GUEST: read_bytes=")) {
        (Some(killed), Some(read)) if killed < read => {}
        (killed, read) => fail(&format!(
            "the worker was not killed during the read (kill at line {killed:?}, read done at line {read:?})"
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
    if !has("crash", r#""signal":9"#) || !has("crash", r#""seccomp_violation":false"#) {
        fail(&format!("the audit log lacks the SIGKILL crash: {audit:?}"));
    }
    if !has("restart", r#""attempt":1"#) {
        fail(&format!("the audit log lacks the restart: {audit:?}"));
    }
}
