//! A device driven from userspace end to end: guest memory shared, features negotiated,
//! and one started split queue per device queue.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestAddress;

use super::frontend::{FrontendError, Negotiated, UserspaceFrontend};
use super::memory::{MemoryError, SharedMemory};
use super::split_queue::{DriverError, SplitQueueDriver};

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// How to set a device up.
#[derive(Debug, Clone)]
pub struct DeviceSetup {
    /// One split queue of each size, for device queues 0, 1, ...
    pub queue_sizes: Vec<u16>,
    pub memory_base: GuestAddress,
    pub memory_size: usize,
    /// Virtio features wanted beyond VIRTIO_F_VERSION_1 (bit masks).
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
}

impl DeviceSetup {
    /// 16 MiB of memory at guest address 1 MiB, REPLY_ACK, no optional virtio feature.
    pub fn new(queue_sizes: &[u16]) -> Self {
        DeviceSetup {
            queue_sizes: queue_sizes.to_vec(),
            memory_base: GuestAddress(1 << 20),
            memory_size: 16 << 20,
            features: 0,
            protocol_features: VhostUserProtocolFeatures::REPLY_ACK,
        }
    }

    pub fn with_features(mut self, features: u64) -> Self {
        self.features = features;
        self
    }
}

/// Memory, connection and queues of one device under test.
pub struct UserspaceDevice {
    pub memory: Arc<SharedMemory>,
    pub frontend: UserspaceFrontend,
    pub queues: Vec<SplitQueueDriver>,
    pub negotiated: Negotiated,
}

impl UserspaceDevice {
    /// Negotiates on `connection`, shares fresh memory and starts every queue.
    pub fn start(connection: UnixStream, setup: &DeviceSetup) -> Result<Self, DeviceError> {
        let memory = Arc::new(SharedMemory::new(setup.memory_base, setup.memory_size)?);
        Self::start_with_memory(connection, setup, memory)
    }

    /// Like [`start`](Self::start) on memory that outlives this device: what a replacement
    /// worker is given, the guest's pages as its predecessor left them (the queues are
    /// fresh ones, allocated in it).
    pub fn start_with_memory(
        connection: UnixStream,
        setup: &DeviceSetup,
        memory: Arc<SharedMemory>,
    ) -> Result<Self, DeviceError> {
        Self::start_prepared(connection, setup, memory, |_| Ok(()))
    }

    /// Like [`start_with_memory`](Self::start_with_memory), with `prepare` posting on the
    /// queues before the device sees them: what a replacement worker finds on rings its
    /// predecessor left with requests unanswered.
    pub fn start_prepared(
        connection: UnixStream,
        setup: &DeviceSetup,
        memory: Arc<SharedMemory>,
        prepare: impl FnOnce(&mut [SplitQueueDriver]) -> Result<(), DriverError>,
    ) -> Result<Self, DeviceError> {
        let mut frontend = UserspaceFrontend::new(connection, setup.queue_sizes.len());
        let negotiated = frontend.negotiate(setup.features, setup.protocol_features)?;
        frontend.set_mem_table(&memory)?;
        let mut queues = Vec::with_capacity(setup.queue_sizes.len());
        for &size in &setup.queue_sizes {
            let mut queue = SplitQueueDriver::new(memory.clone(), size)?;
            queue.set_event_idx(negotiated.has(VIRTIO_RING_F_EVENT_IDX));
            queues.push(queue);
        }
        prepare(&mut queues)?;
        for (index, queue) in queues.iter().enumerate() {
            frontend.start_queue(index, queue)?;
        }
        Ok(UserspaceDevice {
            memory,
            frontend,
            queues,
            negotiated,
        })
    }
}
