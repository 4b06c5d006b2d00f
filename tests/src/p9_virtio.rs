//! 9P over a virtqueue, as a guest's virtio-9p driver carries it: each request is one
//! chain, the T-message device-readable, then a device-writable buffer for the
//! R-message. [`VirtioP9`] is a [`Transport`] for the test [`Client`](crate::p9::Client),
//! one request at a time through two buffers it reuses.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestAddress;

use crate::p9::{P9Error, Result, Transport, REPLY_TIMEOUT};
use crate::vhost::device::DeviceError;
use crate::vhost::{
    Buffer, DeviceSetup, SharedMemory, SplitQueueDriver, UserspaceDevice, UserspaceFrontend,
};

/// `VIRTIO_9P_F_MOUNT_TAG`.
pub const VIRTIO_9P_F_MOUNT_TAG: u64 = 1;
pub const QUEUE_SIZE: u16 = 128;

/// A virtio-9p device driven from userspace.
pub struct VirtioP9 {
    pub device: UserspaceDevice,
    request: GuestAddress,
    reply: GuestAddress,
    buffer_len: u32,
    replies: VecDeque<Vec<u8>>,
}

impl VirtioP9 {
    /// Negotiates the device on `connection` (mount tag, EVENT_IDX, indirect descriptors,
    /// the config space) and sets up request and reply buffers of `buffer_len` bytes.
    pub fn start(
        connection: UnixStream,
        buffer_len: u32,
    ) -> std::result::Result<Self, DeviceError> {
        let mut setup = DeviceSetup::new(&[QUEUE_SIZE]).with_features(features());
        setup.protocol_features =
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG;
        let device = UserspaceDevice::start(connection, &setup)?;
        let request = device.memory.allocate(u64::from(buffer_len), 8)?;
        let reply = device.memory.allocate(u64::from(buffer_len), 8)?;
        Ok(VirtioP9 {
            device,
            request,
            reply,
            buffer_len,
            replies: VecDeque::new(),
        })
    }

    /// [`start`](Self::start), with the queue tracked in an inflight region
    /// (INFLIGHT_SHMFD): what the VMM keeps so that a replacement worker
    /// ([`replace`](Self::replace)) answers what a killed one left in flight.
    pub fn start_tracked(
        connection: UnixStream,
        buffer_len: u32,
    ) -> std::result::Result<(Self, Inflight), DeviceError> {
        let features = features();
        let protocol = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        let setup = DeviceSetup::new(&[QUEUE_SIZE]);
        let memory = Arc::new(SharedMemory::new(setup.memory_base, setup.memory_size)?);
        let mut frontend = UserspaceFrontend::new(connection, 1);
        let negotiated = frontend.negotiate(features, protocol)?;
        frontend.set_mem_table(&memory)?;
        let (description, region) = frontend.get_inflight_fd(1, QUEUE_SIZE)?;
        let mut queue = SplitQueueDriver::new(memory.clone(), QUEUE_SIZE)?;
        queue.set_event_idx(negotiated.has(VIRTIO_RING_F_EVENT_IDX));
        frontend.start_queue(0, &queue)?;
        let device = UserspaceDevice {
            memory,
            frontend,
            queues: vec![queue],
            negotiated,
        };
        let request = device.memory.allocate(u64::from(buffer_len), 8)?;
        let reply = device.memory.allocate(u64::from(buffer_len), 8)?;
        Ok((
            VirtioP9 {
                device,
                request,
                reply,
                buffer_len,
                replies: VecDeque::new(),
            },
            Inflight {
                description,
                region,
            },
        ))
    }

    /// Hands the device to a replacement worker on `connection`, as the VMM's supervisor
    /// does after a crash: same memory, same ring, the predecessor's inflight region; the
    /// queue resumes where the used ring stands.
    pub fn replace(
        &mut self,
        connection: UnixStream,
        inflight: &Inflight,
    ) -> std::result::Result<(), DeviceError> {
        let protocol = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        let mut frontend = UserspaceFrontend::new(connection, 1);
        frontend.negotiate(features(), protocol)?;
        frontend.set_mem_table(&self.device.memory)?;
        frontend.set_inflight_fd(&inflight.description, &inflight.region)?;
        let queue = &self.device.queues[0];
        let used_idx = self
            .device
            .memory
            .read(GuestAddress(queue.layout().used_ring.0 + 2), 2)?;
        frontend.resume_queue(0, queue, u16::from_le_bytes([used_idx[0], used_idx[1]]))?;
        queue.kick()?;
        self.device.frontend = frontend;
        Ok(())
    }

    /// Posts `buffers` as one chain, kicks, and returns what the device wrote into
    /// `reply_at` (the used length's worth).
    pub fn exchange(&mut self, buffers: &[Buffer], reply_at: GuestAddress) -> Result<Vec<u8>> {
        let queue = &mut self.device.queues[0];
        queue.post(buffers).map_err(protocol)?;
        queue.kick().map_err(protocol)?;
        let used = queue.wait_used(1, REPLY_TIMEOUT).map_err(protocol)?;
        let len = used.first().map_or(0, |u| u.len);
        self.device
            .memory
            .read(reply_at, len as usize)
            .map_err(protocol)
    }
}

/// The inflight region of a tracked queue, kept across workers.
pub struct Inflight {
    pub description: VhostUserInflight,
    pub region: File,
}

fn features() -> u64 {
    VIRTIO_9P_F_MOUNT_TAG | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
}

fn protocol(e: impl std::fmt::Display) -> P9Error {
    P9Error::Protocol(e.to_string())
}

impl Transport for VirtioP9 {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|&len| len <= self.buffer_len)
            .ok_or_else(|| io::Error::other("message larger than the request buffer"))?;
        self.device
            .memory
            .write(self.request, bytes)
            .map_err(io::Error::other)?;
        let chain = [
            Buffer::readable(self.request, len),
            Buffer::writable(self.reply, self.buffer_len),
        ];
        let reply = self
            .exchange(&chain, self.reply)
            .map_err(io::Error::other)?;
        self.replies.push_back(reply);
        Ok(())
    }

    fn recv(&mut self, _msize: u32) -> Result<Option<Vec<u8>>> {
        // An empty answer is a request the device dropped: as if it had hung up.
        Ok(self.replies.pop_front().filter(|reply| !reply.is_empty()))
    }
}
