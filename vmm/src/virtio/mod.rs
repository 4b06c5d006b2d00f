//! Virtio devices as the guest sees them: the MMIO transport's registers live in the VMM,
//! while the queues are served elsewhere (a vhost-user worker process). The VMM is on
//! the control path only; notifications travel through ioeventfd and irqfd.

pub mod device;
pub mod mmio;

pub use device::{ActivateError, InflightRegion, QueueConfig, VirtioDevice};
pub use mmio::VirtioMmio;

/// Feature bit every modern (virtio 1.x) device and driver must agree on.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}
