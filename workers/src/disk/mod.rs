//! The disk engine behind the block worker: raw and QCOW2 images, an in-memory
//! copy-on-write overlay and a read-only mode. It knows nothing of vhost-user so it can be
//! tested and benchmarked on its own.
//!
//! The worker has no filesystem reach: every image, and every file of a backing chain, is
//! opened by the VMM and handed over as a [`File`]. Backing files named inside an image are
//! obtained through a [`BackingResolver`]; the engine never opens a path itself.
//!
//! ```no_run
//! use std::fs::{File, OpenOptions};
//! use bulkhead_workers::disk::{self, DiskImage, Mode, PreopenedBacking};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // VMM side: open the image, then walk its backing chain under its own path policy.
//! let image = OpenOptions::new().read(true).write(true).open("disk.qcow2")?;
//! let mut chain = Vec::new();
//! let mut cur = image.try_clone()?;
//! while let Some((name, _format)) = disk::backing_of(&cur)? {
//!     let f = File::open(&name)?; // the VMM's policy decides what `name` may reach
//!     chain.push((name, f.try_clone()?));
//!     cur = f;
//! }
//! // Worker side, with only those files: one engine shared by every queue thread.
//! let disk = disk::open(image, None, Mode::ReadWrite, &PreopenedBacking::new(chain))?;
//! disk.write_at(&[0u8; 4096], 0)?;
//! disk.flush()?;
//! # Ok(())
//! # }
//! ```
//!
//! Every image is untrusted. Anything read from one is checked before it is used, and a bad
//! image gives a [`DiskError`] at open or at access, never a panic, an unbounded allocation or
//! a write outside the image.

pub mod backing;
pub mod cow;
pub mod direct;
pub mod guest_buffers;
pub(crate) mod io;
pub mod probe;
pub mod qcow2;
pub mod raw;

use std::fs::File;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::VolatileSlice;

pub use backing::{backing_of, PreopenedBacking};
pub use cow::CowOverlay;
pub use direct::{DirectIo, DirectRun, IoHold};
pub use probe::{probe, Format};
pub use qcow2::Qcow2;
pub use raw::Raw;

/// How deep a chain of backing files may go. Chains in practice are a handful deep; the
/// limit is what stops a loop (an image that names itself, directly or not).
pub const MAX_BACKING_DEPTH: usize = 16;

/// Everything that can go wrong opening or using an image.
#[derive(Debug, Error)]
pub enum DiskError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the image is read-only")]
    ReadOnly,
    #[error("access at {offset:#x}+{len:#x} is beyond the end of the disk ({size:#x} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("not a supported image format")]
    UnknownFormat,
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("image refuses writes: {0}")]
    NeedsRepair(String),
    #[error("backing file {name:?} was refused: {source}")]
    BackingRefused {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("backing chain is deeper than {MAX_BACKING_DEPTH} (a loop?)")]
    BackingTooDeep,
    #[error("image has an external data file, which the engine does not support")]
    ExternalDataFile,
    #[error("refcount of cluster at {offset:#x} would overflow {bits}-bit refcounts")]
    RefcountOverflow { offset: u64, bits: u32 },
    #[error("image is full: {0}")]
    Full(String),
    #[error("compressed cluster at {offset:#x} does not decompress: {why}")]
    Decompress { offset: u64, why: String },
}

pub type Result<T> = std::result::Result<T, DiskError>;

impl DiskError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DiskError {
        move |source| DiskError::Io { what, source }
    }
}

/// A virtual disk. All methods take `&self`: an image is shared by the queue threads (behind
/// an `Arc`) and does its own locking.
pub trait DiskImage: Send + Sync {
    /// Size of the virtual disk in bytes.
    fn len(&self) -> u64;
    /// Fills `buf` from the disk at `offset`; the whole range must lie inside the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`; the whole range must lie inside the disk.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Fills the guest's `bufs`, in order, from the disk at `offset`. The default goes
    /// through a scratch buffer; a format that can read straight into them does.
    fn read_into(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<()> {
        guest_buffers::with_scratch(guest_buffers::total_len(bufs), |scratch| {
            self.read_at(scratch, offset)?;
            guest_buffers::scatter(scratch, bufs);
            Ok(())
        })
    }
    /// Writes the guest's `bufs`, in order, at `offset`; the counterpart of [`read_into`].
    ///
    /// [`read_into`]: DiskImage::read_into
    fn write_from(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<()> {
        guest_buffers::with_scratch(guest_buffers::total_len(bufs), |scratch| {
            guest_buffers::gather(bufs, scratch);
            self.write_at(scratch, offset)
        })
    }
    /// Where the `len` bytes at `offset` lie in host files, when they can be moved there
    /// by the caller (asynchronous I/O) with no help from the engine: every byte in a file
    /// the disk owns, and for a write, nothing to allocate, copy or record. `None` means
    /// "go through `read_into`/`write_from`". The default says `None`.
    fn map_direct(&self, offset: u64, len: u64, write: bool) -> Result<Option<DirectIo>> {
        let _ = (offset, len, write);
        Ok(None)
    }
    /// Returns once every write that completed before the call is durable, data and metadata.
    fn flush(&self) -> Result<()>;
    /// The guest no longer needs the range; reading it back may give zeros or old data.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// The range reads back as zeros afterwards.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    fn is_read_only(&self) -> bool;
    /// Discards smaller than this, or not aligned to it, free nothing: a hint for the
    /// device's discard_sector_alignment.
    fn discard_granularity(&self) -> u64 {
        4096
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hands the engine the backing files an image names. The VMM implements it with real paths
/// (and its own policy on what may be opened); the engine only ever passes the name along.
pub trait BackingResolver: Send + Sync {
    fn open_backing(&self, name: &str) -> std::io::Result<File>;
}

/// A resolver for images that must not have backing files.
pub struct NoBacking;

impl BackingResolver for NoBacking {
    fn open_backing(&self, name: &str) -> std::io::Result<File> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("no backing files allowed (image names {name:?})"),
        ))
    }
}

impl<F> BackingResolver for F
where
    F: Fn(&str) -> std::io::Result<File> + Send + Sync,
{
    fn open_backing(&self, name: &str) -> std::io::Result<File> {
        self(name)
    }
}

/// How the guest may change the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ReadWrite,
    /// Writes fail with [`DiskError::ReadOnly`].
    ReadOnly,
    /// Writes go to an overlay store in memory and vanish with it; the image is never
    /// written. [`open`] makes the store; [`open_cow`] takes one.
    Cow,
}

/// Tunables; the defaults suit a guest disk.
#[derive(Debug, Clone, Copy)]
pub struct DiskOptions {
    /// Bytes of QCOW2 L2 tables cached per image (at least two tables are kept).
    pub l2_cache_bytes: u64,
    /// Bytes of QCOW2 refcount blocks cached per image (at least two blocks are kept).
    pub refcount_cache_bytes: u64,
    /// Fault injection for crash tests: after this many writes to a QCOW2 image file every
    /// write fails, as if the process had been killed right there. None in real use.
    pub fail_writes_after: Option<u64>,
}

impl Default for DiskOptions {
    fn default() -> DiskOptions {
        DiskOptions {
            // 32 MiB of 64 KiB-cluster L2 tables map 256 GiB of disk.
            l2_cache_bytes: 32 << 20,
            refcount_cache_bytes: 8 << 20,
            fail_writes_after: None,
        }
    }
}

/// Opens `file` as a disk with default [`DiskOptions`]. `format` None probes it. `file` must be opened for writing when
/// `mode` is [`Mode::ReadWrite`]; backing files are only ever read.
pub fn open(
    file: File,
    format: Option<Format>,
    mode: Mode,
    resolver: &dyn BackingResolver,
) -> Result<Arc<dyn DiskImage>> {
    open_with(file, format, mode, resolver, &DiskOptions::default())
}

/// [`open`] with explicit options.
pub fn open_with(
    file: File,
    format: Option<Format>,
    mode: Mode,
    resolver: &dyn BackingResolver,
    options: &DiskOptions,
) -> Result<Arc<dyn DiskImage>> {
    let writable = mode == Mode::ReadWrite;
    if writable && !io::is_writable(&file) {
        return Err(DiskError::Unsupported(
            "read-write mode needs an image file opened for writing".into(),
        ));
    }
    let base = open_inner(file, format, writable, resolver, options, 0)?;
    Ok(match mode {
        Mode::Cow => Arc::new(CowOverlay::new(base)?),
        _ => Arc::from(base),
    })
}

/// Opens `file` in [`Mode::Cow`] with its changes in `store` (see [`cow::store`]): an empty
/// store starts afresh, one an earlier worker for the same disk used is carried on.
pub fn open_cow(
    file: File,
    format: Option<Format>,
    resolver: &dyn BackingResolver,
    options: &DiskOptions,
    store: File,
) -> Result<Arc<dyn DiskImage>> {
    let base = open_inner(file, format, false, resolver, options, 0)?;
    Ok(Arc::new(CowOverlay::open(base, store)?))
}

pub(crate) fn open_inner(
    file: File,
    format: Option<Format>,
    writable: bool,
    resolver: &dyn BackingResolver,
    options: &DiskOptions,
    depth: usize,
) -> Result<Box<dyn DiskImage>> {
    if depth > MAX_BACKING_DEPTH {
        return Err(DiskError::BackingTooDeep);
    }
    let format = match format {
        Some(f) => f,
        None => probe(&file)?,
    };
    Ok(match format {
        Format::Raw => Box::new(Raw::open(file, writable)?),
        Format::Qcow2 => Box::new(Qcow2::open_with_depth(
            file, writable, resolver, options, depth,
        )?),
    })
}

/// Checks that `offset..offset+len` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}
