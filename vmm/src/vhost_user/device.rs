//! A virtio device served by a vhost-user backend (a bulkhead worker or any standard
//! backend). The VMM keeps the transport registers; on DRIVER_OK it tells the backend
//! where guest memory and the rings are, and which eventfds carry kicks and interrupts.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::reply_watchdog::{Armed, ReplyWatchdog};
use crate::memory::GuestMemory;
use crate::virtio::{ActivateError, InflightRegion, QueueConfig, VirtioDevice, VIRTIO_F_VERSION_1};

/// Protocol features bulkhead can use, when the backend offers them. A backend offers
/// INFLIGHT_SHMFD when its device completes requests out of order.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

#[derive(Debug, Error)]
pub enum VhostUserDeviceError {
    #[error("vhost-user {step} failed: {source}")]
    Protocol {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the backend does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    #[error("the backend serves {offered} queues, the device needs {needed}")]
    TooFewQueues { offered: u64, needed: usize },
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserDeviceError {
    move |source| VhostUserDeviceError::Protocol { step, source }
}

pub struct VhostUserDevice {
    device_type: u32,
    queue_sizes: Vec<u16>,
    frontend: Frontend,
    /// Features the backend offers (including vhost-user's own PROTOCOL_FEATURES bit).
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    memory: GuestMemory,
    config_size: usize,
    /// Queues handed to the backend at the last activation, to stop them on reset.
    active_queues: Vec<u16>,
    /// The inflight region of the running queues (INFLIGHT_SHMFD): from this backend's
    /// GET_INFLIGHT_FD, or inherited from the backend it replaced.
    inflight: Option<InflightRegion>,
    /// Whether `inflight` came from a predecessor and must be sent with SET_INFLIGHT_FD.
    inflight_inherited: bool,
    /// Kills the backend if it leaves an operation unanswered (a worker the VMM started).
    watchdog: Option<ReplyWatchdog>,
}

impl VhostUserDevice {
    /// Connects to a backend over `stream` and learns what it offers. `watchdog`, for a
    /// backend the VMM can kill, bounds how long each operation waits for it.
    pub fn connect(
        stream: UnixStream,
        device_type: u32,
        queue_sizes: Vec<u16>,
        config_size: usize,
        memory: GuestMemory,
        watchdog: Option<ReplyWatchdog>,
    ) -> Result<Self, VhostUserDeviceError> {
        let _armed = watchdog.as_ref().map(|w| w.arm("the handshake"));
        let mut frontend = Frontend::from_stream(stream, queue_sizes.len() as u64);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserDeviceError::NotModern);
        }
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            protocol_features = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(protocol_features)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
        }
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message then waits for the backend to have acted on it, so a backend's
            // refusal (a bad memory table, a ring outside guest memory) fails activation
            // here instead of leaving a dead ring, and the rings are enabled before the VMM
            // kicks them: the vhost-user-backend crate's handler drops a kick that reaches a
            // ring still disabled (bulkhead's workers look at a ring again when it is
            // enabled, but other backends need not).
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let offered = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
            if offered < queue_sizes.len() as u64 {
                return Err(VhostUserDeviceError::TooFewQueues {
                    offered,
                    needed: queue_sizes.len(),
                });
            }
        }
        Ok(Self {
            device_type,
            queue_sizes,
            frontend,
            backend_features,
            protocol_features,
            memory,
            config_size,
            active_queues: Vec::new(),
            inflight: None,
            inflight_inherited: false,
            watchdog,
        })
    }

    /// Times operation `what` until the returned guard is dropped.
    fn armed(&self, what: &'static str) -> Option<Armed> {
        self.watchdog.as_ref().map(|w| w.arm(what))
    }

    /// Sets up inflight tracking before the rings, as the spec asks: a backend taking over
    /// running queues gets its predecessor's region (SET_INFLIGHT_FD); otherwise the
    /// backend makes a fresh one (GET_INFLIGHT_FD), which the VMM keeps for its successor.
    fn set_up_inflight(&mut self) -> Result<(), VhostUserDeviceError> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            self.inflight = None;
            return Ok(());
        }
        match &self.inflight {
            Some(region) if self.inflight_inherited => {
                let description = VhostUserInflight {
                    mmap_size: region.mmap_size,
                    mmap_offset: region.mmap_offset,
                    num_queues: region.num_queues,
                    queue_size: region.queue_size,
                };
                self.frontend
                    .set_inflight_fd(&description, region.file.as_raw_fd())
                    .map_err(step("SET_INFLIGHT_FD"))?;
                self.inflight_inherited = false;
            }
            _ => {
                // Big enough for any ring size the driver may choose.
                let queue_size = self.queue_sizes.iter().copied().max().unwrap_or(0);
                let request = VhostUserInflight {
                    num_queues: self.queue_sizes.len() as u16,
                    queue_size,
                    ..Default::default()
                };
                let (reply, file) = self
                    .frontend
                    .get_inflight_fd(&request)
                    .map_err(step("GET_INFLIGHT_FD"))?;
                self.inflight = Some(InflightRegion {
                    file: Arc::new(file),
                    mmap_size: reply.mmap_size,
                    mmap_offset: reply.mmap_offset,
                    num_queues: reply.num_queues,
                    queue_size: reply.queue_size,
                });
            }
        }
        Ok(())
    }

    fn memory_table(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserDeviceError> {
        self.memory
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region)
                    .map_err(step("describing guest memory"))
            })
            .collect()
    }

    /// vhost-user wants ring addresses in the frontend's address space.
    fn host_address(&self, queue: &QueueConfig, guest: u64) -> Result<u64, ActivateError> {
        self.memory
            .get_host_address(GuestAddress(guest))
            .map(|host| host as u64)
            .map_err(|_| ActivateError::BadQueue {
                index: queue.index,
                problem: format!("ring address {guest:#x} is not in guest RAM"),
            })
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        // The PROTOCOL_FEATURES bit is vhost-user's business, not the guest's.
        self.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let in_range = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.config_size as u64);
        if !in_range
            || !self
                .protocol_features
                .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return;
        }
        // GET_CONFIG needs `&mut`; config reads are rare, so a short-lived clone of the
        // connection handle (it shares the socket and its lock) keeps this method `&self`.
        let _armed = self.armed("GET_CONFIG");
        let mut frontend = self.frontend.clone();
        match frontend.get_config(
            offset as u32,
            data.len() as u32,
            VhostUserConfigFlags::WRITABLE,
            data,
        ) {
            Ok((_, payload)) if payload.len() == data.len() => data.copy_from_slice(&payload),
            Ok(_) => tracing::warn!("vhost-user GET_CONFIG returned a short payload"),
            Err(e) => tracing::warn!("vhost-user GET_CONFIG failed: {e}"),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return;
        }
        let _armed = self.armed("SET_CONFIG");
        if let Err(e) =
            self.frontend
                .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        {
            tracing::warn!("vhost-user SET_CONFIG failed: {e}");
        }
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueConfig],
        kicks: &[EventFd],
        interrupt: &EventFd,
    ) -> Result<(), ActivateError> {
        let _armed = self.armed("the activation");
        self.active_queues.clear();
        let backend = |e: VhostUserDeviceError| ActivateError::Backend(e.to_string());
        let protocol_bit =
            self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(acked_features | protocol_bit)
            .map_err(step("SET_FEATURES"))
            .map_err(backend)?;
        let table = self.memory_table().map_err(backend)?;
        self.frontend
            .set_mem_table(&table)
            .map_err(step("SET_MEM_TABLE"))
            .map_err(backend)?;
        self.set_up_inflight().map_err(backend)?;
        for queue in queues {
            let index = usize::from(queue.index);
            let max = self.queue_sizes.get(index).copied().unwrap_or(0);
            let kick = kicks.get(index).ok_or_else(|| ActivateError::BadQueue {
                index: queue.index,
                problem: "no notification eventfd".into(),
            })?;
            let rings = VringConfigData {
                queue_max_size: max,
                queue_size: queue.size,
                flags: 0,
                desc_table_addr: self.host_address(queue, queue.descriptors)?,
                used_ring_addr: self.host_address(queue, queue.device_area)?,
                avail_ring_addr: self.host_address(queue, queue.driver_area)?,
                log_addr: None,
            };
            let steps: [(&'static str, Result<(), vhost::Error>); 5] = [
                (
                    "SET_VRING_NUM",
                    self.frontend.set_vring_num(index, queue.size),
                ),
                (
                    "SET_VRING_ADDR",
                    self.frontend.set_vring_addr(index, &rings),
                ),
                (
                    "SET_VRING_BASE",
                    self.frontend.set_vring_base(index, queue.next_avail),
                ),
                (
                    "SET_VRING_CALL",
                    self.frontend.set_vring_call(index, interrupt),
                ),
                ("SET_VRING_KICK", self.frontend.set_vring_kick(index, kick)),
            ];
            for (name, result) in steps {
                result.map_err(step(name)).map_err(backend)?;
            }
            // With PROTOCOL_FEATURES negotiated, rings start disabled (vhost-user spec).
            if protocol_bit != 0 {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(step("SET_VRING_ENABLE"))
                    .map_err(backend)?;
            }
            self.active_queues.push(queue.index);
        }
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            // A backend handles its messages in order: once this reply is in, the rings are
            // enabled (see `connect`).
            self.frontend
                .get_features()
                .map_err(step("GET_FEATURES"))
                .map_err(backend)?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        // GET_VRING_BASE stops a ring (vhost-user spec); the backend keeps no state.
        let _armed = self.armed("GET_VRING_BASE");
        for index in std::mem::take(&mut self.active_queues) {
            if let Err(e) = self.frontend.get_vring_base(usize::from(index)) {
                tracing::warn!(queue = index, "vhost-user GET_VRING_BASE failed: {e}");
            }
        }
        // The driver starts its rings afresh: nothing is owed from before.
        self.inflight = None;
        self.inflight_inherited = false;
    }

    fn inflight_region(&self) -> Option<InflightRegion> {
        self.inflight.clone()
    }

    fn adopt_inflight_region(&mut self, region: InflightRegion) {
        self.inflight = Some(region);
        self.inflight_inherited = true;
    }
}
