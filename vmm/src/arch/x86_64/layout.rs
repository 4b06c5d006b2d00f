//! The guest-physical memory map. One place, so that the e820 map, the ACPI tables, the
//! loader and the page tables cannot disagree.
//!
//! ```text
//! 0x0000_0500  GDT, then IDT                       (boot structures, VMM-owned)
//! 0x0000_1000  PML4, PDPT, 4 page directories      (identity map of the first 4 GiB)
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8000  free (micro-guests put their AP trampoline here)
//! 0x0000_9000  boot stack, growing down from 0x9ff0
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: not RAM in the e820 map
//! 0x000e_0000  ACPI tables (RSDP is found here by the BIOS-area scan as well)
//! 0x0010_0000  kernel, initrd (highest fitting address below the 32-bit gap)
//! 0xc000_0000  32-bit MMIO gap: IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PML4_START: u64 = 0x1000;
pub const PDPT_START: u64 = 0x2000;
pub const PD_START: u64 = 0x3000;
/// Page directories mapping 4 GiB with 2 MiB pages: one 4 KiB table per GiB.
pub const PD_COUNT: u64 = 4;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x9ff0;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line we place; the kernel's own limit (setup header `cmdline_size`)
/// may be lower and is checked too.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_TABLES_START: u64 = 0xe_0000;
pub const ACPI_TABLES_END: u64 = 0x10_0000;
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: RAM below 4 GiB ends here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// virtio-mmio devices, one 4 KiB page each from the start of the MMIO gap.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// IOAPIC pins for virtio-mmio devices: the ones no legacy ISA device uses.
pub const VIRTIO_MMIO_GSIS: [u32; 8] = [16, 17, 18, 19, 20, 21, 22, 23];
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Where KVM (on Intel) may put its TSS and identity-map pages: three pages just below
/// the 4 GiB boundary, inside the MMIO gap and clear of the IOAPIC and LAPIC.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy and ACPI I/O ports the VMM emulates.
pub mod ports {
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_COMMAND: u16 = 0x64;
    pub const RTC_INDEX: u16 = 0x70;
    pub const RTC_DATA: u16 = 0x71;
    pub const COM1: u16 = 0x3f8;
    /// ACPI PM1a event block: 2 bytes status, 2 bytes enable.
    pub const PM1A_EVENT: u16 = 0x600;
    pub const PM1A_EVENT_LEN: u8 = 4;
    /// ACPI PM1a control register (16 bit).
    pub const PM1A_CONTROL: u16 = 0x604;
    pub const PM1A_CONTROL_LEN: u8 = 2;
    /// ACPI PM timer (32-bit register, 24-bit counter).
    pub const PM_TIMER: u16 = 0x608;
    pub const PM_TIMER_LEN: u8 = 4;
    /// The PC reset control register, named as the ACPI reset register in the FADT.
    pub const RESET_CONTROL: u16 = 0xcf9;
}

/// IRQ lines of the legacy devices (ISA numbering, equal to the GSI on the IOAPIC).
pub mod irqs {
    pub const COM1: u32 = 4;
    pub const RTC: u32 = 8;
    pub const ACPI_SCI: u16 = 9;
}

/// Guest-physical ranges below 1 MiB the VMM writes at boot, `[start, end)`. A kernel
/// segment may use the rest of low memory (micro-guests put AP trampolines there), but
/// not these: they would be overwritten, or would overwrite what the VMM wrote.
pub const VMM_RESERVED_LOW: [(u64, u64); 4] = [
    (GDT_START, ZERO_PAGE_START + 0x1000),
    (BOOT_STACK_POINTER & !0xfff, BOOT_STACK_POINTER + 0x10),
    (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
    (EBDA_START, HIGH_MEMORY_START),
];

// The boot structures must not overlap; checked when the crate compiles.
const _: () = {
    assert!(IDT_START + 8 <= PML4_START);
    assert!(PML4_START < PDPT_START && PDPT_START < PD_START);
    assert!(PD_START + PD_COUNT * 0x1000 <= ZERO_PAGE_START);
    assert!(ZERO_PAGE_START + 0x1000 <= 0x8000);
    assert!(BOOT_STACK_POINTER > 0x9000 && BOOT_STACK_POINTER < 0xa000);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(ACPI_TABLES_END <= HIGH_MEMORY_START);
};

/// Where the `index`th virtio-mmio device lives: (MMIO base, GSI), or None past the last.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    let gsi = *VIRTIO_MMIO_GSIS.get(index)?;
    Some((VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_STRIDE, gsi))
}

/// A guest RAM range `[start, start + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub size: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Splits `total` bytes of guest RAM around the 32-bit MMIO gap: everything up to
/// [`MMIO_GAP_START`] below 4 GiB, the rest above it.
pub fn ram_ranges(total: u64) -> Vec<RamRange> {
    let low = total.min(MMIO_GAP_START);
    let mut ranges = vec![RamRange {
        start: 0,
        size: low,
    }];
    if total > low {
        ranges.push(RamRange {
            start: MMIO_GAP_END,
            size: total - low,
        });
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_have_one_range() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                start: 0,
                size: 512 << 20
            }]
        );
        assert_eq!(
            ram_ranges(3 << 30),
            vec![RamRange {
                start: 0,
                size: 3 << 30
            }]
        );
    }

    #[test]
    fn large_guests_skip_the_mmio_gap() {
        let ranges = ram_ranges(8 << 30);
        assert_eq!(
            ranges[0],
            RamRange {
                start: 0,
                size: 3 << 30
            }
        );
        assert_eq!(
            ranges[1],
            RamRange {
                start: 4 << 30,
                size: 5 << 30
            }
        );
        assert_eq!(ranges.iter().map(|r| r.size).sum::<u64>(), 8 << 30);
    }
}
