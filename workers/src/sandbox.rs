//! The one place a worker confines itself.

use std::os::fd::RawFd;

use bulkhead_protocol::WorkerKind;
use bulkhead_seccomp::{apply, policy_for, LandlockOutcome, Policy, SandboxError};

/// Confines the worker for the rest of its life: the kind's seccomp allowlist and
/// Landlock ruleset, no_new_privs, no capabilities, and every descriptor closed but the
/// standard ones and `keep` (the frontend's socket).
///
/// Called exactly once, by `main`, after setup - command line parsed, launch config read,
/// socket bound or inherited, device created - and before the first message from a
/// frontend or the first byte of guest memory is read. The process must still be
/// single-threaded: Landlock and capabilities only change the calling thread, so the
/// vring threads start afterwards and inherit the sandbox.
pub fn enter_sandbox(kind: WorkerKind, keep: &[(RawFd, &'static str)]) -> Result<(), SandboxError> {
    enter_policy(policy_for(kind), keep)
}

/// [`enter_sandbox`] with a policy built for this worker's resources (the p9 worker's
/// Landlock rule is beneath the directory it holds).
pub fn enter_policy(policy: Policy, keep: &[(RawFd, &'static str)]) -> Result<(), SandboxError> {
    let kind = policy.kind;
    let policy = keep
        .iter()
        .fold(policy, |policy, &(fd, what)| policy.keep_fd(fd, what));
    let report = apply(&policy)?;
    match report.landlock {
        LandlockOutcome::Full => tracing::debug!("{kind} worker sandboxed"),
        outcome => tracing::warn!(
            "{kind} worker sandboxed; this kernel enforces its Landlock rules {}",
            outcome.as_str()
        ),
    }
    Ok(())
}
