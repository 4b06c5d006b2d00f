//! Asynchronous data I/O: one io_uring per request queue, and the bookkeeping of the
//! requests it has in flight.
//!
//! A queue's thread submits the host I/O ops of a drained batch ([`QueueRing::submit`],
//! then one `io_uring_enter` for all of them in [`QueueRing::flush`]); the ring's
//! completion eventfd is a device event source of the same thread, which reaps the
//! completions ([`QueueRing::reap`]), resubmits short transfers and hands back each request
//! whose ops have all ended. Ops point straight into guest memory: each request keeps the
//! memory map it was planned with alive until it ends, so a new memory table cannot unmap
//! buffers the kernel is still filling.
//!
//! io_uring does its work outside seccomp, so the rings are made before the worker
//! confines itself, disabled, and restricted before they are enabled: READV and WRITEV
//! only, on the image files registered at creation only (fixed files), with no flag but
//! IOSQE_ASYNC; no register operation is left allowed. The sandbox then allows
//! `io_uring_enter` and nothing else of io_uring, so a confined worker cannot make a ring
//! without these limits.

use std::collections::HashMap;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use io_uring::{cqueue, opcode, register::Restriction, squeue, types, IoUring};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::request::{DirectRequest, HostOp, Status};
use crate::disk::io::{transfer_all, Direction, IoVecs, IOV_MAX};
use crate::disk::IoHold;
use crate::virtio::Request;

/// Submission queue entries per ring; a full ring is submitted and refilled.
const RING_ENTRIES: u32 = 256;

/// How the rings are set up.
#[derive(Debug, Clone, Copy)]
pub struct UringOptions {
    /// Ops of at least this many bytes are punted to the kernel's io-wq workers
    /// (IOSQE_ASYNC) instead of being tried inline at submission, where a page-cache hit
    /// copies on the submitting thread; `None` never punts.
    pub punt_from: Option<u64>,
    /// Writes shorter than this are done on the queue's thread (pwritev) instead: a
    /// buffered write the file system cannot do without blocking (ext4) would go to an
    /// io-wq worker anyway, a thread hop that costs a small write more than it saves.
    pub inline_writes_below: u64,
}

/// The rings of a device, one per queue, made before the worker confines itself and
/// shared by every connection a standalone worker serves.
pub struct AsyncIo {
    rings: Vec<Mutex<QueueRing>>,
}

impl AsyncIo {
    /// `files`: the descriptors ops may use (the image), registered as fixed files.
    pub fn create(queues: usize, files: &[RawFd], options: UringOptions) -> io::Result<AsyncIo> {
        let rings = (0..queues)
            .map(|_| QueueRing::create(files, options).map(Mutex::new))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(AsyncIo { rings })
    }

    /// Descriptors to keep open through confinement, with what they are.
    pub fn descriptors(&self) -> Vec<(RawFd, &'static str)> {
        let mut fds = Vec::new();
        for ring in &self.rings {
            let ring = lock(ring);
            fds.push((ring.ring.as_raw_fd(), "io_uring"));
            fds.push((ring.eventfd.as_raw_fd(), "io_uring completion eventfd"));
        }
        fds
    }

    pub fn queues(&self) -> usize {
        self.rings.len()
    }

    pub fn ring(&self, queue: usize) -> Option<MutexGuard<'_, QueueRing>> {
        self.rings.get(queue).map(lock)
    }

    /// Waits for everything still in flight (a previous connection's I/O) and drops it.
    pub fn quiesce(&self) {
        for ring in &self.rings {
            drop(lock(ring).wait_idle());
        }
    }
}

fn lock(ring: &Mutex<QueueRing>) -> MutexGuard<'_, QueueRing> {
    // Every method leaves the ring consistent before anything that can panic.
    ring.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request whose ops have all ended.
pub struct Finished {
    pub request: Request,
    /// The queue generation it was popped in (see `TrackedQueue::generation`).
    pub generation: u64,
    /// Data bytes written for the driver, or the failure.
    pub result: Result<u64, Status>,
    /// The memory its buffers (status byte included) lie in.
    pub memory: Arc<GuestMemoryMmap>,
}

/// A request with ops in flight.
struct Pending {
    request: Request,
    generation: u64,
    ops_left: usize,
    failed: bool,
    data_in: u64,
    /// Keeps the buffers' mapping alive while the kernel may use them.
    memory: Arc<GuestMemoryMmap>,
    /// Keeps the disk's mapping valid (QCOW2: no freed cluster reused under the op).
    _hold: Option<IoHold>,
}

/// One SQE's worth of work, kept until its completion: the iovecs must stay put, and a
/// short transfer goes on from where it stopped.
struct Op {
    request: u64,
    slot: u32,
    /// Where in the file the next byte goes or comes from.
    host: u64,
    write: bool,
    iovecs: IoVecs,
}

impl Op {
    /// `n` more bytes moved.
    fn advance(&mut self, n: usize) {
        self.host += n as u64;
        self.iovecs.advance(n);
    }
}

/// One queue's ring and what it has in flight. Used by that queue's thread only; the
/// mutex around it is never contended.
pub struct QueueRing {
    ring: IoUring,
    eventfd: EventFd,
    /// Registered files: index = fixed-file slot.
    files: Vec<RawFd>,
    options: UringOptions,
    /// Ops by `user_data`.
    ops: HashMap<u64, Op>,
    requests: HashMap<u64, Pending>,
    next_id: u64,
    next_op: u64,
    /// Entries pushed and not yet submitted.
    unsubmitted: usize,
}

impl QueueRing {
    fn create(files: &[RawFd], options: UringOptions) -> io::Result<QueueRing> {
        let ring: IoUring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
        let eventfd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let submitter = ring.submitter();
        submitter.register_files(files)?;
        submitter.register_eventfd(eventfd.as_raw_fd())?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        let mut restrictions = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_allowed(fixed | squeue::Flags::ASYNC.bits()),
            Restriction::sqe_flags_required(fixed),
        ];
        submitter.register_restrictions(&mut restrictions)?;
        submitter.register_enable_rings()?;
        Ok(QueueRing {
            ring,
            eventfd,
            files: files.to_vec(),
            options,
            ops: HashMap::new(),
            requests: HashMap::new(),
            next_id: 0,
            next_op: 0,
            unsubmitted: 0,
        })
    }

    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Requests with ops in flight.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Queues the ops of `request` (submitted at the next [`flush`](Self::flush)). Gives
    /// the request back, untouched, when an op is not one this ring may do (a file it
    /// was not given, too many buffers) or there is none: the caller serves it
    /// synchronously.
    pub fn submit(
        &mut self,
        request: Request,
        direct: DirectRequest,
        memory: Arc<GuestMemoryMmap>,
        generation: u64,
    ) -> Result<(), Request> {
        if direct.ops.is_empty() {
            return Err(request);
        }
        let mut slots = Vec::with_capacity(direct.ops.len());
        for op in &direct.ops {
            match self.files.iter().position(|&fd| fd == op.fd) {
                Some(slot) if op.iovecs.len() <= IOV_MAX => slots.push(slot as u32),
                _ => return Err(request),
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let DirectRequest {
            write,
            ops,
            data_in,
            hold,
        } = direct;
        let count = ops.len();
        for (op, slot) in ops.into_iter().zip(slots) {
            let HostOp { host, iovecs, .. } = op;
            let op = Op {
                request: id,
                slot,
                host,
                write,
                // SAFETY: the iovecs lie in guest memory that the request's `Pending`
                // keeps mapped until this op's completion is reaped.
                iovecs: unsafe { IoVecs::from_raw(iovecs) },
            };
            self.push(op);
        }
        self.requests.insert(
            id,
            Pending {
                request,
                generation,
                ops_left: count,
                failed: false,
                data_in,
                memory,
                _hold: hold,
            },
        );
        Ok(())
    }

    /// Whether `direct` is better done at once on this thread ([`run_inline`]).
    pub fn wants_inline(&self, direct: &DirectRequest) -> bool {
        direct.write && direct.len() < self.options.inline_writes_below
    }

    /// Submits everything queued with one `io_uring_enter`.
    pub fn flush(&mut self) {
        if self.unsubmitted > 0 {
            self.enter(0);
        }
    }

    /// The queue's thread is at work on the ring: completions need not wake it until
    /// [`unquiet`](Self::unquiet). Saves an eventfd write, an epoll wakeup and a read
    /// per request the page cache serves inline at submission.
    pub fn quiet(&mut self) {
        self.ring.completion().disable_eventfd();
    }

    /// Completions wake the thread again; returns those that came while it was quiet.
    pub fn unquiet(&mut self) -> Vec<Finished> {
        self.ring.completion().enable_eventfd();
        self.reap()
    }

    /// Woken by the completion eventfd: resets it, then reaps.
    pub fn reap_woken(&mut self) -> Vec<Finished> {
        // Reset before looking, so a completion posted after the look wakes the thread
        // again.
        let _ = self.eventfd.read();
        self.reap()
    }

    /// Reaps what has completed: finished requests come back; short transfers are
    /// resubmitted.
    pub fn reap(&mut self) -> Vec<Finished> {
        let mut finished = Vec::new();
        loop {
            let completions: Vec<cqueue::Entry> = self.ring.completion().collect();
            if completions.is_empty() {
                break;
            }
            for cqe in completions {
                self.complete_op(cqe.user_data(), cqe.result(), &mut finished);
            }
        }
        self.flush();
        finished
    }

    /// Waits until nothing is in flight; returns what finished meanwhile.
    pub fn wait_idle(&mut self) -> Vec<Finished> {
        let mut finished = Vec::new();
        while !self.ops.is_empty() {
            self.enter(1);
            finished.extend(self.reap());
        }
        finished
    }

    fn push(&mut self, op: Op) {
        let user_data = self.next_op;
        self.next_op = self.next_op.wrapping_add(1);
        let iovecs = op.iovecs.pending();
        let file = types::Fixed(op.slot);
        let entry = if op.write {
            opcode::Writev::new(file, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(op.host)
                .build()
        } else {
            opcode::Readv::new(file, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(op.host)
                .build()
        };
        let punt = self
            .options
            .punt_from
            .is_some_and(|from| op.iovecs.remaining_len() >= from);
        let entry = entry.user_data(user_data).flags(if punt {
            squeue::Flags::FIXED_FILE | squeue::Flags::ASYNC
        } else {
            squeue::Flags::FIXED_FILE
        });
        self.ops.insert(user_data, op);
        loop {
            // SAFETY: the entry's iovecs live in `self.ops[user_data]`, which is only
            // removed when its completion is reaped, and point into guest memory that the
            // op's request keeps mapped until then.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted += 1;
                return;
            }
            // Full: hand the kernel what is there, then there is room.
            self.enter(0);
        }
    }

    /// io_uring_enter: submit what is queued, and wait for `want` completions.
    fn enter(&mut self, want: usize) {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The kernel is short of memory for now (EAGAIN) or has too many
                // completions to post (EBUSY): reaping makes room. Anything else cannot
                // be answered but by trying again, without spinning hot.
                Err(e) => {
                    tracing::debug!("io_uring_enter: {e}, retrying");
                    std::thread::sleep(std::time::Duration::from_micros(100));
                    if want == 0 && self.ring.submission().is_empty() {
                        self.unsubmitted = 0;
                        return;
                    }
                }
            }
        }
    }

    fn complete_op(&mut self, user_data: u64, result: i32, finished: &mut Vec<Finished>) {
        let Some(mut op) = self.ops.remove(&user_data) else {
            tracing::warn!(user_data, "completion of an unknown io_uring op");
            return;
        };
        let mut failed = false;
        match result {
            n if n > 0 => {
                op.advance(n as usize);
                if !op.iovecs.is_empty() {
                    // Short transfer: go on from where it stopped.
                    return self.resubmit(op);
                }
            }
            0 if !op.write => op.iovecs.zero_rest(),
            0 => {
                tracing::debug!("io_uring write moved nothing");
                failed = true;
            }
            e if e == -libc::EAGAIN || e == -libc::EINTR => return self.resubmit(op),
            e => {
                tracing::debug!(
                    "io_uring {}: {}",
                    if op.write { "write" } else { "read" },
                    io::Error::from_raw_os_error(-e)
                );
                failed = true;
            }
        }
        let id = op.request;
        let Some(pending) = self.requests.get_mut(&id) else {
            return;
        };
        pending.failed |= failed;
        pending.ops_left -= 1;
        if pending.ops_left == 0 {
            if let Some(p) = self.requests.remove(&id) {
                finished.push(Finished {
                    result: if p.failed {
                        Err(Status::IoErr)
                    } else {
                        Ok(p.data_in)
                    },
                    request: p.request,
                    generation: p.generation,
                    memory: p.memory,
                });
            }
        }
    }

    fn resubmit(&mut self, op: Op) {
        self.push(op);
    }
}

impl Drop for QueueRing {
    /// The kernel may still be writing into guest memory the requests keep mapped:
    /// wait for it before they let go of it.
    fn drop(&mut self) {
        drop(self.wait_idle());
    }
}

/// Does the ops of `direct` with preadv/pwritev on the calling thread; the data bytes for
/// the driver, or the failure.
pub fn run_inline(direct: &DirectRequest) -> Result<u64, Status> {
    let direction = if direct.write {
        Direction::Write
    } else {
        Direction::Read
    };
    for host_op in &direct.ops {
        // SAFETY: the iovecs lie in guest memory the caller keeps mapped for the call.
        let mut iovecs = unsafe { IoVecs::from_raw(host_op.iovecs.clone()) };
        if let Err(e) = transfer_all(host_op.fd, &mut iovecs, host_op.host, direction) {
            tracing::debug!("inline {direction:?}: {e}");
            return Err(Status::IoErr);
        }
    }
    Ok(direct.data_in)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;

    fn memfd_with(bytes: &[u8]) -> File {
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor
        // (checked below), which the File then owns.
        let fd = unsafe { libc::memfd_create(c"uring-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(bytes).unwrap();
        file
    }

    /// Guest memory and iovecs for `len` bytes at `addr`, split in two buffers.
    fn iovecs(memory: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<libc::iovec> {
        let host = memory.get_host_address(GuestAddress(addr)).unwrap();
        let half = len / 3;
        vec![
            libc::iovec {
                iov_base: host.cast(),
                iov_len: half,
            },
            libc::iovec {
                iov_base: host.wrapping_add(half).cast(),
                iov_len: len - half,
            },
        ]
    }

    fn one_op(file: &File, write: bool, host: u64, iovecs: Vec<libc::iovec>) -> DirectRequest {
        let len: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        DirectRequest {
            write,
            ops: vec![HostOp {
                fd: file.as_raw_fd(),
                host,
                iovecs,
            }],
            data_in: if write { 0 } else { len },
            hold: None,
        }
    }

    /// Through a restricted ring on a registered file: a write, then a read that runs
    /// past the end of the file (a short read, resubmitted, then zeros); a descriptor the
    /// ring was not given is handed back for the synchronous path.
    #[test]
    fn ring_moves_bytes_and_reads_zeros_past_the_end() {
        let file = memfd_with(&[0x11; 10_000]);
        let options = UringOptions {
            punt_from: Some(8192),
            inline_writes_below: 0,
        };
        let mut ring = match QueueRing::create(&[file.as_raw_fd()], options) {
            Ok(ring) => ring,
            Err(e) => {
                eprintln!("io_uring unavailable here ({e}); nothing to test");
                return;
            }
        };
        let memory =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        memory.write_slice(&[0x22; 4096], GuestAddress(0)).unwrap();
        let write = one_op(&file, true, 1000, iovecs(&memory, 0, 4096));
        assert!(ring
            .submit(Request::default(), write, memory.clone(), 1)
            .is_ok());
        ring.flush();
        let done = ring.wait_idle();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].result, Ok(0));
        let mut back = [0u8; 4096];
        file.read_exact_at(&mut back, 1000).unwrap();
        assert!(back.iter().all(|&b| b == 0x22));

        memory
            .write_slice(&[0xff; 16384], GuestAddress(65536))
            .unwrap();
        let read = one_op(&file, false, 8192, iovecs(&memory, 65536, 16384));
        assert!(ring
            .submit(Request::default(), read, memory.clone(), 7)
            .is_ok());
        ring.flush();
        let done = ring.wait_idle();
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].result, done[0].generation), (Ok(16384), 7));
        let mut got = vec![0u8; 16384];
        memory.read_slice(&mut got, GuestAddress(65536)).unwrap();
        assert!(got[..10_000 - 8192].iter().all(|&b| b == 0x11));
        assert!(got[10_000 - 8192..].iter().all(|&b| b == 0));

        let other = memfd_with(&[0; 512]);
        let stranger = one_op(&other, false, 0, iovecs(&memory, 0, 512));
        assert!(ring
            .submit(Request::default(), stranger, memory.clone(), 1)
            .is_err());
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn inline_ops_move_bytes_and_zero_past_the_end() {
        let file = memfd_with(&[0x33; 3000]);
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 65536)]).unwrap();
        memory.write_slice(&[0xff; 8192], GuestAddress(0)).unwrap();
        let read = one_op(&file, false, 1000, iovecs(&memory, 0, 8192));
        assert_eq!(run_inline(&read), Ok(8192));
        let mut got = vec![0u8; 8192];
        memory.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert!(got[..2000].iter().all(|&b| b == 0x33));
        assert!(got[2000..].iter().all(|&b| b == 0));
    }
}
