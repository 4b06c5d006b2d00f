//! How long the VMM waits on a worker. Its vhost-user calls block until the backend
//! answers (the vhost crate retries a read that timed out, so a socket timeout does not
//! help), and they are made by vCPU threads (config space, activation, reset) and by the
//! supervisor with the device's transport locked: a worker that hangs, whether by a bug or
//! because it was taken over, would hang them with it. The watchdog kills a worker that
//! has not answered within its limit, through its pidfd; the call in progress then fails
//! on the closed socket and the supervisor replaces the worker as after a crash.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::worker::pidfd::PidFd;

/// How long a worker has to answer one operation: a handshake, a config access, an
/// activation or a reset. Generous, as a worker may be slow to start under load (the
/// nested lab), but a vCPU blocked this long is still a guest that recovers.
pub const REPLY_LIMIT: Duration = Duration::from_secs(20);

/// Told which call went unanswered, just before the worker is killed.
pub type OnKill = Box<dyn Fn(&'static str) + Send>;

pub struct ReplyWatchdog {
    shared: Arc<Shared>,
    limit: Duration,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// The operation in progress and when its time is up.
    armed: Option<(&'static str, Instant)>,
    closing: bool,
}

/// An operation the watchdog times; it is done when this is dropped.
#[must_use]
pub struct Armed(Arc<Shared>);

impl Drop for Armed {
    fn drop(&mut self) {
        lock(&self.0.state).armed = None;
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ReplyWatchdog {
    /// Watches `worker`, the backend of `device`, giving it `limit` per operation.
    pub fn new(
        device: String,
        worker: PidFd,
        limit: Duration,
        on_kill: OnKill,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("reply-watchdog".into())
                .spawn(move || watch(&shared, &device, &worker, limit, on_kill))?
        };
        Ok(Self {
            shared,
            limit,
            thread: Some(thread),
        })
    }

    /// Starts timing operation `what` (named in the log if the worker is killed).
    pub fn arm(&self, what: &'static str) -> Armed {
        lock(&self.shared.state).armed = Some((what, Instant::now() + self.limit));
        self.shared.wake.notify_one();
        Armed(self.shared.clone())
    }
}

impl Drop for ReplyWatchdog {
    fn drop(&mut self) {
        lock(&self.shared.state).closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch(shared: &Shared, device: &str, worker: &PidFd, limit: Duration, on_kill: OnKill) {
    let mut state = lock(&shared.state);
    loop {
        if state.closing {
            return;
        }
        state = match state.armed {
            None => shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
            Some((what, deadline)) => {
                let now = Instant::now();
                if now < deadline {
                    shared
                        .wake
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                } else {
                    // Once: the operation fails on its own when the worker is gone.
                    state.armed = None;
                    tracing::error!(
                        %device,
                        "the worker has not answered {what} within {limit:?}: killing it so that it is replaced"
                    );
                    on_kill(what);
                    if let Err(e) = worker.kill() {
                        tracing::warn!(%device, "cannot kill the unresponsive worker: {e}");
                    }
                    state
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command};

    fn sleeper() -> (Child, PidFd) {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        (child, pidfd)
    }

    #[test]
    fn a_worker_past_its_limit_is_killed() {
        let (mut child, pidfd) = sleeper();
        let limit = Duration::from_millis(100);
        let (told, heard) = std::sync::mpsc::channel();
        let on_kill = Box::new(move |call: &'static str| told.send(call).unwrap());
        let watchdog = ReplyWatchdog::new("rng0".into(), pidfd, limit, on_kill).unwrap();
        let started = Instant::now();
        let _armed = watchdog.arm("GET_CONFIG");
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(heard.try_recv(), Ok("GET_CONFIG"));
        assert!(heard.try_recv().is_err(), "killed twice");
    }

    #[test]
    fn a_worker_that_answers_in_time_is_left_alone() {
        let (mut child, pidfd) = sleeper();
        let limit = Duration::from_millis(200);
        let on_kill = Box::new(|call| panic!("killed at {call}"));
        let watchdog = ReplyWatchdog::new("rng0".into(), pidfd, limit, on_kill).unwrap();
        for _ in 0..3 {
            let _armed = watchdog.arm("SET_FEATURES");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(400));
        assert!(child.try_wait().unwrap().is_none(), "killed while idle");
        drop(watchdog);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
