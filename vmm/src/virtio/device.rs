//! The device behind a virtio transport.

use std::fs::File;
use std::sync::Arc;

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// One virtqueue as the driver configured it, in guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    pub index: u16,
    pub size: u16,
    /// Where in the available ring the device starts: 0 for a fresh queue, the used
    /// index when a restarted backend takes over a running one.
    ///
    /// The used index is exact for a device that completes in order. One that completes
    /// out of order has also taken the requests still in flight; with an inflight region
    /// ([`InflightRegion`]) the backend knows them and resumes after them (used index +
    /// in-flight count, after repairing a half-recorded last batch), overriding this
    /// value, as libvhost-user does when QEMU sends it the same used index. The VMM does
    /// not read the region itself: mapping a file a worker can shrink would let the worker
    /// crash the VMM with SIGBUS, and the backend must do that arithmetic anyway.
    pub next_avail: u16,
    pub descriptors: u64,
    pub driver_area: u64,
    pub device_area: u64,
}

#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("device backend: {0}")]
    Backend(String),
    #[error("queue {index}: {problem}")]
    BadQueue { index: u16, problem: String },
}

/// A vhost-user inflight I/O tracking region (INFLIGHT_SHMFD): made by the first backend
/// (GET_INFLIGHT_FD), kept by the VMM, and handed to every replacement (SET_INFLIGHT_FD)
/// so it can finish exactly the requests its predecessor left in flight. Opaque here.
#[derive(Debug, Clone)]
pub struct InflightRegion {
    pub file: Arc<File>,
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// What a transport needs from a device. Queue processing is not here: the device hands
/// the queues to whoever serves them, together with the eventfds the guest kicks and
/// the one that interrupts the guest.
pub trait VirtioDevice: Send {
    /// Virtio device id (4 = entropy, 2 = block, ...).
    fn device_type(&self) -> u32;
    /// The most descriptors each queue may have; its length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving `queues` with `acked_features`.
    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueConfig],
        kicks: &[EventFd],
        interrupt: &EventFd,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving the queues.
    fn reset(&mut self);
    /// The inflight region of the running queues, for a replacement backend to adopt.
    fn inflight_region(&self) -> Option<InflightRegion> {
        None
    }
    /// Takes over `region` from the backend this one replaces; called before
    /// [`activate`](Self::activate).
    fn adopt_inflight_region(&mut self, _region: InflightRegion) {}
}
