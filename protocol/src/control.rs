//! The control socket protocol: how `bulkhead list/stop/pause/...` (or any script) talks
//! to a running VMM.
//!
//! Transport: a Unix stream socket at `<runtime dir>/bulkhead/<name>.sock`. The client
//! writes one [`Request`] as a single line of JSON (terminated by `\n`); the VMM answers
//! with one [`Reply`] line and closes the connection. Every reply carries either `ok` (the
//! answer) or `error` (a message for a person), never both.
//!
//! ```text
//! -> {"version":1,"command":"status"}
//! <- {"version":1,"ok":{"kind":"status","name":"web","pid":4242,...}}
//! -> {"version":1,"command":"restart_worker","device":"rng0"}
//! <- {"version":1,"ok":{"kind":"done"}}
//! -> {"version":1,"command":"dance"}
//! <- {"version":1,"error":"malformed request: unknown variant `dance`, ..."}
//! ```
//!
//! Versioning: `version` is [`CONTROL_PROTOCOL_VERSION`]. A VMM refuses requests with
//! another version with an error reply (naming the version it speaks), so an old client
//! never silently misreads a newer VMM. Fields may be added to replies within a version;
//! clients must ignore fields they do not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::launch::WorkerKind;

/// The protocol version this crate speaks.
pub const CONTROL_PROTOCOL_VERSION: u32 = 1;

/// Longest request line a VMM reads; anything longer is refused unread.
pub const MAX_REQUEST_LINE: usize = 4096;

/// One request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    pub fn new(command: Command) -> Self {
        Self {
            version: CONTROL_PROTOCOL_VERSION,
            command,
        }
    }
}

/// What a client may ask a VM to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Answered with [`Answer::Status`].
    Status,
    /// Stop the vCPUs (outside KVM_RUN); device workers keep running. Idempotent.
    Pause,
    /// Restart paused vCPUs. Idempotent.
    Resume,
    /// Press the ACPI power button; if the guest has not powered off after
    /// `timeout_secs`, the VMM ends the VM itself. A paused VM is resumed first so that
    /// the guest can react. Answered at once; the VM ends later (its socket disappears).
    Stop { timeout_secs: u64 },
    /// End the VM now. Answered before the VMM exits.
    Kill,
    /// Answered with [`Answer::Registers`]: every vCPU's registers, read while it is
    /// briefly paused (a paused VM stays paused).
    Debug,
    /// Kill the named device's worker; the supervisor replaces it exactly as after a
    /// crash. Recorded in the audit log as operator-initiated.
    RestartWorker { device: String },
}

/// The VMM's answer: exactly one of `ok` and `error` is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Answer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(answer: Answer) -> Self {
        Self {
            version: CONTROL_PROTOCOL_VERSION,
            ok: Some(answer),
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            version: CONTROL_PROTOCOL_VERSION,
            ok: None,
            error: Some(message.into()),
        }
    }
}

/// The successful result of a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Answer {
    /// The command was carried out (or, for `stop`, started).
    Done,
    Status(VmStatus),
    Registers {
        vcpus: Vec<VcpuRegisters>,
    },
}

/// Whether the guest's vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
}

/// A running VM, as `bulkhead status` and `bulkhead list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    /// The VMM's process id.
    pub pid: u32,
    pub cpus: u8,
    pub memory_bytes: u64,
    /// Milliseconds since the VM was created.
    pub uptime_ms: u64,
    pub state: VmState,
    pub devices: Vec<DeviceStatus>,
}

/// A device served by a worker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The VMM's name for the device, e.g. `rng0`.
    pub name: String,
    pub kind: WorkerKind,
    /// The current worker's pid; absent while it is being replaced or after the device
    /// failed.
    pub worker_pid: Option<u32>,
    /// Workers started after the first one (crash recovery and operator restarts).
    pub restarts: u32,
    /// The supervisor gave up on the device after too many crashes.
    pub failed: bool,
}

/// One vCPU's state, as KVM_GET_REGS and KVM_GET_SREGS report it. Register names are
/// lower case (`rip`, `cr3`, `cs.base`, `efer`, ...); values are raw 64-bit numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuRegisters {
    pub cpu: u8,
    pub registers: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_flat_json() {
        let request = Request::new(Command::RestartWorker {
            device: "rng0".into(),
        });
        let line = serde_json::to_string(&request).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"command":"restart_worker","device":"rng0"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
        let status: Request = serde_json::from_str(r#"{"version":1,"command":"status"}"#).unwrap();
        assert_eq!(status.command, Command::Status);
    }

    #[test]
    fn replies_have_ok_or_error() {
        let ok = serde_json::to_string(&Reply::ok(Answer::Done)).unwrap();
        assert_eq!(ok, r#"{"version":1,"ok":{"kind":"done"}}"#);
        let error = serde_json::to_string(&Reply::error("no")).unwrap();
        assert_eq!(error, r#"{"version":1,"error":"no"}"#);
        let status = Reply::ok(Answer::Status(VmStatus {
            name: "vm".into(),
            pid: 1,
            cpus: 2,
            memory_bytes: 4 << 20,
            uptime_ms: 5,
            state: VmState::Paused,
            devices: vec![DeviceStatus {
                name: "rng0".into(),
                kind: WorkerKind::Rng,
                worker_pid: Some(9),
                restarts: 1,
                failed: false,
            }],
        }));
        let line = serde_json::to_string(&status).unwrap();
        assert!(line.contains(r#""state":"paused""#), "{line}");
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), status);
    }

    #[test]
    fn unknown_commands_do_not_parse() {
        assert!(serde_json::from_str::<Request>(r#"{"version":1,"command":"dance"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"command":"status"}"#).is_err());
        assert!(serde_json::from_str::<Request>("not json").is_err());
    }
}
