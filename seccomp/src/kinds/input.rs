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
    use crate::kinds::{assert_denies, denied};

    fn allowed(name: &str) -> bool {
        policy().allows(name)
    }

    #[test]
    fn creates_no_socket_and_opens_no_file() {
        let extra = [
            "openat2",
            "memfd_create",
            "sendto",
            "recvfrom",
            "timerfd_create",
            "accept4",
        ];
        assert_denies(
            &policy(),
            &[denied::PATH, denied::SOCKET_PROGRAM_OR_SIGNAL, &extra],
        );
        let rules = policy().landlock;
        assert!(rules.paths.is_empty() && rules.ports.is_empty());
    }

    #[test]
    fn serves_vhost_user_and_reads_events() {
        for name in ["read", "recvmsg", "sendmsg", "epoll_wait", "futex", "mmap"] {
            assert!(allowed(name), "input must allow {name}");
        }
    }
}
