//! The virtio-input device (virtio 1.2, section 5.8): queue 0 (eventq) takes
//! device-writable buffers the device fills with one `virtio_input_event` each; queue 1
//! (statusq) brings the driver's LED and similar events, which a VNC viewer cannot show
//! and are only given back. Events come from the display worker's socket, one checked
//! report per datagram, and wait in a bounded queue until the guest posts buffers.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::config::InputConfigSpace;
use super::event::{decode_report, InputRecord, EVENT_SIZE, MAX_EVENTS_PER_REPORT};
use crate::vhost_user::{DeviceBackend, EventSource, GuestRam};
use crate::virtio::drain::{notify, settle};
use crate::virtio::{drain, Drained, Next, QueueFault};

pub const NUM_QUEUES: usize = 2;
pub const MAX_QUEUE_SIZE: usize = 256;
const EVENT_QUEUE: u16 = 0;
const STATUS_QUEUE: u16 = 1;
/// The display worker's socket; event ids up to `NUM_QUEUES` belong to the server.
const EVENTS_SOCKET: u16 = NUM_QUEUES as u16 + 1;
/// Events kept while the guest posts no buffers (a driver not loaded yet, a guest that
/// stopped reading): about 400 keystrokes. Newer events are dropped beyond it.
const MAX_PENDING: usize = 4096;

pub struct InputDevice {
    memory: Option<GuestRam>,
    event_idx: bool,
    events: OwnedFd,
    config: InputConfigSpace,
    pending: VecDeque<InputRecord>,
    dropped: u64,
    ring_fault_reported: bool,
}

impl InputDevice {
    /// A device fed from `events`, the receiving end of the display worker's
    /// `SOCK_SEQPACKET` socket, which must be non-blocking.
    pub fn new(events: OwnedFd) -> Self {
        Self {
            memory: None,
            event_idx: false,
            events,
            config: InputConfigSpace::default(),
            pending: VecDeque::new(),
            dropped: 0,
            ring_fault_reported: false,
        }
    }

    pub fn into_backend(self) -> DeviceBackend<Arc<RwLock<InputDevice>>> {
        let source = EventSource {
            fd: self.events.as_raw_fd(),
            id: EVENTS_SOCKET,
            thread: 0,
        };
        DeviceBackend {
            backend: Arc::new(RwLock::new(self)),
            event_sources: vec![source],
            // Every event is complete once written: the used index says all there is.
            inflight: None,
        }
    }

    /// Takes every datagram waiting on the socket into the pending queue. `evset` is what
    /// epoll said of the socket: a hang-up tells the end of it from an empty datagram,
    /// as both read 0 bytes.
    fn receive(&mut self, evset: EventSet) -> io::Result<()> {
        let mut buf = [0u8; EVENT_SIZE * MAX_EVENTS_PER_REPORT + 1];
        loop {
            // SAFETY: `buf` is valid for writes of its length; the descriptor is ours.
            let n =
                unsafe { libc::read(self.events.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let error = io::Error::last_os_error();
                return match error.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(error),
                };
            }
            if n == 0 {
                if evset.contains(EventSet::HANG_UP) {
                    // Every sender is gone, the VMM's copy included: the VMM has ended.
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the display worker's events socket was closed on every side",
                    ));
                }
                // An empty datagram: refused. Epoll, level-triggered, brings the rest.
                tracing::debug!(target: "bulkhead::input", "an empty report refused");
                return Ok(());
            }
            // A datagram longer than the buffer is cut short, and refused below.
            match decode_report(&buf[..n as usize]) {
                Ok(report) => self.queue(report),
                Err(e) => tracing::debug!(target: "bulkhead::input", "report refused: {e}"),
            }
        }
    }

    fn queue(&mut self, report: Vec<InputRecord>) {
        // A report goes whole or not at all: half of one could leave a key down.
        if self.pending.len() + report.len() > MAX_PENDING {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(
                    "the guest reads no input events: {} reports dropped so far",
                    self.dropped
                );
            }
            return;
        }
        self.pending.extend(report);
    }

    /// Writes pending events into the guest's event buffers, as many as it posted.
    fn deliver(&mut self, vring: &VringRwLock) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.serve(vring, |device, chain, memory| device.fill(chain, memory))
    }

    /// Puts the first pending event in one buffer; a buffer too small or not writable
    /// is given back empty and the event waits.
    fn fill(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, memory: &GuestMemoryMmap) -> Next {
        let Some(&event) = self.pending.front() else {
            return Next::PutBack;
        };
        let head = chain.head_index();
        match Writer::new(memory, chain) {
            Ok(mut writer) if writer.available_bytes() >= EVENT_SIZE => {
                match writer.write_all(&event.to_bytes()) {
                    Ok(()) => {
                        self.pending.pop_front();
                        Next::Used(EVENT_SIZE as u32)
                    }
                    Err(e) => {
                        tracing::debug!("event buffer {head} refused: {e}");
                        Next::Used(0)
                    }
                }
            }
            Ok(_) => Next::Used(0),
            Err(e) => {
                tracing::debug!("event buffer {head} refused: {e}");
                Next::Used(0)
            }
        }
    }

    /// Gives back whatever the driver sent on the status queue (LED states: no LEDs here).
    fn drain_status(&mut self, vring: &VringRwLock) -> io::Result<()> {
        self.serve(vring, |_, _, _| Next::Used(0))
    }

    /// One pass over `vring`, `serve` saying what each chain gets.
    fn serve(
        &mut self,
        vring: &VringRwLock,
        mut serve: impl FnMut(&mut Self, DescriptorChain<&GuestMemoryMmap>, &GuestMemoryMmap) -> Next,
    ) -> io::Result<()> {
        let Some(memory) = self.memory.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        if !(state.is_enabled() && state.get_queue().ready()) {
            return Ok(());
        }
        let mut drained = Drained::default();
        let event_idx = self.event_idx;
        let result = drain(&mut state, &memory, event_idx, &mut drained, |chain| {
            Ok::<_, QueueFault>(serve(self, chain, &memory))
        });
        let notified = notify(&mut state, drained.completed, false);
        settle(
            result.and(notified),
            "input queue",
            &mut self.ring_fault_reported,
        )
    }
}

impl VhostUserBackendMut for InputDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&mut self) {
        // Keys held when the driver went away must not arrive as a new driver's first
        // events; the config selection starts over too.
        self.event_idx = false;
        self.ring_fault_reported = false;
        self.pending.clear();
        self.config = InputConfigSpace::default();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn update_memory(&mut self, memory: GuestRam) -> io::Result<()> {
        self.memory = Some(memory);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.config.write(offset, buf);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            EVENT_QUEUE => {}
            STATUS_QUEUE => {
                return match vrings.get(usize::from(STATUS_QUEUE)) {
                    Some(vring) => self.drain_status(vring),
                    None => Ok(()),
                }
            }
            EVENTS_SOCKET => self.receive(evset)?,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown device event {other}"),
                ))
            }
        }
        match vrings.get(usize::from(EVENT_QUEUE)) {
            Some(vring) => self.deliver(vring),
            None => Ok(()),
        }
    }
}
