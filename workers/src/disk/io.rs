//! The one place data reaches the host file, so the synchronous pread/pwrite path can later
//! be swapped for io_uring without touching the format code.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

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

    pub fn write_all(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if let Some(budget) = &self.write_budget {
            if budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_err()
            {
                return Err(std::io::Error::other("injected failure: writes cut off"));
            }
        }
        write_all(&self.file, buf, offset)?;
        self.written_end
            .fetch_max(offset + buf.len() as u64, Ordering::SeqCst);
        Ok(())
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
