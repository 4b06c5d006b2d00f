//! Guest memory without a guest: a memfd mapped into the test process and shared with a
//! backend through `SET_MEM_TABLE`, exactly as the VMM shares guest RAM.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("memfd_create: {0}")]
    Memfd(io::Error),
    #[error("sizing the memfd: {0}")]
    Size(io::Error),
    #[error("mapping the memfd: {0}")]
    Map(String),
    #[error("{len:#x} more bytes (aligned to {align:#x}) do not fit in guest memory")]
    OutOfMemory { len: u64, align: u64 },
    #[error("guest address {0:#x} is not in guest memory")]
    NotInMemory(u64),
    #[error("guest memory access at {addr:#x}: {source}")]
    Access {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// One memfd-backed region of "guest RAM", with a bump allocator for rings and buffers.
#[derive(Debug)]
pub struct SharedMemory {
    memory: GuestMemoryMmap,
    base: GuestAddress,
    size: u64,
    /// Offset of the first unallocated byte.
    next_free: AtomicU64,
}

impl SharedMemory {
    /// `size` bytes of zeroed guest memory starting at guest address `base`.
    pub fn new(base: GuestAddress, size: usize) -> Result<Self, MemoryError> {
        // SAFETY: a valid NUL-terminated name; the result is checked before use.
        let fd = unsafe { libc::memfd_create(c"bulkhead-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(MemoryError::Size)?;
        let memory =
            GuestMemoryMmap::from_ranges_with_files([(base, size, Some(FileOffset::new(file, 0)))])
                .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(SharedMemory {
            memory,
            base,
            size: size as u64,
            next_free: AtomicU64::new(0),
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// First guest address of the memory.
    pub fn base(&self) -> GuestAddress {
        self.base
    }

    /// First guest address past the end of the memory.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.base.0 + self.size)
    }

    /// Reserves `len` bytes aligned to `align` (a power of two) and returns their address.
    pub fn allocate(&self, len: u64, align: u64) -> Result<GuestAddress, MemoryError> {
        let out_of_memory = MemoryError::OutOfMemory { len, align };
        let mut start = 0;
        self.next_free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                start = free.checked_add(align - 1)? & !(align - 1);
                let end = start.checked_add(len)?;
                (end <= self.size).then_some(end)
            })
            .map_err(|_| out_of_memory)?;
        Ok(GuestAddress(self.base.0 + start))
    }

    /// Where `addr` is mapped in this process: the "frontend virtual address" that
    /// `SET_VRING_ADDR` speaks in.
    pub fn host_address(&self, addr: GuestAddress) -> Result<u64, MemoryError> {
        self.memory
            .get_host_address(addr)
            .map(|ptr| ptr as u64)
            .map_err(|_| MemoryError::NotInMemory(addr.0))
    }

    /// The region as `SET_MEM_TABLE` describes it (the memfd travels with the message).
    pub fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.memory
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region)
                    .expect("every region is memfd-backed")
            })
            .collect()
    }

    pub fn read(&self, addr: GuestAddress, len: usize) -> Result<Vec<u8>, MemoryError> {
        let mut bytes = vec![0; len];
        self.memory
            .read_slice(&mut bytes, addr)
            .map_err(|source| MemoryError::Access {
                addr: addr.0,
                source,
            })?;
        Ok(bytes)
    }

    pub fn write(&self, addr: GuestAddress, bytes: &[u8]) -> Result<(), MemoryError> {
        self.memory
            .write_slice(bytes, addr)
            .map_err(|source| MemoryError::Access {
                addr: addr.0,
                source,
            })
    }
}
