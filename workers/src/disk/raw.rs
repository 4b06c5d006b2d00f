//! Raw images (files or host block devices): guest offset = file offset.

use std::fs::File;
use std::os::unix::io::AsRawFd;

use vm_memory::VolatileSlice;

use super::{check_range, guest_buffers, io, DirectIo, DirectRun, DiskError, DiskImage, Result};

pub struct Raw {
    file: File,
    len: u64,
    writable: bool,
}

impl Raw {
    /// The size is fixed at open; a block device's size comes from seeking to its end.
    pub fn open(file: File, writable: bool) -> Result<Raw> {
        use std::io::Seek;
        let mut f = file;
        let len = f
            .seek(std::io::SeekFrom::End(0))
            .map_err(DiskError::io("size of raw image"))?;
        Ok(Raw {
            file: f,
            len,
            writable,
        })
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.len)
    }
}

impl DiskImage for Raw {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len)?;
        io::read_zero_fill(&self.file, buf, offset).map_err(DiskError::io("raw read"))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        io::write_all(&self.file, buf, offset).map_err(DiskError::io("raw write"))
    }

    /// One preadv straight into the guest's buffers: no copy in between.
    fn read_into(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<()> {
        check_range(offset, guest_buffers::total_len(bufs) as u64, self.len)?;
        io::read_vectored_zero_fill(&self.file, bufs, offset).map_err(DiskError::io("raw read"))
    }

    fn write_from(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<()> {
        self.check_write(offset, guest_buffers::total_len(bufs) as u64)?;
        io::write_vectored_all(&self.file, bufs, offset).map_err(DiskError::io("raw write"))
    }

    /// Guest offset = file offset, and nothing in the file ever moves.
    fn map_direct(&self, offset: u64, len: u64, write: bool) -> Result<Option<DirectIo>> {
        if write {
            self.check_write(offset, len)?;
        } else {
            check_range(offset, len, self.len)?;
        }
        Ok(Some(DirectIo {
            runs: vec![DirectRun {
                fd: self.file.as_raw_fd(),
                host: offset,
                at: 0,
                len,
            }],
            hold: None,
        }))
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        io::sync_data(&self.file).map_err(DiskError::io("raw flush"))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        // Discard is advisory: a file system (or device) that cannot punch holes keeps the data.
        if let Err(e) = io::punch_hole(&self.file, offset, len) {
            tracing::debug!("raw discard not supported here: {e}");
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        io::zero_range(&self.file, offset, len).map_err(DiskError::io("raw write zeroes"))
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }
}
