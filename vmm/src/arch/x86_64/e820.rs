//! The e820 memory map handed to the kernel in the zero page.

use super::layout::{self, RamRange};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The map for a guest whose RAM is `ram` (as laid out by [`layout::ram_ranges`]): low RAM
/// minus the EBDA and BIOS area, the ACPI table area reserved, then the rest of RAM.
pub fn memory_map(ram: &[RamRange]) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for range in ram {
        if range.start == 0 {
            map.push(E820Entry {
                addr: 0,
                size: layout::EBDA_START.min(range.size),
                kind: E820_RAM,
            });
            map.push(E820Entry {
                addr: layout::ACPI_TABLES_START,
                size: layout::ACPI_TABLES_END - layout::ACPI_TABLES_START,
                kind: E820_RESERVED,
            });
            if range.end() > layout::HIGH_MEMORY_START {
                map.push(E820Entry {
                    addr: layout::HIGH_MEMORY_START,
                    size: range.end() - layout::HIGH_MEMORY_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(E820Entry {
                addr: range.start,
                size: range.size,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ram_ranges;

    #[test]
    fn small_guest_map() {
        let map = memory_map(&ram_ranges(512 << 20));
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0xe0000,
                    size: 0x20000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: (512 << 20) - 0x100000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn large_guest_map_covers_all_ram_and_skips_the_gap() {
        let total = 6u64 << 30;
        let map = memory_map(&ram_ranges(total));
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the 384 KiB hole between the EBDA and 1 MiB is RAM.
        assert_eq!(ram, total - (0x100000 - 0x9fc00));
        let last = map.last().unwrap();
        assert_eq!(last.addr, 4 << 30);
        assert_eq!(last.addr + last.size, (4u64 << 30) + (3u64 << 30));
        for pair in map.windows(2) {
            assert!(
                pair[0].addr + pair[0].size <= pair[1].addr,
                "entries overlap: {pair:?}"
            );
        }
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= layout::MMIO_GAP_START || e.addr >= layout::MMIO_GAP_END));
    }
}
