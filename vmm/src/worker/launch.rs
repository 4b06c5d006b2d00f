//! Starting a `bulkhead-worker` process for a device.
//!
//! The worker inherits exactly two descriptors: fd 3, a sealed memfd holding its
//! bincode-encoded [`WorkerLaunch`], and fd 4, its end of a connected vhost-user socket
//! pair. Everything else the VMM has open is close-on-exec.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bulkhead_protocol::{encode, WorkerLaunch};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use thiserror::Error;

/// Descriptor numbers in the worker, fixed by the launch contract.
pub const LAUNCH_FD: RawFd = 3;
pub const VHOST_USER_FD: RawFd = 4;
/// Where descriptors are parked before the fork, clear of 3 and 4.
const PARKING_FD_MIN: RawFd = 10;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("encoding the launch configuration")]
    Encode(#[source] bulkhead_protocol::WireError),
    #[error("preparing the launch configuration memfd")]
    Memfd(#[source] std::io::Error),
    #[error("creating the vhost-user socket pair")]
    SocketPair(#[source] std::io::Error),
    #[error("starting worker {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A started worker and the VMM's end of its vhost-user socket.
pub struct WorkerChild {
    pub child: Child,
    pub socket: UnixStream,
}

/// `bulkhead-worker` next to the running `bulkhead`, unless `BULKHEAD_WORKER` names one.
pub fn worker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BULKHEAD_WORKER") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .map(|exe| exe.with_file_name("bulkhead-worker"))
        .unwrap_or_else(|_| PathBuf::from("bulkhead-worker"))
}

fn launch_memfd(launch: &WorkerLaunch) -> Result<File, LaunchError> {
    let bytes = encode(launch).map_err(LaunchError::Encode)?;
    let fd = memfd_create(
        c"bulkhead-worker-launch",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| LaunchError::Memfd(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(&bytes).map_err(LaunchError::Memfd)?;
    file.seek(SeekFrom::Start(0)).map_err(LaunchError::Memfd)?;
    // Sealed, the worker can trust that nobody changes its configuration under it.
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_SEAL;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| LaunchError::Memfd(e.into()))?;
    Ok(file)
}

fn park(fd: &impl AsRawFd) -> Result<OwnedFd, LaunchError> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own, or -1.
    let parked = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, PARKING_FD_MIN) };
    if parked < 0 {
        return Err(LaunchError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `parked` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(parked) })
}

/// Kills and reaps a worker that never got its device (or could not be handed it), so
/// that no half-started process is left behind.
pub fn discard_worker(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `binary <kind> --launch-fd 3` with the launch memfd and a fresh socket pair.
pub fn spawn_worker(binary: &Path, launch: &WorkerLaunch) -> Result<WorkerChild, LaunchError> {
    let mut launch = launch.clone();
    launch.vhost_user_fd = VHOST_USER_FD;
    let config = park(&launch_memfd(&launch)?)?;
    let (ours, theirs) = UnixStream::pair().map_err(LaunchError::SocketPair)?;
    let theirs = park(&theirs)?;
    let (config_fd, socket_fd) = (config.as_raw_fd(), theirs.as_raw_fd());

    let mut command = Command::new(binary);
    command
        .arg(launch.device.kind().name())
        .arg("--launch-fd")
        .arg(LAUNCH_FD.to_string())
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (dup2, prctl) on descriptors that stay open until then.
    unsafe {
        command.pre_exec(move || {
            for (from, to) in [(config_fd, LAUNCH_FD), (socket_fd, VHOST_USER_FD)] {
                // dup2 clears close-on-exec on the new descriptor.
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // A worker must not outlive its VMM.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| LaunchError::Spawn {
        binary: binary.to_owned(),
        source,
    })?;
    Ok(WorkerChild {
        child,
        socket: ours,
    })
}
