//! The one place data reaches the host file on the calling thread. The vectored calls move
//! bytes straight between a file and the guest's buffers (see `guest_buffers`); the blk
//! worker's io_uring path (`blk::uring`) uses the same iovec bookkeeping ([`IoVecs`]) and,
//! for what it does inline, the same loop ([`transfer_all`]).

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// The kernel's limit on iovecs per call (UIO_MAXIOV).
pub(crate) const IOV_MAX: usize = 1024;

/// Reads `buf.len()` bytes at `offset`; what lies past the end of the file reads as zeros
/// (a file's tail may be sparse or not yet written).
pub(crate) fn read_zero_fill(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The iovecs of a list of guest buffers, consumed from the front as the kernel moves
/// bytes (a vectored call may stop anywhere, even inside a buffer).
pub(crate) struct IoVecs {
    iovecs: Vec<libc::iovec>,
    first: usize,
}

impl IoVecs {
    /// Over `bufs`, which the caller keeps alive while it uses these iovecs.
    fn new<B: BitmapSlice>(bufs: &[VolatileSlice<'_, B>]) -> Self {
        let iovecs = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.ptr_guard_mut().as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        IoVecs { iovecs, first: 0 }
    }

    /// Over iovecs made elsewhere.
    ///
    /// # Safety
    /// Every iovec must describe memory that stays mapped and writable for as long as
    /// these iovecs are used, and that no Rust reference points into meanwhile (guest
    /// memory does: the guest may touch it, as under any device doing DMA).
    pub(crate) unsafe fn from_raw(iovecs: Vec<libc::iovec>) -> Self {
        IoVecs { iovecs, first: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first >= self.iovecs.len()
    }

    /// The next iovecs for one system call or io_uring op.
    pub(crate) fn pending(&self) -> &[libc::iovec] {
        let end = self.iovecs.len().min(self.first + IOV_MAX);
        &self.iovecs[self.first..end]
    }

    /// Bytes not moved yet.
    pub(crate) fn remaining_len(&self) -> u64 {
        self.iovecs[self.first..]
            .iter()
            .map(|v| v.iov_len as u64)
            .sum()
    }

    /// `n` more bytes moved.
    pub(crate) fn advance(&mut self, mut n: usize) {
        while n > 0 && !self.is_empty() {
            let iovec = &mut self.iovecs[self.first];
            if n >= iovec.iov_len {
                n -= iovec.iov_len;
                self.first += 1;
            } else {
                // Still inside the buffer the iovec describes.
                iovec.iov_base = iovec.iov_base.cast::<u8>().wrapping_add(n).cast();
                iovec.iov_len -= n;
                n = 0;
            }
        }
    }

    /// A read met the end of the file: the rest reads as zeros.
    pub(crate) fn zero_rest(&mut self) {
        for iovec in &self.iovecs[self.first..] {
            // SAFETY: the iovec describes mapped, writable memory no Rust reference points
            // into (`new`'s buffers outlive their use; `from_raw`'s contract); writing
            // zeros there is what the reader asked for (the bytes past the end of the file).
            unsafe { std::ptr::write_bytes(iovec.iov_base.cast::<u8>(), 0, iovec.iov_len) };
        }
        self.first = self.iovecs.len();
    }
}

// SAFETY: the iovecs are addresses in memory whose owner keeps it mapped (see `new` and
// `from_raw`), not borrowed Rust data tied to a thread.
unsafe impl Send for IoVecs {}

fn file_offset(offset: u64) -> std::io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))
}

/// Which way a vectored call moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// preadv: file to buffers; the end of the file reads as zeros.
    Read,
    /// pwritev: buffers to file.
    Write,
}

/// Moves every byte `iovecs` has left between them and `fd` at `offset`, on this thread, as
/// many calls as it takes (short transfers, interrupted calls, more buffers than one call
/// takes).
pub(crate) fn transfer_all(
    fd: RawFd,
    iovecs: &mut IoVecs,
    offset: u64,
    direction: Direction,
) -> std::io::Result<()> {
    let mut at = offset;
    while !iovecs.is_empty() {
        let pending = iovecs.pending();
        let (count, file_at) = (pending.len() as libc::c_int, file_offset(at)?);
        let n = match direction {
            // SAFETY: every iovec lies in mapped memory no Rust reference points into (the
            // IoVecs' constructors), and the kernel writes at most the iovecs' lengths.
            Direction::Read => unsafe { libc::preadv(fd, pending.as_ptr(), count, file_at) },
            // SAFETY: as above; the kernel only reads the memory.
            Direction::Write => unsafe { libc::pwritev(fd, pending.as_ptr(), count, file_at) },
        };
        match (n, direction) {
            (0, Direction::Read) => iovecs.zero_rest(),
            (0, Direction::Write) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
            (n, _) if n > 0 => {
                iovecs.advance(n as usize);
                at += n as u64;
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Moves every byte of `bufs` between them and `file` at `offset`.
fn vectored_all(
    file: &File,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
    direction: Direction,
) -> std::io::Result<()> {
    transfer_all(file.as_raw_fd(), &mut IoVecs::new(bufs), offset, direction)
}

/// Fills `bufs`, in order, from `file` at `offset`; what lies past the end of the file
/// reads as zeros.
pub(crate) fn read_vectored_zero_fill(
    file: &File,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
) -> std::io::Result<()> {
    vectored_all(file, bufs, offset, Direction::Read)
}

/// Writes `bufs`, in order, to `file` at `offset`.
pub(crate) fn write_vectored_all(
    file: &File,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
) -> std::io::Result<()> {
    vectored_all(file, bufs, offset, Direction::Write)
}

/// Whether `file` was opened for writing.
pub(crate) fn is_writable(file: &File) -> bool {
    // SAFETY: F_GETFL reads the descriptor's flags and touches no memory of ours.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && (flags & libc::O_ACCMODE) != libc::O_RDONLY
}

pub(crate) fn write_all(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    file.write_all_at(buf, offset)
}

pub(crate) fn sync_data(file: &File) -> std::io::Result<()> {
    file.sync_data()
}

pub(crate) fn file_len(file: &File) -> std::io::Result<u64> {
    Ok(file.metadata()?.len())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate only acts on the descriptor `file` owns and reads no memory of ours.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, l) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Deallocates the range; it reads back as zeros. Fails where the file system cannot.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Makes the range read as zeros, by the cheapest means the file system offers.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
    .is_ok()
        || punch_hole(file, offset, len).is_ok()
    {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        write_all(file, &zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// An image file as the format code sees it. `fail_writes_after` is fault injection for
/// tests: after that many writes every write fails, as if the process had died there.
pub(crate) struct HostFile {
    file: File,
    write_budget: Option<AtomicU64>,
    /// Past everything written through this handle or in the file at open: beyond it the
    /// file reads as zeros.
    written_end: AtomicU64,
}

impl HostFile {
    pub fn new(file: File, fail_writes_after: Option<u64>) -> HostFile {
        let end = file_len(&file).unwrap_or(u64::MAX);
        HostFile {
            file,
            write_budget: fail_writes_after.map(AtomicU64::new),
            written_end: AtomicU64::new(end),
        }
    }

    pub fn read_zero_fill(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        read_zero_fill(&self.file, buf, offset)
    }

    pub fn read_vectored_zero_fill(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> std::io::Result<()> {
        read_vectored_zero_fill(&self.file, bufs, offset)
    }

    pub fn write_all(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.spend_write()?;
        write_all(&self.file, buf, offset)?;
        self.written_end
            .fetch_max(offset + buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    pub fn write_vectored_all(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> std::io::Result<()> {
        self.spend_write()?;
        write_vectored_all(&self.file, bufs, offset)?;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        self.written_end
            .fetch_max(offset + len as u64, Ordering::SeqCst);
        Ok(())
    }

    /// Fault injection: one write less before every write fails.
    fn spend_write(&self) -> std::io::Result<()> {
        if let Some(budget) = &self.write_budget {
            if budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_err()
            {
                return Err(std::io::Error::other("injected failure: writes cut off"));
            }
        }
        Ok(())
    }

    /// Something other than this handle (asynchronous I/O) is about to write up to `end`.
    pub fn note_written(&self, end: u64) {
        self.written_end.fetch_max(end, Ordering::SeqCst);
    }

    /// Fault injection is on: writes must all come through here to be counted.
    pub fn injects_faults(&self) -> bool {
        self.write_budget.is_some()
    }

    pub fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.file.as_raw_fd()
    }

    pub fn written_end(&self) -> u64 {
        self.written_end.load(Ordering::SeqCst)
    }

    pub fn sync_data(&self) -> std::io::Result<()> {
        if self
            .write_budget
            .as_ref()
            .is_some_and(|b| b.load(Ordering::SeqCst) == 0)
        {
            return Err(std::io::Error::other("injected failure: writes cut off"));
        }
        sync_data(&self.file)
    }

    pub fn len(&self) -> std::io::Result<u64> {
        file_len(&self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> File {
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor
        // (checked below), which the File then owns.
        let fd = unsafe { libc::memfd_create(c"disk-io-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.write_all(bytes).unwrap();
        file
    }

    #[test]
    fn vectored_reads_cross_buffers_and_zero_fill_past_the_end() {
        let file = file_with(&(0..100u8).collect::<Vec<_>>());
        let mut a = [0xffu8; 7];
        let mut b = [0xffu8; 0];
        let mut c = [0xffu8; 20];
        let bufs = [
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
            VolatileSlice::from(&mut c[..]),
        ];
        read_vectored_zero_fill(&file, &bufs, 90).unwrap();
        assert_eq!(a, [90, 91, 92, 93, 94, 95, 96]);
        assert_eq!(&c[..3], &[97, 98, 99]);
        assert!(c[3..].iter().all(|&x| x == 0));
    }

    #[test]
    fn vectored_writes_cross_buffers() {
        let file = file_with(&[0u8; 16]);
        let mut a = *b"hello ";
        let mut b = *b"world";
        let bufs = [
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
        ];
        write_vectored_all(&file, &bufs, 3).unwrap();
        let mut back = [0u8; 11];
        file.read_exact_at(&mut back, 3).unwrap();
        assert_eq!(&back, b"hello world");
    }
}
