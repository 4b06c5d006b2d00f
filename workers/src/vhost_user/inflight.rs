//! The inflight I/O tracking region (vhost-user spec, "Inflight I/O tracking", split
//! virtqueues): shared memory that outlives a worker and records which requests it had
//! taken from the available ring without completing them, so its replacement can finish
//! exactly those.
//!
//! The backend creates the region (GET_INFLIGHT_FD); the frontend only keeps the
//! descriptor and hands it to the next backend (SET_INFLIGHT_FD). Per queue:
//!
//! ```text
//! QueueRegionSplit { features: u64, version: u16, desc_num: u16, last_batch_head: u16,
//!                    used_idx: u16, desc: [DescStateSplit; desc_num] }
//! DescStateSplit   { inflight: u8, padding: [u8; 5], next: u16, counter: u64 }
//! ```
//!
//! Everything in the region is read as untrusted: the worker that wrote it may have been
//! subverted before it died. Accesses are atomic (the mapping is shared) and every index
//! read from it is bounds-checked.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;

use thiserror::Error;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

/// The region layout version this worker writes and understands.
pub const VERSION: u16 = 1;
/// Bytes of a queue region's header (features .. used_idx).
const HEADER_SIZE: usize = 16;
/// Bytes of one `DescStateSplit`.
const DESC_STATE_SIZE: usize = 16;
/// Each queue region starts on a cache line, as libvhost-user lays them out.
const QUEUE_ALIGNMENT: usize = 64;
/// The largest split queue virtio allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

// Field offsets in a queue region.
const FEATURES: usize = 0;
const VERSION_FIELD: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
// Field offsets in a DescStateSplit.
const INFLIGHT: usize = 0;
const NEXT: usize = 6;
const COUNTER: usize = 8;

#[derive(Debug, Error)]
pub enum InflightError {
    #[error("{num_queues} queues requested; the device has {max}")]
    QueueCount { num_queues: u16, max: usize },
    #[error("queue size {size} is not in 1..={max}")]
    QueueSize { size: u16, max: u16 },
    #[error(
        "the region is {given:#x} bytes; {num_queues} queues of {queue_size} need {expected:#x}"
    )]
    RegionSize {
        given: u64,
        expected: u64,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("the region's descriptor is not a regular file or memfd")]
    NotAFile,
    #[error("offset {offset:#x} + size {size:#x} runs past the end of the file ({file_len:#x})")]
    PastEndOfFile {
        offset: u64,
        size: u64,
        file_len: u64,
    },
    #[error("cannot create the region: {0}")]
    Create(io::Error),
    #[error("cannot inspect the region's descriptor: {0}")]
    Inspect(io::Error),
    #[error("cannot map the region: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
    #[error("queue {queue} has no inflight region (the region covers {num_queues})")]
    NoSuchQueue { queue: u16, num_queues: u16 },
    #[error("queue {queue}: region version {version}, this worker knows {VERSION}")]
    Version { queue: u16, version: u16 },
    #[error("queue {queue}: region holds {desc_num} descriptors, the ring has {ring_size}")]
    DescNum {
        queue: u16,
        desc_num: u16,
        ring_size: u16,
    },
    #[error(
        "queue {queue}: the used ring is {batch} entries ahead of the region, more than the \
         {desc_num} a batch can hold"
    )]
    BatchTooLarge {
        queue: u16,
        batch: u16,
        desc_num: u16,
    },
    #[error("queue {queue}: the last batch links to descriptor {index}, outside the region")]
    BadBatchLink { queue: u16, index: u16 },
    #[error("head {head} is outside the region's {desc_num} descriptors")]
    HeadOutOfRange { head: u16, desc_num: u16 },
}

/// The shape of a region: what GET_INFLIGHT_FD asks for and SET_INFLIGHT_FD repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightLayout {
    pub num_queues: u16,
    pub queue_size: u16,
}

impl InflightLayout {
    /// Checks a frontend's request against what the device serves.
    pub fn new(
        num_queues: u16,
        queue_size: u16,
        device_queues: usize,
        device_max_queue_size: usize,
    ) -> Result<Self, InflightError> {
        if num_queues == 0 || usize::from(num_queues) > device_queues {
            return Err(InflightError::QueueCount {
                num_queues,
                max: device_queues,
            });
        }
        let max = u16::try_from(device_max_queue_size)
            .unwrap_or(MAX_QUEUE_SIZE)
            .min(MAX_QUEUE_SIZE);
        if queue_size == 0 || queue_size > max {
            return Err(InflightError::QueueSize {
                size: queue_size,
                max,
            });
        }
        Ok(InflightLayout {
            num_queues,
            queue_size,
        })
    }

    /// Bytes one queue's region takes, padded to the alignment.
    pub fn queue_stride(&self) -> usize {
        let bytes = HEADER_SIZE + DESC_STATE_SIZE * usize::from(self.queue_size);
        bytes.div_ceil(QUEUE_ALIGNMENT) * QUEUE_ALIGNMENT
    }

    /// Bytes of the whole region; at most 64 Ki queues of 32 Ki descriptors: no overflow.
    pub fn mmap_size(&self) -> usize {
        usize::from(self.num_queues) * self.queue_stride()
    }
}

/// A mapped region, shared by the session (which installs it) and the queues (which track
/// their requests in it).
pub struct InflightRegion {
    layout: InflightLayout,
    file: File,
    mapping: MmapRegion,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl InflightRegion {
    /// A fresh, zeroed region in a new memfd (GET_INFLIGHT_FD).
    pub fn create(layout: InflightLayout) -> Result<Self, InflightError> {
        // SAFETY: the name is a NUL-terminated string literal; memfd_create reads nothing
        // else and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"bulkhead-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let size = layout.mmap_size();
        // A new memfd reads as zeros up to its length: the region starts zeroed.
        file.set_len(size as u64).map_err(InflightError::Create)?;
        Self::map(layout, file, 0)
    }

    /// The frontend's region (SET_INFLIGHT_FD), after checking that its claims hold: the
    /// size matches the layout exactly and the file really is that long, since touching a
    /// mapping past the end of its file would kill the worker with SIGBUS.
    pub fn adopt(
        layout: InflightLayout,
        file: File,
        mmap_offset: u64,
        mmap_size: u64,
    ) -> Result<Self, InflightError> {
        let expected = layout.mmap_size() as u64;
        if mmap_size != expected {
            return Err(InflightError::RegionSize {
                given: mmap_size,
                expected,
                num_queues: layout.num_queues,
                queue_size: layout.queue_size,
            });
        }
        let metadata = file.metadata().map_err(InflightError::Inspect)?;
        // A memfd is a regular file to fstat.
        if !metadata.file_type().is_file() {
            return Err(InflightError::NotAFile);
        }
        let fits = mmap_offset
            .checked_add(mmap_size)
            .is_some_and(|end| end <= metadata.len());
        if !fits {
            return Err(InflightError::PastEndOfFile {
                offset: mmap_offset,
                size: mmap_size,
                file_len: metadata.len(),
            });
        }
        Self::map(layout, file, mmap_offset)
    }

    fn map(layout: InflightLayout, file: File, offset: u64) -> Result<Self, InflightError> {
        let mapping_file = file.try_clone().map_err(InflightError::Inspect)?;
        let mapping =
            MmapRegion::from_file(FileOffset::new(mapping_file, offset), layout.mmap_size())
                .map_err(InflightError::Map)?;
        Ok(InflightRegion {
            layout,
            file,
            mapping,
        })
    }

    pub fn layout(&self) -> InflightLayout {
        self.layout
    }

    /// The descriptor to send the frontend.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Queue `queue`'s part of the region.
    pub fn queue(&self, queue: u16) -> Result<QueueRegion<'_>, InflightError> {
        if queue >= self.layout.num_queues {
            return Err(InflightError::NoSuchQueue {
                queue,
                num_queues: self.layout.num_queues,
            });
        }
        Ok(QueueRegion {
            region: self,
            queue,
            base: usize::from(queue) * self.layout.queue_stride(),
        })
    }

    // Offsets passed here are computed from the layout and always in bounds and aligned;
    // a failure would be a bug here, and is then ignored (loads read 0) rather than
    // trusted to panic safely in a vring thread.
    fn load<T: vm_memory::AtomicAccess + Default>(&self, offset: usize) -> T {
        let value = self
            .mapping
            .as_volatile_slice()
            .load(offset, Ordering::Relaxed);
        debug_assert!(value.is_ok(), "inflight offset {offset:#x} out of bounds");
        value.unwrap_or_default()
    }

    fn store<T: vm_memory::AtomicAccess>(&self, value: T, offset: usize) {
        let stored = self
            .mapping
            .as_volatile_slice()
            .store(value, offset, Ordering::Relaxed);
        debug_assert!(stored.is_ok(), "inflight offset {offset:#x} out of bounds");
    }
}

/// What a restarted queue must do, read from its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Heads taken but never completed, oldest first: to be served again.
    pub resubmit: Vec<u16>,
    /// Where popping the available ring resumes: every entry before it was either
    /// completed (it is counted in the used index) or is in `resubmit`.
    pub next_avail: u16,
    /// The next request counter, above every counter in the region.
    pub next_counter: u64,
}

/// One queue's part of the region.
#[derive(Debug, Clone, Copy)]
pub struct QueueRegion<'r> {
    region: &'r InflightRegion,
    queue: u16,
    base: usize,
}

impl QueueRegion<'_> {
    fn desc_num(&self) -> u16 {
        self.region.layout.queue_size
    }

    fn desc(&self, head: u16) -> usize {
        self.base + HEADER_SIZE + usize::from(head) * DESC_STATE_SIZE
    }

    fn check_head(&self, head: u16) -> Result<(), InflightError> {
        if head >= self.desc_num() {
            return Err(InflightError::HeadOutOfRange {
                head,
                desc_num: self.desc_num(),
            });
        }
        Ok(())
    }

    /// The ring starts (SET_VRING_KICK): initializes a fresh region, or reads what the
    /// previous worker left and repairs a batch it completed only halfway.
    ///
    /// `ring_used_idx` is the used index in guest memory: the truth about what the guest
    /// was told, whatever the region says.
    pub fn start(
        &self,
        ring_size: u16,
        ring_used_idx: u16,
        features: u64,
    ) -> Result<Recovery, InflightError> {
        let region = self.region;
        let desc_num = self.desc_num();
        if ring_size > desc_num {
            return Err(InflightError::DescNum {
                queue: self.queue,
                desc_num,
                ring_size,
            });
        }
        let version: u16 = region.load(self.base + VERSION_FIELD);
        if version == 0 {
            // Fresh (all zeros): nothing was ever in flight.
            region.store(features, self.base + FEATURES);
            region.store(desc_num, self.base + DESC_NUM);
            region.store(ring_used_idx, self.base + USED_IDX);
            region.store(VERSION, self.base + VERSION_FIELD);
            return Ok(Recovery {
                resubmit: Vec::new(),
                next_avail: ring_used_idx,
                next_counter: 1,
            });
        }
        if version != VERSION {
            return Err(InflightError::Version {
                queue: self.queue,
                version,
            });
        }
        let recorded: u16 = region.load(self.base + DESC_NUM);
        if recorded != desc_num {
            return Err(InflightError::DescNum {
                queue: self.queue,
                desc_num: recorded,
                ring_size,
            });
        }

        // The previous worker published a batch in the used ring but died before marking
        // it complete here: the batch is linked from last_batch_head through `next`.
        let used_idx: u16 = region.load(self.base + USED_IDX);
        let batch = ring_used_idx.wrapping_sub(used_idx);
        if batch > desc_num {
            return Err(InflightError::BatchTooLarge {
                queue: self.queue,
                batch,
                desc_num,
            });
        }
        let mut index: u16 = region.load(self.base + LAST_BATCH_HEAD);
        for _ in 0..batch {
            if index >= desc_num {
                return Err(InflightError::BadBatchLink {
                    queue: self.queue,
                    index,
                });
            }
            region.store(0u8, self.desc(index) + INFLIGHT);
            index = region.load(self.desc(index) + NEXT);
        }
        region.store(ring_used_idx, self.base + USED_IDX);

        let mut pending = Vec::new();
        let mut max_counter = 0u64;
        for head in 0..desc_num {
            if region.load::<u8>(self.desc(head) + INFLIGHT) == 0 {
                continue;
            }
            let counter: u64 = region.load(self.desc(head) + COUNTER);
            if head >= ring_size {
                // No such descriptor in this ring: nothing the guest could be waiting for.
                tracing::warn!(
                    queue = self.queue,
                    head,
                    "in-flight head outside the ring, dropped"
                );
                region.store(0u8, self.desc(head) + INFLIGHT);
                continue;
            }
            max_counter = max_counter.max(counter);
            pending.push((counter, head));
        }
        pending.sort_unstable();
        // At most desc_num <= 32768 entries: fits in u16 arithmetic modulo 2^16.
        let next_avail = ring_used_idx.wrapping_add(pending.len() as u16);
        Ok(Recovery {
            resubmit: pending.into_iter().map(|(_, head)| head).collect(),
            next_avail,
            next_counter: max_counter.saturating_add(1),
        })
    }

    /// `head` was taken from the available ring: counter first, then the flag, so a
    /// flagged entry always carries its order.
    pub fn begin(&self, head: u16, counter: u64) -> Result<(), InflightError> {
        self.check_head(head)?;
        self.region.store(counter, self.desc(head) + COUNTER);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.region.store(1u8, self.desc(head) + INFLIGHT);
        Ok(())
    }

    /// Step 1 of completing a batch, before the caller publishes it in the used ring:
    /// link the batch from last_batch_head so a successor can find it.
    pub fn stage_batch(&self, heads: &[u16]) -> Result<(), InflightError> {
        for &head in heads {
            self.check_head(head)?;
        }
        for &head in heads {
            let last: u16 = self.region.load(self.base + LAST_BATCH_HEAD);
            self.region.store(last, self.desc(head) + NEXT);
            self.region.store(head, self.base + LAST_BATCH_HEAD);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }

    /// Step 3, after the caller published the batch with used index `used_idx`: the
    /// batch's entries are no longer in flight.
    pub fn commit_batch(&self, heads: &[u16], used_idx: u16) -> Result<(), InflightError> {
        std::sync::atomic::fence(Ordering::SeqCst);
        for &head in heads {
            self.check_head(head)?;
            self.region.store(0u8, self.desc(head) + INFLIGHT);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.region.store(used_idx, self.base + USED_IDX);
        Ok(())
    }

    /// Whether `head` is marked in flight (for tests and diagnostics).
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.desc_num() && self.region.load::<u8>(self.desc(head) + INFLIGHT) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(num_queues: u16, queue_size: u16) -> InflightLayout {
        InflightLayout::new(num_queues, queue_size, 4, 256).unwrap()
    }

    #[test]
    fn sizes_follow_the_layout() {
        assert_eq!(layout(1, 256).queue_stride(), 16 + 256 * 16 + 48);
        assert_eq!(layout(2, 1).queue_stride(), 64);
        assert_eq!(layout(2, 1).mmap_size(), 128);
        let region = InflightRegion::create(layout(2, 8)).unwrap();
        assert_eq!(region.file().metadata().unwrap().len(), 2 * 192);
    }

    #[test]
    fn refuses_requests_the_device_cannot_serve() {
        assert!(matches!(
            InflightLayout::new(0, 8, 4, 256),
            Err(InflightError::QueueCount { .. })
        ));
        assert!(matches!(
            InflightLayout::new(5, 8, 4, 256),
            Err(InflightError::QueueCount { .. })
        ));
        assert!(matches!(
            InflightLayout::new(1, 0, 4, 256),
            Err(InflightError::QueueSize { .. })
        ));
        assert!(matches!(
            InflightLayout::new(1, 512, 4, 256),
            Err(InflightError::QueueSize { .. })
        ));
    }

    #[test]
    fn adopting_checks_the_frontends_claims() {
        let region = InflightRegion::create(layout(1, 8)).unwrap();
        let file = || region.file().try_clone().unwrap();
        let size = layout(1, 8).mmap_size() as u64;
        assert!(matches!(
            InflightRegion::adopt(layout(1, 8), file(), 0, size + 64),
            Err(InflightError::RegionSize { .. })
        ));
        assert!(matches!(
            InflightRegion::adopt(layout(1, 16), file(), 0, size),
            Err(InflightError::RegionSize { .. })
        ));
        // The right size, but the file is shorter than offset + size.
        assert!(matches!(
            InflightRegion::adopt(layout(1, 8), file(), 4096, size),
            Err(InflightError::PastEndOfFile { .. })
        ));
        assert!(matches!(
            InflightRegion::adopt(layout(1, 8), file(), u64::MAX - 8, size),
            Err(InflightError::PastEndOfFile { .. })
        ));
        assert!(InflightRegion::adopt(layout(1, 8), file(), 0, size).is_ok());
    }

    #[test]
    fn a_fresh_region_has_nothing_to_resubmit() {
        let region = InflightRegion::create(layout(1, 8)).unwrap();
        let queue = region.queue(0).unwrap();
        let recovery = queue.start(8, 5, 0).unwrap();
        assert_eq!(recovery.resubmit, Vec::<u16>::new());
        assert_eq!(recovery.next_avail, 5);
        assert!(matches!(
            region.queue(1),
            Err(InflightError::NoSuchQueue { .. })
        ));
    }

    #[test]
    fn resubmits_in_flight_heads_oldest_first() {
        let region = InflightRegion::create(layout(1, 8)).unwrap();
        let queue = region.queue(0).unwrap();
        queue.start(8, 0, 0).unwrap();
        for (counter, head) in [(1, 4), (2, 1), (3, 6), (4, 2)] {
            queue.begin(head, counter).unwrap();
        }
        queue.stage_batch(&[1]).unwrap();
        queue.commit_batch(&[1], 1).unwrap();

        let again = InflightRegion::adopt(
            layout(1, 8),
            region.file().try_clone().unwrap(),
            0,
            layout(1, 8).mmap_size() as u64,
        )
        .unwrap();
        let recovery = again.queue(0).unwrap().start(8, 1, 0).unwrap();
        assert_eq!(recovery.resubmit, vec![4, 6, 2]);
        assert_eq!(recovery.next_avail, 4);
        assert_eq!(recovery.next_counter, 5);
    }

    #[test]
    fn repairs_a_batch_published_but_not_committed() {
        let region = InflightRegion::create(layout(1, 8)).unwrap();
        let queue = region.queue(0).unwrap();
        queue.start(8, 0, 0).unwrap();
        for (counter, head) in [(1, 0), (2, 3), (3, 5)] {
            queue.begin(head, counter).unwrap();
        }
        queue.stage_batch(&[5, 0]).unwrap();
        // The used ring got both (used idx 2), then the worker died.
        let recovery = queue.start(8, 2, 0).unwrap();
        assert_eq!(recovery.resubmit, vec![3]);
        assert_eq!(recovery.next_avail, 3);

        // Staged but never published: both stay in flight.
        queue.stage_batch(&[3]).unwrap();
        let recovery = queue.start(8, 2, 0).unwrap();
        assert_eq!(recovery.resubmit, vec![3]);
    }

    #[test]
    fn refuses_a_region_that_lies() {
        let region = InflightRegion::create(layout(1, 8)).unwrap();
        let queue = region.queue(0).unwrap();
        queue.start(8, 0, 0).unwrap();
        // The used ring cannot be further ahead than a whole batch.
        assert!(matches!(
            queue.start(8, 9, 0),
            Err(InflightError::BatchTooLarge { .. })
        ));
        // A ring larger than the region.
        assert!(matches!(
            queue.start(16, 0, 0),
            Err(InflightError::DescNum { .. })
        ));
        // A batch link pointing outside the region.
        region.store(200u16, LAST_BATCH_HEAD);
        assert!(matches!(
            queue.start(8, 1, 0),
            Err(InflightError::BadBatchLink { index: 200, .. })
        ));
        region.store(7u16, VERSION_FIELD);
        assert!(matches!(
            queue.start(8, 0, 0),
            Err(InflightError::Version { version: 7, .. })
        ));
        assert!(matches!(
            queue.begin(8, 1),
            Err(InflightError::HeadOutOfRange { .. })
        ));
    }
}
