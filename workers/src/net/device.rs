//! The virtio-net device (virtio 1.2, section 5.1): receive/transmit queue pairs on the
//! queues of one TAP device, one TAP queue per pair.
//!
//! Multiqueue: with several pairs the device also has a control queue (the last one) and
//! offers VIRTIO_NET_F_MQ, which Linux takes only with VIRTIO_NET_F_CTRL_VQ. The guest
//! starts with one pair and enables more with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET. The kernel
//! hashes flows onto every queue of a multiqueue TAP, enabled pairs or not, so each TAP
//! queue's frames go to receive queue `tap queue % enabled pairs`: no TAP queue is ever
//! left unread, and nothing about the TAP changes when the guest changes its pairs (nor
//! when a restarted worker does not know what the guest had enabled: it starts with one
//! pair, which the guest's receive queue 0 always serves). Transmit queue `p` writes to
//! TAP queue `p`, whichever pairs are enabled.
//!
//! Transmit: each chain is a vnet header and a frame, both device-readable; a copy of the
//! header is checked ([`VnetHeader::check_tx`]) and written to the TAP with the frame, one
//! writev straight from guest memory - the kernel does whatever offload work the header
//! asks for. When the TAP's queue is full
//! the chain goes back on the ring and the device waits for the TAP to become writable.
//!
//! Receive: the TAP is watched in the queue thread, through an epoll set of the device's
//! own so that the device can stop watching it. A frame read from the TAP goes into one
//! chain or, with mergeable buffers, into as many as it takes (`num_buffers` says how
//! many). With no buffer posted the frame waits in the device and the TAP is not watched
//! until the guest posts more: the kernel's queue holds further frames (and drops what
//! overflows it, as a NIC without descriptors would); the worker neither spins nor drops.
//!
//! Whatever a guest sends that is malformed - a bad header, an oversized frame, a chain
//! with writable buffers on the transmit queue - is dropped and counted in [`NetStats`],
//! never fatal.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT, Writer};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::header::{VnetHeader, MAX_FRAME_LEN};
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN};
use crate::vhost_user::{DeviceBackend, EventSource, GuestRam};
use crate::virtio::drain::{notify, settle};
use crate::virtio::{drain, writable_len, Drained, Next, QueueFault};

/// Queues of a device with one pair (no control queue).
pub const NUM_QUEUES: usize = 2;
pub const MAX_QUEUE_SIZE: usize = 1024;
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// The most queue pairs a device serves: all its queues fit one vring thread's event ids.
pub const MAX_QUEUE_PAIRS: usize = 16;
/// Readable bytes of a control command looked at: class, command and the largest data
/// this device understands; longer commands are answered from their first bytes.
const CTRL_PEEK_LEN: usize = 64;
/// Largest chain either way: header and the largest frame.
const MAX_CHAIN_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// The virtio-net configuration space served: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("cannot create the device's epoll set: {0}")]
    Epoll(io::Error),
    #[error("{0} TAP queues: a device has 1 to {MAX_QUEUE_PAIRS} queue pairs, one TAP queue each")]
    QueuePairs(usize),
}

/// What the device has done, shared with whoever wants to look (logs, tests).
#[derive(Debug, Default)]
pub struct NetStats {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Transmitted chains dropped: bad header, oversized, malformed chain, or refused by
    /// the kernel.
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Received frames dropped: no mergeable buffers and a chain too small for the frame.
    pub rx_dropped: AtomicU64,
    /// Receive chains given back unused because they were malformed.
    pub rx_bad_chains: AtomicU64,
    /// Control commands answered VIRTIO_NET_ERR: unknown, or asking for what cannot be.
    pub ctrl_refused: AtomicU64,
    /// Control chains given back unanswered because they were malformed.
    pub ctrl_bad_chains: AtomicU64,
}

/// What the guest is told in the configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSettings {
    pub mac: [u8; 6],
    pub mtu: Option<u16>,
}

/// Why a transmitted chain was dropped.
#[derive(Debug, Error)]
enum TxDrop {
    #[error("descriptor {0} of the chain is device-writable")]
    Writable(u32),
    #[error("the chain does not end, or is longer than the queue")]
    Unterminated,
    #[error("the chain holds {0} bytes, fewer than the 12-byte vnet header")]
    ShortHeader(usize),
    #[error("the chain holds {0} bytes, more than a header and a {MAX_FRAME_LEN}-byte frame")]
    Oversized(u64),
    #[error("the chain's buffers are not in guest memory: {0}")]
    Memory(String),
    #[error("bad vnet header: {0}")]
    Header(#[from] super::header::HeaderError),
    #[error("the TAP refused the frame: {0}")]
    Refused(io::Error),
}

/// Why a control chain was given back unanswered.
#[derive(Debug, Error)]
enum CtrlDrop {
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    #[error("a device-readable buffer follows the writable status")]
    ReadableAfterStatus,
    #[error("the chain does not end, or is longer than the queue")]
    Unterminated,
    #[error("the command has {0} bytes, fewer than its class and command")]
    Short(usize),
    #[error("the chain's buffers are not in guest memory: {0}")]
    Memory(String),
}

/// What a queue index stands for under the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Rx(usize),
    Tx(usize),
    Control,
}

/// How delivering the pending received frame went.
enum Delivery {
    Delivered,
    Dropped,
    /// The ring has `offered` buffers past the device's position, too few for the frame.
    NoBuffers {
        offered: u16,
    },
}

/// One TAP queue and what the device keeps about it.
struct TapQueue {
    tap: Arc<Tap>,
    /// Holds the TAP with `interest`; empty interest means the TAP is not in the set.
    poll: Epoll,
    interest: EventSet,
    rx_frame: Vec<u8>,
    /// Length of the frame in `rx_frame` read from the TAP but not yet delivered; 0: none.
    rx_len: usize,
    /// The TAP's queue was full: the device waits for it to be writable.
    tx_blocked: bool,
}

impl TapQueue {
    fn set_interest(&mut self, want: EventSet) -> io::Result<()> {
        if want == self.interest {
            return Ok(());
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.tap);
        let op = if self.interest.is_empty() {
            ControlOperation::Add
        } else if want.is_empty() {
            ControlOperation::Delete
        } else {
            ControlOperation::Modify
        };
        self.poll.ctl(op, fd, EpollEvent::new(want, 0))?;
        self.interest = want;
        Ok(())
    }
}

pub struct NetDevice {
    /// One per queue pair, in pair order.
    taps: Vec<TapQueue>,
    /// Pairs the guest has enabled (VQ_PAIRS_SET); 1 until it says otherwise.
    enabled_pairs: usize,
    settings: NetSettings,
    memory: Option<GuestRam>,
    features: u64,
    event_idx: bool,
    stats: Arc<NetStats>,
    ring_fault_reported: Vec<bool>,
}

impl NetDevice {
    /// A device with one queue pair per TAP queue in `taps` (all queues of one TAP).
    pub fn new(
        taps: Vec<Arc<Tap>>,
        settings: NetSettings,
        stats: Arc<NetStats>,
    ) -> Result<NetDevice, NetError> {
        if taps.is_empty() || taps.len() > MAX_QUEUE_PAIRS {
            return Err(NetError::QueuePairs(taps.len()));
        }
        let taps = taps
            .into_iter()
            .map(|tap| {
                Ok(TapQueue {
                    tap,
                    poll: Epoll::new().map_err(NetError::Epoll)?,
                    interest: EventSet::empty(),
                    rx_frame: vec![0; MAX_CHAIN_LEN],
                    rx_len: 0,
                    tx_blocked: false,
                })
            })
            .collect::<Result<Vec<_>, NetError>>()?;
        let num_queues = queues_for(taps.len());
        Ok(NetDevice {
            taps,
            enabled_pairs: 1,
            settings,
            memory: None,
            features: 0,
            event_idx: false,
            stats,
            ring_fault_reported: vec![false; num_queues],
        })
    }

    pub fn into_backend(mut self) -> Result<DeviceBackend<Arc<RwLock<NetDevice>>>, NetError> {
        // Watch the TAP from the start; the first event with no receive ring running just
        // stops watching it again until the ring starts.
        let mut event_sources = Vec::with_capacity(self.taps.len());
        for index in 0..self.taps.len() {
            let tap = &mut self.taps[index];
            tap.set_interest(EventSet::IN).map_err(NetError::Epoll)?;
            event_sources.push(EventSource {
                fd: std::os::fd::AsRawFd::as_raw_fd(&tap.poll),
                id: self.tap_event(index),
                thread: 0,
            });
        }
        Ok(DeviceBackend {
            backend: Arc::new(RwLock::new(self)),
            event_sources,
            // Chains complete in order; the used index says all there is.
            inflight: None,
        })
    }

    fn has(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    fn multiqueue(&self) -> bool {
        self.taps.len() > 1
    }

    /// The event id of TAP queue `index`'s epoll set: past the queues' ids and the
    /// server's own.
    fn tap_event(&self, index: usize) -> u16 {
        (queues_for(self.taps.len()) + 1 + index) as u16
    }

    /// Pairs the guest may use: all of them with VIRTIO_NET_F_MQ, else the first.
    fn usable_pairs(&self) -> usize {
        if self.has(VIRTIO_NET_F_MQ) {
            self.taps.len()
        } else {
            1
        }
    }

    /// What queue `queue` is (virtio 1.2, 5.1.2): the pairs first, then the control queue
    /// right after the last pair the features allow.
    fn role(&self, queue: usize) -> Option<Role> {
        let pairs = self.usable_pairs();
        if queue < 2 * pairs {
            Some(if queue.is_multiple_of(2) {
                Role::Rx(queue / 2)
            } else {
                Role::Tx(queue / 2)
            })
        } else if queue == 2 * pairs && self.has(VIRTIO_NET_F_CTRL_VQ) {
            Some(Role::Control)
        } else {
            None
        }
    }

    /// The receive queue TAP queue `index` delivers to.
    fn rx_queue_of(&self, index: usize) -> usize {
        2 * (index % self.enabled_pairs.max(1))
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0; CONFIG_LEN];
        config[0..6].copy_from_slice(&self.settings.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&(self.taps.len() as u16).to_le_bytes());
        config[10..12].copy_from_slice(&self.settings.mtu.unwrap_or(0).to_le_bytes());
        config
    }

    /// The TUN_F_* offloads matching what the guest can receive.
    fn tap_offloads(&self) -> u32 {
        let mut flags = 0;
        // The kernel refuses TSO without checksum offload, and so does virtio.
        if self.has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if self.has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if self.has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
            if self.has(VIRTIO_NET_F_GUEST_ECN) && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                flags |= TUN_F_TSO_ECN;
            }
            if self.has(VIRTIO_NET_F_GUEST_UFO) {
                flags |= TUN_F_UFO;
            }
        }
        flags
    }

    fn running(vring: &VringRwLock) -> bool {
        let state = vring.get_ref();
        state.is_enabled() && state.get_queue().ready()
    }

    fn handle_fault(&mut self, queue: usize, result: Result<(), QueueFault>) -> io::Result<()> {
        let mut ignored = false;
        let reported = self
            .ring_fault_reported
            .get_mut(queue)
            .unwrap_or(&mut ignored);
        settle(result, format_args!("queue {queue}"), reported)
    }

    // ---- transmit ----

    fn process_tx(&mut self, pair: usize, vring: &VringRwLock) -> io::Result<()> {
        // Set again below if the TAP is still full; a stopped ring waits for nothing.
        self.taps[pair].tx_blocked = false;
        let Some(memory) = self.memory.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        if !Self::running(vring) {
            return Ok(());
        }
        let mut state = vring.get_mut();
        let mut drained = Drained::default();
        let result = drain(&mut state, &memory, self.event_idx, &mut drained, |chain| {
            Ok::<_, QueueFault>(self.transmit(pair, chain, &memory))
        });
        let notified = notify(&mut state, drained.completed, false);
        drop(state);
        for _ in 0..drained.bad_heads {
            self.tx_drop("head index out of range");
        }
        self.handle_fault(2 * pair + 1, result.and(notified))
    }

    /// Sends one chain, or leaves it on the ring while the TAP is full: read again from
    /// guest memory when the TAP has room, so that the ring's state is all there is to it
    /// (a stop or a restart in between loses nothing).
    fn transmit(
        &mut self,
        pair: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> Next {
        match self.send_chain(pair, chain, memory) {
            Ok(len) => {
                self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.stats.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(TxDrop::Refused(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.taps[pair].tx_blocked = true;
                return Next::PutBack;
            }
            Err(reason) => self.tx_drop(&reason.to_string()),
        }
        Next::Used(0)
    }

    fn tx_drop(&self, reason: &str) {
        let dropped = self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if dropped == 1 {
            tracing::warn!("tx frame dropped: {reason} ({dropped} tx frames dropped so far; further drops are logged at debug level)");
        } else {
            tracing::debug!("tx frame dropped: {reason} ({dropped} tx frames dropped so far)");
        }
    }

    /// Checks one transmitted chain and writes it to the TAP; returns the frame's length.
    /// The vnet header is copied out of guest memory and checked, and the TAP gets that
    /// copy: another vCPU rewriting the header in guest memory meanwhile changes nothing.
    /// The frame itself goes from guest memory straight into the kernel (writev), which
    /// copies it once; its contents are the kernel's to parse, as on a real NIC.
    fn send_chain(
        &mut self,
        pair: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> Result<usize, TxDrop> {
        let descriptors = readable_descriptors(chain)?;
        let total: u64 = descriptors.iter().map(|&(_, len)| len as u64).sum();
        if total > MAX_CHAIN_LEN as u64 {
            return Err(TxDrop::Oversized(total));
        }
        let total = total as usize;
        if total < VNET_HDR_LEN {
            return Err(TxDrop::ShortHeader(total));
        }
        let memory_error = |e: vm_memory::GuestMemoryError| TxDrop::Memory(e.to_string());
        let mut header = [0u8; VNET_HDR_LEN];
        let mut filled = 0;
        let mut slices = Vec::with_capacity(descriptors.len());
        for (mut addr, mut len) in descriptors {
            if filled < VNET_HDR_LEN {
                let n = (VNET_HDR_LEN - filled).min(len);
                memory
                    .read_slice(&mut header[filled..filled + n], addr)
                    .map_err(memory_error)?;
                filled += n;
                addr = addr.unchecked_add(n as u64);
                len -= n;
            }
            if len > 0 {
                for slice in GuestMemoryBackend::get_slices(memory, addr, len) {
                    slices.push(slice.map_err(memory_error)?);
                }
            }
        }
        VnetHeader::parse(&header).check_tx(total - VNET_HDR_LEN, self.features)?;
        let guards: Vec<_> = slices.iter().map(|slice| slice.ptr_guard()).collect();
        let mut iov = Vec::with_capacity(guards.len() + 1);
        iov.push(libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: VNET_HDR_LEN,
        });
        iov.extend(
            guards
                .iter()
                .zip(&slices)
                .map(|(guard, slice)| libc::iovec {
                    iov_base: guard.as_ptr() as *mut libc::c_void,
                    iov_len: slice.len(),
                }),
        );
        // SAFETY: the first iovec is `header`, the others point into guest memory mapped
        // for as long as `memory` (held by the caller) lives, each within a region
        // (get_slices checked the ranges); the guards keep them valid across the call.
        match unsafe { self.taps[pair].tap.writev(&iov) } {
            Ok(_) => Ok(total - VNET_HDR_LEN),
            Err(e) => Err(TxDrop::Refused(e)),
        }
    }

    // ---- receive ----

    /// Moves what TAP queue `index` has into receive ring `vring` (the one
    /// [`rx_queue_of`](Self::rx_queue_of) names).
    fn process_rx(&mut self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(memory) = self.memory.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        if !Self::running(vring) {
            return Ok(());
        }
        let mut state = vring.get_mut();
        let mut completed = 0u32;
        let mut batched = false;
        let result = self.serve_rx(index, &mut state, &memory, &mut completed, &mut batched);
        let notified = notify(&mut state, completed, batched);
        drop(state);
        let queue = self.rx_queue_of(index);
        self.handle_fault(queue, result.and(notified))
    }

    /// Moves frames from the TAP to the ring until either runs dry. True in `batched` when
    /// a frame used several chains at once (event-index bookkeeping then under-counts).
    fn serve_rx(
        &mut self,
        index: usize,
        state: &mut VringState,
        memory: &GuestMemoryMmap,
        completed: &mut u32,
        batched: &mut bool,
    ) -> Result<(), QueueFault> {
        loop {
            let tap = &mut self.taps[index];
            if tap.rx_len == 0 {
                match tap.tap.read(&mut tap.rx_frame) {
                    Ok(n) if n <= VNET_HDR_LEN => continue,
                    Ok(n) => tap.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(QueueFault::Host(e)),
                }
            }
            match self.deliver(index, state, memory, completed, batched)? {
                Delivery::Delivered | Delivery::Dropped => self.taps[index].rx_len = 0,
                Delivery::NoBuffers { offered } => {
                    if ask_for_more_buffers(state.get_queue_mut(), memory, offered)? {
                        continue;
                    }
                    return Ok(());
                }
            }
        }
    }

    fn deliver(
        &mut self,
        index: usize,
        state: &mut VringState,
        memory: &GuestMemoryMmap,
        completed: &mut u32,
        batched: &mut bool,
    ) -> Result<Delivery, QueueFault> {
        let mergeable = self.has(VIRTIO_NET_F_MRG_RXBUF);
        let total = self.taps[index].rx_len;
        let queue = state.get_queue_mut();
        let size = queue.size();
        let mut chains: Vec<(u16, DescriptorChain<&GuestMemoryMmap>)> = Vec::new();
        let mut capacity = 0usize;
        while capacity < total {
            if chains.len() >= usize::from(size) {
                // Every buffer the ring can hold would not fit this frame: it would wait
                // forever. The buffers go back for the next frame; this one is dropped.
                for _ in 0..chains.len() {
                    queue.go_to_previous_position();
                }
                let dropped = self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(
                    "rx frame of {total} bytes dropped: a full ring of buffers holds {capacity} \
                     ({dropped} so far)"
                );
                return Ok(Delivery::Dropped);
            }
            let Some(chain) = queue.iter(memory)?.next() else {
                // Not enough room yet: the chains taken go back, the frame waits.
                for _ in 0..chains.len() {
                    queue.go_to_previous_position();
                }
                // Fewer than the ring's size, checked above.
                let offered = u16::try_from(chains.len()).unwrap_or(u16::MAX);
                return Ok(Delivery::NoBuffers { offered });
            };
            let head = chain.head_index();
            let len = if head >= size {
                Err("head index out of range".to_string())
            } else {
                writable_len(chain.clone(), size).map_err(|e| e.to_string())
            };
            let len = match len {
                Ok(len) => len as usize,
                Err(e) => {
                    let bad = self.stats.rx_bad_chains.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::debug!("rx chain {head} given back unused: {e} ({bad} so far)");
                    // A head outside the table has no descriptor to give back.
                    if head < size {
                        queue.add_used(memory, head, 0)?;
                        *completed = completed.saturating_add(1);
                    }
                    if chains.is_empty() {
                        continue;
                    }
                    // The ring cannot be rewound past a chain already given back, so the
                    // buffers taken for this frame go back empty and the frame is dropped.
                    for (taken, _) in chains {
                        queue.add_used(memory, taken, 0)?;
                        *completed = completed.saturating_add(1);
                    }
                    self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    return Ok(Delivery::Dropped);
                }
            };
            if !mergeable && len < total {
                // Without mergeable buffers one chain must hold the whole frame.
                let dropped = self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(
                    "rx frame of {total} bytes dropped: chain {head} holds {len} ({dropped} so far)"
                );
                queue.add_used(memory, head, 0)?;
                *completed = completed.saturating_add(1);
                return Ok(Delivery::Dropped);
            }
            chains.push((head, chain));
            capacity += len;
        }

        let num_buffers = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        let frame = &mut self.taps[index].rx_frame;
        frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        let mut offset = 0;
        let mut used = Vec::with_capacity(chains.len());
        for (head, chain) in chains {
            let written = match Writer::new(memory, chain) {
                Ok(mut writer) => {
                    let n = writer.available_bytes().min(total - offset);
                    match writer.write_all(&frame[offset..offset + n]) {
                        Ok(()) => n,
                        // Buffers outside guest memory: the guest sees a short frame.
                        Err(_) => writer.bytes_written(),
                    }
                }
                Err(_) => 0,
            };
            offset += written;
            used.push((head, written as u32));
        }
        publish_used(queue, memory, &used)?;
        if used.len() > 1 {
            *batched = true;
        }
        *completed = completed.saturating_add(used.len() as u32);
        self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.stats
            .rx_bytes
            .fetch_add((total - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Ok(Delivery::Delivered)
    }

    /// Watches TAP queue `index` for what the device can act on now.
    fn update_interest(&mut self, index: usize, vrings: &[VringRwLock]) -> io::Result<()> {
        let rx_running = self.memory.is_some()
            && vrings
                .get(self.rx_queue_of(index))
                .is_some_and(Self::running);
        let tap = &mut self.taps[index];
        let mut want = EventSet::empty();
        // A frame still waiting means no buffers: reading on would only pile up more.
        if rx_running && tap.rx_len == 0 {
            want |= EventSet::IN;
        }
        if tap.tx_blocked {
            want |= EventSet::OUT;
        }
        tap.set_interest(want)
    }

    // ---- control ----

    fn process_ctrl(&mut self, queue: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(memory) = self.memory.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        if !Self::running(vring) {
            return Ok(());
        }
        let mut state = vring.get_mut();
        let mut drained = Drained::default();
        let result = drain(&mut state, &memory, self.event_idx, &mut drained, |chain| {
            Ok::<_, QueueFault>(match self.control(chain, &memory) {
                Ok(()) => Next::Used(1),
                Err(reason) => {
                    self.ctrl_drop(&reason.to_string());
                    Next::Used(0)
                }
            })
        });
        let notified = notify(&mut state, drained.completed, false);
        drop(state);
        for _ in 0..drained.bad_heads {
            self.ctrl_drop("head index out of range");
        }
        self.handle_fault(queue, result.and(notified))
    }

    fn ctrl_drop(&self, reason: &str) {
        let bad = self.stats.ctrl_bad_chains.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!("control chain given back unanswered: {reason} ({bad} so far)");
    }

    /// Reads one command (class, command, data: device-readable; then a writable status
    /// byte), carries it out and writes the status.
    fn control(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> Result<(), CtrlDrop> {
        let mut command = [0u8; CTRL_PEEK_LEN];
        let mut len = 0usize;
        let mut total = 0u64;
        let mut status = None;
        let mut ended = false;
        for descriptor in chain {
            ended = !descriptor.has_next();
            if descriptor.is_write_only() {
                if status.is_none() && descriptor.len() > 0 {
                    status = Some(descriptor.addr());
                }
                continue;
            }
            if status.is_some() {
                return Err(CtrlDrop::ReadableAfterStatus);
            }
            total += u64::from(descriptor.len());
            let take = (descriptor.len() as usize).min(CTRL_PEEK_LEN - len);
            memory
                .read_slice(&mut command[len..len + take], descriptor.addr())
                .map_err(|e| CtrlDrop::Memory(e.to_string()))?;
            len += take;
        }
        if !ended {
            return Err(CtrlDrop::Unterminated);
        }
        let Some(status_addr) = status else {
            return Err(CtrlDrop::NoStatus);
        };
        if len < 2 {
            return Err(CtrlDrop::Short(total as usize));
        }
        let answer = match self.command(command[0], command[1], &command[2..len]) {
            Ok(()) => VIRTIO_NET_OK as u8,
            Err(reason) => {
                let refused = self.stats.ctrl_refused.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!("control command refused: {reason} ({refused} so far)");
                VIRTIO_NET_ERR as u8
            }
        };
        memory
            .write_obj(answer, status_addr)
            .map_err(|e| CtrlDrop::Memory(e.to_string()))
    }

    /// Carries out a well-formed command; Err(why) is answered VIRTIO_NET_ERR.
    fn command(&mut self, class: u8, command: u8, data: &[u8]) -> Result<(), String> {
        if u32::from(class) != VIRTIO_NET_CTRL_MQ
            || u32::from(command) != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
        {
            return Err(format!("class {class} command {command} is not supported"));
        }
        if !self.has(VIRTIO_NET_F_MQ) {
            return Err("VQ_PAIRS_SET without VIRTIO_NET_F_MQ".to_owned());
        }
        let [low, high, ..] = *data else {
            return Err(format!(
                "VQ_PAIRS_SET with {} bytes of data, not 2",
                data.len()
            ));
        };
        let pairs = usize::from(u16::from_le_bytes([low, high]));
        if pairs == 0 || pairs > self.taps.len() {
            return Err(format!(
                "VQ_PAIRS_SET {pairs}: the device has 1 to {} pairs",
                self.taps.len()
            ));
        }
        // Once per driver probe or ethtool -L: worth seeing at the default level.
        tracing::info!("{pairs} queue pairs enabled");
        self.enabled_pairs = pairs;
        Ok(())
    }
}

/// Queues of a device with `pairs` pairs: with more than one, a control queue follows.
pub fn queues_for(pairs: usize) -> usize {
    if pairs > 1 {
        2 * pairs + 1
    } else {
        2 * pairs
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        let s = &self.stats;
        let n = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        tracing::info!(
            "TAP {} ({} queues): sent {} frames ({} bytes), {} dropped; received {} frames \
             ({} bytes), {} dropped, {} bad receive chains; {} control commands refused, {} bad \
             control chains",
            self.taps[0].tap.name(),
            self.taps.len(),
            n(&s.tx_frames),
            n(&s.tx_bytes),
            n(&s.tx_dropped),
            n(&s.rx_frames),
            n(&s.rx_bytes),
            n(&s.rx_dropped),
            n(&s.rx_bad_chains),
            n(&s.ctrl_refused),
            n(&s.ctrl_bad_chains)
        );
    }
}

/// Adds the chains of one frame to the used ring and makes them visible at once: a guest
/// reading the first of them must find all `num_buffers` there.
/// Asks the guest for a kick once it posts buffers beyond the `offered` ones past the
/// device's position, which are too few for the waiting frame; true when it already has
/// (looked at after asking, so a buffer posted in between is not missed). The usual
/// re-enabling would count the `offered` buffers as new and have the device retry at once,
/// spinning on them, with the ring and the device locked, until the guest posts more.
fn ask_for_more_buffers<Q: QueueT>(
    queue: &mut Q,
    memory: &GuestMemoryMmap,
    offered: u16,
) -> Result<bool, QueueFault> {
    // enable_notification asks for a kick past the device's position (avail_event with
    // EVENT_IDX) and compares the avail index with it: moved past the offered buffers
    // for that, and back.
    let position = queue.next_avail();
    queue.set_next_avail(position.wrapping_add(offered));
    let more = queue.enable_notification(memory);
    queue.set_next_avail(position);
    Ok(more?)
}

fn publish_used<Q: QueueT>(
    queue: &mut Q,
    memory: &GuestMemoryMmap,
    used: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), first)) = used.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    let ring = queue.used_ring();
    let start = queue.next_used();
    // All but the last element are written without moving the used index...
    for (i, &(head, len)) in first.iter().enumerate() {
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        let addr = GuestAddress(ring)
            .checked_add(4 + 8 * slot)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let element = (u64::from(len) << 32) | u64::from(head);
        memory
            .write_obj(element.to_le(), addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    // ...then the last one moves it past all of them, with a release store.
    queue.set_next_used(start.wrapping_add(first.len() as u16));
    queue.add_used(memory, last_head, last_len)
}

/// The buffers of a chain made only of device-readable buffers, (address, length) each.
fn readable_descriptors(
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<(GuestAddress, usize)>, TxDrop> {
    let mut descriptors = Vec::new();
    let mut total = 0u64;
    let mut ended = false;
    for descriptor in chain {
        if descriptor.is_write_only() {
            return Err(TxDrop::Writable(descriptors.len() as u32));
        }
        total += u64::from(descriptor.len());
        // Stop collecting early: the caller refuses a chain this long anyway.
        if total > MAX_CHAIN_LEN as u64 {
            return Err(TxDrop::Oversized(total));
        }
        descriptors.push((descriptor.addr(), descriptor.len() as usize));
        ended = !descriptor.has_next();
    }
    if descriptors.is_empty() || !ended {
        return Err(TxDrop::Unterminated);
    }
    Ok(descriptors)
}

impl VhostUserBackendMut for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        queues_for(self.taps.len())
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MAC,
        ];
        let mut features = bits.iter().fold(0u64, |acc, &bit| acc | (1 << bit))
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.settings.mtu.is_some() {
            features |= 1 << VIRTIO_NET_F_MTU;
        }
        if self.multiqueue() {
            features |= (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ);
        }
        features
    }

    fn acked_features(&mut self, features: u64) {
        self.features = features;
        let offloads = self.tap_offloads();
        // Offloads belong to the TAP device, not to one of its queues.
        let tap = &self.taps[0].tap;
        if let Err(e) = tap.set_offload(offloads) {
            // Older kernels know no UFO; the guest then just never gets UFO frames.
            let fallback = offloads & !(TUN_F_UFO | TUN_F_TSO_ECN);
            match tap.set_offload(fallback) {
                Ok(()) => {
                    tracing::debug!("TAP offloads {offloads:#x} refused ({e}); using {fallback:#x}")
                }
                Err(e) => tracing::warn!("cannot set the TAP's offloads {offloads:#x}: {e}"),
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&mut self) {
        // A frame read from the TAP but not delivered is kept for the next driver.
        self.event_idx = false;
        self.features = 0;
        self.enabled_pairs = 1;
        for tap in &mut self.taps {
            tap.tx_blocked = false;
        }
        self.ring_fault_reported.fill(false);
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        // Bytes past the fields this device has read as zero.
        (offset..offset.saturating_add(size))
            .map(|i| config.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    fn update_memory(&mut self, memory: GuestRam) -> io::Result<()> {
        self.memory = Some(memory);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let event = usize::from(device_event);
        let first_tap_event = usize::from(self.tap_event(0));
        if let Some(index) = event
            .checked_sub(first_tap_event)
            .filter(|&index| index < self.taps.len())
        {
            // Level-triggered: collect the set's readiness so it is re-evaluated, then
            // serve whichever direction can move.
            let mut events = [EpollEvent::default(); 1];
            self.taps[index].poll.wait(0, &mut events)?;
            if self.taps[index].tx_blocked {
                if let Some(tx) = vrings.get(2 * index + 1) {
                    self.process_tx(index, tx)?;
                }
            }
            if let Some(rx) = vrings.get(self.rx_queue_of(index)) {
                self.process_rx(index, rx)?;
            }
            return self.update_interest(index, vrings);
        }
        if event >= self.num_queues() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown device event {device_event}"),
            ));
        }
        let Some(vring) = vrings.get(event) else {
            return Ok(());
        };
        match self.role(event) {
            Some(Role::Tx(pair)) => {
                self.process_tx(pair, vring)?;
                self.update_interest(pair, vrings)
            }
            Some(Role::Rx(pair)) => {
                // Every TAP queue that delivers here may have waited for these buffers.
                for index in 0..self.taps.len() {
                    if self.rx_queue_of(index) == 2 * pair {
                        self.process_rx(index, vring)?;
                        self.update_interest(index, vrings)?;
                    }
                }
                Ok(())
            }
            Some(Role::Control) => {
                self.process_ctrl(event, vring)?;
                // The pairs may have changed: each TAP queue now feeds another ring.
                for index in 0..self.taps.len() {
                    self.update_interest(index, vrings)?;
                }
                Ok(())
            }
            // A queue the negotiated features leave unused: nothing to serve.
            None => Ok(()),
        }
    }
}
