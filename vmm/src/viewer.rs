//! `--display sdl`: the `bulkhead-viewer` process that shows the guest's screen in an SDL
//! window. It is an RFB client like any VNC viewer, handed the one connection queued on
//! the display worker's private listener, so the worker's sandbox is the same as for
//! `vnc`. It is not a device worker: closing its window leaves the VM running, and its
//! exit is only logged. Its connection dies with the display worker, though: the
//! supervisor then starts a new viewer on a new private connection for the replacement
//! (`vm.rs`, `display::reopen_sdl_listener`), so the window blinks and comes back.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

/// Where the viewer finds its connection (`--fd 3`).
pub const VIEWER_FD: RawFd = 3;
/// Where the connection waits before the fork, clear of the target number.
const PARKING_FD_MIN: RawFd = 10;

#[derive(Debug, Error)]
pub enum ViewerError {
    #[error("duplicating the viewer's connection")]
    Duplicate(#[source] std::io::Error),
    #[error("starting the SDL viewer {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `bulkhead-viewer` next to the running `bulkhead`, unless `BULKHEAD_VIEWER` names one.
pub fn viewer_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BULKHEAD_VIEWER") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .map(|exe| exe.with_file_name("bulkhead-viewer"))
        .unwrap_or_else(|_| PathBuf::from("bulkhead-viewer"))
}

/// `binary --fd 3 --title TITLE` with `connection` at descriptor 3; the caller may add
/// arguments and environment before spawning it.
pub fn viewer_command(
    binary: &Path,
    connection: &UnixStream,
    title: &str,
) -> Result<Command, ViewerError> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own, or -1.
    let parked = unsafe {
        libc::fcntl(
            connection.as_raw_fd(),
            libc::F_DUPFD_CLOEXEC,
            PARKING_FD_MIN,
        )
    };
    if parked < 0 {
        return Err(ViewerError::Duplicate(std::io::Error::last_os_error()));
    }
    // SAFETY: `parked` is a fresh descriptor nobody else owns.
    let parked = unsafe { OwnedFd::from_raw_fd(parked) };
    let mut command = Command::new(binary);
    command
        .arg("--fd")
        .arg(VIEWER_FD.to_string())
        .arg("--title")
        .arg(title)
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (dup2, prctl) on a descriptor the closure itself keeps open.
    unsafe {
        command.pre_exec(move || {
            // dup2 clears close-on-exec on the new descriptor.
            if libc::dup2(parked.as_raw_fd(), VIEWER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The window goes with the VMM even before the worker's end reaches it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// Starts the viewer on `connection` and logs its exit from a thread of its own.
pub fn start_viewer(connection: UnixStream, title: &str) -> Result<(), ViewerError> {
    let binary = viewer_binary();
    let mut child = viewer_command(&binary, &connection, title)?
        .spawn()
        .map_err(|source| ViewerError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    drop(connection);
    let pid = child.id();
    tracing::info!(pid, binary = %binary.display(), "SDL viewer started");
    let watcher = std::thread::Builder::new()
        .name("sdl-viewer".into())
        .spawn(move || match child.wait() {
            Ok(status) if status.success() => tracing::info!(pid, "SDL viewer closed"),
            Ok(status) => tracing::warn!(pid, %status, "SDL viewer ended"),
            Err(e) => tracing::warn!(pid, "waiting for the SDL viewer: {e}"),
        });
    if let Err(e) = watcher {
        // Only the log line is lost; the viewer runs on and is reaped when the VMM ends.
        tracing::warn!(pid, "cannot watch the SDL viewer: {e}");
    }
    Ok(())
}
