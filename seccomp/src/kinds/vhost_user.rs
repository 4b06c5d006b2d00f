//! What serving one vhost-user connection takes, on top of [`super::runtime`]: messages
//! and descriptors on the inherited socket, an epoll loop over eventfds, and mapping the
//! guest memory regions the frontend sends (`mmap` itself is in the runtime set).
//!
//! Traced from a vhost-user-backend 0.24 daemon serving a frontend through SET_OWNER,
//! features, SET_MEM_TABLE (twice, so the old table is unmapped), vring setup, kicks and
//! calls, GET_VRING_BASE and hang-up.

use crate::syscall_rule::{Arg, SyscallRule};
use crate::{constant, sys};

/// Standalone workers accept frontends on a socket bound before the sandbox; launched ones
/// never call it. Kinds that accept other connections too say so with their own rule.
pub fn standalone_accept() -> SyscallRule {
    SyscallRule::allow(sys!(SYS_accept4)).because(
        "standalone mode: the next frontend on the socket bound before the sandbox; \
         accepting creates no socket of its own",
    )
}

pub fn rules() -> Vec<SyscallRule> {
    vec![
        SyscallRule::allow(sys!(SYS_recvmsg))
            .because("vhost-user messages and the descriptors they carry (SCM_RIGHTS)"),
        SyscallRule::allow(sys!(SYS_sendmsg)).because("vhost-user replies"),
        SyscallRule::allow(sys!(SYS_shutdown))
            .because("ending the connection when the frontend hangs up"),
        SyscallRule::allow(sys!(SYS_epoll_create1)).because("the vring thread's event loop"),
        SyscallRule::allow(sys!(SYS_epoll_ctl))
            .because("watching kick eventfds as the frontend sets them"),
        SyscallRule::allow(sys!(SYS_epoll_wait)).because("the vring thread waiting for kicks"),
        SyscallRule::allow(sys!(SYS_eventfd2))
            .because("the vring thread's control and exit events"),
        SyscallRule::allow(sys!(SYS_fcntl))
            .when_one_of(
                Arg::int(1, "cmd"),
                &[
                    constant!(F_GETFD),
                    constant!(F_SETFD),
                    constant!(F_GETFL),
                    constant!(F_SETFL),
                    constant!(F_DUPFD_CLOEXEC),
                ],
            )
            .because("descriptor flags; try_clone duplicates with F_DUPFD_CLOEXEC"),
        SyscallRule::allow(sys!(SYS_ioctl))
            .when(Arg::int(1, "request").eq(constant!(FIONBIO)))
            .because("set_nonblocking on sockets and eventfds; no other ioctl"),
        SyscallRule::allow(sys!(SYS_newfstatat))
            .when(Arg::int(3, "flags").eq(constant!(AT_EMPTY_PATH)))
            .because(
                "fstat of a memory region's descriptor (type, size) before mapping it: glibc \
                 2.33+ makes fstat(fd) newfstatat(fd, \"\", AT_EMPTY_PATH). The path is a \
                 pointer the filter cannot read, so this lets a subverted worker learn a host \
                 path's metadata (never its contents)",
            ),
        SyscallRule::fail_with(sys!(SYS_statx), constant!(ENOSYS)).because(
            "std's File::metadata tries statx first; refused, it falls back to fstat, so \
             one stat call is allowed instead of two",
        ),
    ]
}
