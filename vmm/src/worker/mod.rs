//! Device worker processes: how the VMM starts them, watches them and restarts them,
//! and the audit log of all of it.

pub mod audit_log;
pub mod launch;
pub mod pidfd;
pub mod supervisor;

pub use audit_log::AuditLog;
pub use launch::{discard_worker, spawn_worker, worker_binary, LaunchError, WorkerChild};
pub use supervisor::{DeviceBoard, RestartPolicy, RestartWorkerError, WorkerSupervisor};
