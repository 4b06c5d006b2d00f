//! A worker's sandbox policy: everything [`crate::apply`] enforces, as data.

use std::collections::BTreeSet;
use std::os::fd::RawFd;

use bulkhead_protocol::WorkerKind;
use thiserror::Error;

use crate::landlock_rules::{Enforcement, GrantRoot, LandlockRules};
use crate::syscall_rule::{RuleAction, Syscall, SyscallRule};
use crate::{describe, sys};

/// A descriptor that survives [`crate::apply`]; every other one is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeptFd {
    pub fd: RawFd,
    /// What it is, for the rendering ("vhost-user socket").
    pub what: &'static str,
}

/// What one worker kind may do once sandboxed.
///
/// Besides the fields, [`crate::apply`] always sets `no_new_privs` and drops every
/// capability; those are not negotiable per kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub kind: WorkerKind,
    /// The seccomp allowlist; any other system call kills the worker with SIGSYS.
    pub syscalls: Vec<SyscallRule>,
    pub landlock: LandlockRules,
    pub keep_fds: Vec<KeptFd>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("{0} is listed twice; merge its conditions into one rule")]
    DuplicateSyscall(&'static str),
    #[error("{syscall}: argument index {index} does not exist (system calls take six)")]
    ArgumentIndex { syscall: &'static str, index: u8 },
    #[error("{0} must never be allowed in a worker")]
    Forbidden(&'static str),
    #[error(
        "{0} takes a path, so Landlock is the filesystem's only guard and its enforcement \
         must be Required"
    )]
    PathSyscallNeedsLandlock(&'static str),
    #[error(
        "{0} takes a path that Landlock polices only from ABI 3 (Linux 6.2), newer than a \
         Required policy may assume; truncate through a descriptor instead"
    )]
    PathSyscallNeedsNewerLandlock(&'static str),
    #[error("descriptor {0} cannot be kept: not a valid descriptor number")]
    InvalidFd(RawFd),
    #[error("descriptor {0} is kept twice")]
    DuplicateFd(RawFd),
    #[error("a Landlock rule is beneath descriptor {0}, which the policy does not keep")]
    GrantFdNotKept(RawFd),
}

/// System calls no worker gets, whatever its kind: running other programs, reaching into
/// other processes, and kernel facilities with a long record of privilege escalations.
fn forbidden_syscalls() -> Vec<Syscall> {
    vec![
        sys!(SYS_execve),
        sys!(SYS_execveat),
        sys!(SYS_ptrace),
        sys!(SYS_process_vm_readv),
        sys!(SYS_process_vm_writev),
        sys!(SYS_bpf),
        sys!(SYS_perf_event_open),
        sys!(SYS_io_uring_setup),
        sys!(SYS_io_uring_register),
        sys!(SYS_keyctl),
        sys!(SYS_add_key),
        sys!(SYS_request_key),
        sys!(SYS_mount),
        sys!(SYS_umount2),
        sys!(SYS_pivot_root),
        sys!(SYS_chroot),
        sys!(SYS_setns),
        sys!(SYS_unshare),
        sys!(SYS_init_module),
        sys!(SYS_finit_module),
        sys!(SYS_kexec_load),
        sys!(SYS_reboot),
    ]
}

/// System calls that open or change files by path name. The filter cannot inspect a path
/// (the argument is a pointer), so once one is allowed only Landlock confines it. (The
/// stat, readlink and xattr families resolve paths too and Landlock does not police
/// them; a policy needing metadata allows the descriptor-only forms.)
fn landlock_guarded_syscalls() -> Vec<Syscall> {
    let mut calls = vec![
        sys!(SYS_openat),
        sys!(SYS_openat2),
        sys!(SYS_mkdirat),
        sys!(SYS_mknodat),
        sys!(SYS_unlinkat),
        sys!(SYS_renameat),
        sys!(SYS_renameat2),
        sys!(SYS_linkat),
        sys!(SYS_symlinkat),
        sys!(SYS_truncate),
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        sys!(SYS_open),
        sys!(SYS_creat),
        sys!(SYS_mkdir),
        sys!(SYS_mknod),
        sys!(SYS_unlink),
        sys!(SYS_rmdir),
        sys!(SYS_rename),
        sys!(SYS_link),
        sys!(SYS_symlink),
    ]);
    calls
}

impl Policy {
    /// Whether the allowlist lets `syscall` (by name) through, with or without argument
    /// filters.
    pub fn allows(&self, syscall: &str) -> bool {
        self.syscalls
            .iter()
            .any(|rule| rule.syscall.name() == syscall && rule.action == RuleAction::Allow)
    }

    /// Also keeps `fd` open; for the descriptors a worker receives at launch.
    pub fn keep_fd(mut self, fd: RawFd, what: &'static str) -> Policy {
        self.keep_fds.push(KeptFd { fd, what });
        self
    }

    /// The standard descriptors, kept by every worker: stdin is /dev/null and logs go to
    /// stderr, and leaving 0-2 closed would let the next descriptor opened take their
    /// place.
    pub fn stdio() -> Vec<KeptFd> {
        vec![
            KeptFd {
                fd: 0,
                what: "stdin",
            },
            KeptFd {
                fd: 1,
                what: "stdout",
            },
            KeptFd {
                fd: 2,
                what: "stderr (logs)",
            },
        ]
    }

    /// Checks the invariants every policy must hold before it is compiled or applied.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut seen = BTreeSet::new();
        for rule in &self.syscalls {
            let name = rule.syscall.name();
            if !seen.insert(rule.syscall.nr) {
                return Err(PolicyError::DuplicateSyscall(name));
            }
            let conditions = rule.matches.iter().flat_map(|m| m.0.iter());
            if let Some(bad) = conditions.map(|c| c.arg.index).find(|&index| index > 5) {
                return Err(PolicyError::ArgumentIndex {
                    syscall: name,
                    index: bad,
                });
            }
        }
        let allowed = |syscall: &Syscall| seen.contains(&syscall.nr);
        if let Some(forbidden) = forbidden_syscalls().iter().find(|s| allowed(s)) {
            return Err(PolicyError::Forbidden(forbidden.name()));
        }
        if self.landlock.enforcement != Enforcement::Required {
            if let Some(path) = landlock_guarded_syscalls().iter().find(|s| allowed(s)) {
                return Err(PolicyError::PathSyscallNeedsLandlock(path.name()));
            }
        } else if allowed(&sys!(SYS_truncate)) {
            // Required enforcement assumes only Landlock's first ABI (REQUIRED_ABI).
            return Err(PolicyError::PathSyscallNeedsNewerLandlock("truncate"));
        }
        let mut fds = BTreeSet::new();
        for kept in &self.keep_fds {
            if kept.fd < 0 {
                return Err(PolicyError::InvalidFd(kept.fd));
            }
            if !fds.insert(kept.fd) {
                return Err(PolicyError::DuplicateFd(kept.fd));
            }
        }
        for grant in &self.landlock.paths {
            if let GrantRoot::Fd { fd, .. } = grant.root {
                if !fds.contains(&fd) {
                    return Err(PolicyError::GrantFdNotKept(fd));
                }
            }
        }
        Ok(())
    }

    /// The descriptor numbers to keep, ascending.
    pub fn kept_fd_numbers(&self) -> Vec<RawFd> {
        let fds: BTreeSet<RawFd> = self.keep_fds.iter().map(|k| k.fd).collect();
        fds.into_iter().collect()
    }

    /// The human-readable rendering `bulkhead policy <kind>` prints.
    pub fn describe(&self) -> String {
        describe::render(self)
    }

    /// A stable digest of what the policy enforces, for the audit log.
    pub fn digest(&self) -> describe::PolicyDigest {
        describe::digest(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::policy_for;
    use crate::syscall_rule::{Arg, Constant};
    use crate::{constant, sys};

    fn rng() -> Policy {
        policy_for(WorkerKind::Rng)
    }

    #[test]
    fn every_kind_is_valid() {
        for kind in WorkerKind::ALL {
            assert_eq!(policy_for(kind).validate(), Ok(()), "{kind}");
            assert_eq!(policy_for(kind).kind, kind);
        }
    }

    #[test]
    fn a_syscall_is_listed_once() {
        let mut policy = rng();
        policy.syscalls.push(SyscallRule::allow(sys!(SYS_read)));
        assert_eq!(
            policy.validate(),
            Err(PolicyError::DuplicateSyscall("read"))
        );
    }

    #[test]
    fn forbidden_syscalls_are_refused_whatever_the_conditions() {
        for syscall in [sys!(SYS_execve), sys!(SYS_ptrace), sys!(SYS_unshare)] {
            let mut policy = rng();
            policy
                .syscalls
                .push(SyscallRule::allow(syscall).when(Arg::long(0, "arg").eq(Constant::ZERO)));
            assert_eq!(
                policy.validate(),
                Err(PolicyError::Forbidden(syscall.name()))
            );
        }
    }

    #[test]
    fn path_syscalls_need_required_landlock() {
        let mut policy = rng();
        policy.syscalls.push(SyscallRule::allow(sys!(SYS_openat)));
        assert_eq!(
            policy.validate(),
            Err(PolicyError::PathSyscallNeedsLandlock("openat"))
        );
        policy.landlock.enforcement = Enforcement::Required;
        assert_eq!(policy.validate(), Ok(()));
        policy.syscalls.push(SyscallRule::allow(sys!(SYS_truncate)));
        assert_eq!(
            policy.validate(),
            Err(PolicyError::PathSyscallNeedsNewerLandlock("truncate"))
        );
    }

    #[test]
    fn argument_indexes_stop_at_five() {
        let mut policy = rng();
        policy.syscalls.push(
            SyscallRule::allow(sys!(SYS_sched_setaffinity))
                .when(Arg::int(6, "seventh").eq(constant!(F_GETFD))),
        );
        assert_eq!(
            policy.validate(),
            Err(PolicyError::ArgumentIndex {
                syscall: "sched_setaffinity",
                index: 6
            })
        );
    }

    #[test]
    fn kept_descriptors_are_valid_and_distinct() {
        assert_eq!(
            rng().keep_fd(-1, "nothing").validate(),
            Err(PolicyError::InvalidFd(-1))
        );
        assert_eq!(
            rng().keep_fd(2, "stderr again").validate(),
            Err(PolicyError::DuplicateFd(2))
        );
        let policy = rng().keep_fd(7, "socket").keep_fd(4, "memfd");
        assert_eq!(policy.validate(), Ok(()));
        assert_eq!(policy.kept_fd_numbers(), vec![0, 1, 2, 4, 7]);
    }

    #[test]
    fn syscall_names_drop_the_libc_prefix() {
        assert_eq!(sys!(SYS_clock_nanosleep).name(), "clock_nanosleep");
        assert_eq!(sys!(SYS_read).nr, libc::SYS_read);
    }
}
