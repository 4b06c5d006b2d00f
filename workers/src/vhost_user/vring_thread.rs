//! The thread that runs a device's virtqueues: it sleeps in epoll on the queues' kick
//! eventfds and on the device's own event sources (timers, host descriptors) and hands each
//! event to the device's `handle_event`.
//!
//! Event ids follow `vhost-user-backend`'s convention, so a device written for its daemon
//! runs here unchanged: ids `0..n` are this thread's queues (in queue order), id
//! `num_queues()` is reserved (here: the session's control eventfd), and device event ids
//! are above it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use thiserror::Error;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Guest memory as the vrings and devices see it.
pub type GuestRam = GuestMemoryAtomic<GuestMemoryMmap>;

/// A host descriptor a device wants watched beside its queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSource {
    /// The descriptor; the device owns it and keeps it open while it lives.
    pub fd: RawFd,
    /// What `handle_event` receives as `device_event`; must exceed `num_queues()`.
    pub id: u16,
    /// Which vring thread watches it (an index into `queues_per_thread()`).
    pub thread: usize,
}

#[derive(Debug, Error)]
pub enum VringThreadError {
    #[error("cannot set up the vring thread's epoll: {0}")]
    Setup(io::Error),
    #[error("event id {id} is reserved for queues (ids up to {num_queues} are)")]
    ReservedEventId { id: u16, num_queues: usize },
    #[error("epoll_wait failed: {0}")]
    Wait(io::Error),
    #[error("reading queue {queue}'s kick eventfd: {source}")]
    ReadKick { queue: usize, source: io::Error },
    #[error("device failed handling event {event}: {source}")]
    Device { event: u16, source: io::Error },
}

/// One vring thread's state, shared between the thread and the session that controls it.
pub struct VringThread<T: VhostUserBackend> {
    backend: T,
    /// The queues this thread serves, in queue order; index = event id.
    vrings: Vec<T::Vring>,
    thread_id: usize,
    epoll: Epoll,
    /// Wakes the thread for `exit` or `pending`.
    control: EventFd,
    control_id: u64,
    exit: AtomicBool,
    /// Queues (bit = event id) to look at once even without a kick: a ring that was just
    /// started or enabled may already hold buffers whose kick came earlier.
    pending: AtomicU64,
}

impl<T> VringThread<T>
where
    T: VhostUserBackend<Bitmap = ()>,
    T::Vring: VringT<GuestRam>,
{
    pub fn new(
        backend: T,
        vrings: Vec<T::Vring>,
        thread_id: usize,
    ) -> Result<Self, VringThreadError> {
        let epoll = Epoll::new().map_err(VringThreadError::Setup)?;
        let control = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(VringThreadError::Setup)?;
        let control_id = backend.num_queues() as u64;
        epoll
            .ctl(
                ControlOperation::Add,
                control.as_raw_fd(),
                EpollEvent::new(EventSet::IN, control_id),
            )
            .map_err(VringThreadError::Setup)?;
        Ok(VringThread {
            backend,
            vrings,
            thread_id,
            epoll,
            control,
            control_id,
            exit: AtomicBool::new(false),
            pending: AtomicU64::new(0),
        })
    }

    /// Watches a device event source.
    pub fn watch_source(&self, source: &EventSource) -> Result<(), VringThreadError> {
        if u64::from(source.id) <= self.control_id {
            return Err(VringThreadError::ReservedEventId {
                id: source.id,
                num_queues: self.backend.num_queues(),
            });
        }
        self.epoll
            .ctl(
                ControlOperation::Add,
                source.fd,
                EpollEvent::new(EventSet::IN, u64::from(source.id)),
            )
            .map_err(VringThreadError::Setup)
    }

    /// Serves events until [`request_exit`](Self::request_exit) or a failure.
    ///
    /// Guest mistakes are the device's to absorb; an error here is a host-side failure
    /// (epoll, an eventfd, the device's own resources) and ends the thread.
    pub fn run(&self) -> Result<(), VringThreadError> {
        const MAX_EVENTS: usize = 16;
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VringThreadError::Wait(e)),
            };
            for event in &events[..ready] {
                let id = event.data();
                if id == self.control_id {
                    // Non-blocking: an empty counter just means another wake-up got here first.
                    let _ = self.control.read();
                    if self.exit.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    self.run_pending()?;
                } else if let Some(vring) = self.vrings.get(id as usize) {
                    if take_kick(vring, id as usize)? {
                        self.dispatch(id as u16, event.event_set())?;
                    }
                } else {
                    // Device sources were checked to fit in u16 when registered.
                    self.dispatch(id as u16, event.event_set())?;
                }
            }
        }
    }

    fn run_pending(&self) -> Result<(), VringThreadError> {
        let pending = self.pending.swap(0, Ordering::AcqRel);
        for (event, vring) in self.vrings.iter().enumerate() {
            if pending & (1 << event) != 0 && is_running(vring) {
                self.dispatch(event as u16, EventSet::IN)?;
            }
        }
        Ok(())
    }

    fn dispatch(&self, event: u16, evset: EventSet) -> Result<(), VringThreadError> {
        self.backend
            .handle_event(event, evset, &self.vrings, self.thread_id)
            .map_err(|source| VringThreadError::Device { event, source })
    }
}

impl<T: VhostUserBackend> VringThread<T> {
    /// Starts delivering kicks of this thread's queue `event` (its index in this thread).
    pub fn watch_kick(&self, event: usize, kick: RawFd) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            kick,
            EpollEvent::new(EventSet::IN, event as u64),
        )
    }

    /// Stops delivering kicks. Kicks already taken out of epoll may still be handled; the
    /// queue's `ready` flag, cleared first by the caller, makes them no-ops.
    pub fn unwatch_kick(&self, event: usize, kick: RawFd) {
        // Fails only when the fd was never added, which is what we want anyway.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            kick,
            EpollEvent::new(EventSet::IN, event as u64),
        );
    }

    /// Has the thread look at queue `event` once, as if it had been kicked.
    pub fn poke(&self, event: usize) {
        self.pending.fetch_or(1 << event, Ordering::AcqRel);
        self.wake();
    }

    /// Asks the thread to return from [`run`](Self::run).
    pub fn request_exit(&self) {
        self.exit.store(true, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        // Writing 1 to an eventfd only fails when its counter is about to overflow, in which
        // case the thread has plenty of wake-ups pending already.
        let _ = self.control.write(1);
    }
}

/// Consumes a kick; true when the queue should be served.
fn take_kick<V: VringT<GuestRam>>(vring: &V, queue: usize) -> Result<bool, VringThreadError> {
    match vring.read_kick() {
        Ok(enabled) => Ok(enabled && vring.get_ref().get_queue().ready()),
        // The kick fd is non-blocking; nothing to read means a stale wake-up (for example
        // the fd was just replaced), not an error.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(source) => Err(VringThreadError::ReadKick { queue, source }),
    }
}

/// A started (kick received, not stopped by GET_VRING_BASE) and enabled ring.
pub fn is_running<V: VringT<GuestRam>>(vring: &V) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}
