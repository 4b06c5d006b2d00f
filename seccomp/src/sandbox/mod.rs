//! Applying a policy to the calling process: the one function a worker calls between
//! reading its launch configuration and reading anything from the guest.

mod capabilities;
mod fds;
mod ruleset;

pub use ruleset::LandlockOutcome;

use crate::error::SandboxError;
use crate::filter::CompiledFilter;
use crate::policy::Policy;

/// What [`apply`] achieved, for the worker's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxReport {
    pub landlock: LandlockOutcome,
}

/// Confines the calling process to `policy`, for good.
///
/// Must run while the process has a single thread (it checks): Landlock, capabilities
/// and no_new_privs belong to a thread, and threads started later inherit them. Handles
/// to descriptors the policy does not keep (the launch configuration's memfd) must be
/// dropped before, or leaked: their descriptors are closed by number.
///
/// In this order, each step relying on the ones before it:
/// 1. compile the seccomp filter (before anything changes, so a bad policy fails cleanly);
/// 2. close every descriptor the policy does not keep;
/// 3. set no_new_privs (Landlock and unprivileged seccomp require it; no execve can gain
///    privileges afterwards);
/// 4. drop all capabilities;
/// 5. restrict the thread with Landlock;
/// 6. install the seccomp filter, last because it forbids the system calls the steps
///    above make (capset, landlock_*, seccomp itself).
///
/// An error may leave the process partly confined; the worker must exit.
pub fn apply(policy: &Policy) -> Result<SandboxReport, SandboxError> {
    policy.validate()?;
    let filter = CompiledFilter::compile(policy)?;
    ensure_single_threaded()?;
    fds::close_all_except(&policy.kept_fd_numbers()).map_err(SandboxError::CloseFds)?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| SandboxError::NoNewPrivs(e.into()))?;
    capabilities::drop_all()?;
    let landlock = ruleset::restrict_self(&policy.landlock)?;
    filter.install()?;
    Ok(SandboxReport { landlock })
}

fn ensure_single_threaded() -> Result<(), SandboxError> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(SandboxError::ThreadCount)?
        .count();
    match threads {
        1 => Ok(()),
        n => Err(SandboxError::NotSingleThreaded(n)),
    }
}
