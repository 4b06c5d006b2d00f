//! One virtio-blk request (virtio 1.2, 5.2.6): a 16-byte header and any data the device
//! reads in the device-readable buffers; data for the driver and a final status byte in
//! the device-writable ones. Buffers may be split anywhere, header included, so both sides
//! are treated as byte streams over their segments.
//!
//! Every request gets a status when it has a writable byte to put it in: a malformed or
//! impossible request is answered IOERR or UNSUPP, never a crash. Guest buffers are read
//! once, when needed; the guest may rewrite them meanwhile and only hurts its own data.
//!
//! A request is first [`plan`]ned: a read or write whose bytes the disk maps straight to
//! host file ranges becomes a list of host I/O ops into the guest's buffers, which the
//! queue submits asynchronously (`super::uring`) and answers with [`finish`]; everything
//! else is [`serve`]d synchronously on the calling vring thread, straight between the disk
//! and the guest's buffers where the format allows (see `disk::guest_buffers`).

use std::ops::Range;
use std::os::unix::io::RawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::config::{BlkGeometry, SECTOR_SIZE};
use crate::disk::{guest_buffers, DiskImage, IoHold};
use crate::virtio::{GuestSegment, Request};

pub const HEADER_LEN: u64 = 16;
/// A DISCARD or WRITE_ZEROES range: sector (u64), num_sectors (u32), flags (u32).
pub const RANGE_LEN: u64 = 16;
/// Largest piece of a request moved at once: bounds the scratch memory of formats that
/// stage data, whatever length the guest's buffers claim.
pub const CHUNK: usize = 1 << 20;

/// The status byte's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// Why a request failed, for the debug log; the guest only sees the status.
#[derive(Debug)]
enum Failure {
    Unsupported(String),
    Refused(String),
}

impl Failure {
    fn status(&self) -> Status {
        match self {
            Failure::Unsupported(_) => Status::Unsupp,
            Failure::Refused(_) => Status::IoErr,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unsupported(why) => write!(f, "unsupported: {why}"),
            Failure::Refused(why) => f.write_str(why),
        }
    }
}

fn refused(why: impl Into<String>) -> Failure {
    Failure::Refused(why.into())
}

/// A byte stream over guest buffers.
struct Stream<'a> {
    segments: &'a [GuestSegment],
    len: u64,
}

impl<'a> Stream<'a> {
    fn new(segments: &'a [GuestSegment], len: u64) -> Self {
        Stream { segments, len }
    }

    /// Calls `f(segment piece, offset into the piece's buffer)` for the bytes `range` of
    /// the stream covers, in order.
    fn pieces(
        &self,
        range: Range<u64>,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let mut start = 0u64;
        let mut done = 0usize;
        for segment in self.segments {
            let end = start + u64::from(segment.len);
            if end > range.start && start < range.end {
                let from = range.start.max(start) - start;
                let to = range.end.min(end) - start;
                let len = (to - from) as usize;
                // The walk checked the segment lies in guest memory: no overflow.
                f(segment.addr.unchecked_add(from), done, len)?;
                done += len;
            }
            start = end;
            if start >= range.end {
                break;
            }
        }
        Ok(())
    }

    fn read(&self, memory: &GuestMemoryMmap, at: u64, buf: &mut [u8]) -> Result<(), Failure> {
        let end = at + buf.len() as u64;
        if end > self.len {
            return Err(refused("read past the end of the guest's buffers"));
        }
        self.pieces(at..end, |addr, done, len| {
            memory
                .read_slice(&mut buf[done..done + len], addr)
                .map_err(|e| refused(format!("guest buffer unreadable: {e}")))
        })
    }

    /// The guest memory under the bytes `range` of the stream covers, in order.
    fn slices<'m>(
        &self,
        memory: &'m GuestMemoryMmap,
        range: Range<u64>,
    ) -> Result<Vec<VolatileSlice<'m>>, Failure> {
        if range.end > self.len {
            return Err(refused("access past the end of the guest's buffers"));
        }
        let mut slices = Vec::new();
        self.pieces(range, |addr, _, len| {
            for slice in memory.get_slices(addr, len) {
                slices.push(slice.map_err(|e| refused(format!("guest buffer unmapped: {e}")))?);
            }
            Ok(())
        })?;
        Ok(slices)
    }

    fn write(&self, memory: &GuestMemoryMmap, at: u64, buf: &[u8]) -> Result<(), Failure> {
        let end = at + buf.len() as u64;
        if end > self.len {
            return Err(refused("write past the end of the guest's buffers"));
        }
        self.pieces(at..end, |addr, done, len| {
            memory
                .write_slice(&buf[done..done + len], addr)
                .map_err(|e| refused(format!("guest buffer unwritable: {e}")))
        })
    }
}

/// What one request needs from its device.
pub struct Context<'a> {
    pub disk: &'a dyn DiskImage,
    pub geometry: &'a BlkGeometry,
    pub serial: &'a [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// How a request is to be served.
pub enum Plan {
    /// Host I/O the caller does itself; the request ends with [`finish`] once all of it has.
    Direct(DirectRequest),
    /// Anything else: [`serve`] it, after the queue's earlier requests have ended.
    Sync,
}

/// A read (IN) or write (OUT) as host I/O ops straight between files and guest buffers.
pub struct DirectRequest {
    pub write: bool,
    /// In request order; together they move every data byte of the request.
    pub ops: Vec<HostOp>,
    /// Data bytes for the driver when it succeeds (an IN's length).
    pub data_in: u64,
    /// Keeps the mapping valid until dropped (after the last op has ended).
    pub hold: Option<IoHold>,
}

impl DirectRequest {
    /// Bytes the ops move.
    pub fn len(&self) -> u64 {
        self.ops
            .iter()
            .flat_map(|op| &op.iovecs)
            .map(|v| v.iov_len as u64)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One run of a request: contiguous in one file, scattered in guest memory.
pub struct HostOp {
    pub fd: RawFd,
    pub host: u64,
    /// Guest memory, valid while the memory map the request was planned with lives.
    pub iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs are addresses in guest memory, not borrowed Rust data; whoever holds
// the op keeps the memory map they point into alive (see `uring::Pending`), whichever
// thread that is.
unsafe impl Send for HostOp {}

/// Decides how `request` is served. Anything unusual (a malformed or refused request, a
/// format that must stage or allocate) is `Sync`, where [`serve`] answers it as always.
pub fn plan(ctx: &Context<'_>, memory: &GuestMemoryMmap, request: &Request) -> Plan {
    let writable_len = request.writable_len();
    let readable = Stream::new(&request.readable, request.readable_len());
    if writable_len == 0 || readable.len < HEADER_LEN {
        return Plan::Sync;
    }
    let mut header = [0u8; HEADER_LEN as usize];
    if readable.read(memory, 0, &mut header).is_err() {
        return Plan::Sync;
    }
    let (kind, sector) = parse_header(&header);
    let (write, stream, at, len) = match kind {
        VIRTIO_BLK_T_IN => (
            false,
            Stream::new(&request.writable, writable_len - 1),
            0,
            writable_len - 1,
        ),
        VIRTIO_BLK_T_OUT if writable(ctx).is_ok() => {
            let len = readable.len - HEADER_LEN;
            (true, readable, HEADER_LEN, len)
        }
        _ => return Plan::Sync,
    };
    if len == 0 {
        return Plan::Sync;
    }
    let Ok(offset) = disk_range(ctx, sector, len) else {
        return Plan::Sync;
    };
    let Ok(slices) = stream.slices(memory, at..at + len) else {
        return Plan::Sync;
    };
    let direct = match ctx.disk.map_direct(offset, len, write) {
        Ok(Some(direct)) => direct,
        Ok(None) => return Plan::Sync,
        Err(e) => {
            tracing::debug!(head = request.head, "no direct mapping: {e}");
            return Plan::Sync;
        }
    };
    let ops = direct
        .runs
        .iter()
        .map(|run| HostOp {
            fd: run.fd,
            host: run.host,
            iovecs: guest_buffers::sub_slices(&slices, run.at as usize, run.len as usize)
                .iter()
                .filter(|b| !b.is_empty())
                .map(|b| libc::iovec {
                    iov_base: b.ptr_guard_mut().as_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect(),
        })
        .collect();
    Plan::Direct(DirectRequest {
        write,
        ops,
        data_in: if write { 0 } else { len },
        hold: direct.hold,
    })
}

/// Serves `request` and writes its status; returns the bytes written into its buffers,
/// for the used ring. A request with no writable byte has nowhere to put a status: it is
/// returned with nothing written.
pub fn serve(ctx: &mut Context<'_>, memory: &GuestMemoryMmap, request: &Request) -> u32 {
    if request.writable_len() == 0 {
        tracing::debug!(
            head = request.head,
            "request without a status byte, dropped"
        );
        return 0;
    }
    let readable = Stream::new(&request.readable, request.readable_len());
    // Everything writable but the last byte is data for the driver.
    let data_in = Stream::new(&request.writable, request.writable_len() - 1);
    let result = execute(ctx, memory, &readable, &data_in).map_err(|failure| {
        tracing::debug!(head = request.head, "request failed: {failure}");
        failure.status()
    });
    finish(memory, request, result)
}

/// Writes the status of `request` for `result` (the data bytes written for the driver, or
/// the failure); returns the bytes written into its buffers, for the used ring.
pub fn finish(memory: &GuestMemoryMmap, request: &Request, result: Result<u64, Status>) -> u32 {
    let writable_len = request.writable_len();
    if writable_len == 0 {
        return 0;
    }
    let (status, data_written) = match result {
        Ok(written) => (Status::Ok, written),
        Err(status) => (status, 0),
    };
    let status_stream = Stream::new(&request.writable, writable_len);
    if let Err(e) = status_stream.write(memory, writable_len - 1, &[status.byte()]) {
        tracing::debug!(head = request.head, "cannot write the status: {e}");
        return 0;
    }
    // At most the writable length, which the walk capped at 4 GiB.
    u32::try_from(data_written + 1).unwrap_or(u32::MAX)
}

/// The request type and the sector of a header.
fn parse_header(header: &[u8; HEADER_LEN as usize]) -> (u32, u64) {
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    (kind, sector)
}

/// Returns the data bytes written for the driver.
fn execute(
    ctx: &mut Context<'_>,
    memory: &GuestMemoryMmap,
    readable: &Stream<'_>,
    data_in: &Stream<'_>,
) -> Result<u64, Failure> {
    if readable.len < HEADER_LEN {
        return Err(refused(format!(
            "header is {} bytes, not {HEADER_LEN}",
            readable.len
        )));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    readable.read(memory, 0, &mut header)?;
    let (kind, sector) = parse_header(&header);
    let data_out_len = readable.len - HEADER_LEN;
    match kind {
        VIRTIO_BLK_T_IN => {
            let offset = disk_range(ctx, sector, data_in.len)?;
            copy_in(ctx, memory, data_in, offset)?;
            Ok(data_in.len)
        }
        VIRTIO_BLK_T_OUT => {
            writable(ctx)?;
            let offset = disk_range(ctx, sector, data_out_len)?;
            copy_out(ctx, memory, readable, offset, data_out_len)?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            ctx.disk
                .flush()
                .map_err(|e| refused(format!("flush: {e}")))?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = data_in.len.min(ctx.serial.len() as u64) as usize;
            data_in.write(memory, 0, &ctx.serial[..n])?;
            Ok(n as u64)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if ctx.geometry.read_only {
                // Not offered to a read-only disk's driver.
                return Err(Failure::Unsupported("read-only disk".into()));
            }
            writable(ctx)?;
            ranges(ctx, memory, readable, kind == VIRTIO_BLK_T_WRITE_ZEROES)?;
            Ok(0)
        }
        other => Err(Failure::Unsupported(format!("request type {other}"))),
    }
}

fn writable(ctx: &Context<'_>) -> Result<(), Failure> {
    if ctx.geometry.read_only || ctx.disk.is_read_only() {
        return Err(refused("write to a read-only disk"));
    }
    Ok(())
}

/// The byte offset of `len` bytes at `sector`, which must be whole sectors inside the disk.
fn disk_range(ctx: &Context<'_>, sector: u64, len: u64) -> Result<u64, Failure> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(refused(format!("{len} bytes is not whole sectors")));
    }
    let capacity = ctx.geometry.capacity_sectors();
    let sectors = len / SECTOR_SIZE;
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(refused(format!(
            "sectors {sector}+{sectors} beyond the disk's {capacity}"
        ))),
    }
}

/// Disk to guest, straight into the guest's buffers, a chunk at a time (a format that
/// cannot read into them directly stages a chunk in a scratch buffer).
fn copy_in(
    ctx: &mut Context<'_>,
    memory: &GuestMemoryMmap,
    data_in: &Stream<'_>,
    offset: u64,
) -> Result<(), Failure> {
    let mut done = 0u64;
    while done < data_in.len {
        let n = (data_in.len - done).min(CHUNK as u64);
        let slices = data_in.slices(memory, done..done + n)?;
        ctx.disk
            .read_into(&slices, offset + done)
            .map_err(|e| refused(format!("read: {e}")))?;
        done += n;
    }
    Ok(())
}

/// Guest to disk, a chunk at a time; the data follows the header.
fn copy_out(
    ctx: &mut Context<'_>,
    memory: &GuestMemoryMmap,
    readable: &Stream<'_>,
    offset: u64,
    len: u64,
) -> Result<(), Failure> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64);
        let at = HEADER_LEN + done;
        let slices = readable.slices(memory, at..at + n)?;
        ctx.disk
            .write_from(&slices, offset + done)
            .map_err(|e| refused(format!("write: {e}")))?;
        done += n;
    }
    Ok(())
}

/// DISCARD or WRITE_ZEROES: every range is checked before any is acted on, so a bad range
/// leaves the disk untouched.
fn ranges(
    ctx: &mut Context<'_>,
    memory: &GuestMemoryMmap,
    readable: &Stream<'_>,
    zeroes: bool,
) -> Result<(), Failure> {
    let len = readable.len - HEADER_LEN;
    let count = len / RANGE_LEN;
    if len == 0 || !len.is_multiple_of(RANGE_LEN) {
        return Err(refused(format!("{len} bytes of ranges")));
    }
    if count > u64::from(ctx.geometry.max_discard_segments) {
        return Err(refused(format!("{count} ranges")));
    }
    let mut checked = Vec::with_capacity(count as usize);
    for i in 0..count {
        let mut raw = [0u8; RANGE_LEN as usize];
        readable.read(memory, HEADER_LEN + i * RANGE_LEN, &mut raw)?;
        let sector = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        // The spec: unmap on a discard, or any unknown flag, is UNSUPP.
        let allowed = if zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(Failure::Unsupported(format!("range flags {flags:#x}")));
        }
        if sectors > ctx.geometry.max_discard_sectors {
            return Err(refused(format!("range of {sectors} sectors")));
        }
        let offset = disk_range(ctx, sector, u64::from(sectors) * SECTOR_SIZE)?;
        checked.push((offset, u64::from(sectors) * SECTOR_SIZE));
    }
    for (offset, len) in checked {
        let result = if zeroes {
            ctx.disk.write_zeroes(offset, len)
        } else {
            ctx.disk.discard(offset, len)
        };
        result.map_err(|e| refused(format!("discard or write zeroes: {e}")))?;
    }
    Ok(())
}
