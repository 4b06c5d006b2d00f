//! Identity page tables for the first 4 GiB with 2 MiB pages: the 64-bit boot protocol
//! starts the kernel with paging on, and the kernel builds its own tables right away.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{PDPT_START, PD_COUNT, PD_START, PML4_START};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes the PML4, PDPT and page directories; returns the CR3 value.
pub fn write_identity_map(mem: &GuestMemoryMmap) -> Result<u64, GuestMemoryError> {
    mem.write_obj(PDPT_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    for gib in 0..PD_COUNT {
        let pd = PD_START + gib * 0x1000;
        mem.write_obj(pd | PRESENT_WRITABLE, GuestAddress(PDPT_START + gib * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| {
                let frame = ((gib << 9) + i) << 21;
                (frame | PAGE_SIZE_2M | PRESENT_WRITABLE).to_le_bytes()
            })
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_4gib_one_to_one() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_identity_map(&mem).unwrap(), PML4_START);
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4e, PDPT_START | 3);
        // The last 2 MiB page of the last GiB maps 0xffe0_0000, where the LAPIC lives.
        let pdpte3: u64 = mem.read_obj(GuestAddress(PDPT_START + 3 * 8)).unwrap();
        let pd3 = pdpte3 & !0xfff;
        let last: u64 = mem.read_obj(GuestAddress(pd3 + 511 * 8)).unwrap();
        assert_eq!(last, 0xffe0_0000 | 0x83);
    }
}
