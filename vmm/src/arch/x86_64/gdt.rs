//! The GDT the 64-bit boot protocol requires: flat `__BOOT_CS` (0x10) and `__BOOT_DS`
//! (0x18) descriptors, plus a TSS descriptor because VMX refuses to enter a guest whose
//! task register is unusable.

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment (`__BOOT_CS` in Linux).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS` in Linux).
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

/// Descriptor flags: G, D/B, L, AVL nibble then the access byte (P, DPL, S, type).
const CODE64_FLAGS: u16 = 0xa09b;
const DATA_FLAGS: u16 = 0xc093;
const TSS_FLAGS: u16 = 0x808b;

/// The boot GDT, indexed by selector / 8.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        descriptor(CODE64_FLAGS, 0, 0xfffff),
        descriptor(DATA_FLAGS, 0, 0xfffff),
        descriptor(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// Packs base, limit and flags into a legacy segment descriptor.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM view of the descriptor at `index` of `gdt`.
pub fn kvm_segment(gdt: &[u64], index: usize) -> kvm_segment {
    let entry = gdt[index];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    // With G set the limit counts 4 KiB pages; KVM wants it in bytes.
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: (present == 0) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_64_bit() {
        let gdt = boot_gdt();
        let cs = kvm_segment(&gdt, usize::from(BOOT_CS / 8));
        assert_eq!(cs.selector, 0x10);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn data_segment_is_flat_writable() {
        let gdt = boot_gdt();
        let ds = kvm_segment(&gdt, usize::from(BOOT_DS / 8));
        assert_eq!(ds.selector, 0x18);
        assert_eq!((ds.type_, ds.db, ds.g, ds.present), (0x3, 1, 1, 1));
        assert_eq!(ds.limit, 0xffff_ffff);
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let d = descriptor(0x408b, 0x1234_5678, 0xabcde);
        let seg = kvm_segment(&[d], 0);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.type_, 0xb);
    }
}
