//! Guest RAM: one memfd, mapped shared, split into regions around the 32-bit MMIO gap.
//!
//! A memfd rather than anonymous memory so that device workers can later map the very
//! same pages (vhost-user `SET_MEM_TABLE` passes the fd and offsets).

use std::fs::File;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use thiserror::Error;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{self, RamRange};

pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("creating the guest RAM memfd")]
    Memfd(#[source] nix::Error),
    #[error("sizing guest RAM to {size} bytes")]
    Resize {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("registering guest RAM slot {slot} with KVM")]
    Register {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM. The memfd behind it stays open through the regions' file offsets, which
/// is also how device workers are handed the same pages.
pub struct GuestRam {
    memory: GuestMemory,
    ranges: Vec<RamRange>,
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM (zero-filled, lazily backed).
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let fd = memfd_create(
            c"bulkhead-guest-ram",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(MemoryError::Memfd)?;
        let memfd = File::from(fd);
        memfd
            .set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        // Workers map this file: if it could shrink under them, their next access to the
        // lost pages would kill them with SIGBUS.
        fcntl(
            &memfd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )
        .map_err(MemoryError::Memfd)?;
        let ranges = layout::ram_ranges(size);
        let mut file_offset = 0u64;
        let regions: Vec<_> = ranges
            .iter()
            .map(|range| {
                let file = FileOffset::new(
                    memfd
                        .try_clone()
                        .map_err(|source| MemoryError::Resize { size, source })?,
                    file_offset,
                );
                file_offset += range.size;
                Ok((GuestAddress(range.start), range.size as usize, Some(file)))
            })
            .collect::<Result<_, MemoryError>>()?;
        let memory = GuestMemory::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
        Ok(Self { memory, ranges })
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// End of the RAM below the 32-bit gap: where the kernel, initrd and boot data live.
    pub fn low_end(&self) -> u64 {
        self.ranges.first().map_or(0, |r| r.end())
    }

    /// Maps every region into the VM, one KVM memory slot each.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| MemoryError::Register {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let mapping = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live shared mapping of `len` bytes owned by
            // `self.memory`, which outlives the VM (the Vm struct drops the VmFd first),
            // and slots do not overlap because the RAM ranges do not.
            unsafe { vm.set_user_memory_region(mapping) }
                .map_err(|source| MemoryError::Register { slot, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_is_zeroed_and_writable_in_every_range() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert_eq!(ram.low_end(), 64 << 20);
        let mem = ram.memory();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
        mem.write_obj(0xdead_beef_u32, GuestAddress((64 << 20) - 4))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((64 << 20) - 4)).unwrap(),
            0xdead_beef
        );
        assert!(mem.write_obj(1u8, GuestAddress(64 << 20)).is_err());
        // Sealed: nobody can pull pages out from under a worker.
        let memfd = mem.iter().next().unwrap().file_offset().unwrap().file();
        assert!(memfd.set_len(1 << 20).is_err());
    }
}
