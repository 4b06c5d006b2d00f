//! A queue for devices that complete requests out of order (a block device with many
//! asynchronous I/Os in flight), with every request recorded in the inflight region so a
//! replacement worker serves exactly the ones left unfinished: none lost, none completed
//! twice.
//!
//! A device asks for tracking by handing an [`InflightTracking`] to the server in its
//! `DeviceBackend`; the session then offers `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, installs
//! the region the frontend negotiates, and restarts each [`TrackedQueue`] when its ring
//! starts. Without a region (a frontend that does not negotiate the feature) the queue
//! works the same, untracked. The device, in its vring thread:
//!
//! ```ignore
//! let mut state = vrings[q].get_mut();               // the vring lock first,
//! let mut queue = tracking.queue(q).unwrap();        // then the queue's
//! queue.drain(&mut state, &memory, event_idx, |request| {
//!     submit(request);                              // async I/O, any number in flight
//! })?;
//! // later, as the I/Os finish, in any order:
//! queue.complete_batch(&mut state, &memory, &[Completion { head, written }])?;
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use thiserror::Error;
use vhost_user_backend::VringState;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::inflight::{InflightError, InflightRegion};
use super::vring_thread::GuestRam;
use crate::virtio::{walk_request, DescriptorTable, Request};

/// Offset of the ring in a split used ring (after flags and idx), and an element's size.
const USED_RING_HEADER: u64 = 4;
const USED_ELEMENT_SIZE: u64 = 8;

#[derive(Debug, Error)]
pub enum QueueError {
    /// The guest's rings are unusable (an avail index that jumps too far, rings outside
    /// memory): the queue stays stuck until the driver resets it.
    #[error("the guest's ring is unusable: {0}")]
    Ring(#[from] virtio_queue::Error),
    #[error("cannot write the used ring: {0}")]
    UsedRing(vm_memory::GuestMemoryError),
    #[error("inflight region: {0}")]
    Inflight(#[from] InflightError),
    /// A device bug: completing a request that is not in flight (or twice in a batch).
    #[error("head {0} is not in flight")]
    NotInFlight(u16),
    #[error("cannot signal the guest: {0}")]
    Signal(std::io::Error),
}

/// A finished request: its head and how many bytes the device wrote into its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub written: u32,
}

/// The per-queue tracking state, shared by the session (which restarts it when the ring
/// starts) and the device (which pops and completes).
#[derive(Clone)]
pub struct InflightTracking {
    queues: Arc<[Mutex<TrackedQueue>]>,
}

impl InflightTracking {
    pub fn new(num_queues: usize) -> Self {
        let queues: Vec<_> = (0..num_queues)
            .map(|index| Mutex::new(TrackedQueue::new(index as u16)))
            .collect();
        InflightTracking {
            queues: queues.into(),
        }
    }

    /// Queue `index`. Take the vring's lock before this one.
    pub fn queue(&self, index: usize) -> Option<MutexGuard<'_, TrackedQueue>> {
        // A panic elsewhere leaves consistent state here: every method updates its fields
        // only after the fallible steps.
        self.queues
            .get(index)
            .map(|queue| queue.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }
}

/// One queue's requests: popped ones are in flight until completed.
#[derive(Debug)]
pub struct TrackedQueue {
    index: u16,
    region: Option<Arc<InflightRegion>>,
    /// Requests a previous worker left unfinished, oldest first, served before new ones.
    resubmit: VecDeque<u16>,
    /// By head index: popped and not yet completed.
    in_flight: Vec<bool>,
    in_flight_count: usize,
    counter: u64,
    /// The driver broke the ring's rules in a way that makes tracking impossible (a head
    /// outside the ring, a head reused while in flight); nothing more is popped until the
    /// ring restarts.
    broken: bool,
    /// Changes whenever the queue is started or stopped, so that a device with I/O still
    /// running when it did can tell its completions belong to a queue that is gone.
    generation: u64,
}

/// Generations are unique over the process, so a stale one never matches by chance.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

impl TrackedQueue {
    fn new(index: u16) -> Self {
        TrackedQueue {
            index,
            region: None,
            resubmit: VecDeque::new(),
            in_flight: Vec::new(),
            in_flight_count: 0,
            counter: 1,
            broken: false,
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Which start of the queue requests popped now belong to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The ring starts: take `region` (if the frontend set one up) and find out from it
    /// what a previous worker left. Called by the session with the vring locked, before
    /// the device can see the ring ready.
    ///
    /// With a region, popping resumes at the region's count of requests ever taken (used
    /// index + those still in flight), whatever base the frontend sent: a frontend cannot
    /// know how many requests an out-of-order device had taken (QEMU sends the used index,
    /// as libvhost-user expects).
    pub fn start(
        &mut self,
        region: Option<Arc<InflightRegion>>,
        state: &mut VringState<GuestRam>,
        memory: &GuestMemoryMmap,
        features: u64,
    ) -> Result<(), QueueError> {
        let queue = state.get_queue_mut();
        let ring_size = queue.size();
        let used_idx = queue.used_idx(memory, Ordering::Acquire)?.0;
        *self = TrackedQueue::new(self.index);
        self.in_flight = vec![false; usize::from(ring_size)];
        let region = region.filter(|r| self.index < r.layout().num_queues);
        if let Some(region) = region {
            let recovery = region
                .queue(self.index)?
                .start(ring_size, used_idx, features)?;
            queue.set_next_avail(recovery.next_avail);
            queue.set_next_used(used_idx);
            for &head in &recovery.resubmit {
                self.in_flight[usize::from(head)] = true;
            }
            self.in_flight_count = recovery.resubmit.len();
            self.resubmit = recovery.resubmit.into();
            self.counter = recovery.next_counter;
            if !self.resubmit.is_empty() {
                tracing::info!(
                    queue = self.index,
                    count = self.resubmit.len(),
                    "resubmitting requests a previous worker left in flight"
                );
            }
            self.region = Some(region);
        }
        Ok(())
    }

    /// The ring stopped or the device was reset: forget everything.
    pub fn stop(&mut self) {
        *self = TrackedQueue::new(self.index);
    }

    /// Requests popped and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    /// Whether the queue records its requests in an inflight region.
    pub fn is_tracked(&self) -> bool {
        self.region.is_some()
    }

    /// The next request: first those a previous worker left unfinished, then new ones
    /// from the available ring. Each is in flight until completed. Malformed chains are
    /// completed at once with nothing written and never returned.
    pub fn pop(
        &mut self,
        state: &mut VringState<GuestRam>,
        memory: &GuestMemoryMmap,
    ) -> Result<Option<Request>, QueueError> {
        loop {
            if self.broken {
                return Ok(None);
            }
            let queue = state.get_queue_mut();
            let table = DescriptorTable {
                addr: GuestAddress(queue.desc_table()),
                size: queue.size(),
            };
            let head = match self.resubmit.pop_front() {
                Some(head) => head,
                None => {
                    let Some(head) = queue.iter(memory)?.next().map(|c| c.head_index()) else {
                        return Ok(None);
                    };
                    if !self.take(head)? {
                        return Ok(None);
                    }
                    head
                }
            };
            match walk_request(memory, table, head) {
                Ok(request) => return Ok(Some(request)),
                Err(e) => {
                    tracing::debug!(queue = self.index, head, "request refused: {e}");
                    self.complete_batch(state, memory, &[Completion { head, written: 0 }])?;
                }
            }
        }
    }

    /// Pops every request the ring holds and hands each to `submit`; returns how many.
    /// With EVENT_IDX (`event_idx`) the guest's kicks are suppressed while draining and
    /// re-enabled after, then the ring is looked at once more, so that a request posted in
    /// between is not left without a kick.
    pub fn drain(
        &mut self,
        state: &mut VringState<GuestRam>,
        memory: &GuestMemoryMmap,
        event_idx: bool,
        mut submit: impl FnMut(Request),
    ) -> Result<usize, QueueError> {
        let mut count = 0;
        loop {
            if event_idx {
                state.disable_notification()?;
            }
            while let Some(request) = self.pop(state, memory)? {
                submit(request);
                count += 1;
            }
            if !event_idx || !state.enable_notification()? {
                return Ok(count);
            }
        }
    }

    /// Marks a head just taken from the available ring in flight; false if the driver
    /// broke the ring.
    fn take(&mut self, head: u16) -> Result<bool, QueueError> {
        match self.in_flight.get(usize::from(head)) {
            Some(false) => {}
            Some(true) => {
                tracing::warn!(
                    queue = self.index,
                    head,
                    "the driver offered a head already in flight; queue stopped"
                );
                self.broken = true;
                return Ok(false);
            }
            None => {
                tracing::warn!(
                    queue = self.index,
                    head,
                    "the driver offered a head outside the ring; queue stopped"
                );
                self.broken = true;
                return Ok(false);
            }
        }
        if let Some(region) = &self.region {
            region.queue(self.index)?.begin(head, self.counter)?;
        }
        self.counter += 1;
        self.in_flight[usize::from(head)] = true;
        self.in_flight_count += 1;
        Ok(true)
    }

    /// Completes one request; see [`complete_batch`](Self::complete_batch).
    pub fn complete(
        &mut self,
        state: &mut VringState<GuestRam>,
        memory: &GuestMemoryMmap,
        head: u16,
        written: u32,
    ) -> Result<(), QueueError> {
        self.complete_batch(state, memory, &[Completion { head, written }])
    }

    /// Returns finished requests to the guest, in one used-ring update, and interrupts it
    /// if it wants to hear (EVENT_IDX respected).
    ///
    /// The order is the spec's, so that a worker dying at any point leaves its successor
    /// able to tell exactly which of these the guest got: link the batch in the region,
    /// write the used elements, publish the used index once, then clear the in-flight
    /// marks and record the new used index in the region.
    pub fn complete_batch(
        &mut self,
        state: &mut VringState<GuestRam>,
        memory: &GuestMemoryMmap,
        done: &[Completion],
    ) -> Result<(), QueueError> {
        if done.is_empty() {
            return Ok(());
        }
        // Every head must be in flight, once. Marks are cleared as heads are checked (so a
        // repeated head is caught) and put back if anything fails before publication.
        for (checked, completion) in done.iter().enumerate() {
            match self.in_flight.get_mut(usize::from(completion.head)) {
                Some(mark) if *mark => *mark = false,
                _ => {
                    self.restore_marks(&done[..checked]);
                    return Err(QueueError::NotInFlight(completion.head));
                }
            }
        }
        let heads: Vec<u16> = done.iter().map(|c| c.head).collect();
        // A handle of our own, so the marks can be restored while the region is in use.
        let shared = self.region.clone();
        let region = match &shared {
            Some(region) => match region.queue(self.index) {
                Ok(region) => Some(region),
                Err(e) => {
                    self.restore_marks(done);
                    return Err(e.into());
                }
            },
            None => None,
        };
        let staged = match &region {
            Some(region) => region.stage_batch(&heads).map_err(QueueError::from),
            None => Ok(()),
        };
        let published = staged.and_then(|()| publish_used(state, memory, done));
        let new_used = match published {
            Ok(new_used) => new_used,
            Err(e) => {
                // The guest got none of them: still in flight.
                self.restore_marks(done);
                return Err(e);
            }
        };
        // From here the guest has them, whatever happens: the marks stay cleared.
        self.in_flight_count -= done.len();
        if let Some(region) = &region {
            region.commit_batch(&heads, new_used)?;
        }
        let old_used = new_used.wrapping_sub(done.len() as u16);
        if wants_interrupt(state, memory, old_used, new_used)? {
            state.signal_used_queue().map_err(QueueError::Signal)?;
        }
        Ok(())
    }

    fn restore_marks(&mut self, done: &[Completion]) {
        for completion in done {
            self.in_flight[usize::from(completion.head)] = true;
        }
    }
}

/// Whether the driver wants an interrupt now that the used index moved from `old` to
/// `new` (virtio 1.2, 2.7.10): always without EVENT_IDX, else when its `used_event` lies
/// in between. Not `Queue::needs_notification`: that counts the entries `add_used` added,
/// and this queue publishes its own (with `set_next_used`), so it would never fire.
fn wants_interrupt(
    state: &mut VringState<GuestRam>,
    memory: &GuestMemoryMmap,
    old: u16,
    new: u16,
) -> Result<bool, QueueError> {
    let queue = state.get_queue();
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    // used_event follows the avail ring's flags, idx and entries.
    let addr = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(queue.size()))
        .ok_or(QueueError::Ring(virtio_queue::Error::AddressOverflow))?;
    // The used index store must be visible before the driver's used_event is read, or an
    // update of it in between could be missed by both sides.
    fence(Ordering::SeqCst);
    let used_event: u16 = memory
        .load(addr, Ordering::Acquire)
        .map_err(QueueError::UsedRing)?;
    let used_event = u16::from_le(used_event);
    Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old))
}

/// Writes `done` into the used ring and publishes them with one used index store; returns
/// the new used index.
fn publish_used(
    state: &mut VringState<GuestRam>,
    memory: &GuestMemoryMmap,
    done: &[Completion],
) -> Result<u16, QueueError> {
    let queue = state.get_queue_mut();
    let size = queue.size();
    let used_ring = GuestAddress(queue.used_ring());
    let mut next = queue.next_used();
    for completion in done {
        let slot = u64::from(next % size);
        let addr = used_ring
            .checked_add(USED_RING_HEADER + slot * USED_ELEMENT_SIZE)
            .ok_or(QueueError::Ring(virtio_queue::Error::AddressOverflow))?;
        // struct virtq_used_elem { le32 id; le32 len; }
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&u32::from(completion.head).to_le_bytes());
        element[4..].copy_from_slice(&completion.written.to_le_bytes());
        memory
            .write_obj(element, addr)
            .map_err(QueueError::UsedRing)?;
        next = next.wrapping_add(1);
    }
    let idx = used_ring
        .checked_add(2)
        .ok_or(QueueError::Ring(virtio_queue::Error::AddressOverflow))?;
    // Release: the elements are visible before the index that announces them.
    memory
        .store(u16::to_le(next), idx, Ordering::Release)
        .map_err(QueueError::UsedRing)?;
    // The inflight region's commit must not be reordered before the publication.
    fence(Ordering::SeqCst);
    queue.set_next_used(next);
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_user::InflightLayout;
    use vhost_user_backend::{VringRwLock, VringT};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryAtomic;

    const SIZE: u16 = 16;
    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    /// A guest with one ring whose descriptor `i` is a 64-byte writable buffer.
    struct Guest {
        memory: GuestMemoryMmap,
        desc: u64,
        avail: u64,
        used: u64,
        posted: u16,
    }

    impl Guest {
        fn new() -> Self {
            let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let mock = MockSplitQueue::new(&memory, SIZE);
            for i in 0..SIZE {
                let d = Descriptor::new(0x8_0000 + u64::from(i) * 64, 64, WRITE, 0);
                mock.desc_table().store(i, RawDescriptor::from(d)).unwrap();
            }
            let (desc, avail, used) = (
                mock.desc_table_addr().0,
                mock.avail_addr().0,
                mock.used_addr().0,
            );
            Guest {
                memory,
                desc,
                avail,
                used,
                posted: 0,
            }
        }

        fn post(&mut self, head: u16) {
            let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.posted % SIZE));
            self.memory.write_obj(head, slot).unwrap();
            self.posted = self.posted.wrapping_add(1);
            self.memory
                .write_obj(self.posted, GuestAddress(self.avail + 2))
                .unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.memory.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// Heads in the used ring, in the order the device returned them.
        fn used_heads(&self) -> Vec<u16> {
            (0..self.used_idx())
                .map(|i| {
                    let slot = GuestAddress(self.used + 4 + 8 * u64::from(i % SIZE));
                    self.memory.read_obj::<u32>(slot).unwrap() as u16
                })
                .collect()
        }

        /// A worker's view of the ring after the frontend set it up and resumed it at
        /// `base`.
        fn vring(&self, base: u16) -> VringRwLock {
            let vring =
                VringRwLock::new(GuestMemoryAtomic::new(self.memory.clone()), SIZE).unwrap();
            vring.set_queue_size(SIZE);
            vring
                .set_queue_info(self.desc, self.avail, self.used)
                .unwrap();
            vring.set_queue_next_avail(base);
            vring.set_queue_next_used(self.used_idx());
            vring.set_queue_ready(true);
            vring
        }
    }

    fn layout() -> InflightLayout {
        InflightLayout::new(1, SIZE, 1, usize::from(SIZE)).unwrap()
    }

    /// A new worker's copy of the region, adopted from the descriptor the frontend kept.
    fn adopt(region: &InflightRegion) -> Arc<InflightRegion> {
        let file = region.file().try_clone().unwrap();
        let size = layout().mmap_size() as u64;
        Arc::new(InflightRegion::adopt(layout(), file, 0, size).unwrap())
    }

    fn pop_all(queue: &mut TrackedQueue, vring: &VringRwLock, guest: &Guest) -> Vec<u16> {
        let mut state = vring.get_mut();
        std::iter::from_fn(|| queue.pop(&mut state, &guest.memory).unwrap())
            .map(|r| r.head)
            .collect()
    }

    fn complete(queue: &mut TrackedQueue, vring: &VringRwLock, guest: &Guest, heads: &[u16]) {
        let done: Vec<_> = heads
            .iter()
            .map(|&head| Completion { head, written: 8 })
            .collect();
        queue
            .complete_batch(&mut vring.get_mut(), &guest.memory, &done)
            .unwrap();
    }

    fn start(
        queue: &mut TrackedQueue,
        region: Option<Arc<InflightRegion>>,
        vring: &VringRwLock,
        guest: &Guest,
    ) {
        queue
            .start(region, &mut vring.get_mut(), &guest.memory, 0)
            .unwrap();
    }

    /// Under EVENT_IDX the guest is interrupted exactly when a batch passes its used_event.
    #[test]
    fn event_idx_interrupts_when_the_driver_asks() {
        use std::os::fd::{AsRawFd, FromRawFd};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

        let mut guest = Guest::new();
        // The mock packs the used ring where used_event would be: move it clear.
        guest.used = 0x4_0000;
        let tracking = InflightTracking::new(1);
        let vring = guest.vring(0);
        vring.set_queue_event_idx(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: dup returns a new descriptor, checked, owned by the File alone.
        let call_file = unsafe {
            let fd = libc::dup(call.as_raw_fd());
            assert!(fd >= 0);
            std::fs::File::from_raw_fd(fd)
        };
        vring.set_call(Some(call_file));
        start(&mut tracking.queue(0).unwrap(), None, &vring, &guest);
        for head in 0..8 {
            guest.post(head);
        }
        let mut queue = tracking.queue(0).unwrap();
        assert_eq!(pop_all(&mut queue, &vring, &guest).len(), 8);
        let used_event = GuestAddress(guest.avail + 4 + 2 * u64::from(SIZE));

        guest.memory.write_obj(0u16, used_event).unwrap();
        complete(&mut queue, &vring, &guest, &[0]);
        assert!(call.read().is_ok(), "used_event 0 passed: interrupt");

        guest.memory.write_obj(5u16, used_event).unwrap();
        complete(&mut queue, &vring, &guest, &[1]);
        assert!(
            call.read().is_err(),
            "used_event 5 not reached: no interrupt"
        );
        complete(&mut queue, &vring, &guest, &[2, 3, 4, 5]);
        assert!(
            call.read().is_ok(),
            "a batch passing used_event 5: interrupt"
        );
    }

    #[test]
    fn event_idx_interrupts_exactly_when_used_event_is_passed() {
        let guest = Guest::new();
        let vring = guest.vring(0);
        let mut state = vring.get_mut();
        // Without EVENT_IDX: always.
        assert!(wants_interrupt(&mut state, &guest.memory, 0, 1).unwrap());
        state.get_queue_mut().set_event_idx(true);
        let used_event = GuestAddress(guest.avail + 4 + 2 * u64::from(SIZE));
        guest.memory.write_obj(3u16.to_le(), used_event).unwrap();
        // The driver asked to hear once entry 3 is used: 3 -> 4 passes it, 0 -> 3 and
        // 4 -> 6 do not; a batch 2 -> 5 does.
        assert!(!wants_interrupt(&mut state, &guest.memory, 0, 3).unwrap());
        assert!(wants_interrupt(&mut state, &guest.memory, 3, 4).unwrap());
        assert!(!wants_interrupt(&mut state, &guest.memory, 4, 6).unwrap());
        assert!(wants_interrupt(&mut state, &guest.memory, 2, 5).unwrap());
    }

    #[test]
    fn a_restarted_worker_finishes_exactly_what_was_left() {
        let mut guest = Guest::new();
        let region = Arc::new(InflightRegion::create(layout()).unwrap());
        let tracking = InflightTracking::new(1);
        let vring = guest.vring(0);
        start(
            &mut tracking.queue(0).unwrap(),
            Some(region.clone()),
            &vring,
            &guest,
        );

        for head in [3, 7, 1, 9, 12, 0] {
            guest.post(head);
        }
        let mut queue = tracking.queue(0).unwrap();
        assert_eq!(pop_all(&mut queue, &vring, &guest), vec![3, 7, 1, 9, 12, 0]);
        assert_eq!(queue.in_flight(), 6);
        complete(&mut queue, &vring, &guest, &[9]);
        complete(&mut queue, &vring, &guest, &[0, 7]);
        assert_eq!(guest.used_heads(), vec![9, 0, 7]);
        drop(queue);

        // kill -9: the worker's state is gone; the region and guest memory remain. The
        // frontend resumes the ring at the used index, as QEMU and bulkhead do.
        drop((tracking, vring, region.clone()));
        let region = adopt(&region);
        let tracking = InflightTracking::new(1);
        let vring = guest.vring(guest.used_idx());
        let mut queue = tracking.queue(0).unwrap();
        start(&mut queue, Some(region), &vring, &guest);
        assert_eq!(queue.in_flight(), 3);

        // Two new requests arrive after the restart; they come after the resubmitted ones.
        guest.post(5);
        guest.post(9);
        assert_eq!(pop_all(&mut queue, &vring, &guest), vec![3, 1, 12, 5, 9]);
        complete(&mut queue, &vring, &guest, &[12, 5, 3, 9, 1]);
        assert_eq!(queue.in_flight(), 0);
        assert_eq!(guest.used_heads(), vec![9, 0, 7, 12, 5, 3, 9, 1]);
        assert_eq!(guest.used_idx(), guest.posted);
    }

    #[test]
    fn a_batch_published_before_the_crash_is_not_completed_again() {
        let mut guest = Guest::new();
        let region = Arc::new(InflightRegion::create(layout()).unwrap());
        let tracking = InflightTracking::new(1);
        let vring = guest.vring(0);
        let mut queue = tracking.queue(0).unwrap();
        start(&mut queue, Some(region.clone()), &vring, &guest);
        for head in [4, 5, 6] {
            guest.post(head);
        }
        assert_eq!(pop_all(&mut queue, &vring, &guest), vec![4, 5, 6]);

        // The worker dies after publishing a batch in the used ring and before marking it
        // complete in the region.
        let done = [4, 6].map(|head| Completion { head, written: 1 });
        region.queue(0).unwrap().stage_batch(&[4, 6]).unwrap();
        publish_used(&mut vring.get_mut(), &guest.memory, &done).unwrap();
        drop(queue);

        let tracking = InflightTracking::new(1);
        let vring = guest.vring(guest.used_idx());
        let mut queue = tracking.queue(0).unwrap();
        start(&mut queue, Some(adopt(&region)), &vring, &guest);
        assert_eq!(pop_all(&mut queue, &vring, &guest), vec![5]);
        complete(&mut queue, &vring, &guest, &[5]);
        assert_eq!(guest.used_heads(), vec![4, 6, 5]);
    }

    #[test]
    fn drain_pops_everything_with_or_without_event_idx() {
        let mut guest = Guest::new();
        let tracking = InflightTracking::new(1);
        for event_idx in [false, true] {
            let vring = guest.vring(guest.posted);
            vring.set_queue_event_idx(event_idx);
            let mut queue = tracking.queue(0).unwrap();
            start(&mut queue, None, &vring, &guest);
            for head in [1, 2, 3] {
                guest.post(head);
            }
            let mut heads = Vec::new();
            let count = queue
                .drain(&mut vring.get_mut(), &guest.memory, event_idx, |r| {
                    heads.push(r.head)
                })
                .unwrap();
            assert_eq!((count, heads), (3, vec![1, 2, 3]));
            complete(&mut queue, &vring, &guest, &[3, 1, 2]);
        }
        assert_eq!(guest.used_heads(), vec![3, 1, 2, 3, 1, 2]);
    }

    #[test]
    fn without_a_region_the_queue_works_untracked() {
        let mut guest = Guest::new();
        let tracking = InflightTracking::new(1);
        let vring = guest.vring(0);
        let mut queue = tracking.queue(0).unwrap();
        start(&mut queue, None, &vring, &guest);
        assert!(!queue.is_tracked());
        guest.post(2);
        guest.post(8);
        assert_eq!(pop_all(&mut queue, &vring, &guest), vec![2, 8]);
        complete(&mut queue, &vring, &guest, &[8, 2]);
        assert_eq!(guest.used_heads(), vec![8, 2]);
    }

    #[test]
    fn completing_what_is_not_in_flight_is_refused() {
        let mut guest = Guest::new();
        let tracking = InflightTracking::new(1);
        let vring = guest.vring(0);
        let mut queue = tracking.queue(0).unwrap();
        start(&mut queue, None, &vring, &guest);
        guest.post(2);
        pop_all(&mut queue, &vring, &guest);
        let mut state = vring.get_mut();
        for batch in [vec![3], vec![2, 2], vec![SIZE + 1]] {
            let done: Vec<_> = batch
                .iter()
                .map(|&head| Completion { head, written: 0 })
                .collect();
            assert!(matches!(
                queue.complete_batch(&mut state, &guest.memory, &done),
                Err(QueueError::NotInFlight(_))
            ));
        }
        assert_eq!(guest.used_idx(), 0, "nothing was published");
        assert_eq!(queue.in_flight(), 1);
        // The refused batches left head 2 in flight.
        queue.complete(&mut state, &guest.memory, 2, 0).unwrap();
        assert_eq!(guest.used_heads(), vec![2]);
    }

    #[test]
    fn malformed_chains_are_completed_empty_and_a_reused_head_stops_the_queue() {
        let mut guest = Guest::new();
        // Descriptor 1 loops to itself.
        let looped = Descriptor::new(0x8_0000, 8, WRITE | 1, 1);
        guest
            .memory
            .write_obj(RawDescriptor::from(looped), GuestAddress(guest.desc + 16))
            .unwrap();
        let tracking = InflightTracking::new(1);
        let vring = guest.vring(0);
        let mut queue = tracking.queue(0).unwrap();
        start(&mut queue, None, &vring, &guest);
        guest.post(1);
        guest.post(0);
        assert_eq!(pop_all(&mut queue, &vring, &guest), vec![0]);
        assert_eq!(guest.used_heads(), vec![1]);
        // Head 0 is still in flight; offering it again breaks the ring's rules.
        guest.post(0);
        guest.post(3);
        assert_eq!(pop_all(&mut queue, &vring, &guest), Vec::<u16>::new());
    }
}
