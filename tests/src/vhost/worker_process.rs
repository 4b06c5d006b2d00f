//! A `bulkhead-worker` process under test: spawned standalone on a socket or launched the
//! way the VMM launches it (launch memfd + socketpair), its stderr captured, and killed by
//! a watchdog if a test overruns - so that a hung worker fails a test instead of hanging it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bulkhead_protocol::{encode, DeviceConfig, WorkerLaunch};
use thiserror::Error;

use crate::micro::ScratchDir;

/// Longest a worker may live in a test before the watchdog kills it.
pub const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a standalone worker gets to start listening.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptor numbers a launched worker finds its launch memfd and socket at.
const LAUNCH_FD: RawFd = 3;
const VHOST_USER_FD: RawFd = 4;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("could not start {binary}: {source}")]
    Spawn { binary: String, source: io::Error },
    #[error("setting up the worker's files: {0}")]
    Setup(io::Error),
    #[error("encoding the launch config: {0}")]
    Encode(#[from] bulkhead_protocol::WireError),
    #[error("the worker did not accept connections within {timeout:?}: {last_error}\n--- worker stderr ---\n{stderr}")]
    NotListening {
        timeout: Duration,
        last_error: io::Error,
        stderr: String,
    },
    #[error("the worker was still running after {0:?}")]
    StillRunning(Duration),
    #[error("waiting for the worker: {0}")]
    Wait(io::Error),
}

/// Path of the `bulkhead-worker` binary under test: `BULKHEAD_WORKER_BIN` when set,
/// otherwise the one cargo built next to the test executable (`target/<profile>/`).
pub fn worker_bin() -> PathBuf {
    crate::built_binary("bulkhead-worker", "BULKHEAD_WORKER_BIN")
}

/// A running worker. Dropping it kills it.
pub struct WorkerProcess {
    child: Arc<Mutex<Child>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    socket: Option<PathBuf>,
    /// Holds the socket's directory until the worker is gone.
    _scratch: Option<ScratchDir>,
}

impl WorkerProcess {
    /// `bulkhead-worker <kind> --socket <path> <args>`, once it accepts connections.
    pub fn standalone(kind: &str, args: &[&str]) -> Result<Self, WorkerError> {
        let scratch = ScratchDir::new("worker").map_err(WorkerError::Setup)?;
        let socket = scratch.path().join(format!("{kind}.sock"));
        let mut command = Command::new(worker_bin());
        command.arg(kind).arg("--socket").arg(&socket).args(args);
        let mut worker = Self::spawn(command)?;
        worker.socket = Some(socket);
        worker._scratch = Some(scratch);
        worker.wait_until_listening()?;
        Ok(worker)
    }

    /// `bulkhead-worker <args>`, where `args` make it listen on `socket` in their own way
    /// (`p9 --listen unix:PATH`), once it accepts connections.
    pub fn listening(args: &[&OsStr], socket: PathBuf) -> Result<Self, WorkerError> {
        let mut command = Command::new(worker_bin());
        command.args(args);
        Self::listening_command(command, socket)
    }

    /// Like [`WorkerProcess::listening`] for a command the caller prepared (to run it as
    /// another user, say).
    pub fn listening_command(command: Command, socket: PathBuf) -> Result<Self, WorkerError> {
        let mut worker = Self::spawn(command)?;
        worker.socket = Some(socket);
        worker.wait_until_listening()?;
        Ok(worker)
    }

    /// `bulkhead-worker <kind> --launch-fd 3`, as the VMM starts it: descriptor 3 is a
    /// sealed memfd holding the launch config, descriptor 4 the worker's end of a
    /// socketpair. Returns the worker and the frontend's end.
    pub fn launched(
        device_name: &str,
        device: DeviceConfig,
    ) -> Result<(Self, UnixStream), WorkerError> {
        Self::launched_with(device_name, device, &[], &[])
    }

    /// Like [`WorkerProcess::launched`], with more descriptors the config names: each
    /// `(fd, number)` is inherited as `number` (above 4), e.g. the display worker's VNC
    /// listening socket.
    pub fn launched_with_fds(
        device_name: &str,
        device: DeviceConfig,
        extra: &[(RawFd, RawFd)],
    ) -> Result<(Self, UnixStream), WorkerError> {
        Self::launched_with(device_name, device, extra, &[])
    }

    /// [`launched`](Self::launched) with the device's own files: `files[i]` is inherited at
    /// the descriptor number `device.descriptors()[i]` names, as the VMM passes a disk
    /// image and its backing chain.
    pub fn launched_with_files(
        device_name: &str,
        device: DeviceConfig,
        files: &[&File],
    ) -> Result<(Self, UnixStream), WorkerError> {
        let inherit: Vec<(RawFd, RawFd)> = files
            .iter()
            .map(|file| file.as_raw_fd())
            .zip(device.descriptors())
            .collect();
        Self::launched_with(device_name, device, &inherit, &[])
    }

    /// [`launched`](Self::launched), also passing each `(descriptor, number)` of
    /// `inherit` as that number (the p9 worker's shared directory, say), and environment
    /// variables for the worker (`BULKHEAD_LOG`).
    pub fn launched_with(
        device_name: &str,
        device: DeviceConfig,
        inherit: &[(RawFd, RawFd)],
        env: &[(&str, &str)],
    ) -> Result<(Self, UnixStream), WorkerError> {
        let launch = WorkerLaunch {
            device_name: device_name.to_owned(),
            device: device.clone(),
            vhost_user_fd: VHOST_USER_FD,
        };
        let memfd = sealed_memfd(&encode(&launch)?).map_err(WorkerError::Setup)?;
        let (frontend_end, worker_end) = UnixStream::pair().map_err(WorkerError::Setup)?;
        // Copies above the target numbers, so the dup2s in the child cannot clobber them.
        let launch_src = dup_above(memfd.as_raw_fd(), 10).map_err(WorkerError::Setup)?;
        let socket_src = dup_above(worker_end.as_raw_fd(), 10).map_err(WorkerError::Setup)?;
        let extra_src = inherit
            .iter()
            .map(|&(fd, target)| Ok((dup_above(fd, 10)?, target)))
            .collect::<io::Result<Vec<_>>>()
            .map_err(WorkerError::Setup)?;
        let mut pairs = vec![
            (launch_src.as_raw_fd(), LAUNCH_FD),
            (socket_src.as_raw_fd(), VHOST_USER_FD),
        ];
        pairs.extend(
            extra_src
                .iter()
                .map(|(fd, target)| (fd.as_raw_fd(), *target)),
        );

        let mut command = Command::new(worker_bin());
        command
            .arg(device.kind().name())
            .arg("--launch-fd")
            .arg(LAUNCH_FD.to_string());
        command.envs(env.iter().copied());
        // SAFETY: the closure runs in the child between fork and exec and only calls dup2,
        // which is async-signal-safe; dup2 also clears close-on-exec on the new numbers, so
        // exactly these descriptors are inherited.
        unsafe {
            command.pre_exec(move || {
                for &(source, target) in &pairs {
                    if libc::dup2(source, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let worker = Self::spawn(command)?;
        // The parent's copies go now: only the worker holds its end of the socketpair, so
        // the frontend sees EOF when the worker dies.
        drop((launch_src, socket_src, worker_end, memfd, extra_src));
        Ok((worker, frontend_end))
    }

    fn spawn(mut command: Command) -> Result<Self, WorkerError> {
        let binary = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| WorkerError::Spawn { binary, source })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_reader = child.stderr.take().map(|mut pipe| {
            let sink = stderr.clone();
            thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend_from_slice(&chunk[..n]);
                }
            })
        });
        let child = Arc::new(Mutex::new(child));
        let watchdog = start_watchdog(child.clone(), WATCHDOG_TIMEOUT);
        Ok(WorkerProcess {
            child,
            stderr,
            stderr_reader,
            watchdog: Some(watchdog),
            socket: None,
            _scratch: None,
        })
    }

    /// The standalone worker's socket.
    pub fn socket_path(&self) -> &Path {
        self.socket
            .as_deref()
            .expect("only a standalone worker has a socket path")
    }

    /// A new connection to the standalone worker.
    pub fn connect(&self) -> io::Result<UnixStream> {
        UnixStream::connect(self.socket_path())
    }

    fn wait_until_listening(&mut self) -> Result<(), WorkerError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            // A probe connection: the worker serves it, sees it close, and serves the next.
            let last_error = match self.connect() {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline || !self.is_running() {
                return Err(WorkerError::NotListening {
                    timeout: STARTUP_TIMEOUT,
                    last_error,
                    stderr: self.stderr(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.lock_child().id()
    }

    /// True while the worker has not exited.
    pub fn is_running(&self) -> bool {
        matches!(self.lock_child().try_wait(), Ok(None))
    }

    /// Everything the worker wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    /// Waits at most `timeout` for the worker to exit by itself.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus, WorkerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.lock_child().try_wait().map_err(WorkerError::Wait)? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(WorkerError::StillRunning(timeout));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the worker (if still running) and reaps it.
    pub fn kill(&self) -> Result<ExitStatus, WorkerError> {
        let mut child = self.lock_child();
        // Fails only when the child is already reaped, which is fine.
        let _ = child.kill();
        child.wait().map_err(WorkerError::Wait)
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some((stop, watchdog)) = self.watchdog.take() {
            drop(stop);
            let _ = watchdog.join();
        }
        let _ = self.kill();
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
    }
}

/// Kills `child` unless told to stop (by dropping the sender) within `timeout`. Killing goes
/// through `Child`, which never signals a child it has already reaped.
fn start_watchdog(
    child: Arc<Mutex<Child>>,
    timeout: Duration,
) -> (mpsc::Sender<()>, JoinHandle<()>) {
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(timeout) {
            eprintln!("watchdog: bulkhead-worker still running after {timeout:?}, killing it");
            let _ = child.lock().unwrap_or_else(PoisonError::into_inner).kill();
        }
    });
    (stop, handle)
}

/// A memfd holding `bytes`, sealed against any change.
fn sealed_memfd(bytes: &[u8]) -> io::Result<OwnedFd> {
    use std::io::Write;
    // SAFETY: a valid NUL-terminated name; the result is checked before use.
    let fd = unsafe {
        libc::memfd_create(
            c"bulkhead-worker-launch".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS on a memfd we own; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// A close-on-exec copy of `fd` numbered `min` or above.
fn dup_above(fd: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor; the result is checked.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` is a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}
