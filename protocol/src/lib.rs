//! What the VMM and its device workers say to each other, outside vhost-user itself.
//!
//! - [`launch`]: the configuration a worker process starts with, written by the VMM
//!   into a sealed memfd the worker reads before it touches anything from the guest.
//! - [`control`]: the versioned JSON protocol of a VM's control socket (`bulkhead list`,
//!   `stop`, `pause`, ...).
//! - [`audit`]: lifecycle events (spawn, exit, crash, restart, ...) the supervisor logs
//!   as JSON lines for auditors.
//!
//! Binary messages are bincode 2 with a size limit, so a corrupt or hostile message is
//! an error, never an allocation of whatever size it claims.

pub mod audit;
pub mod control;
pub mod launch;
pub mod wire;

pub use audit::AuditEvent;
pub use launch::{
    BackingFile, BlkConfig, DeviceConfig, DisplayConfig, ImageFormat, InputConfig, NetConfig,
    P9Config, RateLimit, RngConfig, WorkerKind, WorkerLaunch,
};
pub use wire::{decode, encode, WireError, MAX_MESSAGE_SIZE};
