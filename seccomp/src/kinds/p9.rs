//! The p9 worker: a virtio-9p vhost-user backend (and its 9P-over-a-socket debug
//! transport) serving one host directory.
//!
//! # How the allowlist was found
//!
//! From the server's own code (`workers/src/p9/confined.rs` is the only module that
//! touches the host file system: one function per system call), then by running the
//! p9_device and p9_server tests against the sandboxed worker: a missing call kills it
//! with SIGSYS, which the tests see. The runtime and vhost-user groups are rng's.
//!
//! # Why Landlock is required here
//!
//! The server resolves every name with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` beneath the shared directory's descriptor, but the filter cannot
//! see a path or that flag (both live in memory), so `openat2`, `mkdirat`, `unlinkat`,
//! `renameat`, `linkat`, ... are allowed for any path. What stops a subverted worker from
//! passing an absolute path or another directory is Landlock: its only grant is beneath
//! the shared directory (read-only rights for a read-only share), built from the
//! descriptor itself, so the worker never needs a host path name. A kernel without
//! Landlock cannot run this worker.
//!
//! The stat, readlink, xattr and chown families resolve paths too and Landlock does not
//! police them; the server only uses their descriptor forms (`AT_EMPTY_PATH`, `f*xattr`),
//! and the filter pins the `newfstatat` and `fchownat` flags to those forms.
//!
//! One descriptor is not beneath the share: the session journal, a memfd from the VMM
//! that the worker appends to (pwrite64) and frees old generations of (fallocate, punch
//! hole only).

use std::os::fd::RawFd;

use bulkhead_protocol::WorkerKind;
use landlock::{AccessFs, BitFlags};

use super::{inflight, runtime, vhost_user};
use crate::landlock_rules::{Enforcement, GrantRoot, LandlockRules, PathGrant};
use crate::policy::Policy;
use crate::syscall_rule::{Arg, Constant, SyscallRule};
use crate::{constant, sys};

/// What the worker calls the directory in its Landlock rule.
pub const SHARED_DIR: &str = "shared directory";

/// The rights beneath the shared directory: reading for a read-only share; for a
/// writable one, every change a 9P2000.L client can ask for. Never `execute` (the worker
/// runs nothing) nor `ioctl_dev` (it sends no ioctl to files).
pub fn shared_dir_access(read_only: bool) -> BitFlags<AccessFs> {
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    if read_only {
        return read;
    }
    read | AccessFs::WriteFile
        | AccessFs::RemoveDir
        | AccessFs::RemoveFile
        | AccessFs::MakeChar
        | AccessFs::MakeDir
        | AccessFs::MakeReg
        | AccessFs::MakeSock
        | AccessFs::MakeFifo
        | AccessFs::MakeBlock
        | AccessFs::MakeSym
        | AccessFs::Refer
        | AccessFs::Truncate
}

/// The policy of a p9 worker serving the directory open as `root_fd` (None: the shape
/// only, for `bulkhead policy p9`). The caller keeps `root_fd` ([`Policy::keep_fd`]).
pub fn policy(root_fd: Option<RawFd>, read_only: bool) -> Policy {
    let root = match root_fd {
        Some(fd) => GrantRoot::Fd {
            fd,
            what: SHARED_DIR,
        },
        None => GrantRoot::AtLaunch {
            what:
                "shared directory; for a read-only share the grant is read_file and read_dir only",
        },
    };
    let mut landlock = LandlockRules::deny_all(Enforcement::Required);
    landlock.paths.push(PathGrant {
        root,
        access: shared_dir_access(read_only),
    });
    // Replaced below by wider rules of the same system calls.
    let widened = ["fcntl", "newfstatat", "ftruncate"];
    let shared = runtime::rules()
        .into_iter()
        .chain(vhost_user::rules())
        .chain(inflight::rules())
        .filter(|rule| !widened.contains(&rule.syscall.name()));
    Policy {
        kind: WorkerKind::P9,
        syscalls: shared.chain(rules()).collect(),
        landlock,
        keep_fds: Policy::stdio(),
    }
}

fn rules() -> Vec<SyscallRule> {
    let at_empty_nofollow = Constant {
        name: "AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW",
        value: (libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) as u64,
    };
    vec![
        // Opening and creating, by name beneath a fid's descriptor.
        SyscallRule::allow(sys!(SYS_openat2)).because(
            "every lookup: openat2 beneath a fid's descriptor with RESOLVE_BENEATH | \
             RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS. The path and the resolve flags are \
             in memory the filter cannot read; Landlock confines it to the share",
        ),
        SyscallRule::fail_with(sys!(SYS_openat), constant!(ENOENT)).because(
            "glibc sizing malloc arenas once several handler threads allocate opens \
             /sys/devices/system/cpu/online; refused, it falls back to sched_getaffinity. \
             The server itself only ever uses openat2",
        ),
        SyscallRule::allow(sys!(SYS_mkdirat)).because("Tmkdir, beneath the share (Landlock)"),
        SyscallRule::allow(sys!(SYS_mknodat))
            .because("Tmknod (fifos, sockets; devices need CAP_MKNOD, which is dropped)"),
        SyscallRule::allow(sys!(SYS_symlinkat))
            .because("Tsymlink: the link's text is never followed by the server"),
        SyscallRule::allow(sys!(SYS_linkat)).because("Tlink, both ends beneath the share"),
        SyscallRule::allow(sys!(SYS_renameat)).because("Trename, Trenameat"),
        SyscallRule::allow(sys!(SYS_unlinkat)).because("Tremove, Tunlinkat"),
        SyscallRule::allow(sys!(SYS_readlinkat))
            .because("Treadlink, on the link's own O_PATH descriptor (empty name)"),
        // Metadata through descriptors.
        SyscallRule::allow(sys!(SYS_newfstatat))
            .when_one_of(
                Arg::int(3, "flags"),
                &[constant!(AT_EMPTY_PATH), at_empty_nofollow],
            )
            .because(
                "Tgetattr and every qid: fstat of a fid's descriptor (AT_EMPTY_PATH), and of a \
                 memory region's descriptor before mapping it. The path is a pointer the filter \
                 cannot read, so a subverted worker could learn a host path's metadata (never \
                 its contents)",
            ),
        SyscallRule::allow(sys!(SYS_fstatfs)).because("Tstatfs"),
        SyscallRule::allow(sys!(SYS_fchownat))
            .when(Arg::int(4, "flags").eq(at_empty_nofollow))
            .because("Tsetattr uid/gid when running as root: the fid's own descriptor"),
        SyscallRule::allow(sys!(SYS_fchmodat2))
            .because("Tsetattr mode on an O_PATH descriptor (AT_EMPTY_PATH)"),
        SyscallRule::allow(sys!(SYS_fchmod))
            .because("Tsetattr mode where fchmodat2 is missing (kernels before 6.6)"),
        SyscallRule::allow(sys!(SYS_utimensat))
            .because("Tsetattr times; futimens is utimensat with no path"),
        SyscallRule::allow(sys!(SYS_ftruncate)).because(
            "Tsetattr size, and sizing a new inflight region. Guest memory cannot be resized \
             this way: the VMM seals its memfd against growing and shrinking",
        ),
        // Data.
        SyscallRule::allow(sys!(SYS_pread64)).because("Tread"),
        SyscallRule::allow(sys!(SYS_pwrite64))
            .because("Twrite, and appending to the session journal (a memfd from the VMM)"),
        SyscallRule::allow(sys!(SYS_fallocate))
            .when(Arg::int(1, "mode").eq(Constant {
                name: "FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE",
                value: (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
            }))
            .because(
                "freeing a compacted session journal's old generation; never grows, \
                 allocates or collapses ranges",
            ),
        SyscallRule::allow(sys!(SYS_getdents64)).because("Treaddir"),
        SyscallRule::allow(sys!(SYS_lseek)).because("Treaddir: seeking a directory to a cookie"),
        SyscallRule::allow(sys!(SYS_fsync)).because("Tfsync"),
        SyscallRule::allow(sys!(SYS_fdatasync)).because("Tfsync with datasync set"),
        // Extended attributes, descriptor forms only.
        SyscallRule::allow(sys!(SYS_fgetxattr)).because("Txattrwalk of one attribute"),
        SyscallRule::allow(sys!(SYS_flistxattr)).because("Txattrwalk listing attributes"),
        SyscallRule::allow(sys!(SYS_fsetxattr)).because("Tclunk of a Txattrcreate fid"),
        SyscallRule::allow(sys!(SYS_fremovexattr))
            .because("Tclunk of a Txattrcreate fid with no value"),
        SyscallRule::allow(sys!(SYS_fcntl))
            .when_one_of(
                Arg::int(1, "cmd"),
                &[
                    constant!(F_GETFD),
                    constant!(F_SETFD),
                    constant!(F_GETFL),
                    constant!(F_SETFL),
                    constant!(F_DUPFD_CLOEXEC),
                    constant!(F_OFD_SETLK),
                    constant!(F_OFD_GETLK),
                ],
            )
            .because(
                "descriptor flags; try_clone's F_DUPFD_CLOEXEC; Tlock and Tgetlock as \
                 open-file-description locks (never the blocking F_OFD_SETLKW)",
            ),
        SyscallRule::allow(sys!(SYS_prlimit64))
            .when_all([
                Arg::int(0, "pid").eq(Constant::ZERO),
                Arg::long(2, "new_limit").eq(Constant::ZERO),
            ])
            .because("reading this process's own limits; never setting them"),
        // Serving frontends.
        SyscallRule::allow(sys!(SYS_accept4)).because(
            "standalone mode: the next frontend (or debug 9P client) on the socket bound \
             before the sandbox; accepting creates no socket of its own",
        ),
        SyscallRule::allow(sys!(SYS_recvfrom))
            .because("the debug transport reading 9P from its client (std's recv)"),
        SyscallRule::allow(sys!(SYS_sendto))
            .when(Arg::long(4, "dest_addr").eq(Constant::ZERO))
            .because(
                "the debug transport answering its client (std's send, MSG_NOSIGNAL); only on \
                 a connected socket: no destination address",
            ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::CompiledFilter;
    use crate::kinds::{assert_denies, denied};

    fn allowed(name: &str) -> bool {
        policy(None, false).allows(name)
    }

    #[test]
    fn validates_and_compiles() {
        for read_only in [false, true] {
            let policy = policy(Some(5), read_only).keep_fd(5, "shared directory");
            policy.validate().unwrap();
            CompiledFilter::compile(&policy).unwrap();
        }
    }

    #[test]
    fn the_grant_needs_its_descriptor_kept() {
        assert!(policy(Some(5), false).validate().is_err());
    }

    #[test]
    fn creates_no_socket_and_runs_nothing() {
        let extra = ["chroot", "mount"];
        assert_denies(
            &policy(None, false),
            &[denied::PATH, denied::SOCKET_PROGRAM_OR_SIGNAL, &extra],
        );
    }

    #[test]
    fn serves_files() {
        for name in [
            "openat2",
            "getdents64",
            "pread64",
            "pwrite64",
            "renameat",
            "fgetxattr",
            "recvmsg",
            "epoll_wait",
        ] {
            assert!(allowed(name), "p9 must allow {name}");
        }
    }

    #[test]
    fn fallocate_only_punches_the_journal() {
        let policy = policy(None, false);
        let rule = policy
            .syscalls
            .iter()
            .find(|r| r.syscall.name() == "fallocate")
            .expect("fallocate rule");
        assert!(!rule.is_unconditional());
    }

    #[test]
    fn landlock_is_required_and_grants_only_the_share() {
        let rw = policy(None, false).landlock;
        assert_eq!(rw.enforcement, Enforcement::Required);
        assert_eq!(rw.paths.len(), 1);
        assert!(!rw.paths[0].access.contains(AccessFs::Execute));
        let ro = policy(Some(7), true).landlock;
        assert_eq!(ro.paths[0].access, AccessFs::ReadFile | AccessFs::ReadDir);
        assert_eq!(
            ro.paths[0].root,
            GrantRoot::Fd {
                fd: 7,
                what: SHARED_DIR
            }
        );
    }
}
