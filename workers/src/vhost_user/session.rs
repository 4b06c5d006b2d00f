//! One frontend connection's state, and the answers to its messages.
//!
//! The `vhost` crate's `BackendReqHandler` reads and validates each message (framing, sizes,
//! attached descriptors, feature gating) and calls the [`Session`] through
//! `VhostUserBackendReqHandlerMut`. The session owns what the messages set up: the mapped
//! memory table, the vrings and the threads that serve them; the device itself is any
//! `vhost-user-backend` device.
//!
//! Ring lifecycle, as the vhost-user specification has it: a ring *starts* when its kick
//! eventfd arrives (`SET_VRING_KICK`) and *stops* at `GET_VRING_BASE`; independently it is
//! *enabled* by `SET_VRING_ENABLE` (or by `SET_FEATURES` when `VHOST_USER_F_PROTOCOL_FEATURES`
//! is not negotiated). The device touches a ring only while it is both started and enabled.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use thiserror::Error;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use crate::fd::set_nonblocking;

use super::inflight::{InflightError, InflightLayout, InflightRegion};
use super::memory::{map_memory_table, AddressTranslation, MemoryTableError};
use super::tracked_queue::{InflightTracking, QueueError};
use super::vring_thread::{is_running, EventSource, GuestRam, VringThread, VringThreadError};

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("the device has {0} queues; a vring thread cannot serve more than 64")]
    TooManyQueues(usize),
    #[error("queue {0} is assigned to no vring thread")]
    UnassignedQueue(usize),
    #[error("event source {id} names vring thread {thread}, which does not exist")]
    NoSuchThread { id: u16, thread: usize },
    #[error("cannot create vring {index}: {source}")]
    CreateVring {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error(transparent)]
    VringThread(#[from] VringThreadError),
    #[error("cannot spawn a vring thread: {0}")]
    SpawnThread(io::Error),
    #[error("the device tracks {tracked} queues but has {num_queues}")]
    TrackingQueues { tracked: usize, num_queues: usize },
}

/// Why a request was refused; becomes the error `handle_request` reports.
#[derive(Debug, Error)]
enum Refusal {
    #[error("SET_OWNER on a session that already has an owner")]
    AlreadyOwned,
    #[error("queue index {0} out of range")]
    NoSuchQueue(u32),
    #[error("queue {index}: size {size} is not a power of two in 1..={max}")]
    QueueSize { index: u32, size: u32, max: usize },
    #[error("features {0:#x} were not offered")]
    UnofferedFeatures(u64),
    #[error("protocol features {0:#x} were not offered")]
    UnofferedProtocolFeatures(u64),
    #[error("SET_VRING_ADDR before SET_MEM_TABLE")]
    NoMemoryTable,
    #[error("queue {index}: {which} address {addr:#x} is in no memory region")]
    UnmappedRingAddress {
        index: u32,
        which: &'static str,
        addr: u64,
    },
    #[error("queue {index}: ring addresses rejected: {source}")]
    RingAddress {
        index: u32,
        source: virtio_queue::Error,
    },
    #[error("queue {0}: the rings are not (entirely) inside guest memory")]
    InvalidRing(u32),
    #[error("cannot watch the kick eventfd: {0}")]
    WatchKick(io::Error),
    #[error("cannot make the kick eventfd non-blocking: {0}")]
    KickFlags(io::Error),
    #[error(transparent)]
    MemoryTable(#[from] MemoryTableError),
    #[error("the device rejected the new memory: {0}")]
    UpdateMemory(io::Error),
    #[error("the device failed to stop queue {index}: {source}")]
    StopVring { index: u32, source: io::Error },
    #[error("INFLIGHT_SHMFD is not offered")]
    InflightNotOffered,
    #[error("inflight region messages must come before the rings start (queue {0} runs)")]
    InflightWhileRunning(usize),
    #[error("inflight region refused: {0}")]
    Inflight(#[from] InflightError),
    #[error("queue {index}: inflight recovery failed: {source}")]
    InflightStart { index: u32, source: QueueError },
}

impl From<Refusal> for VhostUserError {
    fn from(refusal: Refusal) -> Self {
        VhostUserError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, refusal))
    }
}

/// Where a queue lives: which vring thread, and its event id there.
#[derive(Debug, Clone, Copy)]
struct QueueHome {
    thread: usize,
    event: usize,
}

struct RunningThread<T: VhostUserBackend> {
    thread: Arc<VringThread<T>>,
    handle: Option<JoinHandle<()>>,
}

/// The state of one frontend connection.
pub struct Session<T: VhostUserBackend> {
    backend: T,
    vrings: Vec<T::Vring>,
    homes: Vec<QueueHome>,
    threads: Vec<RunningThread<T>>,
    memory: GuestRam,
    translation: Option<AddressTranslation>,
    owned: bool,
    /// The per-queue request tracking of a device that asked for it.
    tracking: Option<InflightTracking>,
    /// The inflight region from GET_INFLIGHT_FD or SET_INFLIGHT_FD, handed to each
    /// tracked queue as its ring starts.
    inflight: Option<Arc<InflightRegion>>,
    acked_features: u64,
    /// Set by a vring thread that failed; the connection is then shut down so the frontend
    /// (the VMM's supervisor) sees the worker go away rather than a silent queue.
    failure: Arc<Mutex<Option<VringThreadError>>>,
}

impl<T> Session<T>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: VringT<GuestRam> + Clone + Send + Sync + 'static,
{
    /// Creates the vrings and starts the vring threads. `connection` is a clone of the
    /// frontend socket, shut down if a vring thread fails.
    pub fn new(
        backend: T,
        event_sources: &[EventSource],
        tracking: Option<InflightTracking>,
        connection: UnixStream,
    ) -> Result<Self, SessionError> {
        let num_queues = backend.num_queues();
        if let Some(tracking) = &tracking {
            if tracking.num_queues() != num_queues {
                return Err(SessionError::TrackingQueues {
                    tracked: tracking.num_queues(),
                    num_queues,
                });
            }
        }
        let memory = GuestRam::new(GuestMemoryMmap::new());
        let max_queue_size = u16::try_from(backend.max_queue_size()).unwrap_or(u16::MAX);
        let vrings = (0..num_queues)
            .map(|index| {
                T::Vring::new(memory.clone(), max_queue_size)
                    .map_err(|source| SessionError::CreateVring { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let masks = backend.queues_per_thread();
        let mut homes = Vec::with_capacity(num_queues);
        for queue in 0..num_queues {
            if queue >= 64 {
                return Err(SessionError::TooManyQueues(num_queues));
            }
            let thread = masks
                .iter()
                .position(|mask| mask & (1 << queue) != 0)
                .ok_or(SessionError::UnassignedQueue(queue))?;
            let event = (masks[thread] & ((1 << queue) - 1)).count_ones() as usize;
            homes.push(QueueHome { thread, event });
        }

        if let Some(orphan) = event_sources.iter().find(|s| s.thread >= masks.len()) {
            return Err(SessionError::NoSuchThread {
                id: orphan.id,
                thread: orphan.thread,
            });
        }

        let failure = Arc::new(Mutex::new(None));
        let connection = Arc::new(connection);
        let mut threads = Vec::with_capacity(masks.len());
        for thread_id in 0..masks.len() {
            let thread_vrings = (0..num_queues)
                .filter(|&queue| homes[queue].thread == thread_id)
                .map(|queue| vrings[queue].clone())
                .collect();
            let thread = Arc::new(VringThread::new(backend.clone(), thread_vrings, thread_id)?);
            for source in event_sources.iter().filter(|s| s.thread == thread_id) {
                thread.watch_source(source)?;
            }
            let handle = spawn_vring_thread(
                thread_id,
                thread.clone(),
                failure.clone(),
                connection.clone(),
            )?;
            threads.push(RunningThread {
                thread,
                handle: Some(handle),
            });
        }
        Ok(Session {
            backend,
            vrings,
            homes,
            threads,
            memory,
            translation: None,
            owned: false,
            tracking,
            inflight: None,
            acked_features: 0,
            failure,
        })
    }

    /// The failure of a vring thread, if one failed.
    pub fn take_failure(&self) -> Option<VringThreadError> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Stops the vring threads and waits for them.
    pub fn close(&mut self) {
        stop_threads(&mut self.threads);
    }

    fn vring(&self, index: u32) -> Result<&T::Vring, Refusal> {
        self.vrings
            .get(index as usize)
            .ok_or(Refusal::NoSuchQueue(index))
    }

    fn thread_of(&self, index: usize) -> (&VringThread<T>, usize) {
        let home = self.homes[index];
        (&self.threads[home.thread].thread, home.event)
    }

    /// Has the queue's thread look at it once, if it is running: buffers may have been
    /// posted before the ring started or was enabled.
    fn poke_if_running(&self, index: usize) {
        if is_running(&self.vrings[index]) {
            let (thread, event) = self.thread_of(index);
            thread.poke(event);
        }
    }

    /// Stops ring `index` (GET_VRING_BASE, reset): no more kicks, device told to stop.
    fn stop_ring(&self, index: u32) -> Result<(), Refusal> {
        let vring = self.vring(index)?;
        vring.set_queue_ready(false);
        if let Some(kick) = vring.get_ref().get_kick() {
            let (thread, event) = self.thread_of(index as usize);
            thread.unwatch_kick(event, kick.as_raw_fd());
        }
        // The device lock this takes (for `RwLock`/`Mutex` devices) also waits out a
        // `handle_event` already running on the ring.
        self.backend
            .stop_vring(index)
            .map_err(|source| Refusal::StopVring { index, source })
    }

    fn reset(&mut self) -> Result<(), Refusal> {
        for index in 0..self.vrings.len() as u32 {
            self.stop_ring(index)?;
            let vring = &self.vrings[index as usize];
            vring.set_kick(None);
            vring.set_call(None);
            vring.set_err(None);
            vring.set_enabled(false);
            vring.get_mut().get_queue_mut().reset();
        }
        self.backend.reset_device();
        // A reset device has nothing in flight; the frontend sets up a new region.
        self.inflight = None;
        Ok(())
    }

    fn offered_protocol_features(&self) -> VhostUserProtocolFeatures {
        // REPLY_ACK is implemented by the vhost crate's request handler for every backend.
        let mut offered = self.backend.protocol_features() | VhostUserProtocolFeatures::REPLY_ACK;
        if self.tracking.is_some() {
            offered |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        offered
    }

    /// The layout a GET/SET_INFLIGHT_FD asks for, if this session may take it now.
    fn inflight_layout(&self, request: &VhostUserInflight) -> Result<InflightLayout, Refusal> {
        if self.tracking.is_none() {
            return Err(Refusal::InflightNotOffered);
        }
        // Swapping the region under a started queue (enabled or not) would lose its
        // bookkeeping.
        if let Some(running) = self
            .vrings
            .iter()
            .position(|vring| vring.get_ref().get_queue().ready())
        {
            return Err(Refusal::InflightWhileRunning(running));
        }
        Ok(InflightLayout::new(
            request.num_queues,
            request.queue_size,
            self.backend.num_queues(),
            self.backend.max_queue_size(),
        )?)
    }

    /// Starts ring `index` (its kick just arrived): checks that its addresses lie in guest
    /// memory and, for a tracked queue, picks up what a previous worker left in flight. All
    /// under the vring's lock, so the device sees the ring ready only once it is in step
    /// with the inflight region.
    fn start_ring(&self, index: u32) -> Result<(), Refusal> {
        let vring = self.vring(index)?;
        let memory = self.memory.memory();
        let mut state = vring.get_mut();
        // A new kick eventfd for a ring already running changes nothing else: its tracked
        // requests are still being served.
        let restart = !state.get_queue().ready();
        // `is_valid` insists on a ready queue; nobody sees it ready before the lock is
        // released, and then only if everything below succeeded.
        state.get_queue_mut().set_ready(true);
        let started = if !state.get_queue().is_valid(&*memory) {
            Err(Refusal::InvalidRing(index))
        } else if !restart {
            Ok(())
        } else if let Some(mut queue) = self.tracking.as_ref().and_then(|t| t.queue(index as usize))
        {
            queue
                .start(
                    self.inflight.clone(),
                    &mut state,
                    &memory,
                    self.acked_features,
                )
                .map_err(|source| Refusal::InflightStart { index, source })
        } else {
            Ok(())
        };
        if started.is_err() {
            state.get_queue_mut().set_ready(false);
        }
        started
    }
}

impl<T: VhostUserBackend> Drop for RunningThread<T> {
    fn drop(&mut self) {
        stop_threads(std::slice::from_mut(self));
    }
}

fn spawn_vring_thread<T>(
    thread_id: usize,
    thread: Arc<VringThread<T>>,
    failure: Arc<Mutex<Option<VringThreadError>>>,
    connection: Arc<UnixStream>,
) -> Result<JoinHandle<()>, SessionError>
where
    T: VhostUserBackend<Bitmap = ()> + 'static,
    T::Vring: VringT<GuestRam> + Send + Sync + 'static,
{
    std::thread::Builder::new()
        .name(format!("vring{thread_id}"))
        .spawn(move || {
            if let Err(e) = thread.run() {
                tracing::error!("vring thread {thread_id} failed: {e}");
                *failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                // Unblocks the request loop, which then ends the session.
                let _ = connection.shutdown(std::net::Shutdown::Both);
            }
        })
        .map_err(SessionError::SpawnThread)
}

fn stop_threads<T: VhostUserBackend>(threads: &mut [RunningThread<T>]) {
    for running in threads.iter() {
        running.thread.request_exit();
    }
    for running in threads.iter_mut() {
        if let Some(handle) = running.handle.take() {
            if handle.join().is_err() {
                tracing::error!("a vring thread panicked");
            }
        }
    }
}

fn not_offered(what: &'static str) -> VhostUserError {
    VhostUserError::InvalidOperation(what)
}

impl<T> VhostUserBackendReqHandlerMut for Session<T>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: VringT<GuestRam> + Clone + Send + Sync + 'static,
{
    fn set_owner(&mut self) -> VhostUserResult<()> {
        if self.owned {
            return Err(Refusal::AlreadyOwned.into());
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.reset()?;
        self.owned = false;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        Ok(self.reset()?)
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        let unoffered = features & !self.backend.features();
        if unoffered != 0 {
            return Err(Refusal::UnofferedFeatures(unoffered).into());
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features);
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings are
        // enabled from here on.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for (index, vring) in self.vrings.iter().enumerate() {
                vring.set_enabled(true);
                self.poke_if_running(index);
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening == Some(true) {
            return Err(not_offered("postcopy is not offered"));
        }
        let (memory, translation) = map_memory_table(regions, files).map_err(Refusal::from)?;
        // Vrings and device share this handle: they see the new table from their next access.
        self.memory
            .lock()
            .map_err(|_| {
                VhostUserError::ReqHandlerError(io::Error::other("guest memory lock poisoned"))
            })?
            .replace(memory);
        self.backend
            .update_memory(self.memory.clone())
            .map_err(Refusal::UpdateMemory)?;
        self.translation = Some(translation);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        let max = self.backend.max_queue_size();
        if num == 0 || !num.is_power_of_two() || num as usize > max {
            return Err(Refusal::QueueSize {
                index,
                size: num,
                max,
            }
            .into());
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        let translation = self.translation.as_ref().ok_or(Refusal::NoMemoryTable)?;
        let to_guest = |which, addr| {
            translation
                .to_guest(addr)
                .map(|gpa| gpa.0)
                .ok_or(Refusal::UnmappedRingAddress { index, which, addr })
        };
        let desc_table = to_guest("descriptor table", descriptor)?;
        let avail_ring = to_guest("available ring", available)?;
        let used_ring = to_guest("used ring", used)?;
        vring
            .set_queue_info(desc_table, avail_ring, used_ring)
            .map_err(|source| Refusal::RingAddress { index, source })?;
        // SET_VRING_BASE restores only the avail index of a split ring; the used index is
        // whatever the used ring in guest memory says (it survives a backend restart).
        let used_idx = vring
            .queue_used_idx()
            .map_err(|_| Refusal::InvalidRing(index))?;
        vring.set_queue_next_used(used_idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        // The split ring's avail index is 16 bits; the upper half of `base` is for packed
        // rings, which are not offered.
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        self.stop_ring(index)?;
        let vring = self.vring(index)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        let queue = u32::from(index);
        let vring = self.vring(queue)?;
        let (thread, event) = self.thread_of(usize::from(index));
        if let Some(old) = vring.get_ref().get_kick() {
            thread.unwatch_kick(event, old.as_raw_fd());
        }
        if let Some(file) = &file {
            // So that a stale wake-up can never leave the vring thread stuck in read(2). The
            // flag is shared with the frontend, which only ever writes to a kick eventfd.
            set_nonblocking(file).map_err(Refusal::KickFlags)?;
        }
        vring.set_kick(file);

        // The ring starts now.
        self.start_ring(queue)?;
        // Without a kick fd ("polling mode") nothing wakes the thread but pokes; the frontend
        // gets what it asked for.
        if let Some(kick) = vring.get_ref().get_kick() {
            thread
                .watch_kick(event, kick.as_raw_fd())
                .map_err(Refusal::WatchKick)?;
        }
        self.poke_if_running(usize::from(index));
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_call(file);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_err(file);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        let unoffered = features & !self.offered_protocol_features().bits();
        if unoffered != 0 {
            return Err(Refusal::UnofferedProtocolFeatures(unoffered).into());
        }
        // Nothing to keep: the vhost crate's request handler tracks REPLY_ACK itself, and
        // no other protocol feature changes what this session does.
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        self.vring(index)?.set_enabled(enable);
        if enable {
            self.poke_if_running(index as usize);
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        self.backend
            .set_config(offset, buf)
            .map_err(VhostUserError::ReqHandlerError)
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.backend.set_backend_req_fd(backend);
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        Err(not_offered("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(not_offered("SHARED_OBJECT is not offered"))
    }

    // A refusal here ends the connection: the vhost crate's handler has no error reply for
    // GET_INFLIGHT_FD, and SET_INFLIGHT_FD's error ack is followed by the same hang-up.
    fn get_inflight_fd(
        &mut self,
        request: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        let layout = self.inflight_layout(request)?;
        let region = InflightRegion::create(layout).map_err(Refusal::from)?;
        let file = region
            .file()
            .try_clone()
            .map_err(VhostUserError::ReqHandlerError)?;
        let reply = VhostUserInflight::new(
            layout.mmap_size() as u64,
            0,
            layout.num_queues,
            layout.queue_size,
        );
        self.inflight = Some(Arc::new(region));
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, request: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        let layout = self.inflight_layout(request)?;
        let region = InflightRegion::adopt(layout, file, request.mmap_offset, request.mmap_size)
            .map_err(Refusal::from)?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Err(not_offered("CONFIGURE_MEM_SLOTS is not offered"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        Err(not_offered("CONFIGURE_MEM_SLOTS is not offered"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        Err(not_offered("CONFIGURE_MEM_SLOTS is not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostUserResult<Option<File>> {
        Err(not_offered("DEVICE_STATE is not offered"))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        Err(not_offered("DEVICE_STATE is not offered"))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(not_offered("SHMEM is not offered"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        Err(not_offered("LOG_SHMFD is not offered"))
    }
}
