//! Descriptor flags.

use std::io;
use std::os::fd::AsRawFd;

/// Sets `O_NONBLOCK` on `fd`'s open file description (shared with every process holding
/// a copy of the descriptor).
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL only read and set the status flags of a descriptor the caller
    // holds open for the call; no memory is passed to the kernel.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
