//! Taking chains off a ring, the way every in-order device does it: one chain at a time,
//! each answered on the used ring before the next is taken, with EVENT_IDX's "drain with
//! notifications off, turn them on, look again" so that a chain posted in between is never
//! missed. Devices say only what one chain means ([`drain`]'s `serve`), and what a pass
//! did comes back in a [`Drained`] for them to notify the guest and count.
//!
//! The block device keeps its own loop (`vhost_user::TrackedQueue`): its requests go through
//! the inflight region and complete in batches.

use std::io;

use thiserror::Error;
use vhost_user_backend::VringState;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// A failure while serving a ring.
#[derive(Debug, Error)]
pub enum QueueFault {
    /// The ring itself is unusable (unreadable avail ring, an avail index that jumps ahead
    /// by more than the queue size, ...): the guest's doing, and only the guest suffers.
    #[error("the guest's ring is unusable: {0}")]
    Ring(#[from] virtio_queue::Error),
    /// Something on the host failed.
    #[error(transparent)]
    Host(#[from] io::Error),
}

/// What a device did with one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Answered: the chain goes on the used ring with this many bytes written.
    Used(u32),
    /// Not now (the device cannot take it yet): the chain goes back on the ring, to be
    /// read again from guest memory later, and the pass stops.
    PutBack,
}

/// What one pass over a ring did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains put on the used ring: the guest must hear of them even if the pass failed.
    pub completed: u32,
    /// Chains whose head index lies outside the descriptor table: dropped, as there is no
    /// descriptor to give back.
    pub bad_heads: u32,
    /// The device put a chain back: it waits for something else (room, budget, data) and
    /// notifications were left as they were.
    pub stopped: bool,
}

/// Serves the chains available on `state`'s ring with `serve`, until the ring is empty
/// (with `event_idx`: empty after notifications were turned back on) or `serve` puts one
/// back. What was done is added to `drained`, errors or not.
pub fn drain<E>(
    state: &mut VringState,
    memory: &GuestMemoryMmap,
    event_idx: bool,
    drained: &mut Drained,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> Result<Next, E>,
) -> Result<(), E>
where
    E: From<virtio_queue::Error>,
{
    loop {
        if event_idx {
            state.disable_notification()?;
        }
        let queue = state.get_queue_mut();
        let size = queue.size();
        while let Some(chain) = queue.iter(memory)?.next() {
            let head = chain.head_index();
            if head >= size {
                drained.bad_heads = drained.bad_heads.saturating_add(1);
                continue;
            }
            match serve(chain)? {
                Next::Used(written) => {
                    queue.add_used(memory, head, written)?;
                    drained.completed = drained.completed.saturating_add(1);
                }
                Next::PutBack => {
                    queue.go_to_previous_position();
                    drained.stopped = true;
                    return Ok(());
                }
            }
        }
        if !event_idx || !state.enable_notification()? {
            return Ok(());
        }
    }
}

/// Signals the guest when chains were completed and it wants to hear (EVENT_IDX) or always
/// when `always` (several chains published at once, which the event index under-counts).
pub fn notify(state: &mut VringState, completed: u32, always: bool) -> Result<(), QueueFault> {
    if completed > 0 && (always || state.needs_notification()?) {
        state.signal_used_queue()?;
    }
    Ok(())
}

/// Ends a pass: a guest that broke its own ring loses the queue until its driver resets
/// it, which is logged once per reset (`reported`); a host failure is the worker's and is
/// returned.
pub fn settle(
    result: Result<(), QueueFault>,
    queue: impl std::fmt::Display,
    reported: &mut bool,
) -> io::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(QueueFault::Ring(e)) => {
            if !std::mem::replace(reported, true) {
                tracing::warn!("{queue}: {e}");
            }
            Ok(())
        }
        Err(QueueFault::Host(e)) => Err(e),
    }
}
