//! A worker that steps outside its policy is killed by its own seccomp filter, and the
//! VMM's supervisor tells the auditor so.
//!
//! The worker is `rogue-worker` (tests/src/bin): the real rng worker, sandboxed by the real
//! code, that tries to open a host file, run a program or open a socket shortly after the
//! VMM has connected to it. The guest is a micro-guest that halts and waits; the VM must
//! stay up through the crashes, restarts and the supervisor giving up on the device.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_tests::bulkhead_bin;
use bulkhead_tests::micro::{MicroGuest, ScratchDir};

/// Crashes, restarts with backoff (50 ms doubling) and the give-up take about three
/// seconds; the rest is slack for two busy cores.
const GIVE_UP_DEADLINE: Duration = Duration::from_secs(60);

/// A guest that announces itself and then halts for good, with interrupts off.
fn waiting_guest() -> Result<Vec<u8>> {
    let mut guest = MicroGuest::new()?;
    guest.print("waiting\n")?;
    let asm = guest.asm();
    asm.cli()?;
    let mut halt = asm.create_label();
    asm.set_label(&mut halt)?;
    asm.hlt()?;
    asm.jmp(halt)?;
    guest.build()
}

/// bulkhead, killed when dropped.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_vm(kernel: &Path, audit: &Path, action: &str) -> Result<Vmm> {
    let child = Command::new(bulkhead_bin())
        .args(["run", "--rng", "--kernel"])
        .arg(kernel)
        .arg("--audit-log")
        .arg(audit)
        .env("BULKHEAD_WORKER", env!("CARGO_BIN_EXE_rogue-worker"))
        .env("BULKHEAD_ROGUE_ACTION", action)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start bulkhead")?;
    Ok(Vmm(child))
}

/// Waits for the supervisor's give-up record; the audit log is complete up to it.
fn audit_until_give_up(vmm: &mut Vmm, audit: &PathBuf) -> Result<Vec<String>> {
    let start = Instant::now();
    loop {
        let lines: Vec<String> = fs::read_to_string(audit)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.iter().any(|l| l.contains(r#""event":"give_up""#)) {
            return Ok(lines);
        }
        if let Some(status) = vmm.0.try_wait()? {
            bail!("bulkhead exited ({status}) before giving up on the worker: {lines:#?}");
        }
        if start.elapsed() > GIVE_UP_DEADLINE {
            bail!("no give-up within {GIVE_UP_DEADLINE:?}: {lines:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rogue_worker_is_killed_and_reported(action: &str) -> Result<()> {
    let dir = ScratchDir::new("rogue")?;
    let kernel = dir.write("waiting-guest.elf", &waiting_guest()?)?;
    let audit = dir.path().join("audit.jsonl");
    let mut vmm = start_vm(&kernel, &audit, action)?;
    let lines = audit_until_give_up(&mut vmm, &audit)?;

    // The guest outlived its device: bulkhead is still running after the give-up.
    if let Some(status) = vmm.0.try_wait()? {
        bail!("bulkhead exited ({status}) when its device failed: {lines:#?}");
    }
    let count = |event: &str| {
        lines
            .iter()
            .filter(|l| l.contains(&format!(r#""event":"{event}""#)))
            .count()
    };
    let crashes: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(r#""event":"crash""#))
        .collect();
    // Every worker, the first and each replacement, died of SIGSYS for its action.
    if crashes.is_empty()
        || !crashes
            .iter()
            .all(|l| l.contains(r#""signal":31"#) && l.contains(r#""seccomp_violation":true"#))
    {
        bail!("every crash should be a seccomp kill (SIGSYS): {lines:#?}");
    }
    if count("restart") != 5 || crashes.len() != 6 || count("spawn") != 1 {
        bail!("expected one spawn, six crashes and five restarts: {lines:#?}");
    }
    if !lines
        .iter()
        .any(|l| l.contains(r#""event":"give_up""#) && l.contains(r#""attempts":5"#))
    {
        bail!("the give-up should count five restarts: {lines:#?}");
    }
    Ok(())
}

#[test]
fn opening_a_host_file_is_a_seccomp_violation() -> Result<()> {
    rogue_worker_is_killed_and_reported("open")
}

#[test]
fn running_a_program_is_a_seccomp_violation() -> Result<()> {
    rogue_worker_is_killed_and_reported("exec")
}

#[test]
fn opening_a_socket_is_a_seccomp_violation() -> Result<()> {
    rogue_worker_is_killed_and_reported("socket")
}
