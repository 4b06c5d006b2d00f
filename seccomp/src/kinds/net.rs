//! The net worker: a vhost-user virtio-net backend moving frames between the guest's
//! queues and the queues of one host TAP (a descriptor each).
//!
//! On top of [`super::runtime`] and [`super::vhost_user`] (the same traced baseline as
//! [`super::rng`]), the device needs:
//!
//! - `read`/`write` on the TAP: one frame per call, vnet header first. Both are already in
//!   the runtime set (eventfd counters, stderr); the filter cannot tell the descriptors
//!   apart, and the worker has no other descriptor worth reaching that way.
//! - a second epoll set of its own (`epoll_create1`/`epoll_ctl`, in the vhost-user set)
//!   holding the TAP, so that the device can stop watching it while the guest has posted
//!   no receive buffers, and watch for writability while the TAP's queue is full.
//! - `ioctl(TUNSETOFFLOAD)` when the guest acknowledges its features: which offloaded
//!   frames (partial checksums, TSO, UFO) the kernel may hand the guest. That exact request
//!   number is added to the vhost-user set's FIONBIO; everything else about the TAP (name,
//!   flags, vnet header size) is settled before the sandbox goes on.
//!
//! Nothing else: no socket of its own (the TAP is the worker's only reach into the
//! network), no path (Landlock denies every one, and every call that takes a path is
//! missing from the list).

use bulkhead_protocol::WorkerKind;

use super::{runtime, vhost_user};

use crate::landlock_rules::{Enforcement, LandlockRules};
use crate::policy::Policy;
use crate::syscall_rule::{Arg, Constant};

/// `TUNSETOFFLOAD`, `_IOW('T', 208, unsigned int)`; the `libc` crate does not have it.
pub const TUNSETOFFLOAD: Constant = Constant {
    name: "TUNSETOFFLOAD",
    value: 0x4004_54d0,
};

pub fn policy() -> Policy {
    let vhost_user_rules = vhost_user::rules().into_iter().map(|rule| {
        if rule.syscall.name() != "ioctl" {
            return rule;
        }
        rule.when(Arg::int(1, "request").eq(TUNSETOFFLOAD)).because(
            "FIONBIO: set_nonblocking on sockets and eventfds; TUNSETOFFLOAD: the TAP's \
             offloads, set to what the guest negotiated. No other ioctl",
        )
    });
    let net = [vhost_user::standalone_accept()];
    Policy {
        kind: WorkerKind::Net,
        syscalls: runtime::rules()
            .into_iter()
            .chain(vhost_user_rules)
            .chain(net)
            .collect(),
        landlock: LandlockRules::deny_all(Enforcement::BestEffort),
        keep_fds: Policy::stdio(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constant;
    use crate::kinds::{assert_denies, denied};
    use crate::syscall_rule::ArgOp;

    fn allowed(name: &str) -> bool {
        policy().allows(name)
    }

    #[test]
    fn reaches_no_file_socket_or_program() {
        let extra = ["openat2", "sendto", "memfd_create", "pipe2", "dup3"];
        assert_denies(
            &policy(),
            &[denied::PATH, denied::SOCKET_PROGRAM_OR_SIGNAL, &extra],
        );
        let rules = policy().landlock;
        assert!(rules.paths.is_empty() && rules.ports.is_empty());
    }

    #[test]
    fn ioctl_is_fionbio_or_tunsetoffload_only() {
        let policy = policy();
        let ioctl = policy
            .syscalls
            .iter()
            .find(|r| r.syscall.name() == "ioctl")
            .expect("ioctl is allowed");
        let requests: Vec<u64> = ioctl
            .matches
            .iter()
            .map(|m| {
                assert_eq!(m.0.len(), 1);
                match m.0[0].op {
                    ArgOp::Eq(value) => value.value,
                    other => panic!("unexpected condition {other:?}"),
                }
            })
            .collect();
        assert_eq!(requests, [constant!(FIONBIO).value, TUNSETOFFLOAD.value]);
    }

    #[test]
    fn serves_vhost_user_and_the_tap() {
        for name in [
            "recvmsg",
            "sendmsg",
            "epoll_create1",
            "epoll_ctl",
            "epoll_wait",
            "read",
            "write",
            "accept4",
            "exit_group",
        ] {
            assert!(allowed(name), "net must allow {name}");
        }
    }
}
