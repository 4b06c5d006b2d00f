//! Recognising a worker its seccomp filter killed.
//!
//! A call outside the allowlist ends the process with `SECCOMP_RET_KILL_PROCESS`, which
//! the parent sees as death by SIGSYS (the kernel also writes an audit record, type 1326,
//! naming the system call, to the kernel log). Nothing else in a worker raises SIGSYS:
//! the filter never traps, and signals from outside are scoped away by Landlock.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// True when the worker was killed by its seccomp filter.
pub fn is_seccomp_violation(status: &ExitStatus) -> bool {
    status.signal().is_some_and(is_seccomp_signal)
}

/// True for the signal a seccomp kill reports (for callers holding a raw signal number,
/// such as `AuditEvent::Crash`).
pub fn is_seccomp_signal(signal: i32) -> bool {
    signal == libc::SIGSYS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sigsys_is_a_violation() {
        // A wait status with the signal number in the low 7 bits is death by that signal.
        assert!(is_seccomp_violation(&ExitStatus::from_raw(libc::SIGSYS)));
        assert!(!is_seccomp_violation(&ExitStatus::from_raw(libc::SIGSEGV)));
        assert!(!is_seccomp_violation(&ExitStatus::from_raw(libc::SIGABRT)));
        // Exit code 31 (SIGSYS's number) is an exit, not a signal.
        assert!(!is_seccomp_violation(&ExitStatus::from_raw(31 << 8)));
        assert!(!is_seccomp_violation(&ExitStatus::from_raw(0)));
    }
}
