//! The blk worker: a vhost-user virtio-blk backend serving a raw or QCOW2 image (and its
//! backing chain) from descriptors it was handed, never from a path.
//!
//! On top of [`super::runtime`] and [`super::vhost_user`] it needs positioned I/O on those
//! descriptors, durability (flush), hole punching and zeroing for DISCARD and
//! WRITE_ZEROES, and [`super::inflight`] because it offers `INFLIGHT_SHMFD` so a restarted
//! worker finishes the requests its predecessor left in flight. The disk engine's system
//! calls are its `File` calls: `read_at`/`write_at` (pread64/pwrite64), `sync_data`
//! (fdatasync), `metadata` (fstat, in the vhost-user set), a raw image's size by seeking
//! to its end (lseek), and `try_clone` of backing files (fcntl F_DUPFD_CLOEXEC, in the
//! vhost-user set). A `,cow` disk's overlay store is one more descriptor, a memfd made
//! before the sandbox: the same positioned I/O and hole punching, and one ftruncate to
//! empty it when it is blank.
//!
//! Reads and writes go through io_uring where the kernel has it: the worker makes one ring
//! per queue before it confines itself, restricted to READV and WRITEV on the image's
//! registered descriptor, and may only `io_uring_enter` them afterwards: making a ring
//! (`io_uring_setup`, which would come unrestricted) and registering anything with one
//! (`io_uring_register`) stay denied.
//!
//! No path at all: every system call that takes one is missing, and Landlock grants none.

use bulkhead_protocol::WorkerKind;

use super::{inflight, runtime, vhost_user};
use crate::landlock_rules::{Enforcement, LandlockRules};
use crate::policy::Policy;
use crate::sys;
use crate::syscall_rule::{Arg, Constant, SyscallRule};

/// `fallocate` modes the engine uses, and no other (no growing a file, no collapsing or
/// inserting ranges): punching a hole, and zeroing a range, both inside the file's size.
const PUNCH_HOLE: Constant = Constant {
    name: "FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE",
    value: (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
};
const ZERO_RANGE: Constant = Constant {
    name: "FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE",
    value: (libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE) as u64,
};

pub fn policy() -> Policy {
    let blk = [
        SyscallRule::allow(sys!(SYS_pread64))
            .because("reading the image and its backing files at an offset"),
        SyscallRule::allow(sys!(SYS_pwrite64))
            .because("writing guest data and image metadata at an offset"),
        SyscallRule::allow(sys!(SYS_preadv))
            .because("vectored reads into several buffers at an offset"),
        SyscallRule::allow(sys!(SYS_pwritev))
            .because("vectored writes from several buffers at an offset"),
        SyscallRule::allow(sys!(SYS_fdatasync))
            .because("FLUSH: data and metadata durable before the guest hears OK"),
        SyscallRule::allow(sys!(SYS_fsync))
            .because("FLUSH where the data sync alone does not cover a size change"),
        SyscallRule::allow(sys!(SYS_fallocate))
            .when_one_of(Arg::int(1, "mode"), &[PUNCH_HOLE, ZERO_RANGE])
            .because(
                "DISCARD punches holes, WRITE_ZEROES zeroes ranges; never grows, collapses \
                 or inserts ranges",
            ),
        SyscallRule::allow(sys!(SYS_io_uring_enter)).because(
            "submitting to and waiting on the queues' io_uring rings, made and restricted \
             (READV/WRITEV on the image's registered descriptor only) before confinement",
        ),
        SyscallRule::allow(sys!(SYS_lseek))
            .because("a raw image's size (a host block device has no st_size): seek to its end"),
        vhost_user::standalone_accept(),
    ];
    Policy {
        kind: WorkerKind::Blk,
        syscalls: runtime::rules()
            .into_iter()
            .chain(vhost_user::rules())
            .chain(inflight::rules())
            .chain(blk)
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
    fn reaches_no_path_socket_or_program() {
        let extra = [
            "openat2",
            "truncate",
            "unlink",
            "unlinkat",
            "rename",
            "io_uring_setup",
            "io_uring_register",
        ];
        assert_denies(
            &policy(),
            &[denied::PATH, denied::SOCKET_PROGRAM_OR_SIGNAL, &extra],
        );
        let rules = policy().landlock;
        assert!(rules.paths.is_empty() && rules.ports.is_empty());
    }

    #[test]
    fn serves_disk_io_and_inflight_tracking() {
        for name in [
            "pread64",
            "pwrite64",
            "fdatasync",
            "fallocate",
            "lseek",
            "memfd_create",
            "ftruncate",
            "recvmsg",
            "epoll_wait",
            "newfstatat",
            "io_uring_enter",
        ] {
            assert!(allowed(name), "blk must allow {name}");
        }
    }

    #[test]
    fn fallocate_only_punches_and_zeroes() {
        let policy = policy();
        let rule = policy
            .syscalls
            .iter()
            .find(|r| r.syscall.name() == "fallocate")
            .expect("fallocate rule");
        assert!(!rule.is_unconditional());
    }
}
