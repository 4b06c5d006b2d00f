//! How a VM ends. Devices and vCPU threads report the reason; the first report wins and
//! the main thread, which waits for it, turns it into bulkhead's exit status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off through ACPI (PM1 control, `\_S5`).
    PowerOff,
    /// The guest reset the machine (i8042 command 0xfe, or the 0xcf9 reset register).
    /// Like kvmtool, bulkhead ends the VM instead of rebooting it.
    Reset,
    /// The user asked to quit from the console (Ctrl-A x).
    ConsoleQuit,
    /// An operator ended the VM (`bulkhead kill`).
    Killed,
    /// `bulkhead stop` pressed the power button and the guest did not power off in time.
    StopTimedOut { timeout_secs: u64 },
    /// bulkhead received SIGTERM, SIGINT or SIGHUP.
    Signal { signal: i32 },
    /// A vCPU hit a triple fault (KVM_EXIT_SHUTDOWN): the guest crashed. `state` is that
    /// vCPU's registers as KVM left them, for whoever debugs the guest.
    TripleFault { cpu: u8, state: String },
    /// KVM could not enter or run the guest.
    KvmError { cpu: u8, detail: String },
    /// The VMM itself failed (a bug): reported rather than left hanging.
    Internal { detail: String },
}

impl VmExit {
    /// bulkhead's process exit status for this ending.
    pub fn status(&self) -> i32 {
        match self {
            Self::PowerOff | Self::Reset | Self::ConsoleQuit | Self::Killed => 0,
            Self::StopTimedOut { .. } => 0,
            // The shell convention for "ended by signal N".
            Self::Signal { signal } => 128 + signal,
            Self::TripleFault { .. } | Self::KvmError { .. } | Self::Internal { .. } => 1,
        }
    }

    /// One line for the operator; errors are phrased for an `error: ` prefix.
    pub fn describe(&self) -> String {
        match self {
            Self::PowerOff => "guest powered off".into(),
            Self::Reset => "guest requested a reset; VM stopped".into(),
            Self::ConsoleQuit => "quit from the console".into(),
            Self::Killed => "VM killed by `bulkhead kill`".into(),
            Self::StopTimedOut { timeout_secs } => format!(
                "guest did not power off within {timeout_secs} s of the power button; VM stopped"
            ),
            Self::Signal { signal } => format!("VMM terminated by signal {signal}"),
            Self::TripleFault { cpu, state } => format!(
                "guest triple fault on vCPU {cpu} (KVM_EXIT_SHUTDOWN): the guest crashed; {state}"
            ),
            Self::KvmError { cpu, detail } => format!("KVM error on vCPU {cpu}: {detail}"),
            Self::Internal { detail } => format!("internal VMM error: {detail}"),
        }
    }
}

/// The rendezvous between whoever ends the VM and the thread waiting for that.
#[derive(Default)]
pub struct ExitSignal {
    /// Mirrors `reason.is_some()` so that vCPU threads can check it after every exit
    /// without taking a lock shared by the whole VM.
    requested: AtomicBool,
    reason: Mutex<Option<VmExit>>,
    ended: Condvar,
}

impl ExitSignal {
    /// Records why the VM ends; later reports are ignored (the first cause is the one
    /// worth telling, e.g. the triple fault, not the vCPU that stopped after it).
    pub fn request(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            tracing::debug!(?exit, "VM exit requested");
            *reason = Some(exit);
            self.requested.store(true, Ordering::Release);
            self.ended.notify_all();
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` for the VM to end; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<VmExit> {
        let reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        let (reason, _) = self
            .ended
            .wait_timeout_while(reason, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        reason.clone()
    }

    /// Blocks until some thread calls [`ExitSignal::request`].
    pub fn wait(&self) -> VmExit {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(exit) = reason.clone() {
                return exit;
            }
            reason = self.ended.wait(reason).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_request_wins_and_wakes_the_waiter() {
        let signal = Arc::new(ExitSignal::default());
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.wait())
        };
        let crash = VmExit::TripleFault {
            cpu: 1,
            state: "rip=0x0".into(),
        };
        signal.request(crash.clone());
        signal.request(VmExit::PowerOff);
        assert_eq!(waiter.join().unwrap(), crash);
        assert!(signal.is_requested());
    }

    #[test]
    fn statuses() {
        assert_eq!(VmExit::PowerOff.status(), 0);
        assert_eq!(VmExit::Reset.status(), 0);
        let crash = VmExit::TripleFault {
            cpu: 0,
            state: "rip=0xfff0".into(),
        };
        assert_ne!(crash.status(), 0);
        assert!(crash.describe().contains("triple fault"));
        assert!(crash.describe().ends_with("rip=0xfff0"));
    }
}
