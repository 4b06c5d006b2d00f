//! x86-64 guest platform: where things live in guest-physical memory, the tables firmware
//! would normally provide (e820, ACPI), and the initial CPU state for the 64-bit Linux
//! boot protocol.

pub mod acpi;
pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod msrs;
pub mod paging;
pub mod regs;
