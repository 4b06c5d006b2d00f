//! The virtio-9p device (virtio 1.2, section 5.11) as a vhost-user backend: one request
//! queue; each chain's device-readable part is one 9P T-message and its device-writable
//! part receives the R-message. The configuration space is the mount tag
//! (`le16 tag_len; u8 tag[tag_len]`), announced by `VIRTIO_9P_F_MOUNT_TAG`.
//!
//! Requests complete out of order, as 9P allows: the queue thread only pops chains, copies
//! each T-message out of guest memory and registers it with the [`Session`] (in ring
//! order, which is what Tflush's rules need), then hands it to a small pool of handler
//! threads, which write the reply and complete the chain through the [`TrackedQueue`]. A
//! request that blocks (a Tlock, a slow disk) holds one handler, never the ring. A Tflush
//! waits for the request it names, so it runs on a thread of its own, never on a handler
//! that the flushed request might be queued behind.
//!
//! msize: the Linux client sends a Tversion no larger than its transport's buffers hold
//! (virtio: at most 125 pages), and the server never agrees to more than the client asks
//! for; a reply that still does not fit its chain becomes an Rlerror(EMSGSIZE), or is
//! dropped when not even that fits.
//!
//! [`TrackedQueue`]: crate::vhost_user::TrackedQueue

use std::fs::File;
use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::journal::Journal;
use super::server::{Export, Pending, Session, MAX_MSIZE};
use super::wire::HEADER_LEN;
use crate::vhost_user::{DeviceBackend, GuestRam, InflightTracking, QueueError};
use crate::virtio::{GuestSegment, Request};

pub const NUM_QUEUES: usize = 1;
/// Largest ring the frontend may set up (QEMU's and Linux's virtio-9p use 128).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// `VIRTIO_9P_F_MOUNT_TAG`: the configuration space holds the mount tag.
pub const VIRTIO_9P_F_MOUNT_TAG: u64 = 1 << 0;
/// Longest tag the configuration space can describe (`tag_len` is a le16).
pub const MAX_TAG_LEN: usize = u16::MAX as usize;
/// Requests handled at the same time; more wait in the pool's channel (at most a ring's
/// worth: a chain is popped once and stays in flight until completed).
const HANDLERS: usize = 4;

const REQUEST_QUEUE: u16 = 0;
/// Rlerror: size[4] type[1] tag[2] ecode[4].
const RLERROR: u8 = 7;
const RLERROR_LEN: usize = HEADER_LEN + 4;

#[derive(Debug, Error)]
pub enum P9DeviceError {
    #[error("the mount tag is empty")]
    EmptyTag,
    #[error("the mount tag is {0} bytes, longer than {MAX_TAG_LEN}")]
    TagTooLong(usize),
    #[error("cannot start the request handlers: {0}")]
    Threads(io::Error),
    #[error("cannot take the session journal: {0}")]
    Journal(io::Error),
}

/// One popped request, on its way to a handler.
struct Job {
    pending: Pending,
    head: u16,
    writable: Vec<GuestSegment>,
    vring: VringRwLock,
    memory: GuestRam,
    tracking: InflightTracking,
}

pub struct P9Device {
    export: Arc<Export>,
    /// The guest is one 9P client: one session, started afresh by a device reset (and,
    /// inside the server, by every Tversion).
    session: Arc<Session>,
    /// Where the session's fids are recorded for a replacement worker, if anywhere.
    journal: Option<Arc<Journal>>,
    config: Vec<u8>,
    memory: Option<GuestRam>,
    event_idx: bool,
    tracking: InflightTracking,
    handlers: mpsc::Sender<Job>,
    flushes: mpsc::Sender<Job>,
    /// A broken ring is reported once per reset, not once per kick.
    ring_fault_reported: bool,
}

impl P9Device {
    /// A device serving `export` under `tag`; starts its handler threads, so call it
    /// inside the sandbox.
    pub fn new(export: Arc<Export>, tag: &str) -> Result<Self, P9DeviceError> {
        if tag.is_empty() {
            return Err(P9DeviceError::EmptyTag);
        }
        if tag.len() > MAX_TAG_LEN {
            return Err(P9DeviceError::TagTooLong(tag.len()));
        }
        let mut config = Vec::with_capacity(2 + tag.len());
        config.extend_from_slice(&(tag.len() as u16).to_le_bytes());
        config.extend_from_slice(tag.as_bytes());

        let (handlers, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..HANDLERS {
            let jobs = jobs.clone();
            thread::Builder::new()
                .name("p9-handler".into())
                .spawn(move || run_handler(&jobs))
                .map_err(P9DeviceError::Threads)?;
        }
        let (flushes, flush_jobs) = mpsc::channel::<Job>();
        // Flushes wait only for non-flush requests, which the handlers finish, so one
        // thread taking them in order cannot deadlock.
        let flush_jobs = Arc::new(Mutex::new(flush_jobs));
        thread::Builder::new()
            .name("p9-flush".into())
            .spawn(move || run_handler(&flush_jobs))
            .map_err(P9DeviceError::Threads)?;

        Ok(P9Device {
            session: Session::new(export.clone()),
            journal: None,
            export,
            config,
            memory: None,
            event_idx: false,
            tracking: InflightTracking::new(NUM_QUEUES),
            handlers,
            flushes,
            ring_fault_reported: false,
        })
    }

    /// Records the session in `journal` (a memfd the VMM keeps for the device), after
    /// rebuilding the session a previous worker recorded there: the guest's fids carry
    /// on (those whose files are gone answer ESTALE). Call it before serving.
    pub fn with_journal(mut self, journal: File) -> Self {
        let (session, journal) = Session::restore(self.export.clone(), journal);
        self.session = session;
        self.journal = journal;
        self
    }

    /// The device, ready to be served. Its queue is tracked: a replacement worker
    /// answers what this one left in flight, none twice: with a journal, in the session
    /// rebuilt from it; without one, with errors (the guest's fids are gone with the old
    /// worker).
    pub fn into_backend(self) -> DeviceBackend<Arc<RwLock<P9Device>>> {
        let tracking = self.tracking.clone();
        DeviceBackend {
            backend: Arc::new(RwLock::new(self)),
            event_sources: Vec::new(),
            inflight: Some(tracking),
        }
    }

    fn serve_queue(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(ram) = self.memory.clone() else {
            return Ok(());
        };
        let memory = ram.memory();
        let mut state = vring.get_mut();
        if !(state.is_enabled() && state.get_queue().ready()) {
            return Ok(());
        }
        let tracking = self.tracking.clone();
        let Some(mut queue) = tracking.queue(usize::from(REQUEST_QUEUE)) else {
            return Ok(());
        };
        let mut popped = Vec::new();
        let result = queue.drain(&mut state, &memory, self.event_idx, |request| {
            popped.push(request);
        });
        let mut refused = Vec::new();
        for request in popped {
            match read_request(&memory, &request) {
                Some(frame) => {
                    let job = Job {
                        pending: self.session.receive(frame),
                        head: request.head,
                        writable: request.writable,
                        vring: vring.clone(),
                        memory: ram.clone(),
                        tracking: self.tracking.clone(),
                    };
                    let pool = if job.pending.waits_for_others() {
                        &self.flushes
                    } else {
                        &self.handlers
                    };
                    if let Err(mpsc::SendError(job)) = pool.send(job) {
                        // The handlers are gone (a thread panicked): answer nothing, but
                        // give the chain back so the guest's ring does not fill up.
                        refused.push(job.head);
                    }
                }
                None => refused.push(request.head),
            }
        }
        let mut failures = Vec::new();
        for head in refused {
            if let Err(e) = queue.complete(&mut state, &memory, head, 0) {
                failures.push(e);
            }
        }
        drop(queue);
        failures.extend(result.err());
        for failure in failures {
            self.report(failure)?;
        }
        Ok(())
    }

    /// Logs a queue failure that only the guest suffers from; fails on a host one.
    fn report(&mut self, error: QueueError) -> io::Result<()> {
        match error {
            QueueError::Signal(e) => Err(e),
            other => {
                if !std::mem::replace(&mut self.ring_fault_reported, true) {
                    tracing::warn!("9p request queue: {other}");
                }
                Ok(())
            }
        }
    }
}

/// The T-message in a chain's readable buffers, or None when the chain cannot carry one
/// (too short for a header, longer than any msize, or unreadable now).
fn read_request(memory: &GuestMemoryMmap, request: &Request) -> Option<Vec<u8>> {
    let len = request.readable_len();
    if len < HEADER_LEN as u64 || len > u64::from(MAX_MSIZE) {
        tracing::debug!(
            head = request.head,
            "request of {len} readable bytes refused: not a 9P message"
        );
        return None;
    }
    // At most MAX_MSIZE: fits.
    let mut frame = vec![0u8; len as usize];
    let mut at = 0;
    for segment in &request.readable {
        let end = at + segment.len as usize;
        if let Err(e) = memory.read_slice(&mut frame[at..end], segment.addr) {
            tracing::debug!(head = request.head, "request unreadable: {e}");
            return None;
        }
        at = end;
    }
    // Buffers may be longer than the message (a driver reusing a larger buffer): the size
    // field says where it ends. A size beyond the buffers is left for the parser to refuse.
    let size = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if size >= HEADER_LEN && size < frame.len() {
        frame.truncate(size);
    }
    Some(frame)
}

fn run_handler(jobs: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let next = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = next else { return };
        handle(job);
    }
}

/// Answers one request and completes its chain; the request leaves the session's
/// in-flight set only after the guest can see the reply, so a Tflush for it cannot
/// overtake it.
fn handle(job: Job) {
    let reply = match job.pending.handle() {
        Ok(reply) => Some(reply),
        Err(e) => {
            // Not 9P framing: there is no tag to answer, so the chain returns empty.
            tracing::debug!(head = job.head, "request dropped: {e}");
            None
        }
    };
    let memory = job.memory.memory();
    let written = reply.map_or(0, |reply| write_reply(&memory, &job.writable, &reply));
    let mut state = job.vring.get_mut();
    if let Some(mut queue) = job.tracking.queue(usize::from(REQUEST_QUEUE)) {
        match queue.complete(&mut state, &memory, job.head, written) {
            Ok(()) => {}
            // The ring was stopped or reset while this request ran: nobody waits for it.
            Err(QueueError::NotInFlight(head)) => {
                tracing::debug!(head, "request finished after its ring stopped");
            }
            Err(e) => tracing::warn!("9p request queue: {e}"),
        }
    }
    drop(state);
    drop(job.pending);
}

/// Writes `reply` across the writable buffers; returns the bytes written. A reply that
/// does not fit becomes Rlerror(EMSGSIZE) for the same tag, or nothing.
fn write_reply(memory: &GuestMemoryMmap, writable: &[GuestSegment], reply: &[u8]) -> u32 {
    let room: u64 = writable.iter().map(|s| u64::from(s.len)).sum();
    let substitute;
    let reply = if reply.len() as u64 <= room {
        reply
    } else if RLERROR_LEN as u64 <= room && reply.len() >= HEADER_LEN {
        tracing::debug!(
            "a {}-byte reply does not fit the chain's {room} bytes",
            reply.len()
        );
        let mut error = Vec::with_capacity(RLERROR_LEN);
        error.extend_from_slice(&(RLERROR_LEN as u32).to_le_bytes());
        error.push(RLERROR);
        error.extend_from_slice(&reply[5..7]);
        error.extend_from_slice(&(libc::EMSGSIZE as u32).to_le_bytes());
        substitute = error;
        &substitute
    } else {
        return 0;
    };
    let mut at = 0;
    for segment in writable {
        if at == reply.len() {
            break;
        }
        let n = (segment.len as usize).min(reply.len() - at);
        if let Err(e) = memory.write_slice(&reply[at..at + n], segment.addr) {
            tracing::debug!("reply unwritable: {e}");
            return 0;
        }
        at += n;
    }
    // At most the reply's length, itself at most MAX_MSIZE.
    at as u32
}

impl VhostUserBackendMut for P9Device {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_9P_F_MOUNT_TAG
            | (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIG
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Bytes past the tag read as zero, like a device's unused config space.
        let mut out = vec![0u8; size.min(MAX_TAG_LEN as u32 + 2) as usize];
        let start = (offset as usize).min(self.config.len());
        let end = start.saturating_add(out.len()).min(self.config.len());
        out[..end - start].copy_from_slice(&self.config[start..end]);
        out
    }

    fn reset_device(&mut self) {
        self.event_idx = false;
        self.ring_fault_reported = false;
        self.session = match &self.journal {
            Some(journal) => Session::journaled(self.export.clone(), journal.clone()),
            None => Session::new(self.export.clone()),
        };
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
        if device_event != REQUEST_QUEUE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown device event {device_event}"),
            ));
        }
        match vrings.first() {
            Some(vring) => self.serve_queue(vring),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p9::Root;

    fn device(tag: &str) -> Result<P9Device, P9DeviceError> {
        let dir = std::env::temp_dir();
        let root = Root::open(&dir).unwrap();
        P9Device::new(Arc::new(Export::new(root, true)), tag)
    }

    #[test]
    fn config_space_is_the_tag() {
        let device = device("share").unwrap();
        assert_eq!(device.get_config(0, 7), b"\x05\x00share");
        assert_eq!(device.get_config(2, 3), b"sha");
        assert_eq!(device.get_config(5, 6), b"re\0\0\0\0");
        assert_eq!(device.get_config(1000, 2), b"\0\0");
        assert!(device.features() & VIRTIO_9P_F_MOUNT_TAG != 0);
    }

    #[test]
    fn tags_are_checked() {
        assert!(matches!(device(""), Err(P9DeviceError::EmptyTag)));
        assert!(matches!(
            device(&"x".repeat(MAX_TAG_LEN + 1)),
            Err(P9DeviceError::TagTooLong(_))
        ));
    }
}
