//! The vhost-user-blk backend: one vring thread per request queue, all sharing one disk.
//!
//! A queue's thread drains its ring (every request taken is recorded in the inflight
//! region), serves the batch against the disk and completes it with one used-ring update.
//! Requests a killed predecessor left in flight come first out of the ring: the
//! [`TrackedQueue`](crate::vhost_user::TrackedQueue) hands them out again.
//!
//! The device's own state is behind `&self` (no device-wide lock), so queue threads run in
//! parallel; the disk engine does its own locking.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use super::config::{BlkGeometry, SECTOR_SIZE};
use super::request::{self, Context};
use crate::disk::DiskImage;
use crate::vhost_user::{Completion, DeviceBackend, GuestRam, InflightTracking, QueueError};

/// One vring thread per queue; more queues than this buy nothing on a host this worker
/// runs on and cost a thread each.
pub const MAX_QUEUES: u16 = 16;
/// Largest ring the frontend may set up.
pub const MAX_QUEUE_SIZE: usize = 256;
/// Most sectors a DISCARD or WRITE_ZEROES range may cover (1 GiB): one range is one
/// synchronous engine call on the queue's thread.
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Requests served between two used-ring updates.
const COMPLETE_EVERY: usize = 8;

#[derive(Debug, Error)]
pub enum BlkError {
    #[error("the number of queues must be 1 to {MAX_QUEUES}, not {0}")]
    Queues(u16),
    #[error("the serial is {0} bytes; GET_ID answers at most {VIRTIO_BLK_ID_BYTES}")]
    SerialTooLong(usize),
    #[error("the disk is smaller than one {SECTOR_SIZE}-byte sector")]
    TooSmall,
}

/// How the device presents the disk.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    pub num_queues: u16,
    /// GET_ID's answer, up to 20 bytes.
    pub serial: String,
}

pub struct BlkDevice {
    disk: Arc<dyn DiskImage>,
    geometry: BlkGeometry,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    memory: RwLock<Option<GuestRam>>,
    event_idx: AtomicBool,
    tracking: InflightTracking,
    /// Per queue: a broken ring is reported once per reset, not once per kick.
    ring_fault_reported: Vec<AtomicBool>,
}

impl BlkDevice {
    pub fn new(disk: Arc<dyn DiskImage>, options: &BlkOptions) -> Result<Self, BlkError> {
        if !(1..=MAX_QUEUES).contains(&options.num_queues) {
            return Err(BlkError::Queues(options.num_queues));
        }
        let bytes = options.serial.as_bytes();
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        if bytes.len() > serial.len() {
            return Err(BlkError::SerialTooLong(bytes.len()));
        }
        serial[..bytes.len()].copy_from_slice(bytes);
        if disk.len() < SECTOR_SIZE {
            return Err(BlkError::TooSmall);
        }
        let geometry = BlkGeometry {
            size: disk.len(),
            read_only: disk.is_read_only(),
            num_queues: options.num_queues,
            // Everything in a full ring but the header and the status.
            seg_max: MAX_QUEUE_SIZE as u32 - 2,
            discard_granularity: disk.discard_granularity(),
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: MAX_DISCARD_SEGMENTS,
        };
        let queues = usize::from(options.num_queues);
        Ok(BlkDevice {
            disk,
            geometry,
            serial,
            memory: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            tracking: InflightTracking::new(queues),
            ring_fault_reported: (0..queues).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    pub fn geometry(&self) -> &BlkGeometry {
        &self.geometry
    }

    /// The device, ready to be served: requests complete out of order with respect to
    /// other queues and may be in flight when the worker dies, so it asks for inflight
    /// tracking.
    pub fn into_backend(self) -> DeviceBackend<Arc<BlkDevice>> {
        let tracking = self.tracking.clone();
        DeviceBackend {
            backend: Arc::new(self),
            event_sources: Vec::new(),
            inflight: Some(tracking),
        }
    }

    /// Serves what queue `index` holds.
    fn serve_queue(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(ram) = self
            .memory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let memory = ram.memory();
        let mut state = vring.get_mut();
        if !(state.is_enabled() && state.get_queue().ready()) {
            return Ok(());
        }
        let Some(mut queue) = self.tracking.queue(index) else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);

        let mut batch = Vec::new();
        let drained = queue.drain(&mut state, &memory, event_idx, |r| batch.push(r));
        // Whatever stopped the drain, the requests taken are in flight and are answered.
        let mut ctx = Context {
            disk: self.disk.as_ref(),
            geometry: &self.geometry,
            serial: &self.serial,
        };
        // Synchronous, in ring order, completed a few at a time so that the first
        // requests of a long batch are not held back by the last. An asynchronous engine
        // would submit here and complete from its completion event (a device event source
        // of this thread).
        let mut completed = Ok(());
        for group in batch.chunks(COMPLETE_EVERY) {
            let done: Vec<Completion> = group
                .iter()
                .map(|r| Completion {
                    head: r.head,
                    written: request::serve(&mut ctx, &memory, r),
                })
                .collect();
            tracing::trace!(queue = index, requests = done.len(), "requests served");
            completed = queue.complete_batch(&mut state, &memory, &done);
            if completed.is_err() {
                // The rest stay in flight: in the region for a successor, or until the
                // driver resets a ring it broke.
                break;
            }
        }
        self.check(index, drained.map(|_| ()))?;
        self.check(index, completed)
    }

    /// The guest breaking its own ring costs it the queue (until the driver resets it);
    /// anything else is the worker's failure.
    fn check(&self, index: usize, result: Result<(), QueueError>) -> io::Result<()> {
        match result {
            Ok(()) => Ok(()),
            Err(e @ (QueueError::Ring(_) | QueueError::UsedRing(_))) => {
                if !self.ring_fault_reported[index].swap(true, Ordering::Relaxed) {
                    tracing::warn!(queue = index, "request queue: {e}");
                }
                Ok(())
            }
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.geometry.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.geometry.features()
            | (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // The session adds INFLIGHT_SHMFD for a device with tracking.
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        self.event_idx.store(false, Ordering::Relaxed);
        for reported in &self.ring_fault_reported {
            reported.store(false, Ordering::Relaxed);
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.geometry.read_config(offset, size)
    }

    fn update_memory(&self, memory: GuestRam) -> io::Result<()> {
        *self.memory.write().unwrap_or_else(PoisonError::into_inner) = Some(memory);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.geometry.num_queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Each thread serves one queue, event 0; the queue's index is the thread's.
        match (device_event, vrings.first()) {
            (0, Some(vring)) => self.serve_queue(thread_id, vring),
            (other, _) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown device event {other}"),
            )),
        }
    }
}
