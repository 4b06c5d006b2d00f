//! A device worker that turns rogue, for `tests/tests/worker_sandbox.rs`.
//!
//! It starts exactly as `bulkhead-worker rng --launch-fd N` does: reads its launch
//! config, enters the real rng sandbox, and serves the real rng device over the VMM's
//! socket. Shortly after, a second thread attempts what `BULKHEAD_ROGUE_ACTION` names -
//! `open` (a host file), `exec` (a program) or `socket` (the network) - as a worker
//! subverted by a hostile guest would. The sandbox must kill it for that, and the VMM's
//! supervisor must report a seccomp violation.
//!
//! The delay is a futex wait (`park_timeout`), because that is a system call the rng
//! policy allows: the worker must die for its action, not for how it waited.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Duration;

use bulkhead_protocol::{DeviceConfig, WorkerKind};
use bulkhead_workers::launch::read_launch;
use bulkhead_workers::rng::RngDevice;
use bulkhead_workers::sandbox::enter_sandbox;
use bulkhead_workers::vhost_user::serve_connection;

/// Long enough for the VMM's vhost-user handshake to complete first.
const DELAY: Duration = Duration::from_millis(200);

fn misbehave(action: &str) {
    match action {
        "open" => {
            let _ = std::fs::File::open("/etc/passwd");
        }
        "exec" => {
            let Ok(path) = CString::new("/bin/true") else {
                return;
            };
            let argv = [path.as_ptr(), std::ptr::null()];
            // SAFETY: `path` is NUL-terminated and outlives the call; argv ends with NULL.
            unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
        }
        "socket" => {
            // SAFETY: socket takes no pointers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
        other => eprintln!("rogue-worker: unknown BULKHEAD_ROGUE_ACTION {other:?}"),
    }
}

fn main() -> ExitCode {
    // argv: rng --launch-fd N, as the VMM starts every worker.
    let args: Vec<String> = std::env::args().collect();
    let Some(fd) = args.get(3).and_then(|n| n.parse().ok()) else {
        eprintln!("usage: rogue-worker rng --launch-fd N");
        return ExitCode::from(2);
    };
    // Read before the sandbox, which would refuse getenv's nothing but keeps it honest.
    let action = std::env::var("BULKHEAD_ROGUE_ACTION").unwrap_or_default();
    let launch = match read_launch(fd, WorkerKind::Rng) {
        Ok(launch) => launch,
        Err(e) => {
            eprintln!("rogue-worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    // read_launch checked the kind.
    let DeviceConfig::Rng(config) = launch.device else {
        eprintln!("rogue-worker: not an rng launch config");
        return ExitCode::FAILURE;
    };
    let keep = [(launch.connection.as_raw_fd(), "vhost-user socket")];
    if let Err(e) = enter_sandbox(WorkerKind::Rng, &keep) {
        eprintln!("rogue-worker: {e}");
        return ExitCode::FAILURE;
    }
    std::thread::spawn(move || {
        std::thread::park_timeout(DELAY);
        misbehave(&action);
    });
    let device = match RngDevice::new(&config) {
        Ok(device) => device.into_backend(),
        Err(e) => {
            eprintln!("rogue-worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serve_connection(launch.connection, device) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rogue-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
