//! The input worker: a vhost-user virtio-input backend (a keyboard and tablet) fed by the
//! display worker through a datagram socket the VMM made and passed to both.
//!
//! Beyond [`super::runtime`] and [`super::vhost_user`] it only reads datagrams from that
//! inherited socket, with read (in the runtime set), from the vring thread's epoll loop.
//! It runs only launched by the VMM, so it accepts nothing either. It creates no socket,
//! opens no file and runs no program; Landlock grants no path and no port.

use bulkhead_protocol::WorkerKind;

use super::{runtime, vhost_user};
use crate::landlock_rules::{Enforcement, LandlockRules};
use crate::policy::Policy;

pub fn policy() -> Policy {
    Policy {
        kind: WorkerKind::Input,
        syscalls: runtime::rules()
            .into_iter()
            .chain(vhost_user::rules())
            .collect(),
        landlock: LandlockRules::deny_all(Enforcement::BestEffort),
        keep_fds: Policy::stdio(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(name: &str) -> bool {
        policy().allows(name)
    }

    #[test]
    fn creates_no_socket_and_opens_no_file() {
        for name in [
            "open",
            "openat",
            "openat2",
            "creat",
            "socket",
            "socketpair",
            "connect",
            "bind",
            "listen",
            "execve",
            "fork",
            "vfork",
            "memfd_create",
            "kill",
            "sendto",
            "recvfrom",
            "timerfd_create",
            "accept4",
        ] {
            assert!(!allowed(name), "input must not allow {name}");
        }
        let rules = policy().landlock;
        assert!(rules.paths.is_empty() && rules.ports.is_empty());
    }

    #[test]
    fn serves_vhost_user_and_reads_events() {
        for name in ["read", "recvmsg", "sendmsg", "epoll_wait", "futex", "mmap"] {
            assert!(allowed(name), "input must allow {name}");
        }
    }

    #[test]
    fn every_rule_says_why() {
        for rule in policy().syscalls {
            assert!(
                !rule.reason.is_empty(),
                "{} has no reason",
                rule.syscall.name()
            );
        }
    }
}
