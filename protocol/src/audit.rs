//! Lifecycle events of device workers, one JSON object per line in the audit log.

use serde::{Deserialize, Serialize};

use crate::launch::WorkerKind;

/// One event in a worker's life. `device` is the VMM's name for the device ("rng0").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A worker process started.
    Spawn {
        device: String,
        kind: WorkerKind,
        pid: u32,
    },
    /// The sandbox policy the worker runs under, by digest (`bulkhead policy KIND`
    /// prints it in full).
    Policy {
        device: String,
        kind: WorkerKind,
        digest: String,
    },
    /// The worker exited on its own with a status.
    Exit {
        device: String,
        pid: u32,
        status: i32,
    },
    /// The worker was killed by a signal; `seccomp_violation` when the signal was
    /// SIGSYS from its seccomp filter.
    Crash {
        device: String,
        pid: u32,
        signal: i32,
        seccomp_violation: bool,
    },
    /// A replacement worker took over the device.
    Restart {
        device: String,
        attempt: u32,
        pid: u32,
    },
    /// An operator asked for the worker to be replaced (`bulkhead restart-worker`); the
    /// exit and restart that follow are logged as usual.
    OperatorRestart { device: String, pid: u32 },
    /// The VMM killed the worker because it left a vhost-user call (`call`, e.g.
    /// "GET_CONFIG") unanswered past the limit; the crash and restart that follow are
    /// logged as usual.
    Unresponsive {
        device: String,
        pid: u32,
        call: String,
    },
    /// Too many crashes: the device is marked failed; the guest keeps running.
    GiveUp { device: String, attempts: u32 },
}

/// A timestamped line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_flat_json_lines() {
        let record = AuditRecord {
            time_ms: 1,
            event: AuditEvent::Crash {
                device: "rng0".into(),
                pid: 42,
                signal: 31,
                seccomp_violation: true,
            },
        };
        let line = serde_json::to_string(&record).unwrap();
        assert_eq!(
            line,
            r#"{"time_ms":1,"event":"crash","device":"rng0","pid":42,"signal":31,"seccomp_violation":true}"#
        );
        assert_eq!(serde_json::from_str::<AuditRecord>(&line).unwrap(), record);
    }
}
