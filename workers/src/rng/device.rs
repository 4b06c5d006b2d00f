//! The virtio-rng device (virtio 1.2, section 5.4): one request queue of device-writable
//! buffers, each returned filled with random bytes. No configuration space and no feature
//! bits of its own.

use std::io;
use std::sync::{Arc, RwLock};

use bulkhead_protocol::RngConfig;
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::entropy;
use super::rate_limit::{RateLimitError, RateLimiter};
use crate::vhost_user::{DeviceBackend, EventSource, GuestRam};
use crate::virtio::drain::{notify, settle};
use crate::virtio::{drain, writable_len, Drained, Next, QueueFault};

pub const NUM_QUEUES: usize = 1;
/// Largest ring the frontend may set up.
pub const MAX_QUEUE_SIZE: usize = 256;
/// Most bytes served for one request; a driver asking for more gets a short answer and
/// asks again, which keeps one request from holding the queue thread for long.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

const REQUEST_QUEUE: u16 = 0;
/// The rate limiter's timer; event ids up to `NUM_QUEUES` belong to the server.
const RATE_LIMIT_TIMER: u16 = NUM_QUEUES as u16 + 1;

#[derive(Debug, Error)]
pub enum RngError {
    #[error(transparent)]
    RateLimit(#[from] RateLimitError),
}

pub struct RngDevice {
    memory: Option<GuestRam>,
    event_idx: bool,
    limiter: Option<RateLimiter>,
    /// A broken ring is reported once per reset, not once per kick.
    ring_fault_reported: bool,
}

impl RngDevice {
    pub fn new(config: &RngConfig) -> Result<Self, RngError> {
        let limiter = config.rate_limit.map(RateLimiter::new).transpose()?;
        Ok(RngDevice {
            memory: None,
            event_idx: false,
            limiter,
            ring_fault_reported: false,
        })
    }

    /// The device, ready to be served, with the event sources its queue thread watches.
    pub fn into_backend(self) -> DeviceBackend<Arc<RwLock<RngDevice>>> {
        let event_sources = self
            .limiter
            .iter()
            .map(|limiter| EventSource {
                fd: limiter.timer_fd(),
                id: RATE_LIMIT_TIMER,
                thread: 0,
            })
            .collect();
        DeviceBackend {
            backend: Arc::new(RwLock::new(self)),
            event_sources,
            // Requests complete in order, at once: the used index says all there is.
            inflight: None,
        }
    }

    /// Serves what the request queue holds, within the rate limit.
    fn serve_queue(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(memory) = self.memory.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        if !(state.is_enabled() && state.get_queue().ready()) {
            return Ok(());
        }
        let queue_size = state.get_queue().size();
        let mut drained = Drained::default();
        let mut result = drain(&mut state, &memory, self.event_idx, &mut drained, |chain| {
            let budget = self.limiter.as_mut().map_or(u64::MAX, |l| l.available());
            if budget == 0 {
                return Ok(Next::PutBack);
            }
            let written = fill_request(chain, &memory, queue_size, budget)?;
            if let Some(limiter) = &mut self.limiter {
                limiter.spend(u64::from(written));
            }
            Ok::<_, QueueFault>(Next::Used(written))
        });
        if drained.bad_heads > 0 {
            // There is no such descriptor to give back: the requests are dropped.
            tracing::debug!(
                "request queue: {} head indexes out of range",
                drained.bad_heads
            );
        }
        if drained.stopped {
            // Only the budget puts a request back: wait for it to refill.
            if let Some(limiter) = &mut self.limiter {
                result = result.and(limiter.wake_on_refill().map_err(QueueFault::Host));
            }
        }
        // Whatever happened, the guest must hear about the requests already completed.
        let notified = notify(&mut state, drained.completed, false);
        // Only the guest suffers a broken ring: it stays stuck until the driver resets it.
        settle(
            result.and(notified),
            "request queue",
            &mut self.ring_fault_reported,
        )
    }
}

/// Fills one request's buffers with up to `budget` random bytes; returns how many were
/// written. A malformed request is answered with 0 bytes.
fn fill_request(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    queue_size: u16,
    budget: u64,
) -> io::Result<u32> {
    let head = chain.head_index();
    // Checked on one read of the descriptors; the writer below reads them again and checks
    // every buffer against guest memory itself, so a guest rewriting the chain in between
    // gains nothing but a shorter answer.
    if let Err(e) = writable_len(chain.clone(), queue_size) {
        tracing::debug!("request {head} refused: {e}");
        return Ok(0);
    }
    let mut writer = match Writer::new(memory, chain) {
        Ok(writer) => writer,
        Err(e) => {
            tracing::debug!("request {head} refused: {e}");
            return Ok(0);
        }
    };
    let len = (writer.available_bytes() as u64)
        .min(u64::from(MAX_REQUEST_BYTES))
        .min(budget);
    // `len` is at most MAX_REQUEST_BYTES.
    entropy::write_random(&mut writer, len as usize)?;
    Ok(writer.bytes_written() as u32)
}

impl VhostUserBackendMut for RngDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // Indirect descriptors cost nothing to support (virtio-queue walks them, bounded),
        // and QEMU's vhost-user-rng passes its own default of them to the backend whether
        // offered or not.
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&mut self) {
        // The rate limit's budget is kept: a reset must not buy a guest more entropy.
        self.event_idx = false;
        self.ring_fault_reported = false;
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
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
        match device_event {
            REQUEST_QUEUE => {}
            RATE_LIMIT_TIMER => {
                if let Some(limiter) = &mut self.limiter {
                    limiter.on_timer()?;
                }
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown device event {other}"),
                ))
            }
        }
        match vrings.first() {
            Some(vring) => self.serve_queue(vring),
            None => Ok(()),
        }
    }
}
