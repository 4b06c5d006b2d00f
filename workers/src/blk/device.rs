//! The vhost-user-blk backend: one vring thread per request queue, all sharing one disk.
//!
//! A queue's thread drains its ring (every request taken is recorded in the inflight
//! region) and plans each request: reads and writes the disk maps straight to host file
//! ranges go to the queue's io_uring (all of a batch submitted at once) and complete, in
//! any order, when the ring's completion eventfd wakes the same thread; everything else
//! is served synchronously, after the queue's I/O in flight has ended (so a FLUSH covers
//! every write completed before it, and DISCARD, WRITE_ZEROES or an allocating write never
//! overtakes an earlier request). Without rings (io_uring unavailable, or
//! `BULKHEAD_BLK_IO=sync`) every request is served synchronously.
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
use super::request::{self, Context, Plan};
use super::uring::{self, AsyncIo, Finished};
use crate::disk::DiskImage;
use crate::vhost_user::{
    Completion, DeviceBackend, EventSource, GuestRam, InflightTracking, QueueError,
};

/// One vring thread per queue; more queues than this buy nothing on a host this worker
/// runs on and cost a thread each.
pub const MAX_QUEUES: u16 = 16;
/// Largest ring the frontend may set up.
pub const MAX_QUEUE_SIZE: usize = 256;
/// Most sectors a DISCARD or WRITE_ZEROES range may cover (1 GiB): one range is one
/// synchronous engine call on the queue's thread.
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Synchronous requests served between two used-ring updates.
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
    /// One io_uring per queue, when there are.
    uring: Option<Arc<AsyncIo>>,
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
            uring: None,
        })
    }

    /// Reads and writes go through these rings (one per queue at least). I/O a previous
    /// device left in them is waited for first.
    pub fn with_async_io(mut self, uring: Arc<AsyncIo>) -> Self {
        if uring.queues() >= usize::from(self.geometry.num_queues) {
            uring.quiesce();
            self.uring = Some(uring);
        } else {
            tracing::warn!("fewer io_uring rings than queues; serving synchronously");
        }
        self
    }

    /// The device event of queue `index`'s ring completions: past the queues' ids and the
    /// vring thread's own.
    fn ring_event(&self, index: usize) -> u16 {
        self.geometry.num_queues + 1 + index as u16
    }

    pub fn geometry(&self) -> &BlkGeometry {
        &self.geometry
    }

    /// The device, ready to be served: requests complete out of order with respect to
    /// other queues and may be in flight when the worker dies, so it asks for inflight
    /// tracking.
    pub fn into_backend(self) -> DeviceBackend<Arc<BlkDevice>> {
        let tracking = self.tracking.clone();
        let event_sources = match &self.uring {
            Some(uring) => (0..usize::from(self.geometry.num_queues))
                .filter_map(|q| {
                    Some(EventSource {
                        fd: uring.ring(q)?.eventfd(),
                        id: self.ring_event(q),
                        thread: q,
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        DeviceBackend {
            backend: Arc::new(self),
            event_sources,
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
        let memory = ram.memory().into_inner();
        let mut state = vring.get_mut();
        if !(state.is_enabled() && state.get_queue().ready()) {
            return Ok(());
        }
        let Some(mut queue) = self.tracking.queue(index) else {
            return Ok(());
        };
        let generation = queue.generation();
        let mut ring = self.uring.as_ref().and_then(|u| u.ring(index));
        if let Some(ring) = ring.as_mut() {
            ring.quiet();
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);

        let mut batch = Vec::new();
        let drained = queue.drain(&mut state, &memory, event_idx, |r| batch.push(r));
        // Whatever stopped the drain, the requests taken are in flight and are answered.
        let mut ctx = Context {
            disk: self.disk.as_ref(),
            geometry: &self.geometry,
            serial: &self.serial,
        };
        // Synchronous ones are completed a few at a time so that the first requests of a
        // long batch are not held back by the last.
        let mut done = Vec::new();
        let mut completed = Ok(());
        for r in batch {
            let sync = match ring.as_mut() {
                Some(ring) => match request::plan(&ctx, &memory, &r) {
                    Plan::Direct(direct) if ring.wants_inline(&direct) => {
                        let result = uring::run_inline(&direct);
                        drop(direct);
                        done.push(Completion {
                            head: r.head,
                            written: request::finish(&memory, &r, result),
                        });
                        None
                    }
                    // A request the ring cannot take comes back, to be served here.
                    Plan::Direct(direct) => {
                        ring.submit(r, direct, memory.clone(), generation).err()
                    }
                    Plan::Sync => Some(r),
                }
                .inspect(|_| {
                    // Served synchronously: after every earlier request of the queue.
                    ring.flush();
                    let finished = ring.wait_idle();
                    done.extend(finished.into_iter().filter_map(|f| answer(f, generation)));
                }),
                None => Some(r),
            };
            if let Some(r) = sync {
                done.push(Completion {
                    head: r.head,
                    written: request::serve(&mut ctx, &memory, &r),
                });
            }
            if done.len() >= COMPLETE_EVERY && completed.is_ok() {
                tracing::trace!(queue = index, requests = done.len(), "requests served");
                completed = queue.complete_batch(&mut state, &memory, &done);
                done.clear();
            }
        }
        if let Some(ring) = ring.as_mut() {
            ring.flush();
            // What the page cache served inline at submission has completed already:
            // answered now, without the eventfd's round trip through epoll.
            let finished = ring.unquiet();
            done.extend(finished.into_iter().filter_map(|f| answer(f, generation)));
        }
        if completed.is_ok() {
            completed = queue.complete_batch(&mut state, &memory, &done);
        }
        // After a failure the rest stay in flight: in the region for a successor, or until
        // the driver resets a ring it broke.
        self.check(index, drained.map(|_| ()))?;
        self.check(index, completed)
    }

    /// Completes what queue `index`'s ring has finished.
    fn complete_async(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let mut state = vring.get_mut();
        let Some(mut queue) = self.tracking.queue(index) else {
            return Ok(());
        };
        let Some(mut ring) = self.uring.as_ref().and_then(|u| u.ring(index)) else {
            return Ok(());
        };
        // Reaped whatever else holds: the eventfd stays readable (and the thread awake)
        // until it is read.
        let finished = ring.reap_woken();
        drop(ring);
        let Some(ram) = self
            .memory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let memory = ram.memory();
        let generation = queue.generation();
        let done: Vec<Completion> = finished
            .into_iter()
            .filter_map(|f| answer(f, generation))
            .collect();
        tracing::trace!(queue = index, requests = done.len(), "async requests done");
        let completed = queue.complete_batch(&mut state, &memory, &done);
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
        // No I/O may land in buffers the driver takes back with the reset.
        if let Some(uring) = &self.uring {
            uring.quiesce();
        }
        self.event_idx.store(false, Ordering::Relaxed);
        for reported in &self.ring_fault_reported {
            reported.store(false, Ordering::Relaxed);
        }
    }

    /// I/O of the stopped ring is waited for, so none lands in guest memory after the
    /// frontend got the ring back; its requests stay in flight in the inflight region and
    /// are served again if the ring resumes.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(mut ring) = self
            .uring
            .as_ref()
            .and_then(|u| u.ring(queue_index as usize))
        {
            drop(ring.wait_idle());
        }
        Ok(())
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
        // Each thread serves one queue, event 0; the queue's index is the thread's. Its
        // ring's completions come as the queue's ring event.
        match (device_event, vrings.first()) {
            (0, Some(vring)) => self.serve_queue(thread_id, vring),
            (event, Some(vring)) if event == self.ring_event(thread_id) => {
                self.complete_async(thread_id, vring)
            }
            (other, _) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown device event {other}"),
            )),
        }
    }
}

/// The status of a request whose I/O ended, and its completion; none for one popped
/// before its queue was stopped or restarted (that queue, and its record of the request,
/// are gone: the inflight region has it for whoever serves the ring next).
fn answer(finished: Finished, generation: u64) -> Option<Completion> {
    if finished.generation != generation {
        tracing::debug!(
            head = finished.request.head,
            "I/O ended after its queue restarted"
        );
        return None;
    }
    Some(Completion {
        head: finished.request.head,
        written: request::finish(&finished.memory, &finished.request, finished.result),
    })
}
