//! The rng worker: a vhost-user virtio-rng backend that fills the guest's buffers from
//! getrandom(2), optionally rate limited by a timer.
//!
//! # How the allowlist was found
//!
//! A minimal virtio-rng backend on vhost-user-backend 0.24 (one queue; getrandom into each
//! descriptor) was driven by a
//! `vhost` 0.18 frontend through the whole protocol - owner, features, a memfd memory
//! table sent twice, vring setup, five kick/call round trips, GET_VRING_BASE, hang-up -
//! under `strace -f`, with a marker written where the sandbox would go on (before the
//! daemon's threads exist). The system calls after the marker, minus the daemon's own
//! `accept4` (a bulkhead worker inherits a connected socket), are [`super::runtime`] and
//! [`super::vhost_user`]; paths the trace cannot hit (thread exit, abort) come from glibc
//! 2.36 and std.
//!
//! The worker's rate limiter is a timerfd in the queue thread's epoll set, hence
//! timerfd_create/timerfd_settime; standalone mode accepts the next frontend itself.
//!
//! The rng worker needs no file, no path and no network: the VMM hands it its socket, and
//! getrandom needs no /dev/urandom. Every system call that takes a path is missing from
//! the list, so an attempt kills the worker before Landlock would be asked; Landlock
//! denying everything is the second wall, and best effort suffices for it.

use bulkhead_protocol::WorkerKind;

use super::{runtime, vhost_user};
use crate::landlock_rules::{Enforcement, LandlockRules};
use crate::policy::Policy;
use crate::sys;
use crate::syscall_rule::SyscallRule;

pub fn policy() -> Policy {
    let rng = [
        SyscallRule::allow(sys!(SYS_timerfd_create))
            .because("rate limiting: each device's refill timer, in the queue's epoll set"),
        SyscallRule::allow(sys!(SYS_timerfd_settime)).because("rate limiting: arming the refill"),
        vhost_user::standalone_accept(),
    ];
    Policy {
        kind: WorkerKind::Rng,
        syscalls: runtime::rules()
            .into_iter()
            .chain(vhost_user::rules())
            .chain(rng)
            .collect(),
        landlock: LandlockRules::deny_all(Enforcement::BestEffort),
        keep_fds: Policy::stdio(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::{assert_denies, denied};

    fn allowed(name: &str) -> bool {
        policy().allows(name)
    }

    #[test]
    fn reaches_no_file_socket_or_program() {
        let extra = ["openat2", "memfd_create", "pipe2", "dup3"];
        assert_denies(
            &policy(),
            &[denied::PATH, denied::SOCKET_PROGRAM_OR_SIGNAL, &extra],
        );
        let rules = policy().landlock;
        assert!(rules.paths.is_empty() && rules.ports.is_empty());
    }

    #[test]
    fn serves_vhost_user_and_entropy() {
        for name in [
            "recvmsg",
            "sendmsg",
            "epoll_wait",
            "eventfd2",
            "mmap",
            "munmap",
            "getrandom",
            "timerfd_create",
            "timerfd_settime",
            "accept4",
            "clone",
            "futex",
            "exit_group",
        ] {
            assert!(allowed(name), "rng must allow {name}");
        }
    }
}
