//! What any sandboxed worker needs from the kernel just to be a Rust program on glibc once
//! set up: memory, threads, locks, signals, time, logging and exiting.
//!
//! Found by tracing a vhost-user-backend 0.24 daemon (see [`super::rng`]) from the point
//! where the sandbox goes on, and by reading glibc 2.36 and Rust std for the paths a short
//! trace does not hit (thread exit, abort after a panic).

use crate::syscall_rule::{Arg, SyscallRule};
use crate::{constant, sys};

pub fn rules() -> Vec<SyscallRule> {
    let prot = Arg::long(2, "prot");
    vec![
        // Descriptor I/O. Which descriptors exist is decided by what the worker kept and
        // what it was sent; the filter cannot tell them apart.
        SyscallRule::allow(sys!(SYS_read)).because("eventfd counters and inherited pipes"),
        SyscallRule::allow(sys!(SYS_write)).because("logs on stderr, eventfd signals"),
        SyscallRule::allow(sys!(SYS_writev)).because("std's vectored writes to stderr"),
        SyscallRule::allow(sys!(SYS_close))
            .because("dropping descriptors: replaced eventfds, unmapped memory regions"),
        // Memory.
        SyscallRule::allow(sys!(SYS_brk)).because("malloc's main heap"),
        SyscallRule::allow(sys!(SYS_mmap))
            .when(prot.has_none_of(constant!(PROT_EXEC)))
            .because("allocations, thread stacks, guest memory regions; never executable"),
        SyscallRule::allow(sys!(SYS_mprotect))
            .when(prot.has_none_of(constant!(PROT_EXEC)))
            .because("thread stack guard pages; never makes memory executable"),
        SyscallRule::allow(sys!(SYS_munmap))
            .because("freeing allocations, stacks and replaced guest memory regions"),
        SyscallRule::allow(sys!(SYS_mremap))
            .when(Arg::long(3, "flags").eq(constant!(MREMAP_MAYMOVE)))
            .because("realloc of large blocks; never to a fixed address"),
        SyscallRule::allow(sys!(SYS_madvise))
            .when(Arg::int(2, "advice").eq(constant!(MADV_DONTNEED)))
            .because(
                "glibc returning freed stacks and heap; other advice (MADV_REMOVE would punch \
                 holes in guest memory) is refused",
            ),
        // Threads and locks. Threads are created after the sandbox goes on (it must be
        // applied while the process is single-threaded).
        SyscallRule::allow(sys!(SYS_clone))
            .when(Arg::long(0, "flags").has_all_of(constant!(CLONE_THREAD)))
            .because("new threads, which CLONE_THREAD makes sure are never new processes"),
        SyscallRule::fail_with(sys!(SYS_clone3), constant!(ENOSYS)).because(
            "glibc tries clone3 first and falls back to clone, whose flags the filter can \
             read (clone3 passes them in memory)",
        ),
        SyscallRule::allow(sys!(SYS_set_robust_list)).because("glibc, in every new thread"),
        SyscallRule::allow(sys!(SYS_rseq)).because("glibc, in every new thread"),
        SyscallRule::allow(sys!(SYS_prctl))
            .when(Arg::int(0, "option").eq(constant!(PR_SET_NAME)))
            .because("std naming its threads"),
        SyscallRule::allow(sys!(SYS_sched_getaffinity))
            .because("glibc sizing malloc arenas when a new thread first allocates"),
        SyscallRule::allow(sys!(SYS_futex)).because("std's mutexes, condvars and thread join"),
        SyscallRule::allow(sys!(SYS_sched_yield)).because("spinning locks backing off"),
        SyscallRule::allow(sys!(SYS_gettid)).because("std's thread setup, glibc's abort"),
        SyscallRule::allow(sys!(SYS_getpid)).because("glibc's abort"),
        // Signals.
        SyscallRule::allow(sys!(SYS_rt_sigaction))
            .because("glibc's thread-creation signals, restoring SIGABRT in abort"),
        SyscallRule::allow(sys!(SYS_rt_sigprocmask))
            .because("glibc blocking signals around thread creation and exit"),
        SyscallRule::allow(sys!(SYS_rt_sigreturn)).because("returning from a signal handler"),
        SyscallRule::allow(sys!(SYS_sigaltstack))
            .because("std's stack overflow handler, per thread"),
        SyscallRule::allow(sys!(SYS_restart_syscall))
            .because("resuming a sleep interrupted by a signal"),
        SyscallRule::allow(sys!(SYS_tgkill))
            .when_all([
                Arg::int(0, "tgid").is_own_pid(),
                Arg::int(2, "sig").eq(constant!(SIGABRT)),
            ])
            .because(
                "abort() after a panic, so the worker dies of SIGABRT and is not mistaken \
                 for a seccomp violation; only to itself, never to the VMM or another worker",
            ),
        // Time and randomness.
        SyscallRule::allow(sys!(SYS_clock_gettime))
            .because("the vDSO's fallback when the clock source has no fast path"),
        SyscallRule::allow(sys!(SYS_gettimeofday)).because("the same, for the wall clock"),
        SyscallRule::allow(sys!(SYS_getrandom))
            .because("std's HashMap keys; the rng device's entropy source"),
        // Leaving.
        SyscallRule::allow(sys!(SYS_exit)).because("a thread ending"),
        SyscallRule::allow(sys!(SYS_exit_group)).because("the worker ending"),
    ]
}
