//! Sandbox tests: a child process applies a real policy, then does one thing, and the
//! parent checks how the child ended and what it reported.
//!
//! The child is this test binary run again with `BULKHEAD_SANDBOX_CASE` set. Sandboxing
//! needs a single-threaded process (the crate refuses otherwise), which libtest's harness
//! is not, hence `harness = false` and this small runner. The child reports on a pipe it
//! inherits and keeps; a second inherited descriptor it does not keep must be closed.
//!
//! Arguments: an optional substring selecting cases, as with libtest.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::os::unix::prelude::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};

use bulkhead_protocol::WorkerKind;
use bulkhead_seccomp::{
    apply, constant, is_seccomp_violation, policy_for, sys, Arg, Enforcement, Policy, SandboxError,
    SyscallRule,
};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

const CASE_ENV: &str = "BULKHEAD_SANDBOX_CASE";
const REPORT_FD_ENV: &str = "BULKHEAD_SANDBOX_REPORT_FD";
const UNKEPT_FD_ENV: &str = "BULKHEAD_SANDBOX_UNKEPT_FD";
const ABSTRACT_SOCKET_ENV: &str = "BULKHEAD_SANDBOX_ABSTRACT_SOCKET";
/// linux/capability.h
const CAP_SETPCAP: u32 = 8;

/// How a case's child must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Exit 0 after reporting.
    Success,
    /// Killed by its seccomp filter after reporting "sandboxed".
    SeccompKill,
    /// Killed by this signal, which is not a seccomp violation.
    Signal(i32),
}

struct Case {
    name: &'static str,
    expect: Expect,
    /// Runs in the child.
    child: fn(&mut Report),
    /// Checks the child's report in the parent.
    check: fn(&BTreeMap<String, String>) -> Result<(), String>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "rng_policy_allows_what_a_worker_does",
            expect: Expect::Success,
            child: child_allowed_actions,
            check: check_allowed_actions,
        },
        Case {
            name: "rng_policy_kills_opening_a_host_file",
            expect: Expect::SeccompKill,
            child: |report| {
                sandbox_rng(report);
                let _ = File::open("/etc/passwd");
            },
            check: sandboxed_only,
        },
        Case {
            name: "rng_policy_kills_execve",
            expect: Expect::SeccompKill,
            child: |report| {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                sandbox_rng(report);
                // SAFETY: a NUL-terminated path and a NULL-terminated argv of C strings
                // that outlive the call.
                unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
            },
            check: sandboxed_only,
        },
        Case {
            name: "rng_policy_kills_spawning_a_process",
            expect: Expect::SeccompKill,
            child: |report| {
                sandbox_rng(report);
                let _ = Command::new("/bin/true").status();
            },
            check: sandboxed_only,
        },
        Case {
            name: "rng_policy_kills_fork",
            expect: Expect::SeccompKill,
            child: |report| {
                sandbox_rng(report);
                // SAFETY: the child of a successful fork would only _exit; the filter
                // kills the caller before there is one.
                if unsafe { libc::fork() } == 0 {
                    // SAFETY: _exit is async-signal-safe.
                    unsafe { libc::_exit(0) };
                }
            },
            check: sandboxed_only,
        },
        Case {
            name: "rng_policy_kills_opening_a_socket",
            expect: Expect::SeccompKill,
            child: |report| {
                sandbox_rng(report);
                // SAFETY: socket takes no pointers.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            },
            check: sandboxed_only,
        },
        Case {
            name: "rng_policy_kills_executable_mappings",
            expect: Expect::SeccompKill,
            child: |report| {
                sandbox_rng(report);
                // SAFETY: an anonymous private mapping at an address of the kernel's
                // choosing affects no existing memory.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
            },
            check: sandboxed_only,
        },
        Case {
            name: "rng_policy_kills_signalling_another_process",
            expect: Expect::SeccompKill,
            child: |report| {
                // Another process of the same user, as the VMM is to a worker; started
                // before the sandbox, which forbids starting one.
                // It ends by itself: kill(2) is outside the policy too.
                let Ok(other) = Command::new("/bin/sleep").arg("3").spawn() else {
                    report.line("spawn", "failed");
                    return;
                };
                let pid = other.id() as libc::pid_t;
                sandbox_rng(report);
                // SAFETY: tgkill takes no pointers; if the filter let it through, the
                // other process would die of SIGABRT and the case fails on our exit.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGABRT) };
            },
            check: sandboxed_only,
        },
        Case {
            name: "blk_policy_kills_making_an_io_uring",
            expect: Expect::SeccompKill,
            child: |report| {
                sandbox_blk(report, &[]);
                // A ring made now would come without the restrictions the worker's own
                // rings were given before confinement.
                let _ = io_uring_setup();
            },
            check: sandboxed_only,
        },
        Case {
            name: "blk_policy_kills_registering_with_an_io_uring_made_before",
            expect: Expect::SeccompKill,
            child: |report| {
                let ring = match io_uring_setup() {
                    Ok(ring) => ring,
                    Err(e) => {
                        report.line("io_uring_setup", e);
                        return;
                    }
                };
                sandbox_blk(report, &[ring.as_raw_fd()]);
                // Registering would widen what the ring may do (files, buffers, its
                // restrictions before enabling).
                // SAFETY: IORING_REGISTER_ENABLE_RINGS takes no argument buffer.
                unsafe {
                    libc::syscall(
                        libc::SYS_io_uring_register,
                        ring.as_raw_fd(),
                        IORING_REGISTER_ENABLE_RINGS,
                        std::ptr::null::<u8>(),
                        0,
                    )
                };
            },
            check: sandboxed_only,
        },
        Case {
            name: "rng_policy_lets_panics_and_aborts_be_themselves",
            expect: Expect::Signal(libc::SIGABRT),
            child: |report| {
                sandbox_rng(report);
                let panicked = std::thread::spawn(|| panic!("a device bug")).join();
                report.line("thread_panicked", panicked.is_err());
                std::process::abort();
            },
            check: |report| {
                expect_entry(report, "thread_panicked", "true")?;
                sandboxed_only(report)
            },
        },
        Case {
            name: "landlock_capabilities_and_no_new_privs_hold_where_seccomp_lets_calls_through",
            expect: Expect::Success,
            child: child_second_wall,
            check: check_second_wall,
        },
        Case {
            name: "sandboxing_a_multithreaded_process_is_refused",
            expect: Expect::Success,
            child: child_multithreaded,
            check: |report| expect_entry(report, "apply", "not single-threaded"),
        },
    ]
}

// ---- child side ----

/// The child's end of the report pipe: `key=value` lines.
struct Report {
    file: File,
    fd: RawFd,
}

impl Report {
    fn line(&mut self, key: &str, value: impl std::fmt::Display) {
        // A failed report shows up as a missing key in the parent.
        let _ = writeln!(self.file, "{key}={value}");
    }
}

fn env_fd(name: &str) -> RawFd {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not set to a descriptor number"))
}

fn run_child(case: &str) -> ! {
    let fd = env_fd(REPORT_FD_ENV);
    // SAFETY: the parent passes this descriptor open and nothing else in this process
    // owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut report = Report { file, fd };
    let Some(case) = cases().into_iter().find(|c| c.name == case) else {
        panic!("unknown case {case}");
    };
    (case.child)(&mut report);
    report.line("done", "yes");
    std::process::exit(0);
}

fn rng_policy(report: &Report) -> Policy {
    policy_for(WorkerKind::Rng).keep_fd(report.fd, "test report pipe")
}

/// Applies the rng policy and says so, so that a later death is known to be the
/// violation's and not the sandboxing's.
fn sandbox_rng(report: &mut Report) {
    let policy = rng_policy(report);
    match apply(&policy) {
        Ok(_) => report.line("sandboxed", "yes"),
        Err(e) => {
            report.line("sandbox_error", format!("{e:?}"));
            std::process::exit(3);
        }
    }
}

/// Applies the blk policy, keeping `fds` too, and says so.
fn sandbox_blk(report: &mut Report, fds: &[RawFd]) {
    let mut policy = policy_for(WorkerKind::Blk).keep_fd(report.fd, "test report pipe");
    for &fd in fds {
        policy = policy.keep_fd(fd, "io_uring");
    }
    match apply(&policy) {
        Ok(_) => report.line("sandboxed", "yes"),
        Err(e) => {
            report.line("sandbox_error", format!("{e:?}"));
            std::process::exit(3);
        }
    }
}

/// linux/io_uring.h
const IORING_REGISTER_ENABLE_RINGS: libc::c_uint = 12;
/// Bytes of struct io_uring_params.
const IO_URING_PARAMS_LEN: usize = 120;

/// A small ring with IORING_SETUP_R_DISABLED (it is never used).
fn io_uring_setup() -> std::io::Result<OwnedFd> {
    let mut params = [0u8; IO_URING_PARAMS_LEN];
    // flags is the u32 at offset 8; IORING_SETUP_R_DISABLED = 1 << 6.
    params[8..12].copy_from_slice(&(1u32 << 6).to_ne_bytes());
    // SAFETY: `params` is a zeroed io_uring_params the kernel reads and fills, and
    // outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn errno_name(result: std::io::Result<()>) -> String {
    match result.map_err(|e| e.raw_os_error()) {
        Ok(()) => "ok".into(),
        Err(Some(libc::EACCES)) => "EACCES".into(),
        Err(Some(libc::EPERM)) => "EPERM".into(),
        Err(Some(libc::EBADF)) => "EBADF".into(),
        Err(Some(libc::ENOSYS)) => "ENOSYS".into(),
        Err(other) => format!("errno {other:?}"),
    }
}

fn child_allowed_actions(report: &mut Report) {
    let unkept = env_fd(UNKEPT_FD_ENV);
    sandbox_rng(report);

    let mut random = [0u8; 32];
    // SAFETY: getrandom writes at most `random.len()` bytes into `random`.
    let got = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    report.line("getrandom_bytes", got);
    report.line("getrandom_nonzero", random.iter().any(|&b| b != 0));

    // SAFETY: F_GETFD takes no pointer; the descriptor may or may not be open.
    let flags = unsafe { libc::fcntl(unkept, libc::F_GETFD) };
    report.line(
        "unkept_fd",
        errno_name(if flags < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }),
    );

    // A thread: clone3 answered ENOSYS, glibc's fallback to clone, stacks, thread exit.
    let from_thread = std::thread::spawn(|| {
        let mut buf = [0u8; 8];
        // SAFETY: as above.
        unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) }
    })
    .join();
    report.line("thread", matches!(from_thread, Ok(8)));

    let named = std::thread::Builder::new()
        .name("vring_worker".into())
        .spawn(|| ())
        .map(|handle| handle.join().is_ok());
    report.line("named_thread", matches!(named, Ok(true)));

    // std's File::metadata: statx answered ENOSYS, then the fstat fallback.
    report.line("metadata", report.file.metadata().is_ok());

    let mut keys = std::collections::HashMap::new();
    keys.insert("rate", 1);
    // The rate limiter's refill timer.
    // SAFETY: timerfd_create and timerfd_settime get valid constants and a pointer to a
    // live, initialised itimerspec; the descriptor is closed right after.
    let timer_armed = unsafe {
        let fd = libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
        };
        let armed = fd >= 0 && libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) == 0;
        libc::close(fd);
        armed
    };
    report.line("timer", timer_armed);
}

fn check_allowed_actions(report: &BTreeMap<String, String>) -> Result<(), String> {
    expect_entry(report, "sandboxed", "yes")?;
    expect_entry(report, "getrandom_bytes", "32")?;
    expect_entry(report, "getrandom_nonzero", "true")?;
    expect_entry(report, "unkept_fd", "EBADF")?;
    expect_entry(report, "thread", "true")?;
    expect_entry(report, "named_thread", "true")?;
    expect_entry(report, "metadata", "true")?;
    expect_entry(report, "timer", "true")?;
    expect_entry(report, "done", "yes")
}

/// The rng policy plus the calls that let the child probe Landlock, capabilities and
/// no_new_privs from inside: opening paths, sockets, signals, capget, prctl queries.
fn probing_policy(report: &Report) -> Policy {
    let mut policy = rng_policy(report);
    policy
        .syscalls
        .retain(|rule| rule.syscall.nr != libc::SYS_prctl);
    let option = Arg::int(0, "option");
    policy.syscalls.extend([
        SyscallRule::allow(sys!(SYS_openat)),
        SyscallRule::allow(sys!(SYS_socket)),
        SyscallRule::allow(sys!(SYS_connect)),
        SyscallRule::allow(sys!(SYS_bind)),
        SyscallRule::allow(sys!(SYS_setsockopt)),
        SyscallRule::allow(sys!(SYS_kill)),
        SyscallRule::allow(sys!(SYS_getppid)),
        SyscallRule::allow(sys!(SYS_capget)),
        SyscallRule::allow(sys!(SYS_prctl)).when_one_of(
            option,
            &[
                constant!(PR_SET_NAME),
                constant!(PR_CAPBSET_READ),
                constant!(PR_GET_NO_NEW_PRIVS),
            ],
        ),
    ]);
    // Path system calls now pass the filter, so Landlock must be enforced in full.
    policy.landlock.enforcement = Enforcement::Required;
    policy
}

fn child_second_wall(report: &mut Report) {
    let abstract_name = std::env::var(ABSTRACT_SOCKET_ENV).unwrap_or_default();
    let policy = probing_policy(report);
    if let Err(e) = apply(&policy) {
        report.line("sandbox_error", format!("{e:?}"));
        std::process::exit(3);
    }
    report.line("sandboxed", "yes");

    report.line(
        "open_etc_passwd",
        errno_name(File::open("/etc/passwd").map(drop)),
    );
    report.line(
        "create_in_tmp",
        errno_name(File::create("/tmp/bulkhead-sandbox-test").map(drop)),
    );
    report.line(
        "tcp_connect",
        errno_name(std::net::TcpStream::connect("127.0.0.1:9").map(drop)),
    );
    report.line(
        "tcp_bind",
        errno_name(std::net::TcpListener::bind("127.0.0.1:47123").map(drop)),
    );
    let abstract_connect = SocketAddr::from_abstract_name(abstract_name.as_bytes())
        .and_then(|addr| std::os::unix::net::UnixStream::connect_addr(&addr).map(drop));
    report.line("abstract_unix_connect", errno_name(abstract_connect));

    // SAFETY: kill with signal 0 only checks permission; getppid has no arguments.
    let killed = unsafe { libc::kill(libc::getppid(), 0) };
    report.line(
        "signal_parent",
        errno_name(if killed < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }),
    );

    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointers.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    report.line("no_new_privs", nnp);

    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [[0u32; 3]; 2];
    // SAFETY: capget fills a version-3 header and two data structs of three u32s.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    report.line("capget", ret);
    report.line("capabilities", format!("{data:?}"));

    let bounding: Vec<u32> = (0..64)
        // SAFETY: PR_CAPBSET_READ takes a capability number, no pointers.
        .map(|cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) })
        .take_while(|&r| r >= 0)
        .enumerate()
        .filter(|&(_, r)| r == 1)
        .map(|(cap, _)| cap as u32)
        .collect();
    report.line("bounding_set", format!("{bounding:?}"));
}

fn check_second_wall(report: &BTreeMap<String, String>) -> Result<(), String> {
    expect_entry(report, "sandboxed", "yes")?;
    expect_entry(report, "open_etc_passwd", "EACCES")?;
    expect_entry(report, "create_in_tmp", "EACCES")?;
    expect_entry(report, "tcp_connect", "EACCES")?;
    expect_entry(report, "tcp_bind", "EACCES")?;
    expect_entry(report, "abstract_unix_connect", "EPERM")?;
    expect_entry(report, "signal_parent", "EPERM")?;
    expect_entry(report, "no_new_privs", "1")?;
    expect_entry(report, "capget", "0")?;
    expect_entry(report, "capabilities", "[[0, 0, 0], [0, 0, 0]]")?;
    if parent_has_cap_setpcap() {
        expect_entry(report, "bounding_set", "[]")?;
    }
    expect_entry(report, "done", "yes")
}

fn child_multithreaded(report: &mut Report) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let parked = std::thread::spawn(move || rx.recv());
    let outcome = match apply(&rng_policy(report)) {
        Err(SandboxError::NotSingleThreaded(2)) => "not single-threaded".to_string(),
        other => format!("{other:?}"),
    };
    report.line("apply", outcome);
    drop(tx);
    let _ = parked.join();
}

// ---- parent side ----

fn expect_entry(report: &BTreeMap<String, String>, key: &str, want: &str) -> Result<(), String> {
    match report.get(key) {
        Some(got) if got == want => Ok(()),
        Some(got) => Err(format!("{key}: expected {want:?}, got {got:?}")),
        None => Err(format!("{key}: missing from the report")),
    }
}

fn sandboxed_only(report: &BTreeMap<String, String>) -> Result<(), String> {
    expect_entry(report, "sandboxed", "yes")?;
    match report.get("done") {
        Some(_) => Err("the child went on after the forbidden call".into()),
        None => Ok(()),
    }
}

fn parent_has_cap_setpcap() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1 << CAP_SETPCAP) != 0)
}

/// The running kernel's Landlock ABI version, 0 without Landlock.
fn landlock_abi() -> i64 {
    // SAFETY: with LANDLOCK_CREATE_RULESET_VERSION, attr must be NULL and size 0; the
    // call only returns the ABI version.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    abi.max(0)
}

/// A pipe whose write end the child inherits (no close-on-exec).
fn inheritable_pipe() -> (OwnedFd, OwnedFd) {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe2");
    fcntl(&write, FcntlArg::F_SETFD(FdFlag::empty())).expect("clearing close-on-exec");
    (read, write)
}

fn run_case(case: &Case) -> Result<(), String> {
    let (mut report_read, report_write) = {
        let (r, w) = inheritable_pipe();
        (File::from(r), w)
    };
    let (_unkept_read, unkept_write) = inheritable_pipe();
    let abstract_name = format!("bulkhead-sandbox-test-{}", std::process::id());
    let _abstract_listener = SocketAddr::from_abstract_name(abstract_name.as_bytes())
        .and_then(|addr| UnixListener::bind_addr(&addr))
        .map_err(|e| format!("binding an abstract socket: {e}"))?;

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .env(CASE_ENV, case.name)
        .env(REPORT_FD_ENV, report_write.as_raw_fd().to_string())
        .env(UNKEPT_FD_ENV, unkept_write.as_raw_fd().to_string())
        .env(ABSTRACT_SOCKET_ENV, &abstract_name)
        // A backtrace would open /proc/self/exe and turn a test failure into a kill.
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning the child: {e}"))?;
    drop(report_write);
    drop(unkept_write);
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for the child: {e}"))?;

    let mut text = String::new();
    report_read
        .read_to_string(&mut text)
        .map_err(|e| format!("reading the report: {e}"))?;
    let report: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();

    let describe = |status: &ExitStatus| {
        format!(
            "{status}; report {report:?}; stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    };
    let status = output.status;
    match case.expect {
        Expect::Success if !status.success() => {
            return Err(format!("expected a clean exit: {}", describe(&status)))
        }
        Expect::SeccompKill if !is_seccomp_violation(&status) => {
            return Err(format!(
                "expected death by SIGSYS (signal {}): {}",
                libc::SIGSYS,
                describe(&status)
            ))
        }
        Expect::Signal(signal) if status.signal() != Some(signal) => {
            return Err(format!(
                "expected death by signal {signal}: {}",
                describe(&status)
            ))
        }
        _ => {}
    }
    if case.expect == Expect::Success && status.signal().is_some() {
        return Err(describe(&status));
    }
    (case.check)(&report).map_err(|e| format!("{e}; {}", describe(&status)))
}

fn main() {
    if let Ok(case) = std::env::var(CASE_ENV) {
        run_child(&case);
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|c| match filter.as_deref() {
            Some(f) => c.name.contains(f),
            None => true,
        })
        .collect();
    println!("\nrunning {} sandbox tests", selected.len());
    let mut failed = Vec::new();
    for case in &selected {
        if case.name.starts_with("landlock") && landlock_abi() < 6 {
            println!("test {} ... skipped (kernel Landlock ABI < 6)", case.name);
            continue;
        }
        match run_case(case) {
            Ok(()) => println!("test {} ... ok", case.name),
            Err(e) => {
                println!("test {} ... FAILED\n    {e}", case.name);
                failed.push(case.name);
            }
        }
    }
    if !failed.is_empty() {
        println!("\nfailures: {failed:?}");
        std::process::exit(1);
    }
    println!("\nsandbox tests: all {} passed\n", selected.len());
}
