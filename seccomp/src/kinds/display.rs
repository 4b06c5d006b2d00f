//! The display worker: a vhost-user virtio-gpu 2D backend plus a VNC server on a listening
//! socket the VMM opened and passed (TCP on 127.0.0.1 or a Unix socket).
//!
//! Beyond [`super::runtime`] and [`super::vhost_user`] it accepts viewers on that listener
//! and talks to them with read and write (already in the runtime set), and ends a
//! viewer's connection with shutdown (in the vhost-user set). Each viewer is served by two
//! threads that block on their socket and on the framebuffer's condition variable (futex),
//! so no poll or epoll beyond the vring thread's is needed.
//!
//! It keeps what the guest set up in the state store the VMM passed (a memfd), at fixed
//! offsets: pread64 and pwrite64.
//!
//! It creates no socket (socket, socketpair, bind, listen and connect are absent), opens
//! no file and runs no program; Landlock grants no path and no port.

use bulkhead_protocol::WorkerKind;

use super::{runtime, vhost_user};
use crate::landlock_rules::{Enforcement, LandlockRules};
use crate::policy::Policy;
use crate::sys;
use crate::syscall_rule::SyscallRule;

pub fn policy() -> Policy {
    let display = [
        SyscallRule::allow(sys!(SYS_accept4)).because(
            "VNC viewers on the listening socket the VMM passed (and, standalone, the next \
             vhost-user frontend); accepting creates no socket of the worker's own",
        ),
        SyscallRule::allow(sys!(SYS_pread64))
            .because("reading the state store a predecessor left (resources, scanout)"),
        SyscallRule::allow(sys!(SYS_pwrite64))
            .because("recording the guest's resources and scanout in the state store"),
    ];
    Policy {
        kind: WorkerKind::Display,
        syscalls: runtime::rules()
            .into_iter()
            .chain(vhost_user::rules())
            .chain(display)
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
        let extra = ["openat2", "memfd_create", "sendto", "recvfrom"];
        assert_denies(
            &policy(),
            &[denied::PATH, denied::SOCKET_PROGRAM_OR_SIGNAL, &extra],
        );
        let rules = policy().landlock;
        assert!(rules.paths.is_empty() && rules.ports.is_empty());
    }

    #[test]
    fn serves_vhost_user_and_viewers() {
        for name in [
            "accept4",
            "pread64",
            "pwrite64",
            "read",
            "write",
            "recvmsg",
            "sendmsg",
            "shutdown",
            "epoll_wait",
            "futex",
            "clone",
            "mmap",
        ] {
            assert!(allowed(name), "display must allow {name}");
        }
    }
}
