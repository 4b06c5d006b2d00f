//! Inflight I/O tracking end to end through the vhost-user session: an out-of-order test
//! device served in this process (the way a block worker with asynchronous I/O would be),
//! driven by the userspace frontend and driver, "crashed" with requests in flight and
//! replaced - by the userspace frontend and by the VMM's own. Also: frontends lying about the region are refused, and devices that did not
//! ask for tracking do not offer it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use bulkhead_protocol::{DeviceConfig, RngConfig};
use bulkhead_tests::vhost::{
    Buffer, SharedMemory, SplitQueueDriver, UserspaceFrontend, WorkerProcess,
};
use bulkhead_vmm::memory::GuestRam as VmmGuestRam;
use bulkhead_vmm::vhost_user::reply_watchdog::ReplyWatchdog;
use bulkhead_vmm::vhost_user::{VhostUserDevice, VhostUserDeviceError};
use bulkhead_vmm::virtio::{QueueConfig, VirtioDevice};
use bulkhead_vmm::worker::pidfd::PidFd;
use bulkhead_workers::rng::RngDevice;
use bulkhead_workers::vhost_user::{
    serve_connection, Completion, DeviceBackend, EventSource, GuestRam, InflightTracking,
    ServeError,
};
use bulkhead_workers::virtio::Request;
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QUEUE_SIZE: u16 = 16;
/// The device's "I/O finished" event, as an io_uring completion eventfd would be.
const COMPLETION_EVENT: u16 = 2;
const TIMEOUT: Duration = Duration::from_secs(5);
const VIRTIO_F_VERSION_1_BIT: u64 = 1 << VIRTIO_F_VERSION_1;

/// A device that completes requests out of order: it holds every request until the test
/// names the ones to finish, or (`complete_at_once`) finishes each as it arrives. A
/// finished request gets its head index written into its buffer.
struct OutOfOrderDevice {
    memory: Option<GuestRam>,
    tracking: InflightTracking,
    complete_at_once: bool,
    held: Vec<Request>,
    to_complete: Arc<Mutex<Vec<u16>>>,
    completion_event: EventFd,
}

fn io_error(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

impl OutOfOrderDevice {
    fn finish(&self, request: &Request) -> io::Result<Completion> {
        let memory = self
            .memory
            .as_ref()
            .ok_or_else(|| io::Error::other("no memory"))?;
        let buffer = request
            .writable
            .first()
            .ok_or_else(|| io::Error::other("no writable buffer"))?;
        memory
            .memory()
            .write_obj(u32::from(request.head), buffer.addr)
            .map_err(io_error)?;
        Ok(Completion {
            head: request.head,
            written: 4,
        })
    }
}

impl VhostUserBackendMut for OutOfOrderDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

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
        let memory = self
            .memory
            .as_ref()
            .ok_or_else(|| io::Error::other("no memory"))?
            .memory();
        let mut state = vrings[0].get_mut();
        let tracking = self.tracking.clone();
        let mut queue = tracking
            .queue(0)
            .ok_or_else(|| io::Error::other("no queue 0"))?;
        match device_event {
            0 => {
                while let Some(request) = queue.pop(&mut state, &memory).map_err(io_error)? {
                    if self.complete_at_once {
                        let done = self.finish(&request)?;
                        queue
                            .complete_batch(&mut state, &memory, &[done])
                            .map_err(io_error)?;
                    } else {
                        self.held.push(request);
                    }
                }
            }
            COMPLETION_EVENT => {
                let _ = self.completion_event.read();
                let heads = std::mem::take(&mut *self.to_complete.lock().unwrap());
                let mut done = Vec::new();
                for head in heads {
                    let position = self
                        .held
                        .iter()
                        .position(|r| r.head == head)
                        .ok_or_else(|| io::Error::other(format!("head {head} not held")))?;
                    let request = self.held.remove(position);
                    done.push(self.finish(&request)?);
                }
                queue
                    .complete_batch(&mut state, &memory, &done)
                    .map_err(io_error)?;
            }
            other => return Err(io::Error::other(format!("unknown event {other}"))),
        }
        Ok(())
    }
}

/// One in-process backend: the socket to it, and how to ask it to finish requests.
struct Backend {
    connection: Option<UnixStream>,
    tracking: InflightTracking,
    to_complete: Arc<Mutex<Vec<u16>>>,
    completion_event: EventFd,
    server: JoinHandle<Result<(), ServeError>>,
}

impl Backend {
    fn start(complete_at_once: bool) -> Result<Self> {
        let (ours, theirs) = UnixStream::pair()?;
        let tracking = InflightTracking::new(1);
        let to_complete = Arc::new(Mutex::new(Vec::new()));
        let completion_event = EventFd::new(EFD_NONBLOCK)?;
        let device = OutOfOrderDevice {
            memory: None,
            tracking: tracking.clone(),
            complete_at_once,
            held: Vec::new(),
            to_complete: to_complete.clone(),
            completion_event: completion_event.try_clone()?,
        };
        let source = EventSource {
            fd: device.completion_event.as_raw_fd(),
            id: COMPLETION_EVENT,
            thread: 0,
        };
        let backend = DeviceBackend {
            backend: Arc::new(RwLock::new(device)),
            event_sources: vec![source],
            inflight: Some(tracking.clone()),
        };
        let server = std::thread::spawn(move || serve_connection(theirs, backend));
        Ok(Backend {
            connection: Some(ours),
            tracking,
            to_complete,
            completion_event,
            server,
        })
    }

    fn frontend(&mut self) -> Result<UserspaceFrontend> {
        let connection = self.connection.take().expect("one frontend per backend");
        Ok(UserspaceFrontend::new(connection, 1))
    }

    fn complete(&self, heads: &[u16]) -> Result<()> {
        self.to_complete.lock().unwrap().extend_from_slice(heads);
        self.completion_event.write(1)?;
        Ok(())
    }

    fn wait_in_flight(&self, count: usize) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let in_flight = self.tracking.queue(0).unwrap().in_flight();
            if in_flight == count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{in_flight} requests in flight, expected {count}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the session to end; a panic in the backend fails the test.
    fn join(self) -> Result<Result<(), ServeError>> {
        match self.server.join() {
            Ok(result) => Ok(result),
            Err(_) => bail!("the backend panicked"),
        }
    }
}

fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

fn post(queue: &mut SplitQueueDriver, memory: &SharedMemory) -> Result<(u16, GuestAddress)> {
    let buffer = memory.allocate(64, 8)?;
    Ok((queue.post(&[Buffer::writable(buffer, 64)])?, buffer))
}

#[test]
fn a_replaced_backend_completes_exactly_the_requests_left_in_flight() -> Result<()> {
    let memory = Arc::new(SharedMemory::new(GuestAddress(1 << 20), 4 << 20)?);
    let mut queue = SplitQueueDriver::new(memory.clone(), QUEUE_SIZE)?;

    let mut first = Backend::start(false)?;
    let mut frontend = first.frontend()?;
    let negotiated = frontend.negotiate(0, wanted_protocol())?;
    ensure!(negotiated
        .protocol_features
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    frontend.set_mem_table(&memory)?;
    // Before the rings, as the spec asks; the frontend keeps the region for later.
    let (region, region_fd) = frontend.get_inflight_fd(1, QUEUE_SIZE)?;
    ensure!(region.mmap_size > 0 && region_fd.metadata()?.len() >= region.mmap_size);
    frontend.start_queue(0, &queue)?;

    let mut posted = Vec::new();
    for _ in 0..6 {
        posted.push(post(&mut queue, &memory)?);
    }
    queue.kick()?;
    first.wait_in_flight(6)?;
    let heads: Vec<u16> = posted.iter().map(|p| p.0).collect();
    first.complete(&[heads[4], heads[1]])?;
    let used: Vec<u32> = queue.wait_used(2, TIMEOUT)?.iter().map(|u| u.id).collect();
    ensure!(
        used == [u32::from(heads[4]), u32::from(heads[1])],
        "{used:?}"
    );

    // The backend goes away with four requests in flight; what it knew is lost, except
    // the region and guest memory.
    drop(frontend);
    ensure!(first.join()?.is_ok());

    let mut second = Backend::start(true)?;
    let mut frontend = second.frontend()?;
    frontend.negotiate(0, wanted_protocol())?;
    frontend.set_mem_table(&memory)?;
    frontend.set_inflight_fd(&region, &region_fd)?;
    // The frontend resumes at the used index, as bulkhead's VMM and QEMU do; the backend
    // knows better from the region.
    frontend.resume_queue(0, &queue, 2)?;
    ensure!(second.tracking.queue(0).unwrap().is_tracked());
    for _ in 0..2 {
        posted.push(post(&mut queue, &memory)?);
    }
    queue.kick()?;

    // The driver refuses an id it does not have in flight: a double completion fails
    // here.
    let used: Vec<u32> = queue.wait_used(6, TIMEOUT)?.iter().map(|u| u.id).collect();
    let expected: Vec<u32> = [0, 2, 3, 5, 6, 7]
        .iter()
        .map(|&i| u32::from(posted[i].0))
        .collect();
    ensure!(used == expected, "used {used:?}, expected {expected:?}");
    ensure!(queue.used_during(Duration::from_millis(100))?.is_empty());
    for (head, buffer) in &posted {
        let written: u32 = memory.memory().read_obj(*buffer)?;
        ensure!(
            written == u32::from(*head),
            "buffer of {head} holds {written}"
        );
    }
    drop(frontend);
    ensure!(second.join()?.is_ok());
    Ok(())
}

/// Hands a fresh backend an inflight region described by `lie`; the backend must refuse
/// it with an error and end the session without panicking.
fn refused(lie: VhostUserInflight, file: &File) -> Result<()> {
    let mut backend = Backend::start(true)?;
    let mut frontend = backend.frontend()?;
    frontend.negotiate(0, wanted_protocol())?;
    let answer = frontend.set_inflight_fd(&lie, file);
    ensure!(
        answer.is_err(),
        "the backend accepted size {:#x} offset {:#x} queues {} of {}",
        { lie.mmap_size },
        { lie.mmap_offset },
        { lie.num_queues },
        { lie.queue_size }
    );
    drop(frontend);
    ensure!(backend.join()?.is_err());
    Ok(())
}

/// An unlinked 64-byte file.
fn short_file() -> Result<File> {
    let path = std::env::temp_dir().join(format!("bulkhead-inflight-{}", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    file.set_len(64)?;
    Ok(file)
}

#[test]
fn lying_inflight_regions_are_refused() -> Result<()> {
    // A genuine region for one queue of 16, as a backend made it.
    let mut maker = Backend::start(true)?;
    let mut frontend = maker.frontend()?;
    frontend.negotiate(0, wanted_protocol())?;
    let (genuine, file) = frontend.get_inflight_fd(1, QUEUE_SIZE)?;
    drop(frontend);
    maker.join()?.ok();

    let with = |change: &dyn Fn(&mut VhostUserInflight)| {
        let mut lie = genuine;
        change(&mut lie);
        lie
    };
    refused(with(&|r| r.mmap_size += 64), &file)?;
    refused(with(&|r| r.mmap_size = u64::MAX), &file)?;
    refused(with(&|r| r.mmap_offset = 4096), &file)?;
    refused(with(&|r| r.mmap_offset = u64::MAX - 4095), &file)?;
    refused(with(&|r| r.num_queues = 2), &file)?;
    refused(with(&|r| r.queue_size = 1024), &file)?;
    refused(with(&|r| r.queue_size = 32), &file)?;

    // The right description, but a file too short for it, or not a file at all.
    let short = short_file()?;
    refused(genuine, &short)?;
    let (socket, _peer) = UnixStream::pair()?;
    refused(genuine, &File::from(OwnedFd::from(socket)))?;

    // GET_INFLIGHT_FD for queues the device does not have: no region, no reply.
    let mut backend = Backend::start(true)?;
    let mut frontend = backend.frontend()?;
    frontend.negotiate(0, wanted_protocol())?;
    ensure!(frontend.get_inflight_fd(4, QUEUE_SIZE).is_err());
    drop(frontend);
    ensure!(backend.join()?.is_err());
    Ok(())
}

#[test]
fn the_region_cannot_be_swapped_under_a_started_ring() -> Result<()> {
    let memory = Arc::new(SharedMemory::new(GuestAddress(1 << 20), 4 << 20)?);
    let queue = SplitQueueDriver::new(memory.clone(), QUEUE_SIZE)?;
    let mut backend = Backend::start(true)?;
    let mut frontend = backend.frontend()?;
    frontend.negotiate(0, wanted_protocol())?;
    frontend.set_mem_table(&memory)?;
    let (region, file) = frontend.get_inflight_fd(1, QUEUE_SIZE)?;
    frontend.start_queue(0, &queue)?;
    ensure!(frontend.set_inflight_fd(&region, &file).is_err());
    drop(frontend);
    ensure!(backend.join()?.is_err());
    Ok(())
}

#[test]
fn a_corrupt_region_stops_the_ring_from_starting() -> Result<()> {
    use std::os::unix::fs::FileExt;

    let memory = Arc::new(SharedMemory::new(GuestAddress(1 << 20), 4 << 20)?);
    let queue = SplitQueueDriver::new(memory.clone(), QUEUE_SIZE)?;
    // A region its last writer scribbled on: version 1, but an absurd batch link and a
    // used index far behind the ring's.
    let mut maker = Backend::start(true)?;
    let mut frontend = maker.frontend()?;
    frontend.negotiate(0, wanted_protocol())?;
    let (region, file) = frontend.get_inflight_fd(1, QUEUE_SIZE)?;
    drop(frontend);
    maker.join()?.ok();
    // version, desc_num, last_batch_head, used_idx
    let mut header = Vec::new();
    for field in [1u16, QUEUE_SIZE, 60000, 0] {
        header.extend_from_slice(&field.to_le_bytes());
    }
    file.write_all_at(&header, 8)?;
    // The guest's used index says one request was returned.
    let used_idx = GuestAddress(queue.layout().used_ring.0 + 2);
    memory.memory().write_obj(1u16, used_idx)?;

    let mut backend = Backend::start(true)?;
    let mut frontend = backend.frontend()?;
    frontend.negotiate(0, wanted_protocol())?;
    frontend.set_mem_table(&memory)?;
    frontend.set_inflight_fd(&region, &file)?;
    ensure!(frontend.resume_queue(0, &queue, 1).is_err());
    drop(frontend);
    ensure!(backend.join()?.is_err());
    Ok(())
}

/// The VMM's frontend for an rng device (type 4, one queue, no config space) on
/// `connection`, as the VMM would attach it.
fn connect_rng(
    connection: UnixStream,
    ram: &VmmGuestRam,
    watchdog: Option<ReplyWatchdog>,
) -> Result<VhostUserDevice, VhostUserDeviceError> {
    VhostUserDevice::connect(
        connection,
        4,
        vec![QUEUE_SIZE],
        0,
        ram.memory().clone(),
        watchdog,
    )
}

/// The VMM's side: a split ring laid out by hand in the VMM's own guest RAM.
struct VmmGuest {
    memory: bulkhead_vmm::memory::GuestMemory,
    posted: u16,
}

impl VmmGuest {
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn new(ram: &VmmGuestRam) -> Result<Self> {
        let memory = ram.memory().clone();
        for i in 0..QUEUE_SIZE {
            let entry = GuestAddress(Self::DESC + 16 * u64::from(i));
            // addr, len, flags = WRITE, next
            memory.write_obj(0x1_0000 + 64 * u64::from(i), entry)?;
            memory.write_obj(64u32, GuestAddress(entry.0 + 8))?;
            memory.write_obj(2u16, GuestAddress(entry.0 + 12))?;
        }
        Ok(VmmGuest { memory, posted: 0 })
    }

    fn queue(&self, next_avail: u16) -> QueueConfig {
        QueueConfig {
            index: 0,
            size: QUEUE_SIZE,
            next_avail,
            descriptors: Self::DESC,
            driver_area: Self::AVAIL,
            device_area: Self::USED,
        }
    }

    fn post(&mut self, head: u16) -> Result<()> {
        let slot = GuestAddress(Self::AVAIL + 4 + 2 * u64::from(self.posted % QUEUE_SIZE));
        self.memory.write_obj(head, slot)?;
        self.posted += 1;
        self.memory
            .write_obj(self.posted, GuestAddress(Self::AVAIL + 2))?;
        Ok(())
    }

    fn used_idx(&self) -> Result<u16> {
        Ok(self.memory.read_obj(GuestAddress(Self::USED + 2))?)
    }

    fn wait_used(&self, count: u16) -> Result<Vec<u32>> {
        let deadline = Instant::now() + TIMEOUT;
        while self.used_idx()? < count {
            ensure!(Instant::now() < deadline, "used index {}", self.used_idx()?);
            std::thread::sleep(Duration::from_millis(5));
        }
        (0..self.used_idx()?)
            .map(|i| {
                let entry = GuestAddress(Self::USED + 4 + 8 * u64::from(i % QUEUE_SIZE));
                Ok(self.memory.read_obj(entry)?)
            })
            .collect()
    }
}

#[test]
fn the_vmm_hands_the_inflight_region_to_the_replacement_backend() -> Result<()> {
    let ram = VmmGuestRam::new(4 << 20)?;
    let mut guest = VmmGuest::new(&ram)?;
    let kicks = vec![EventFd::new(EFD_NONBLOCK)?];
    let interrupt = EventFd::new(EFD_NONBLOCK)?;
    let connect = |backend: &mut Backend| {
        let connection = backend.connection.take().expect("one frontend per backend");
        VhostUserDevice::connect(
            connection,
            2,
            vec![QUEUE_SIZE],
            0,
            ram.memory().clone(),
            None,
        )
    };

    let mut first = Backend::start(false)?;
    let mut device = connect(&mut first)?;
    device.activate(
        VIRTIO_F_VERSION_1_BIT,
        &[guest.queue(0)],
        &kicks,
        &interrupt,
    )?;
    let region = device
        .inflight_region()
        .ok_or_else(|| anyhow::anyhow!("the VMM did not ask for an inflight region"))?;
    for head in [5, 9, 2] {
        guest.post(head)?;
    }
    kicks[0].write(1)?;
    first.wait_in_flight(3)?;
    first.complete(&[9])?;
    ensure!(guest.wait_used(1)? == [9]);
    drop(device);
    ensure!(first.join()?.is_ok());

    // What the supervisor and `VirtioMmio::replace_device` do for a replacement: the
    // region is handed over, the queue resumes at the used index.
    let mut second = Backend::start(true)?;
    let mut device = connect(&mut second)?;
    device.adopt_inflight_region(region);
    let used = guest.used_idx()?;
    device.activate(
        VIRTIO_F_VERSION_1_BIT,
        &[guest.queue(used)],
        &kicks,
        &interrupt,
    )?;
    guest.post(7)?;
    kicks[0].write(1)?;
    let used = guest.wait_used(4)?;
    ensure!(used == [9, 5, 2, 7], "used ring {used:?}");
    std::thread::sleep(Duration::from_millis(50));
    ensure!(guest.used_idx()? == 4, "a request was completed twice");
    drop(device);
    ensure!(second.join()?.is_ok());
    Ok(())
}

#[test]
fn devices_that_complete_in_order_do_not_offer_inflight_tracking() -> Result<()> {
    let (ours, theirs) = UnixStream::pair()?;
    let device = RngDevice::new(&RngConfig { rate_limit: None })?.into_backend();
    let server = std::thread::spawn(move || serve_connection(theirs, device));
    let mut frontend = UserspaceFrontend::new(ours, 1);
    let negotiated = frontend.negotiate(0, wanted_protocol())?;
    ensure!(!negotiated
        .protocol_features
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    drop(frontend);
    ensure!(server.join().is_ok());

    // The VMM's frontend asks rng for no region and serves it as before.
    let ram = VmmGuestRam::new(4 << 20)?;
    let mut guest = VmmGuest::new(&ram)?;
    let (ours, theirs) = UnixStream::pair()?;
    let device = RngDevice::new(&RngConfig { rate_limit: None })?.into_backend();
    let server = std::thread::spawn(move || serve_connection(theirs, device));
    let mut rng = connect_rng(ours, &ram, None)?;
    let kicks = vec![EventFd::new(EFD_NONBLOCK)?];
    rng.activate(
        VIRTIO_F_VERSION_1_BIT,
        &[guest.queue(0)],
        &kicks,
        &EventFd::new(EFD_NONBLOCK)?,
    )?;
    ensure!(rng.inflight_region().is_none());
    guest.post(3)?;
    kicks[0].write(1)?;
    ensure!(guest.wait_used(1)? == [3]);
    drop(rng);
    ensure!(server.join().is_ok());
    Ok(())
}

/// Takeovers in a row, each with a request the guest posted and kicked before it (the kick
/// went to the backend that died): the new backend must serve it every time, whether the
/// VMM's kick after activation or the backend's own look at a newly enabled ring finds it.
/// A kick drained from a ring not yet enabled would leave the request there for good, and
/// only now and then, so the race gets many rounds.
#[test]
fn the_kick_after_a_takeover_reaches_the_new_backend_every_time() -> Result<()> {
    const ROUNDS: u16 = 300;
    let ram = VmmGuestRam::new(4 << 20)?;
    let mut guest = VmmGuest::new(&ram)?;
    let kicks = vec![EventFd::new(EFD_NONBLOCK)?];
    let interrupt = EventFd::new(EFD_NONBLOCK)?;
    for round in 0..ROUNDS {
        guest.post(round % QUEUE_SIZE)?;
        let (ours, theirs) = UnixStream::pair()?;
        let device = RngDevice::new(&RngConfig { rate_limit: None })?.into_backend();
        let server = std::thread::spawn(move || serve_connection(theirs, device));
        let mut rng = connect_rng(ours, &ram, None)?;
        rng.activate(
            VIRTIO_F_VERSION_1_BIT,
            &[guest.queue(guest.used_idx()?)],
            &kicks,
            &interrupt,
        )?;
        kicks[0].write(1)?;
        guest
            .wait_used(round + 1)
            .map_err(|e| e.context(format!("round {round}: the request was never served")))?;
        drop(rng);
        ensure!(server.join().is_ok());
    }
    Ok(())
}

/// A worker that stops answering (SIGSTOP here; a bug or a takeover in life) does not hang
/// the VMM: the watchdog kills it once an operation has waited past its limit, and the
/// operation fails instead of blocking the vCPU or the supervisor that made it - at the
/// handshake, and at a reset, which waits for the worker to stop its rings.
#[test]
fn the_vmm_kills_a_worker_that_stops_answering() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;

    let ram = VmmGuestRam::new(4 << 20)?;
    let guest = VmmGuest::new(&ram)?;
    let launch = || -> Result<(WorkerProcess, UnixStream, ReplyWatchdog)> {
        let (worker, connection) =
            WorkerProcess::launched("rng0", DeviceConfig::Rng(RngConfig::default()))?;
        let pidfd = PidFd::open(worker.pid())?;
        let watchdog = ReplyWatchdog::new(
            "rng0".into(),
            pidfd,
            Duration::from_millis(300),
            Box::new(|_| {}),
        )?;
        Ok((worker, connection, watchdog))
    };
    let stop = |worker: &WorkerProcess| {
        // SAFETY: kill takes a pid and a signal; the pid is our unreaped child's.
        unsafe { libc::kill(worker.pid() as libc::pid_t, libc::SIGSTOP) }
    };
    let killed = |worker: &WorkerProcess| -> Result<()> {
        let status = worker.wait_exit(TIMEOUT)?;
        ensure!(
            status.signal() == Some(libc::SIGKILL),
            "the worker ended with {status}"
        );
        Ok(())
    };

    let (worker, connection, watchdog) = launch()?;
    ensure!(stop(&worker) == 0);
    let started = Instant::now();
    let connected = connect_rng(connection, &ram, Some(watchdog));
    ensure!(connected.is_err(), "connected to a stopped worker");
    killed(&worker)?;

    let (worker, connection, watchdog) = launch()?;
    let mut rng = connect_rng(connection, &ram, Some(watchdog))?;
    let kicks = vec![EventFd::new(EFD_NONBLOCK)?];
    rng.activate(
        VIRTIO_F_VERSION_1_BIT,
        &[guest.queue(0)],
        &kicks,
        &EventFd::new(EFD_NONBLOCK)?,
    )?;
    ensure!(stop(&worker) == 0);
    rng.reset();
    killed(&worker)?;
    ensure!(started.elapsed() < TIMEOUT, "took {:?}", started.elapsed());
    Ok(())
}
