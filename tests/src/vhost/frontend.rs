//! A vhost-user frontend in the test process: the VMM's half of the protocol, on top of
//! the `vhost` crate's [`Frontend`], for driving any backend without a VM.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use super::memory::{MemoryError, SharedMemory};
use super::split_queue::SplitQueueDriver;

#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NotModern(u64),
    #[error("queue {index}: the backend has only {num_queues} queues")]
    NoSuchQueue { index: usize, num_queues: usize },
}

/// What the negotiation settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Virtio (and vhost-user transport) features both sides agreed on.
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
}

impl Negotiated {
    pub fn has(&self, feature_bit: u32) -> bool {
        self.features & (1 << feature_bit) != 0
    }
}

/// The frontend end of one vhost-user connection.
pub struct UserspaceFrontend {
    frontend: Frontend,
    num_queues: usize,
    negotiated: Option<Negotiated>,
}

impl UserspaceFrontend {
    /// A frontend for a backend with `num_queues` queues, on a connected socket.
    pub fn new(connection: UnixStream, num_queues: usize) -> Self {
        UserspaceFrontend {
            frontend: Frontend::from_stream(connection, num_queues as u64),
            num_queues,
            negotiated: None,
        }
    }

    /// SET_OWNER, then features: the backend's offer masked by `wanted` (VERSION_1 is
    /// always asked for; VHOST_USER_F_PROTOCOL_FEATURES whenever offered), then protocol
    /// features masked by `wanted_protocol`. REPLY_ACK, when agreed, makes every later
    /// request wait for the backend's verdict, so a refused request fails right here.
    pub fn negotiate(
        &mut self,
        wanted: u64,
        wanted_protocol: VhostUserProtocolFeatures,
    ) -> Result<Negotiated, FrontendError> {
        self.frontend.set_owner()?;
        let offered = self.frontend.get_features()?;
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FrontendError::NotModern(offered));
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = offered & (wanted | (1 << VIRTIO_F_VERSION_1) | protocol_bit);
        self.frontend.set_features(features)?;

        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if features & protocol_bit != 0 {
            protocol_features = self.frontend.get_protocol_features()? & wanted_protocol;
            self.frontend.set_protocol_features(protocol_features)?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let negotiated = Negotiated {
            features,
            protocol_features,
        };
        self.negotiated = Some(negotiated);
        Ok(negotiated)
    }

    /// Shares `memory` with the backend (SET_MEM_TABLE).
    pub fn set_mem_table(&mut self, memory: &SharedMemory) -> Result<(), FrontendError> {
        self.frontend.set_mem_table(&memory.regions())?;
        Ok(())
    }

    /// Hands queue `index` to the backend and starts it: SET_VRING_NUM, SET_VRING_BASE,
    /// SET_VRING_ADDR, SET_VRING_CALL, SET_VRING_KICK, and SET_VRING_ENABLE when
    /// VHOST_USER_F_PROTOCOL_FEATURES was negotiated. The call eventfd goes before the kick,
    /// so no completion can be signalled into the void.
    pub fn start_queue(
        &mut self,
        index: usize,
        queue: &SplitQueueDriver,
    ) -> Result<(), FrontendError> {
        self.resume_queue(index, queue, 0)
    }

    /// [`start_queue`](Self::start_queue) for a queue the backend served before: it resumes
    /// at avail index `base`, as returned by [`stop_queue`](Self::stop_queue).
    pub fn resume_queue(
        &mut self,
        index: usize,
        queue: &SplitQueueDriver,
        base: u16,
    ) -> Result<(), FrontendError> {
        if index >= self.num_queues {
            return Err(FrontendError::NoSuchQueue {
                index,
                num_queues: self.num_queues,
            });
        }
        let layout = queue.layout();
        let memory = queue.memory();
        self.frontend.set_vring_num(index, layout.size)?;
        self.frontend.set_vring_base(index, base)?;
        let config = VringConfigData {
            queue_max_size: layout.size,
            queue_size: layout.size,
            flags: 0,
            desc_table_addr: memory.host_address(layout.desc_table)?,
            used_ring_addr: memory.host_address(layout.used_ring)?,
            avail_ring_addr: memory.host_address(layout.avail_ring)?,
            log_addr: None,
        };
        self.frontend.set_vring_addr(index, &config)?;
        self.frontend.set_vring_call(index, queue.call_eventfd())?;
        self.frontend.set_vring_kick(index, queue.kick_eventfd())?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self
            .negotiated
            .is_some_and(|n| n.features & protocol_bit != 0)
        {
            self.frontend.set_vring_enable(index, true)?;
        }
        Ok(())
    }

    /// Stops queue `index` (GET_VRING_BASE); returns the backend's next avail index.
    pub fn stop_queue(&mut self, index: usize) -> Result<u32, FrontendError> {
        Ok(self.frontend.get_vring_base(index)?)
    }

    /// GET_INFLIGHT_FD: asks the backend for a fresh inflight region for `num_queues` queues
    /// of `queue_size`; returns the region's description and its descriptor, which a
    /// frontend keeps for the backend's successor.
    pub fn get_inflight_fd(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(VhostUserInflight, File), FrontendError> {
        let request = VhostUserInflight {
            num_queues,
            queue_size,
            ..Default::default()
        };
        Ok(self.frontend.get_inflight_fd(&request)?)
    }

    /// SET_INFLIGHT_FD: hands the backend a region (normally one its predecessor
    /// created), described by `inflight` - which a test may make lie.
    pub fn set_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
        file: &File,
    ) -> Result<(), FrontendError> {
        self.frontend.set_inflight_fd(inflight, file.as_raw_fd())?;
        Ok(())
    }

    /// The `vhost` crate's frontend, for requests this wrapper does not cover.
    pub fn inner(&mut self) -> &mut Frontend {
        &mut self.frontend
    }
}
