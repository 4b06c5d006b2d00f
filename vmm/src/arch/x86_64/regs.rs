//! Initial state of the boot vCPU for the 64-bit Linux boot protocol, and the local APIC
//! wiring every vCPU needs.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::gdt::{self, BOOT_CS, BOOT_DS, BOOT_TSS};
use super::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START};
use super::paging;
use crate::memory::GuestMemory;

#[derive(Debug, Error)]
pub enum RegsError {
    #[error("writing boot tables into guest memory")]
    BootTables(#[source] GuestMemoryError),
    #[error("{what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the GDT, an empty IDT and the identity page tables; returns CR3.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<u64, RegsError> {
    let table: Vec<u8> = gdt::boot_gdt()
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    mem.write_slice(&table, GuestAddress(GDT_START))
        .map_err(RegsError::BootTables)?;
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(RegsError::BootTables)?;
    paging::write_identity_map(mem).map_err(RegsError::BootTables)
}

/// Puts the boot vCPU in long mode at `entry` with `rsi` pointing at the zero page.
pub fn configure_boot_vcpu(
    vcpu: &VcpuFd,
    cr3: u64,
    entry: u64,
    zero_page: u64,
) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let gdt = gdt::boot_gdt();
    let code = gdt::kvm_segment(&gdt, usize::from(BOOT_CS / 8));
    let data = gdt::kvm_segment(&gdt, usize::from(BOOT_DS / 8));
    let tss = gdt::kvm_segment(&gdt, usize::from(BOOT_TSS / 8));
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(lapic: &mut kvm_lapic_state, register: usize, mode: u32) {
    let bytes: &mut [u8] = lapic_register_bytes(lapic, register);
    let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let value = (value & !0x700) | (mode << 8);
    bytes.copy_from_slice(&value.to_le_bytes());
}

fn lapic_register_bytes(lapic: &mut kvm_lapic_state, register: usize) -> &mut [u8] {
    // kvm_lapic_state.regs is `[c_char; 1024]`; view the 4 bytes of one register.
    let regs = &mut lapic.regs[register..register + 4];
    // SAFETY: c_char and u8 have the same size and alignment, and every bit pattern is
    // valid for both; the slice borrows `lapic` mutably for its whole lifetime.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), regs.len()) }
}

/// Wires LINT0 to the legacy PIC (ExtINT) and LINT1 to NMI, as a BIOS does for the
/// virtual-wire mode Linux expects at boot.
pub fn configure_lapic_lints(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    set_delivery_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes_are_set_in_place() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT0] = 0x12;
        set_delivery_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_delivery_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        assert_eq!(lapic.regs[APIC_LVT0] as u8, 0x12);
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x7);
        assert_eq!(lapic.regs[APIC_LVT1 + 1] as u8, 0x4);
    }
}
