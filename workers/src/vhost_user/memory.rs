//! The memory table a frontend shares with `SET_MEM_TABLE`: each region is a file (a memfd
//! in practice) mapped into this process, plus the frontend's own virtual address of the
//! region, which `SET_VRING_ADDR` uses to name the rings.

use std::fs::File;
use std::io;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

#[derive(Debug, Error)]
pub enum MemoryTableError {
    #[error("memory table has {regions} regions but {files} descriptors")]
    DescriptorCount { regions: usize, files: usize },
    #[error("region {index}: cannot inspect its descriptor: {source}")]
    Inspect { index: usize, source: io::Error },
    #[error("region {index}: descriptor is not a regular file or memfd")]
    NotAFile { index: usize },
    #[error(
        "region {index}: offset {offset:#x} + size {size:#x} runs past the end of its file \
         ({file_len:#x} bytes)"
    )]
    PastEndOfFile {
        index: usize,
        offset: u64,
        size: u64,
        file_len: u64,
    },
    #[error("region {index}: size {size:#x} does not fit this address space")]
    TooLarge { index: usize, size: u64 },
    #[error("region {index}: mmap failed: {source}")]
    Map {
        index: usize,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("region {index}: guest range at {guest_addr:#x} wraps around the address space")]
    GuestRangeWraps { index: usize, guest_addr: u64 },
    #[error("guest memory regions are not usable together: {0}")]
    Layout(#[from] vm_memory::GuestRegionCollectionError),
}

/// One region as the frontend described it, reduced to what translation needs.
#[derive(Debug, Clone, Copy)]
struct FrontendRegion {
    frontend_addr: u64,
    size: u64,
    guest_addr: u64,
}

/// Translates the frontend's virtual addresses into guest physical addresses.
#[derive(Debug, Default)]
pub struct AddressTranslation {
    regions: Vec<FrontendRegion>,
}

impl AddressTranslation {
    /// The guest address behind `frontend_addr`, if a region covers it.
    pub fn to_guest(&self, frontend_addr: u64) -> Option<GuestAddress> {
        self.regions
            .iter()
            .find(|r| frontend_addr >= r.frontend_addr && frontend_addr - r.frontend_addr < r.size)
            .map(|r| GuestAddress(r.guest_addr + (frontend_addr - r.frontend_addr)))
    }
}

/// Maps every region of a memory table. Nothing is kept unless all regions map: a table is
/// taken whole or not at all.
///
/// Region headers arrive already checked by the `vhost` crate (non-zero sizes, no address
/// overflow); here each file is checked to be a regular file long enough for its region,
/// since touching a mapping past the end of its file would kill the worker with SIGBUS.
pub fn map_memory_table(
    regions: &[VhostUserMemoryRegion],
    files: Vec<File>,
) -> Result<(GuestMemoryMmap, AddressTranslation), MemoryTableError> {
    if regions.len() != files.len() {
        return Err(MemoryTableError::DescriptorCount {
            regions: regions.len(),
            files: files.len(),
        });
    }
    let mut mapped = Vec::with_capacity(regions.len());
    let mut translation = AddressTranslation::default();
    for (index, (region, file)) in regions.iter().zip(files).enumerate() {
        // The message struct is packed: copy the fields out before using them.
        let (guest_addr, size, frontend_addr, offset) = (
            region.guest_phys_addr,
            region.memory_size,
            region.user_addr,
            region.mmap_offset,
        );
        check_backing_file(index, &file, offset, size)?;
        let len = usize::try_from(size).map_err(|_| MemoryTableError::TooLarge { index, size })?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, offset), len)
            .map_err(|source| MemoryTableError::Map { index, source })?;
        let guest_region = GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
            .ok_or(MemoryTableError::GuestRangeWraps { index, guest_addr })?;
        mapped.push(guest_region);
        translation.regions.push(FrontendRegion {
            frontend_addr,
            size,
            guest_addr,
        });
    }
    mapped.sort_by_key(|region| region.start_addr());
    let memory = GuestMemoryMmap::from_regions(mapped)?;
    Ok((memory, translation))
}

fn check_backing_file(
    index: usize,
    file: &File,
    offset: u64,
    size: u64,
) -> Result<(), MemoryTableError> {
    let metadata = file
        .metadata()
        .map_err(|source| MemoryTableError::Inspect { index, source })?;
    if !metadata.is_file() {
        return Err(MemoryTableError::NotAFile { index });
    }
    let file_len = metadata.len();
    match offset.checked_add(size) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(MemoryTableError::PastEndOfFile {
            index,
            offset,
            size,
            file_len,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn memfd(len: u64) -> File {
        let file = tempfile_in_memory();
        file.set_len(len).unwrap();
        file
    }

    fn tempfile_in_memory() -> File {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked
        // before it is wrapped, and the new descriptor is owned by nothing else.
        let fd = unsafe { libc::memfd_create(c"bulkhead-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor this function owns.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }

    #[test]
    fn maps_regions_and_translates_frontend_addresses() {
        let regions = [
            VhostUserMemoryRegion::new(0x10_0000, 0x2000, 0x7f00_0000_0000, 0),
            VhostUserMemoryRegion::new(0, 0x1000, 0x7f00_1000_0000, 0x1000),
        ];
        let (memory, translation) =
            map_memory_table(&regions, vec![memfd(0x2000), memfd(0x2000)]).unwrap();
        assert_eq!(memory.num_regions(), 2);
        memory
            .write_obj(0xabcd_u32, GuestAddress(0x10_1ffc))
            .unwrap();
        assert_eq!(
            translation.to_guest(0x7f00_0000_0010),
            Some(GuestAddress(0x10_0010))
        );
        assert_eq!(
            translation.to_guest(0x7f00_1000_0fff),
            Some(GuestAddress(0xfff))
        );
        assert_eq!(translation.to_guest(0x7f00_0000_2000), None);
    }

    #[test]
    fn refuses_regions_past_the_end_of_their_file() {
        let regions = [VhostUserMemoryRegion::new(0, 0x2000, 0x1000, 0x1000)];
        let err = map_memory_table(&regions, vec![memfd(0x2000)]).unwrap_err();
        assert!(
            matches!(err, MemoryTableError::PastEndOfFile { .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_overlapping_guest_ranges() {
        let regions = [
            VhostUserMemoryRegion::new(0, 0x2000, 0x1000_0000, 0),
            VhostUserMemoryRegion::new(0x1000, 0x1000, 0x2000_0000, 0),
        ];
        let err = map_memory_table(&regions, vec![memfd(0x2000), memfd(0x2000)]).unwrap_err();
        assert!(matches!(err, MemoryTableError::Layout(_)), "{err}");
    }

    #[test]
    fn refuses_descriptors_that_are_not_files() {
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(socket));
        let regions = [VhostUserMemoryRegion::new(0, 0x1000, 0x1000, 0)];
        let err = map_memory_table(&regions, vec![file]).unwrap_err();
        assert!(matches!(err, MemoryTableError::NotAFile { .. }), "{err}");
    }
}
