//! A p9 worker subverted into trying host paths, for `tests/tests/p9_device.rs`.
//!
//! `p9-escape-probe DIR [--ro]` opens DIR the way `bulkhead-worker p9` does, enters the
//! real p9 sandbox (seccomp allowlist, Landlock beneath DIR's descriptor), and then makes
//! the system calls a worker taken over by a hostile guest would: `openat2` and `mkdirat`
//! with absolute paths and `..`, without the server's RESOLVE_BENEATH. Each attempt prints
//! one line `NAME ok` or `NAME errno N`; the test decides what must fail.

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;

use bulkhead_workers::sandbox::enter_policy;

fn openat2(dirfd: RawFd, path: &str, flags: i32) -> Result<(), i32> {
    let path = CString::new(path).map_err(|_| libc::EINVAL)?;
    // SAFETY: an all-zero open_how is valid (and the struct is non-exhaustive in libc).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    if flags & libc::O_CREAT != 0 {
        how.mode = 0o600;
    }
    // SAFETY: a NUL-terminated path and a fully initialised open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

fn mkdirat(dirfd: RawFd, path: &str) -> Result<(), i32> {
    let path = CString::new(path).map_err(|_| libc::EINVAL)?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::mkdirat(dirfd, path.as_ptr(), 0o700) } < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(())
}

fn report(name: &str, result: Result<(), i32>) {
    match result {
        Ok(()) => println!("{name} ok"),
        Err(errno) => println!("{name} errno {errno}"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        eprintln!("usage: p9-escape-probe DIR [--ro]");
        return ExitCode::from(2);
    };
    let read_only = args.get(2).is_some_and(|a| a == "--ro");
    let root = match std::fs::File::open(dir) {
        Ok(root) => root,
        Err(e) => {
            eprintln!("p9-escape-probe: {dir}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fd = root.as_raw_fd();
    let policy = bulkhead_seccomp::p9_policy(fd, read_only);
    if let Err(e) = enter_policy(policy, &[(fd, "shared directory")]) {
        eprintln!("p9-escape-probe: {e}");
        return ExitCode::FAILURE;
    }
    report(
        "absolute-read",
        openat2(libc::AT_FDCWD, "/etc/passwd", libc::O_RDONLY),
    );
    report(
        "dotdot-read",
        openat2(fd, "../outside/secret", libc::O_RDONLY),
    );
    report(
        "absolute-create",
        openat2(
            libc::AT_FDCWD,
            &format!("{dir}/../outside/created"),
            libc::O_WRONLY | libc::O_CREAT,
        ),
    );
    report(
        "absolute-mkdir",
        mkdirat(libc::AT_FDCWD, "/tmp/p9-escape-probe-dir"),
    );
    report("inside-read", openat2(fd, "inside", libc::O_RDONLY));
    report(
        "inside-create",
        openat2(fd, "created", libc::O_WRONLY | libc::O_CREAT),
    );
    ExitCode::SUCCESS
}
