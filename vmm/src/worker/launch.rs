//! Starting a `bulkhead-worker` process for a device.
//!
//! The worker inherits fd 3, a sealed memfd holding its bincode-encoded [`WorkerLaunch`],
//! fd 4, its end of a connected vhost-user socket pair, and the device's own files (a disk
//! image and its backing chain) at 5, 6, ... in the order the launch config names them.
//! Everything else the VMM has open is close-on-exec.

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
/// The first of the device's own descriptors; the rest follow.
pub const FIRST_DEVICE_FD: RawFd = 5;
/// Most device descriptors one worker gets (a disk image and a deep backing chain).
pub const MAX_DEVICE_FDS: usize = 32;
/// Where descriptors are parked before the fork, clear of every target number.
const PARKING_FD_MIN: RawFd = FIRST_DEVICE_FD + MAX_DEVICE_FDS as RawFd;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("encoding the launch configuration")]
    Encode(#[source] bulkhead_protocol::WireError),
    #[error("preparing the launch configuration memfd")]
    Memfd(#[source] std::io::Error),
    #[error("creating the vhost-user socket pair")]
    SocketPair(#[source] std::io::Error),
    #[error("the launch config names descriptors {named:?}, but {passed} files are passed at {FIRST_DEVICE_FD}..")]
    DeviceFds { named: Vec<RawFd>, passed: usize },
    #[error("duplicating a device file for the worker")]
    DeviceFile(#[source] std::io::Error),
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

/// The descriptor numbers `count` device files get in the worker: 5, 6, ...
pub fn device_fds(count: usize) -> Vec<RawFd> {
    (0..count.min(MAX_DEVICE_FDS))
        .map(|i| FIRST_DEVICE_FD + i as RawFd)
        .collect()
}

/// Starts `binary <kind> --launch-fd 3` with the launch memfd, a fresh socket pair and
/// `files` at 5, 6, ... (which the launch config must name exactly so). The caller keeps
/// `files` for replacements: each worker gets its own duplicates, sharing file offsets
/// and nothing else that matters to positioned I/O.
pub fn spawn_worker(
    binary: &Path,
    launch: &WorkerLaunch,
    files: &[File],
) -> Result<WorkerChild, LaunchError> {
    let mut launch = launch.clone();
    launch.vhost_user_fd = VHOST_USER_FD;
    let named = launch.device.descriptors();
    if files.len() > MAX_DEVICE_FDS || named != device_fds(files.len()) {
        return Err(LaunchError::DeviceFds {
            named,
            passed: files.len(),
        });
    }
    let config = park(&launch_memfd(&launch)?)?;
    let (ours, theirs) = UnixStream::pair().map_err(LaunchError::SocketPair)?;
    let theirs = park(&theirs)?;
    let parked_files = files
        .iter()
        .map(|file| {
            park(file).map_err(|e| match e {
                LaunchError::Memfd(io) => LaunchError::DeviceFile(io),
                other => other,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut moves = vec![
        (config.as_raw_fd(), LAUNCH_FD),
        (theirs.as_raw_fd(), VHOST_USER_FD),
    ];
    moves.extend(
        parked_files
            .iter()
            .zip(device_fds(files.len()))
            .map(|(parked, target)| (parked.as_raw_fd(), target)),
    );

    let mut command = Command::new(binary);
    command
        .arg(launch.device.kind().name())
        .arg("--launch-fd")
        .arg(LAUNCH_FD.to_string())
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (dup2, prctl) on descriptors that stay open until then; the
    // vector it walks was allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            for &(from, to) in &moves {
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
