//! The driver side of a virtio split virtqueue (virtio 1.2, section 2.7), written straight
//! into shared guest memory: descriptors, the available ring, and reading back the used
//! ring when the device signals the call eventfd.
//!
//! Deliberately naive where a device must not be: [`SplitQueueDriver::write_descriptor`]
//! and [`SplitQueueDriver::offer`] put whatever the test says in the table and the ring, so
//! malformed chains (loops, wild addresses, absurd lengths) reach the device unfiltered.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::{MemoryError, SharedMemory};

pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

#[derive(Debug, Error)]
pub enum DriverError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    QueueSize(u16),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("guest memory access: {0}")]
    Access(#[from] vm_memory::GuestMemoryError),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("a chain needs {wanted} descriptors, {free} are free")]
    NoFreeDescriptors { wanted: usize, free: usize },
    #[error("a chain needs at least one buffer")]
    EmptyChain,
    #[error("the device returned descriptor {0}, which is not the head of an offered chain")]
    UnknownUsedId(u32),
    #[error("waited {timeout:?} for {wanted} used buffers, got {got}")]
    Timeout {
        timeout: Duration,
        wanted: usize,
        got: usize,
    },
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`) rather than device-readable.
    pub device_writable: bool,
}

impl Buffer {
    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Buffer {
            addr,
            len,
            device_writable: true,
        }
    }

    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Buffer {
            addr,
            len,
            device_writable: false,
        }
    }
}

/// A descriptor exactly as it sits in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    /// The descriptor's 16 bytes, little endian, as in a descriptor table.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[0..8].copy_from_slice(&self.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&self.next.to_le_bytes());
        bytes
    }
}

/// An entry of the used ring: which chain came back, and how many bytes the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElement {
    pub id: u32,
    pub len: u32,
}

/// Where the three parts of a split queue live in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    pub size: u16,
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
}

/// The driver of one split queue.
#[derive(Debug)]
pub struct SplitQueueDriver {
    memory: Arc<SharedMemory>,
    layout: QueueLayout,
    /// The driver's avail index: chains offered so far (mod 2^16).
    avail_idx: u16,
    /// The next used ring entry to read.
    last_used: u16,
    free: Vec<u16>,
    /// Offered chains by head index, with the descriptor slots to free when they return.
    in_flight: HashMap<u16, Vec<u16>>,
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
}

impl SplitQueueDriver {
    /// A queue of `size` descriptors with its rings allocated (zeroed) in `memory`.
    pub fn new(memory: Arc<SharedMemory>, size: u16) -> Result<Self, DriverError> {
        if !size.is_power_of_two() || size > 32768 {
            return Err(DriverError::QueueSize(size));
        }
        let n = u64::from(size);
        let layout = QueueLayout {
            size,
            desc_table: memory.allocate(16 * n, 16)?,
            // flags, idx, ring[n], used_event
            avail_ring: memory.allocate(6 + 2 * n, 2)?,
            // flags, idx, ring[n] of (id, len), avail_event
            used_ring: memory.allocate(6 + 8 * n, 4)?,
        };
        let new_eventfd = || EventFd::new(EFD_NONBLOCK).map_err(DriverError::EventFd);
        Ok(SplitQueueDriver {
            memory,
            layout,
            avail_idx: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            event_idx: false,
            kick: new_eventfd()?,
            call: new_eventfd()?,
        })
    }

    pub fn layout(&self) -> QueueLayout {
        self.layout
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }

    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.memory
    }

    /// The eventfd the device watches (`SET_VRING_KICK`).
    pub fn kick_eventfd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device signals (`SET_VRING_CALL`).
    pub fn call_eventfd(&self) -> &EventFd {
        &self.call
    }

    /// Follow `VIRTIO_RING_F_EVENT_IDX`: publish `used_event` so that the device signals
    /// every completion. Set it when the feature was negotiated.
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// Descriptors not in any offered chain.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Writes `buffers` as one chain and offers it; returns its head index.
    pub fn post(&mut self, buffers: &[Buffer]) -> Result<u16, DriverError> {
        if buffers.is_empty() {
            return Err(DriverError::EmptyChain);
        }
        let slots = self.take_slots(buffers.len())?;
        for (i, buffer) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let mut flags = if buffer.device_writable {
                DESC_F_WRITE
            } else {
                0
            };
            if !last {
                flags |= DESC_F_NEXT;
            }
            let descriptor = Descriptor {
                addr: buffer.addr.0,
                len: buffer.len,
                flags,
                next: if last { 0 } else { slots[i + 1] },
            };
            self.write_descriptor(slots[i], descriptor)?;
        }
        let head = slots[0];
        self.offer(head, slots)?;
        Ok(head)
    }

    /// Takes `n` free descriptor slots for a chain written by hand.
    pub fn take_slots(&mut self, n: usize) -> Result<Vec<u16>, DriverError> {
        if n > self.free.len() {
            return Err(DriverError::NoFreeDescriptors {
                wanted: n,
                free: self.free.len(),
            });
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    /// Writes descriptor `index` as given, however wrong.
    pub fn write_descriptor(&self, index: u16, descriptor: Descriptor) -> Result<(), DriverError> {
        let addr = GuestAddress(self.layout.desc_table.0 + 16 * u64::from(index % self.size()));
        Ok(self.memory.write(addr, &descriptor.to_bytes())?)
    }

    /// Writes an indirect descriptor table at `addr` (`VIRTIO_RING_F_INDIRECT_DESC`); a
    /// descriptor with [`DESC_F_INDIRECT`] and length `16 * descriptors.len()` points at it.
    pub fn write_indirect_table(
        &self,
        addr: GuestAddress,
        descriptors: &[Descriptor],
    ) -> Result<(), DriverError> {
        let bytes: Vec<u8> = descriptors.iter().flat_map(|d| d.to_bytes()).collect();
        Ok(self.memory.write(addr, &bytes)?)
    }

    /// Puts `head` in the available ring and publishes it. `slots` (typically from
    /// [`take_slots`](Self::take_slots)) are freed when the device returns `head`; a head
    /// outside the table is offered all the same.
    pub fn offer(&mut self, head: u16, slots: Vec<u16>) -> Result<(), DriverError> {
        let ring = self.layout.avail_ring;
        let entry = GuestAddress(ring.0 + 4 + 2 * u64::from(self.avail_idx % self.size()));
        self.memory
            .memory()
            .store(head.to_le(), entry, Ordering::Relaxed)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before the new index.
        self.memory.memory().store(
            self.avail_idx.to_le(),
            GuestAddress(ring.0 + 2),
            Ordering::Release,
        )?;
        if usize::from(head) < usize::from(self.size()) {
            self.in_flight.insert(head, slots);
        } else {
            self.free.extend(slots);
        }
        Ok(())
    }

    /// Notifies the device (writes the kick eventfd).
    pub fn kick(&self) -> Result<(), DriverError> {
        self.kick.write(1).map_err(DriverError::EventFd)
    }

    /// Reads what the device has put in the used ring since the last call.
    pub fn collect_used(&mut self) -> Result<Vec<UsedElement>, DriverError> {
        let ring = self.layout.used_ring;
        let used_idx = u16::from_le(
            self.memory
                .memory()
                .load(GuestAddress(ring.0 + 2), Ordering::Acquire)?,
        );
        let mut used = Vec::new();
        while self.last_used != used_idx {
            let slot = u64::from(self.last_used % self.size());
            let entry = GuestAddress(ring.0 + 4 + 8 * slot);
            let id = u32::from_le(self.memory.memory().read_obj(entry)?);
            let len = u32::from_le(self.memory.memory().read_obj(GuestAddress(entry.0 + 4))?);
            let slots = u16::try_from(id)
                .ok()
                .and_then(|head| self.in_flight.remove(&head))
                .ok_or(DriverError::UnknownUsedId(id))?;
            self.free.extend(slots);
            used.push(UsedElement { id, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        if self.event_idx {
            // used_event sits after the avail ring's entries: signal us at the next one.
            let used_event =
                GuestAddress(self.layout.avail_ring.0 + 4 + 2 * u64::from(self.size()));
            self.memory
                .memory()
                .store(self.last_used.to_le(), used_event, Ordering::Release)?;
        }
        Ok(used)
    }

    /// Waits (at most `timeout`) for `count` used elements, sleeping on the call eventfd.
    pub fn wait_used(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<UsedElement>, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut used = self.collect_used()?;
        while used.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout {
                    timeout,
                    wanted: count,
                    got: used.len(),
                });
            }
            if wait_readable(&self.call, left) {
                // Non-blocking; only resets the counter.
                let _ = self.call.read();
            }
            used.extend(self.collect_used()?);
        }
        Ok(used)
    }

    /// Collects used elements for `duration`, however many come.
    pub fn used_during(&mut self, duration: Duration) -> Result<Vec<UsedElement>, DriverError> {
        let deadline = Instant::now() + duration;
        let mut used = self.collect_used()?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(used);
            }
            if wait_readable(&self.call, left) {
                let _ = self.call.read();
            }
            used.extend(self.collect_used()?);
        }
    }
}

/// Waits until `eventfd` is readable or `timeout` passes; true when readable.
fn wait_readable(eventfd: &EventFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd: eventfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, borrowed for the duration of the call.
    unsafe { libc::poll(&mut poll, 1, millis) > 0 }
}
