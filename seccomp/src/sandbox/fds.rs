//! Closing every inherited descriptor the policy does not list.
//!
//! A descriptor is a capability: whatever the worker inherited by accident (a log file,
//! another device's socket, a directory) it could use despite Landlock, which only looks
//! at opening paths. So everything not kept is closed, by number, whether or not anything
//! in this process still refers to it: callers must have dropped or leaked their handles
//! to descriptors they do not keep (std's debug builds abort when an `OwnedFd` closes a
//! descriptor that is already closed).

use std::io;
use std::os::fd::RawFd;

/// Closes every descriptor except `keep` (ascending, non-negative, no duplicates).
pub fn close_all_except(keep: &[RawFd]) -> io::Result<()> {
    let mut next: u32 = 0;
    for &fd in keep {
        let fd = u32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        if fd > next {
            close_range(next, fd - 1)?;
        }
        next = fd.saturating_add(1);
    }
    close_range(next, u32::MAX)
}

/// Closes `first..=last`, with close_range(2) where the kernel has it (5.9+).
fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; the memory safety of this process does
    // not depend on them, and the module contract makes callers give up their handles.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            libc::c_uint::from(first),
            libc::c_uint::from(last),
            0 as libc::c_uint,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    close_one_by_one(first, last)
}

/// The fallback for kernels before 5.9: close every number up to the descriptor limit.
fn close_one_by_one(first: u32, last: u32) -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Descriptors at or above the hard limit cannot exist. (The soft limit can be lowered
    // after opening, so it is no bound.)
    let end = u32::try_from(limit.rlim_max).unwrap_or(u32::MAX);
    for fd in first..=last.min(end.saturating_sub(1)) {
        // SAFETY: as in close_range; EBADF for numbers not in use is expected.
        unsafe { libc::close(fd as RawFd) };
    }
    Ok(())
}
