//! How a worker launched by the VMM learns what to serve.
//!
//! The VMM starts `bulkhead-worker <kind> --launch-fd N`. Descriptor `N` is a memfd holding
//! one bincode [`WorkerLaunch`]; the message names the other descriptors the worker
//! inherited: `vhost_user_fd`, the worker's end of a connected socketpair on which the VMM
//! is the vhost-user frontend, and the device's own files (a blk worker's image and its
//! backing chain).

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;

use bulkhead_protocol::{
    decode, DeviceConfig, WireError, WorkerKind, WorkerLaunch, MAX_MESSAGE_SIZE,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("descriptor {0} is stdio, not an inherited launch descriptor")]
    Stdio(RawFd),
    #[error("descriptor {fd} ({what}) is not open")]
    NotOpen { fd: RawFd, what: &'static str },
    #[error("cannot read the launch config: {0}")]
    Read(io::Error),
    #[error("the launch config is larger than {MAX_MESSAGE_SIZE} bytes")]
    TooLarge,
    #[error("malformed launch config: {0}")]
    Decode(#[from] WireError),
    #[error("the launch config is for a {found} worker, this is a {expected} worker")]
    WrongKind {
        expected: WorkerKind,
        found: WorkerKind,
    },
    #[error("descriptor {0} is named twice in the launch config")]
    SameDescriptor(RawFd),
    #[error("vhost_user_fd {0} is not a connected Unix stream socket")]
    NotAUnixStream(RawFd),
    #[error("descriptor {0} is named twice in the launch config")]
    DuplicateDescriptor(RawFd),
    #[error("descriptor {0} is not a listening stream socket")]
    NotListening(RawFd),
    #[error("descriptor {0} is not a non-blocking Unix SOCK_SEQPACKET socket")]
    NotEventsSocket(RawFd),
}

/// What a launched worker serves, and where.
#[derive(Debug)]
pub struct Launch {
    /// The VMM's name for the device ("rng0"), for logs.
    pub device_name: String,
    pub device: DeviceConfig,
    /// The connected vhost-user socket; the VMM is at the other end.
    pub connection: UnixStream,
    /// The device's own descriptors (a disk image and its backing files), in the order
    /// [`DeviceConfig::descriptors`] names them.
    pub files: Vec<File>,
}

/// Reads the launch config from descriptor `launch_fd` and takes the descriptors it names.
///
/// Call it once, at startup, before this process opens anything: the inherited descriptor
/// numbers must not belong to any other object of this process.
pub fn read_launch(launch_fd: RawFd, expected: WorkerKind) -> Result<Launch, LaunchError> {
    let file = File::from(take_inherited(launch_fd, "launch config")?);
    let launch: WorkerLaunch = decode(&read_all(&file)?)?;
    let found = launch.device.kind();
    if found != expected {
        return Err(LaunchError::WrongKind { expected, found });
    }
    let fd = launch.vhost_user_fd;
    if fd == launch_fd {
        return Err(LaunchError::SameDescriptor(fd));
    }
    let connection = UnixStream::from(take_inherited(fd, "vhost-user socket")?);
    if !is_unix_stream(&connection) || connection.peer_addr().is_err() {
        return Err(LaunchError::NotAUnixStream(fd));
    }
    // Each number once, and none of those already taken: two owners of one descriptor
    // would close it under each other.
    let mut taken = vec![launch_fd, fd];
    let mut files = Vec::new();
    for device_fd in launch.device.descriptors() {
        if taken.contains(&device_fd) {
            return Err(LaunchError::DuplicateDescriptor(device_fd));
        }
        taken.push(device_fd);
        files.push(File::from(take_inherited(device_fd, "device file")?));
    }
    Ok(Launch {
        device_name: launch.device_name,
        device: launch.device,
        connection,
        files,
    })
}

/// Takes ownership of an inherited descriptor and marks it close-on-exec.
fn take_inherited(fd: RawFd, what: &'static str) -> Result<OwnedFd, LaunchError> {
    if (0..=2).contains(&fd) {
        return Err(LaunchError::Stdio(fd));
    }
    // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's flags; an invalid
    // descriptor makes them fail with EBADF, which is checked.
    let open = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) >= 0
    };
    if !open {
        return Err(LaunchError::NotOpen { fd, what });
    }
    // SAFETY: the descriptor is open (checked above) and, per this module's contract, was
    // inherited from the VMM and is owned by nothing else in this process; it is taken once
    // (the caller refuses a second use of the same number).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_all(file: &File) -> Result<Vec<u8>, LaunchError> {
    // One byte more than the limit tells "exactly at the limit" from "too large".
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE + 1];
    let mut len = 0;
    while len < buf.len() {
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(LaunchError::Read(e)),
        }
    }
    if len > MAX_MESSAGE_SIZE {
        return Err(LaunchError::TooLarge);
    }
    buf.truncate(len);
    Ok(buf)
}

/// Checks that `file`, the inherited descriptor `fd`, is a listening stream socket (TCP
/// or Unix), e.g. the display worker's VNC listener, and hands it back as a socket.
pub fn listening_socket(file: File, fd: RawFd) -> Result<OwnedFd, LaunchError> {
    use std::os::fd::AsRawFd;
    let listening = socket_option(file.as_raw_fd(), libc::SO_ACCEPTCONN) == Some(1)
        && socket_option(file.as_raw_fd(), libc::SO_TYPE) == Some(libc::SOCK_STREAM);
    if !listening {
        return Err(LaunchError::NotListening(fd));
    }
    Ok(OwnedFd::from(file))
}

/// Checks that `file`, the inherited descriptor `fd`, is a non-blocking Unix
/// `SOCK_SEQPACKET` socket, as the display and input workers' events socket must be.
pub fn events_socket(file: File, fd: RawFd) -> Result<OwnedFd, LaunchError> {
    use std::os::fd::AsRawFd;
    let raw = file.as_raw_fd();
    // SAFETY: F_GETFL only reads the descriptor's status flags.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    let ok = socket_option(raw, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && socket_option(raw, libc::SO_TYPE) == Some(libc::SOCK_SEQPACKET)
        && flags >= 0
        && flags & libc::O_NONBLOCK != 0;
    if !ok {
        return Err(LaunchError::NotEventsSocket(fd));
    }
    Ok(OwnedFd::from(file))
}

fn socket_option(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for the kernel to write an int option into.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (ret == 0).then_some(value)
}

fn is_unix_stream(socket: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for the kernel to write an int option into.
        let ret = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (ret == 0).then_some(value)
    };
    option(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && option(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}
