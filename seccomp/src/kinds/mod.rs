//! One policy per worker kind, assembled from shared groups of rules.
//!
//! - [`runtime`]: what every Rust-on-glibc worker needs after setup.
//! - [`vhost_user`]: what serving a vhost-user connection adds.
//! - [`inflight`]: what a device that tracks in-flight requests adds.
//! - one module per kind for the rest and for its Landlock rules.

mod blk;
mod display;
mod inflight;
mod input;
mod net;
mod p9;
mod rng;
mod runtime;
mod vhost_user;

use std::os::fd::RawFd;

use bulkhead_protocol::{DeviceConfig, WorkerKind};

use crate::policy::Policy;

/// The policy a worker of `kind` runs under, keeping only the standard descriptors; the
/// worker adds the ones it is launched with ([`Policy::keep_fd`]).
pub fn policy_for(kind: WorkerKind) -> Policy {
    match kind {
        WorkerKind::Rng => rng::policy(),
        WorkerKind::P9 => p9::policy(None, false),
        WorkerKind::Blk => blk::policy(),
        WorkerKind::Net => net::policy(),
        WorkerKind::Display => display::policy(),
        WorkerKind::Input => input::policy(),
    }
}

/// The policy of a p9 worker serving the directory it holds open as `root_fd`, which
/// the caller also keeps ([`Policy::keep_fd`]): Landlock grants only beneath it, with read
/// rights only when `read_only`.
pub fn p9_policy(root_fd: RawFd, read_only: bool) -> Policy {
    p9::policy(Some(root_fd), read_only)
}

/// The policy a worker launched for `device` applies, as the audit log must record it:
/// [`policy_for`] its kind, except where the device's configuration shapes the policy
/// (a p9 share's Landlock grant is read-only for a read-only share).
pub fn policy_for_device(device: &DeviceConfig) -> Policy {
    match device {
        DeviceConfig::P9(p9) => p9_policy(p9.root_fd, p9.read_only),
        other => policy_for(other.kind()),
    }
}

/// System calls every kind's tests check its policy refuses, in groups.
#[cfg(test)]
pub(crate) mod denied {
    /// No worker makes a socket of its own, starts a program, or signals another process
    /// (a worker's SIGABRT goes only to itself: see `runtime`).
    pub const SOCKET_PROGRAM_OR_SIGNAL: &[&str] = &[
        "socket",
        "socketpair",
        "connect",
        "bind",
        "listen",
        "execve",
        "execveat",
        "fork",
        "vfork",
        "kill",
    ];
    /// No worker opens a path: the VMM hands over what it needs. (p9 opens beneath its
    /// share with openat2, and only with that.)
    pub const PATH: &[&str] = &["open", "openat", "creat"];
}

/// Panics naming the first system call of `lists` that `policy` allows.
#[cfg(test)]
pub(crate) fn assert_denies(policy: &Policy, lists: &[&[&str]]) {
    for name in lists.iter().flat_map(|list| list.iter()) {
        assert!(
            !policy.allows(name),
            "the {} policy must not allow {name}",
            policy.kind
        );
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_protocol::{P9Config, RngConfig};

    use super::*;
    use crate::filter::CompiledFilter;

    #[test]
    fn every_kind_compiles_and_says_why_for_every_rule() {
        for kind in WorkerKind::ALL {
            let policy = policy_for(kind);
            CompiledFilter::compile(&policy)
                .unwrap_or_else(|e| panic!("the {kind} policy does not compile: {e}"));
            for rule in &policy.syscalls {
                assert!(
                    !rule.reason.is_empty(),
                    "{kind}: {} has no reason",
                    rule.syscall.name()
                );
            }
        }
    }

    #[test]
    fn a_p9_device_is_digested_as_the_worker_applies_it() {
        let share = |read_only| {
            DeviceConfig::P9(P9Config {
                root_fd: 5,
                tag: "share".into(),
                read_only,
                journal_fd: Some(6),
            })
        };
        let writable = policy_for_device(&share(false)).digest();
        let read_only = policy_for_device(&share(true)).digest();
        assert_eq!(writable, p9_policy(7, false).digest());
        assert_eq!(read_only, p9_policy(5, true).digest());
        assert_ne!(writable, read_only);
        assert_ne!(writable, policy_for(WorkerKind::P9).digest());
        let rng = DeviceConfig::Rng(RngConfig::default());
        assert_eq!(
            policy_for_device(&rng).digest(),
            policy_for(WorkerKind::Rng).digest()
        );
    }
}
