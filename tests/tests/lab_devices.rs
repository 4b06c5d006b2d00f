//! Worker-served devices in a real Linux guest, inside the nested lab: one L1 boot, one L2
//! boot with a virtio-rng device whose worker L1 kills in the middle of the guest's reads.
//!
//! The guest finds the device through ACPI (no command-line hints), reads /dev/hwrng,
//! then announces a long series of reads; L1 kills the worker with SIGKILL during them.
//! The supervisor must restart it and hand it the running queue, so that every read
//! completes, and the audit log must tell the story.

use bulkhead_tests::bulkhead_bin;
use bulkhead_tests::lab::{random_token, Guest, Lab, Run, Scenario};

const RNG_IMAGE: &str = "/rng.cpio";
const AUDIT_LOG: &str = "/tmp/audit.jsonl";
const READS: u32 = 30;

fn rng_init() -> String {
    format!(
        r#"
echo "GUEST: hwrng=$(cat /sys/class/misc/hw_random/rng_current)"
echo "GUEST: random=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
echo "GUEST: reading"
ok=0
for i in $(seq 1 {READS}); do
    [ "$(head -c 512 /dev/hwrng | wc -c)" = 512 ] && ok=$((ok + 1))
    sleep 0.2
done
echo "GUEST: reads_ok=$ok"
poweroff -f
"#
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
                .when_output_contains("GUEST: reading", "sleep 1; killall -9 bulkhead-worker")
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
    if run.guest("reads_ok") != Some(&READS.to_string()) {
        fail(&format!(
            "only {:?} of {READS} reads completed around the worker's restart",
            run.guest("reads_ok")
        ));
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
