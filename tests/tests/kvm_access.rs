//! bulkhead without a usable /dev/kvm: missing, not a KVM device, or not permitted.
//! Each must be one clear `error:` line and a non-zero exit.
//!
//! The situations are made real rather than simulated: a private mount namespace hides
//! or replaces /dev/kvm, and `setpriv` drops to an unprivileged user. Both need root,
//! which the test machines (and CI) have.

use std::os::unix::fs::PermissionsExt;

use anyhow::Result;
use bulkhead_tests::bulkhead_bin;
use bulkhead_tests::micro::{BulkheadCommand, MicroGuest, RunOutcome, ScratchDir};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a kernel that would power off at once, under `wrapper`. The binary and kernel
/// are copied to a scratch directory that any user can read, since the checkout itself
/// may live where an unprivileged user cannot reach.
fn run_wrapped(wrapper: &[&str]) -> Result<RunOutcome> {
    let mut guest = MicroGuest::new()?;
    guest.power_off()?;
    let dir = ScratchDir::new("kvm-access")?;
    let kernel = dir.write("kernel", &guest.build()?)?;
    let binary = dir.write("bulkhead", &std::fs::read(bulkhead_bin())?)?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644))?;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
    Ok(BulkheadCommand::new()
        .binary(&binary)
        .wrapped_in(wrapper)
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .run()?)
}

/// `unshare --mount sh -c "<setup> && exec bulkhead ..."`.
fn in_mount_namespace(setup: &str) -> Result<RunOutcome> {
    let script = format!("{setup} && exec \"$0\" \"$@\"");
    run_wrapped(&["unshare", "--mount", "sh", "-c", &script])
}

#[test]
fn missing_dev_kvm() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root for a private mount namespace");
        return Ok(());
    }
    let outcome = in_mount_namespace("mount -t tmpfs tmpfs /dev")?;
    outcome.assert_error_mentioning(&["cannot open /dev/kvm"]);
    outcome.assert_error_mentioning(&["no such file"]);
    Ok(())
}

#[test]
fn dev_kvm_that_is_not_kvm() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root for a private mount namespace");
        return Ok(());
    }
    let outcome = in_mount_namespace("mount --bind /dev/null /dev/kvm")?;
    outcome.assert_error_mentioning(&["KVM API version"]);
    Ok(())
}

#[test]
fn dev_kvm_without_permission() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root to switch to an unprivileged user");
        return Ok(());
    }
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let outcome = run_wrapped(&nobody)?;
    outcome.assert_error_mentioning(&["cannot open /dev/kvm"]);
    outcome.assert_error_mentioning(&["permission denied"]);
    Ok(())
}
