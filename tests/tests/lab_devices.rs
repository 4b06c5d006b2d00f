//! Worker-served devices in a real Linux guest, inside the nested lab: one L1 boot, two L2
//! boots with a virtio-rng device whose worker L1 kills while the guest reads.
//!
//! The guest finds the device through ACPI (no command-line hints), reads 1 MiB from
//! /dev/hwrng, then announces more reading; L1 kills the worker with SIGKILL the moment it
//! does. The supervisor must restart the worker and hand it the running queue, so that
//! the reads complete, and the audit log must tell the story: one crash, one restart.
//! The first boot reads in small paced requests around the kill, the second keeps one
//! 1 MiB read going through it.

use std::time::Duration;

use bulkhead_tests::bulkhead_bin;
use bulkhead_tests::lab::{random_token, Guest, Lab, LabReport, Run, RunReport, Scenario};

/// Bytes the guest reads in one go before the kill.
const BIG_READ: u32 = 1 << 20;
/// Bytes the continuous reader reads through the kill. Less than BIG_READ because Linux's
/// virtio-rng asks for 64 bytes at a time and each request costs two nested exits.
const READ_THROUGH_KILL: u32 = 256 << 10;
/// Each 1 MiB takes about 15 s in the lab on an idle machine; leave room for a busy one.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Reads of 512 bytes, 0.2 s apart, during which the worker is killed and replaced.
const PACED_READS: u32 = 30;

/// How the guest reads while its device's worker is killed.
#[derive(Clone, Copy)]
enum Reading {
    Paced,
    Continuous,
}

impl Reading {
    fn label(self) -> &'static str {
        match self {
            Reading::Paced => "paced",
            Reading::Continuous => "continuous",
        }
    }

    fn image(self) -> String {
        format!("/rng-{}.cpio", self.label())
    }

    fn audit_log(self) -> String {
        format!("/tmp/audit-{}.jsonl", self.label())
    }

    /// The L1 console prefix of this run's audit records.
    fn audit_prefix(self) -> String {
        format!("LAB: audit-{} ", self.label())
    }

    /// Reports the device and 1 MiB of its output, then reads while L1 kills the worker.
    /// Each paced read has a timeout, so that a stuck device shows as a count, not a hang.
    fn init(self) -> String {
        let read = |bytes: u32| {
            let count = bytes / 4096;
            format!("dd if=/dev/hwrng bs=4096 count={count} iflag=fullblock 2>/dev/null | wc -c")
        };
        let big_read = read(BIG_READ);
        let during_kill = match self {
            Reading::Continuous => {
                format!("echo \"GUEST: read_bytes=$({})\"", read(READ_THROUGH_KILL))
            }
            Reading::Paced => format!(
                r#"ok=0
for i in $(seq 1 {PACED_READS}); do
    [ "$(timeout 5 head -c 512 /dev/hwrng | wc -c)" = 512 ] && ok=$((ok + 1))
    sleep 0.2
done
echo "GUEST: reads_ok=$ok""#
            ),
        };
        format!(
            r#"
echo "GUEST: hwrng=$(cat /sys/class/misc/hw_random/rng_current)"
echo "GUEST: random=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
echo "GUEST: big_read=$({big_read})"
echo "GUEST: reading"
{during_kill}
echo "GUEST: irq=$(grep virtio /proc/interrupts | tr -s ' ')"
poweroff -f
"#
        )
    }

    fn run(self, cmdline: &str) -> Run {
        let image = self.image();
        let audit_log = self.audit_log();
        let args = [
            "run",
            "--kernel",
            "/vmlinux",
            "--initrd",
            &image,
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
        Run::new(self.label(), args)
            .timeout(RUN_TIMEOUT)
            .when_output_contains("GUEST: reading", "killall -9 bulkhead-worker")
            .then_in_l1(&format!("sed 's/^/{}/' {audit_log}", self.audit_prefix()))
    }
}

/// Checks what each rng boot must show: the device, its output, the kill landing while
/// the guest was reading, every read completing, and the audit trail of the crash and
/// the restart.
fn check(report: &LabReport, reading: Reading) {
    let label = reading.label();
    let fail =
        |problem: &str| -> ! { panic!("{}", report.explain(&format!("{label}: {problem}"))) };
    let Some(run) = report.run(label) else {
        fail("the run never started");
    };
    check_reads(run, reading).unwrap_or_else(|problem| fail(&problem));

    // L1 reports the kill before the guest reports the reads' result.
    let done_marker = match reading {
        Reading::Paced => "GUEST: reads_ok=",
        Reading::Continuous => "GUEST: read_bytes=",
    };
    let triggered = format!("LAB: run {label}: triggered");
    let position = |needle: &str| report.lines.iter().position(|l| l.text.contains(needle));
    match (position(&triggered), position(done_marker)) {
        (Some(killed), Some(read)) if killed < read => {}
        (killed, read) => fail(&format!(
            "the worker was not killed during the reads (kill at line {killed:?}, reads done at line {read:?})"
        )),
    }

    let prefix = reading.audit_prefix();
    let audit: Vec<&str> = report
        .lines
        .iter()
        .filter_map(|line| line.text.split_once(prefix.as_str()).map(|(_, json)| json))
        .collect();
    check_audit(&audit).unwrap_or_else(|problem| fail(&format!("{problem}: {audit:#?}")));
}

fn check_reads(run: &RunReport, reading: Reading) -> Result<(), String> {
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
    match reading {
        Reading::Paced => expect("reads_ok", PACED_READS),
        Reading::Continuous => expect("read_bytes", READ_THROUGH_KILL),
    }
}

fn check_audit(audit: &[&str]) -> Result<(), String> {
    let has = |event: &str, detail: &str| {
        audit
            .iter()
            .any(|line| line.contains(&format!(r#""event":"{event}""#)) && line.contains(detail))
    };
    let count = |event: &str| {
        audit
            .iter()
            .filter(|line| line.contains(&format!(r#""event":"{event}""#)))
            .count()
    };
    if !has("spawn", r#""device":"rng0""#) || !has("policy", "sha256:") {
        return Err("the audit log lacks the spawn or policy record".into());
    }
    if count("crash") != 1
        || !has("crash", r#""signal":9"#)
        || !has("crash", r#""seccomp_violation":false"#)
    {
        return Err("the audit log should show exactly one SIGKILL crash".into());
    }
    if count("restart") != 1 || !has("restart", r#""attempt":1"#) {
        return Err("the audit log should show exactly one restart".into());
    }
    Ok(())
}

#[test]
fn rng_worker_serves_a_linux_guest_and_survives_kills() {
    let token = random_token().unwrap_or_else(|e| panic!("{e}"));
    let cmdline = format!("console=ttyS0 panic=-1 bulkhead.token={token}");
    let readings = [Reading::Paced, Reading::Continuous];
    let mut scenario = Scenario::new("devices");
    for reading in readings {
        scenario = scenario
            .guest(
                Guest::new(&reading.image(), &reading.init())
                    .modules(&["virtio_mmio", "virtio_rng"]),
            )
            .run(reading.run(&cmdline));
    }
    let lab = Lab::new().unwrap_or_else(|e| panic!("cannot start the nested lab: {e}"));
    let report = lab
        .run(&scenario, &bulkhead_bin())
        .unwrap_or_else(|e| panic!("nested lab boot failed: {e}"));
    eprintln!("{}", report.timings());
    for reading in readings {
        check(&report, reading);
    }
}
