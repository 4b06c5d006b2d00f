//! The VMM as a vhost-user frontend: devices whose queues are served by another process.

pub mod attach;
pub mod device;
pub mod reply_watchdog;

pub use attach::{attach_worker_device, start_backend, AttachError, AttachedDevice, DeviceShape};
pub use device::{VhostUserDevice, VhostUserDeviceError};
