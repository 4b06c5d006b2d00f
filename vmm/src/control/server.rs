//! The VMM side of the control socket: binding it (and cleaning up a stale one), and a
//! thread that answers requests without ever blocking the vCPUs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_protocol::control::{
    Answer, Command, Reply, Request, VmState, VmStatus, CONTROL_PROTOCOL_VERSION, MAX_REQUEST_LINE,
};
use thiserror::Error;

use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::lock;
use crate::exit::{ExitSignal, VmExit};
use crate::pause::VcpuGate;
use crate::worker::{AuditLog, DeviceBoard};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("a VM named {name:?} is already running (its control socket is {path})")]
    NameInUse { name: String, path: PathBuf },
    #[error("cannot create the control socket directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket directory {path} belongs to uid {owner}, not to this user")]
    DirOwner { path: PathBuf, owner: u32 },
    #[error("cannot create the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the control thread")]
    Thread(#[source] std::io::Error),
}

/// A bound control socket; the file is removed when this is dropped (or [`remove`]d).
///
/// [`remove`]: ControlSocket::remove
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket we created, so that we never remove a successor's.
    identity: (u64, u64),
}

impl ControlSocket {
    /// Binds `path` for the VM `name`: creates its directory (0700), replaces a stale
    /// socket left by a VMM that died, and refuses a name a live VMM is using.
    pub fn bind(name: &str, path: &Path) -> Result<Self, ControlError> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        prepare_dir(dir)?;
        let bind_error = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok() {
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ControlError::NameInUse {
                        name: name.to_owned(),
                        path: path.to_owned(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing a stale control socket");
                    std::fs::remove_file(path).map_err(bind_error)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(bind_error(e)),
            }
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            // Another VMM with this name won the race between our check and our bind.
            if e.kind() == std::io::ErrorKind::AddrInUse {
                ControlError::NameInUse {
                    name: name.to_owned(),
                    path: path.to_owned(),
                }
            } else {
                bind_error(e)
            }
        })?;
        let identity = match std::fs::symlink_metadata(path) {
            Ok(m) => (m.dev(), m.ino()),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(bind_error(e));
            }
        };
        // From here on, dropping `socket` removes the file.
        let socket = Self {
            listener,
            path: path.to_owned(),
            identity,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests on a thread of its own, one more thread per connection, so that
    /// a slow client never delays another or the VM.
    pub fn serve(&self, context: Arc<ControlContext>) -> Result<(), ControlError> {
        let listener = self.listener.try_clone().map_err(ControlError::Thread)?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let stream = match stream {
                        Ok(stream) => stream,
                        Err(e) => {
                            tracing::warn!("control socket accept failed: {e}");
                            continue;
                        }
                    };
                    let context = context.clone();
                    let spawned = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || serve_connection(stream, &context));
                    if let Err(e) = spawned {
                        tracing::warn!("cannot start a control connection thread: {e}");
                    }
                }
            })
            .map(|_| ())
            .map_err(ControlError::Thread)
    }

    /// Removes the socket file now (before `std::process::exit`, which skips drops).
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), "cannot remove the control socket: {e}");
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

fn prepare_dir(dir: &Path) -> Result<(), ControlError> {
    let dir_error = |source| ControlError::Dir {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(dir_error)?;
    // Not following a symlink: in a shared /tmp, another user could point one at a
    // directory of ours and have us chmod it.
    let metadata = std::fs::symlink_metadata(dir).map_err(dir_error)?;
    if !metadata.is_dir() {
        return Err(dir_error(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "it exists and is not a directory",
        )));
    }
    let me = super::euid();
    if metadata.uid() != me {
        return Err(ControlError::DirOwner {
            path: dir.to_owned(),
            owner: metadata.uid(),
        });
    }
    if metadata.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_error)?;
    }
    Ok(())
}

/// What the control thread needs from the VM.
pub struct ControlContext {
    pub name: String,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub started: Instant,
    pub exit: Arc<ExitSignal>,
    pub gate: Arc<VcpuGate>,
    pub board: Arc<DeviceBoard>,
    pub audit: Arc<AuditLog>,
    pub pm: Arc<Mutex<AcpiPm>>,
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred we own, and
    // the fd is a connected Unix socket borrowed for the duration of the call.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn serve_connection(stream: UnixStream, context: &ControlContext) {
    let (reply, after) = match authorize(&stream).and_then(|()| read_request(&stream)) {
        Ok(request) => {
            tracing::debug!(?request, "control request");
            handle(request, context)
        }
        Err(message) => (Reply::error(message), None),
    };
    let mut line = serde_json::to_string(&reply).unwrap_or_else(|e| {
        // Plain strings always encode, so the client still gets an `error` reply.
        let message = serde_json::Value::from(format!("cannot encode the reply: {e}"));
        format!(r#"{{"version":{CONTROL_PROTOCOL_VERSION},"error":{message}}}"#)
    });
    line.push('\n');
    let mut stream = stream;
    if let Err(e) = stream.write_all(line.as_bytes()) {
        tracing::debug!("control client went away before its reply: {e}");
    }
    drop(stream);
    // `kill` ends the VM only now, so that the client reads that it worked instead of
    // seeing the connection drop.
    if let Some(exit) = after {
        context.exit.request(exit);
    }
}

fn authorize(stream: &UnixStream) -> Result<(), String> {
    let uid =
        peer_uid(stream).map_err(|e| format!("cannot check the client's credentials: {e}"))?;
    let me = super::euid();
    if uid == me || uid == 0 {
        Ok(())
    } else {
        tracing::warn!(uid, "refused a control client of another user");
        Err(format!(
            "permission denied: this VM belongs to uid {me}, the client runs as uid {uid}"
        ))
    }
}

fn read_request(stream: &UnixStream) -> Result<Request, String> {
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| format!("control socket: {e}"))?;
    let mut reader = BufReader::new(stream.take(MAX_REQUEST_LINE as u64 + 1));
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading the request: {e}"))?;
    if line.len() > MAX_REQUEST_LINE {
        return Err(format!(
            "malformed request: longer than {MAX_REQUEST_LINE} bytes"
        ));
    }
    let value: serde_json::Value =
        serde_json::from_slice(&line).map_err(|e| format!("malformed request: {e}"))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(CONTROL_PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(format!(
            "unsupported protocol version {v}: this VMM speaks version {CONTROL_PROTOCOL_VERSION}"
        ))
        }
        None => return Err("malformed request: no \"version\" number".into()),
    }
    serde_json::from_value(value).map_err(|e| format!("malformed request: {e}"))
}

/// Carries out a request; the second value is how the VM ends once the reply is sent.
fn handle(request: Request, context: &ControlContext) -> (Reply, Option<VmExit>) {
    let ending = || Reply::error("the VM is shutting down");
    let reply = match request.command {
        Command::Status => Reply::ok(Answer::Status(status(context))),
        Command::Pause => match context.gate.pause(&context.exit) {
            Ok(()) => Reply::ok(Answer::Done),
            Err(_) => ending(),
        },
        Command::Resume => {
            context.gate.resume();
            Reply::ok(Answer::Done)
        }
        Command::Debug => match context.gate.registers(&context.exit) {
            Ok(vcpus) => Reply::ok(Answer::Registers { vcpus }),
            Err(_) => ending(),
        },
        Command::Kill => return (Reply::ok(Answer::Done), Some(VmExit::Killed)),
        Command::Stop { timeout_secs } => match stop(context, timeout_secs) {
            Ok(()) => Reply::ok(Answer::Done),
            Err(e) => Reply::error(format!("cannot start the stop timer: {e}")),
        },
        Command::RestartWorker { device } => {
            match context.board.restart_worker(&device, &context.audit) {
                Ok(()) => Reply::ok(Answer::Done),
                Err(e) => Reply::error(e.to_string()),
            }
        }
    };
    (reply, None)
}

/// Presses the power button, and ends the VM if the guest has not powered off within
/// `timeout_secs`.
fn stop(context: &ControlContext, timeout_secs: u64) -> std::io::Result<()> {
    let exit = context.exit.clone();
    let timeout = Duration::from_secs(timeout_secs);
    std::thread::Builder::new()
        .name("stop-timer".into())
        .spawn(move || {
            if exit.wait_timeout(timeout).is_none() {
                tracing::warn!(timeout_secs, "guest ignored the power button; stopping it");
                exit.request(VmExit::StopTimedOut { timeout_secs });
            }
        })?;
    // A paused guest cannot see the button.
    context.gate.resume();
    lock(&context.pm).press_power_button();
    Ok(())
}

fn status(context: &ControlContext) -> VmStatus {
    VmStatus {
        name: context.name.clone(),
        pid: std::process::id(),
        cpus: context.cpus,
        memory_bytes: context.memory_bytes,
        uptime_ms: context.started.elapsed().as_millis() as u64,
        state: if context.gate.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        },
        devices: context.board.snapshot(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bulkhead-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn binds_replaces_stale_refuses_live_and_cleans_up() {
        let dir = scratch("bind");
        let path = dir.join("run/vm.sock");
        let first = ControlSocket::bind("vm", &path).unwrap();
        let mode = std::fs::metadata(dir.join("run")).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(matches!(
            ControlSocket::bind("vm", &path),
            Err(ControlError::NameInUse { .. })
        ));
        drop(first);
        assert!(!path.exists(), "dropping the socket removes it");

        // A socket nobody listens on, as a killed VMM leaves it.
        drop(UnixListener::bind(&path).unwrap());
        let second = ControlSocket::bind("vm", &path).unwrap();
        // A successor's socket at the same path is not ours to remove.
        std::fs::remove_file(&path).unwrap();
        let successor = UnixListener::bind(&path).unwrap();
        drop(second);
        assert!(path.exists());
        drop(successor);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_a_symlinked_directory() {
        let dir = scratch("symlink");
        std::fs::create_dir(dir.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("run")).unwrap();
        let err = ControlSocket::bind("vm", &dir.join("run/vm.sock"))
            .err()
            .expect("a symlinked directory must be refused");
        assert!(matches!(err, ControlError::Dir { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
