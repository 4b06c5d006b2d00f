//! Watching device workers and replacing the ones that die.
//!
//! One thread waits on every worker's pidfd. When a worker exits, the supervisor logs
//! how (an exit status, a signal, a seccomp violation), waits a backoff, starts a new
//! worker, and hands it the running device: memory table, rings resumed at the guest's
//! used index, the same kick and interrupt eventfds (see
//! [`VirtioMmio::replace_device`]). The guest sees a short pause. After too many
//! crashes in a row the device is marked failed and the guest carries on without it.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_protocol::control::DeviceStatus;
use bulkhead_protocol::{AuditEvent, WorkerLaunch};
use bulkhead_seccomp::is_seccomp_violation;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;

use super::audit_log::AuditLog;
use super::launch::discard_worker;
use super::pidfd::PidFd;
use crate::devices::bus::lock;
use crate::memory::GuestMemory;
use crate::vhost_user::{start_backend, DeviceShape};
use crate::virtio::VirtioMmio;

/// How hard the supervisor tries before giving a device up.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Crashes in a row (without a stable period between them) before giving up.
    pub max_restarts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A worker that ran this long has recovered; its next crash counts from one again.
    pub stable_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            stable_after: Duration::from_secs(60),
        }
    }
}

impl RestartPolicy {
    fn backoff(&self, crashes: u32) -> Duration {
        let factor = 1u32 << crashes.saturating_sub(1).min(16);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RestartWorkerError {
    #[error("no device named {name:?} (devices: {known})")]
    NoSuchDevice { name: String, known: String },
    #[error("device {0} has failed; its worker is no longer restarted")]
    Failed(String),
    #[error("device {0}'s worker is being replaced already")]
    Busy(String),
    #[error("cannot kill device {name}'s worker: {errno}")]
    Kill {
        name: String,
        errno: nix::errno::Errno,
    },
}

struct BoardEntry {
    status: DeviceStatus,
    /// The worker's coming exit was asked for by an operator, not a crash.
    operator_restart: bool,
}

/// The devices and their workers as the control socket reports them; the supervisor
/// keeps it current, and operator restarts go through it.
#[derive(Default)]
pub struct DeviceBoard {
    entries: Mutex<Vec<BoardEntry>>,
}

impl DeviceBoard {
    pub fn snapshot(&self) -> Vec<DeviceStatus> {
        lock(&self.entries)
            .iter()
            .map(|e| e.status.clone())
            .collect()
    }

    fn update(&self, device: &str, change: impl FnOnce(&mut BoardEntry)) {
        if let Some(entry) = lock(&self.entries)
            .iter_mut()
            .find(|e| e.status.name == device)
        {
            change(entry);
        }
    }

    /// Kills `device`'s worker so that the supervisor replaces it as after a crash.
    pub fn restart_worker(&self, device: &str, audit: &AuditLog) -> Result<(), RestartWorkerError> {
        let mut entries = lock(&self.entries);
        let Some(entry) = entries.iter_mut().find(|e| e.status.name == device) else {
            let known: Vec<&str> = entries.iter().map(|e| e.status.name.as_str()).collect();
            return Err(RestartWorkerError::NoSuchDevice {
                name: device.to_owned(),
                known: if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                },
            });
        };
        if entry.status.failed {
            return Err(RestartWorkerError::Failed(device.to_owned()));
        }
        let Some(pid) = entry.status.worker_pid.filter(|_| !entry.operator_restart) else {
            return Err(RestartWorkerError::Busy(device.to_owned()));
        };
        audit.record(AuditEvent::OperatorRestart {
            device: device.to_owned(),
            pid,
        });
        entry.operator_restart = true;
        // The pid cannot have been reused: the supervisor clears `worker_pid` under this
        // lock before it reaps the worker, so while we hold the lock with the pid set,
        // the process is still (at least) our unreaped child.
        let target = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL).map_err(|errno| {
            entry.operator_restart = false;
            RestartWorkerError::Kill {
                name: device.to_owned(),
                errno,
            }
        })
    }
}

/// Runs once each time a device's worker has died, before its replacement starts: it may
/// replace the device's files (what the replacement inherits) and start what goes with
/// them. A failure is logged; the worker is replaced all the same.
pub type BeforeRestart = Box<dyn FnMut(&mut [File]) -> anyhow::Result<()> + Send>;

struct Supervised {
    launch: WorkerLaunch,
    before_restart: Option<BeforeRestart>,
    /// The device's own files (a disk image and its chain), kept for every replacement.
    files: Vec<File>,
    shape: DeviceShape,
    transport: Arc<Mutex<VirtioMmio>>,
    child: Child,
    pidfd: PidFd,
    started: Instant,
    /// Crashes since the device last ran stably.
    crashes: u32,
}

pub struct WorkerSupervisor {
    /// The `bulkhead-worker` binary replacements are started from.
    binary: PathBuf,
    devices: Vec<Supervised>,
    memory: GuestMemory,
    audit: Arc<AuditLog>,
    policy: RestartPolicy,
    board: Arc<DeviceBoard>,
}

impl WorkerSupervisor {
    pub fn new(
        binary: PathBuf,
        memory: GuestMemory,
        audit: Arc<AuditLog>,
        policy: RestartPolicy,
    ) -> Self {
        Self {
            binary,
            devices: Vec::new(),
            memory,
            audit,
            policy,
            board: Arc::default(),
        }
    }

    /// The live view of the supervised devices, for the control socket.
    pub fn board(&self) -> Arc<DeviceBoard> {
        self.board.clone()
    }

    pub fn audit(&self) -> Arc<AuditLog> {
        self.audit.clone()
    }

    /// Starts watching a device's first worker.
    pub fn watch(
        &mut self,
        launch: WorkerLaunch,
        files: Vec<File>,
        shape: DeviceShape,
        transport: Arc<Mutex<VirtioMmio>>,
        child: Child,
    ) -> std::io::Result<()> {
        let pidfd = PidFd::open(child.id())?;
        let kind = launch.device.kind();
        self.audit.record(AuditEvent::Spawn {
            device: launch.device_name.clone(),
            kind,
            pid: child.id(),
        });
        self.audit.record(AuditEvent::Policy {
            device: launch.device_name.clone(),
            kind,
            digest: bulkhead_seccomp::policy_for_device(&launch.device)
                .digest()
                .to_string(),
        });
        lock(&self.board.entries).push(BoardEntry {
            status: DeviceStatus {
                name: launch.device_name.clone(),
                kind,
                worker_pid: Some(child.id()),
                restarts: 0,
                failed: false,
            },
            operator_restart: false,
        });
        self.devices.push(Supervised {
            launch,
            before_restart: None,
            files,
            shape,
            transport,
            child,
            pidfd,
            started: Instant::now(),
            crashes: 0,
        });
        Ok(())
    }

    /// Sets what runs before each replacement of the worker of `device` (see
    /// [`BeforeRestart`]); a device not watched is ignored.
    pub fn before_restart(&mut self, device: &str, hook: BeforeRestart) {
        if let Some(d) = self
            .devices
            .iter_mut()
            .find(|d| d.launch.device_name == device)
        {
            d.before_restart = Some(hook);
        }
    }

    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        while !self.devices.is_empty() {
            let ready = match self.wait_for_exit() {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::error!("supervisor cannot wait for workers: {e}");
                    return;
                }
            };
            // Highest index first, so removing a failed device keeps the others' indices.
            for index in ready.into_iter().rev() {
                self.handle_exit(index);
            }
        }
    }

    /// Indices of the devices whose worker exited.
    fn wait_for_exit(&self) -> nix::Result<Vec<usize>> {
        let mut fds: Vec<PollFd> = self
            .devices
            .iter()
            .map(|d| PollFd::new(d.pidfd.as_fd(), PollFlags::POLLIN))
            .collect();
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(fds
            .iter()
            .enumerate()
            .filter(|(_, fd)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(index, _)| index)
            .collect())
    }

    fn record_death(&self, device: &Supervised, status: ExitStatus) {
        let name = device.launch.device_name.clone();
        let pid = device.child.id();
        let event = match (status.code(), status.signal()) {
            (Some(code), _) => AuditEvent::Exit {
                device: name,
                pid,
                status: code,
            },
            (None, signal) => AuditEvent::Crash {
                device: name,
                pid,
                signal: signal.unwrap_or(0),
                seccomp_violation: is_seccomp_violation(&status),
            },
        };
        self.audit.record(event);
    }

    fn handle_exit(&mut self, index: usize) {
        let name = self.devices[index].launch.device_name.clone();
        let mut operator = false;
        // Before reaping: see DeviceBoard::restart_worker.
        self.board.update(&name, |e| {
            e.status.worker_pid = None;
            operator = std::mem::take(&mut e.operator_restart);
        });
        let status = match self.devices[index].child.wait() {
            Ok(status) => status,
            Err(e) => {
                tracing::error!("cannot reap a worker: {e}");
                return;
            }
        };
        self.record_death(&self.devices[index], status);
        let policy = self.policy;
        let device = &mut self.devices[index];
        if let Some(hook) = device.before_restart.as_mut() {
            if let Err(e) = hook(&mut device.files) {
                tracing::warn!(device = %name, "before restarting the worker: {e:#}");
            }
        }
        if device.started.elapsed() >= policy.stable_after {
            device.crashes = 0;
        }
        // An operator's restart is no crash: no backoff, and it does not count towards
        // giving up, unless the replacement itself fails to start.
        if operator {
            match restart(&self.binary, device, &self.memory, &self.audit) {
                Ok(()) => {
                    self.restarted(index);
                    return;
                }
                Err(e) => tracing::warn!(
                    device = %name,
                    "restarting the worker failed: {e:#}"
                ),
            }
        }
        let device = &mut self.devices[index];
        loop {
            device.crashes += 1;
            if device.crashes > policy.max_restarts {
                let failed = self.devices.remove(index);
                lock(&failed.transport).mark_failed();
                self.board.update(&name, |e| e.status.failed = true);
                self.audit.record(AuditEvent::GiveUp {
                    device: failed.launch.device_name,
                    attempts: failed.crashes - 1,
                });
                return;
            }
            std::thread::sleep(policy.backoff(device.crashes));
            match restart(&self.binary, device, &self.memory, &self.audit) {
                Ok(()) => {
                    self.restarted(index);
                    return;
                }
                Err(e) => tracing::warn!(
                    device = %device.launch.device_name,
                    "restarting the worker failed: {e:#}"
                ),
            }
        }
    }
}

impl WorkerSupervisor {
    fn restarted(&self, index: usize) {
        let device = &self.devices[index];
        let pid = device.child.id();
        self.audit.record(AuditEvent::Restart {
            device: device.launch.device_name.clone(),
            attempt: device.crashes,
            pid,
        });
        self.board.update(&device.launch.device_name, |e| {
            e.status.worker_pid = Some(pid);
            e.status.restarts += 1;
        });
    }
}

/// Starts a replacement worker and gives it the device.
fn restart(
    binary: &Path,
    device: &mut Supervised,
    memory: &GuestMemory,
    audit: &Arc<AuditLog>,
) -> anyhow::Result<()> {
    let (mut child, backend) = start_backend(
        binary,
        &device.launch,
        &device.files,
        &device.shape,
        memory,
        audit,
    )?;
    // The pidfd first: once the device is handed over, the worker must be watched.
    let handed_over = PidFd::open(child.id())
        .map_err(anyhow::Error::from)
        .and_then(|pidfd| {
            lock(&device.transport).replace_device(Box::new(backend), memory)?;
            Ok(pidfd)
        });
    match handed_over {
        Ok(pidfd) => {
            device.child = child;
            device.pidfd = pidfd;
            device.started = Instant::now();
            Ok(())
        }
        Err(e) => {
            discard_worker(&mut child);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;
    use crate::virtio::{ActivateError, QueueConfig, VirtioDevice};
    use bulkhead_protocol::{DeviceConfig, RngConfig};
    use std::process::Command;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct NoDevice;

    impl VirtioDevice for NoDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _acked_features: u64,
            _queues: &[QueueConfig],
            _kicks: &[EventFd],
            _interrupt: &EventFd,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }

    /// A supervisor watching one device whose worker is `child`, with a fast restart
    /// policy and no worker binary to start replacements from.
    struct Watched {
        dir: std::path::PathBuf,
        audit: Arc<AuditLog>,
        supervisor: WorkerSupervisor,
        transport: Arc<Mutex<VirtioMmio>>,
    }

    impl Watched {
        fn new(device: DeviceConfig, test: &str, child: Child) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("bulkhead-supervisor-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let audit = Arc::new(AuditLog::open(&dir.join("audit.jsonl")).unwrap());
            let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let policy = RestartPolicy {
                max_restarts: 2,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(1),
                stable_after: Duration::from_secs(60),
            };
            let mut supervisor =
                WorkerSupervisor::new(dir.join("no-such-worker"), memory, audit.clone(), policy);
            let name = format!("{}0", device.kind());
            let transport = Arc::new(Mutex::new(VirtioMmio::new(
                name.clone(),
                Box::new(NoDevice),
                vec![EventFd::new(0).unwrap()],
                EventFd::new(0).unwrap(),
            )));
            let launch = WorkerLaunch {
                device_name: name,
                device,
                vhost_user_fd: 4,
            };
            let shape = DeviceShape {
                device_type: 4,
                queue_sizes: vec![16],
                config_size: 0,
            };
            supervisor
                .watch(launch, Vec::new(), shape, transport.clone(), child)
                .unwrap();
            Watched {
                dir,
                audit,
                supervisor,
                transport,
            }
        }
    }

    fn cow_disk() -> DeviceConfig {
        DeviceConfig::Blk(bulkhead_protocol::BlkConfig {
            image_fd: 5,
            backing: Vec::new(),
            format: None,
            read_only: false,
            copy_on_write: true,
            overlay_fd: Some(6),
            num_queues: 1,
            serial: String::new(),
        })
    }

    fn audit_events(dir: &Path) -> Vec<AuditEvent> {
        let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
        log.lines()
            .map(|l| {
                serde_json::from_str::<bulkhead_protocol::audit::AuditRecord>(l)
                    .unwrap()
                    .event
            })
            .collect()
    }

    /// Watches one device whose worker is `sh -c SCRIPT` until the supervisor gives it
    /// up; returns the audit events and whether the transport tells the driver the device
    /// needs a reset.
    fn supervise_until_given_up(device: DeviceConfig, script: &str) -> (Vec<AuditEvent>, bool) {
        let test = format!("given-up-{}", device.kind());
        let child = Command::new("sh").args(["-c", script]).spawn().unwrap();
        let Watched {
            dir,
            supervisor,
            transport,
            ..
        } = Watched::new(device, &test, child);
        // The thread ends once no device is left to watch.
        supervisor.spawn().unwrap().join().unwrap();

        let events = audit_events(&dir);
        let mut status = [0u8; 4];
        lock(&transport).read(0x70, &mut status);
        let _ = std::fs::remove_dir_all(&dir);
        let needs_reset =
            u32::from_le_bytes(status) & crate::virtio::status::DEVICE_NEEDS_RESET != 0;
        (events, needs_reset)
    }

    /// A worker that dies of SIGSYS, as one does when its seccomp filter catches it, and
    /// whose replacements cannot start: the supervisor must log a seccomp violation, try
    /// as often as its policy says, then give the device up and mark it failed.
    #[test]
    fn logs_a_seccomp_kill_and_gives_up_after_the_restart_limit() {
        let rng = DeviceConfig::Rng(RngConfig::default());
        let (events, needs_reset) = supervise_until_given_up(rng, "kill -SYS $$");
        assert!(matches!(events[0], AuditEvent::Spawn { .. }), "{events:?}");
        assert!(matches!(events[1], AuditEvent::Policy { .. }), "{events:?}");
        assert!(
            matches!(
                events[2],
                AuditEvent::Crash {
                    signal: libc::SIGSYS,
                    seccomp_violation: true,
                    ..
                }
            ),
            "{events:?}"
        );
        assert!(
            matches!(events[3], AuditEvent::GiveUp { attempts: 2, .. }),
            "{events:?}"
        );
        assert!(needs_reset);
    }

    /// A copy-on-write disk's changes live in the overlay store the supervisor keeps with
    /// the disk's files, not in its worker: the worker is replaced like any other, as often
    /// as the policy says (here no replacement can start, so the device is given up).
    #[test]
    fn a_cow_disk_s_worker_is_restarted_like_any_other() {
        let (events, needs_reset) = supervise_until_given_up(cow_disk(), "kill -KILL $$");
        assert!(
            matches!(
                events.as_slice(),
                [
                    AuditEvent::Spawn { .. },
                    AuditEvent::Policy { .. },
                    AuditEvent::Crash { signal: 9, .. },
                    AuditEvent::GiveUp { attempts: 2, .. },
                ]
            ),
            "{events:?}"
        );
        assert!(needs_reset);
    }

    /// The hook a device's planning set (the SDL viewer's new connection) runs once per
    /// death of its worker, however many tries the replacement takes, on the files the
    /// replacement inherits.
    #[test]
    fn before_restart_runs_once_per_death_on_the_devices_files() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let child = Command::new("sh")
            .args(["-c", "kill -KILL $$"])
            .spawn()
            .unwrap();
        let Watched {
            dir,
            mut supervisor,
            ..
        } = Watched::new(
            DeviceConfig::Rng(RngConfig::default()),
            "before-restart",
            child,
        );
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        supervisor.before_restart(
            "rng0",
            Box::new(move |files| {
                assert!(files.is_empty());
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        );
        supervisor.spawn().unwrap().join().unwrap();
        let events = audit_events(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(
            matches!(events.last(), Some(AuditEvent::GiveUp { attempts: 2, .. })),
            "{events:?}"
        );
    }

    /// An operator's restart-worker kills a copy-on-write disk's worker for the
    /// supervisor to replace, as for any other device.
    #[test]
    fn restart_worker_takes_a_cow_disk() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let Watched {
            dir,
            audit,
            supervisor,
            ..
        } = Watched::new(cow_disk(), "restart-cow", child);
        let board = supervisor.board();
        board.restart_worker("blk0", &audit).unwrap();
        supervisor.spawn().unwrap().join().unwrap();
        let events = audit_events(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            matches!(
                events.as_slice(),
                [
                    AuditEvent::Spawn { .. },
                    AuditEvent::Policy { .. },
                    AuditEvent::OperatorRestart { pid: p, .. },
                    AuditEvent::Crash { signal: 9, .. },
                    AuditEvent::GiveUp { .. },
                ] if *p == pid
            ),
            "{events:?}"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RestartPolicy::default();
        assert_eq!(policy.backoff(1), Duration::from_millis(50));
        assert_eq!(policy.backoff(2), Duration::from_millis(100));
        assert_eq!(policy.backoff(4), Duration::from_millis(400));
        assert_eq!(policy.backoff(40), Duration::from_secs(5));
    }
}
