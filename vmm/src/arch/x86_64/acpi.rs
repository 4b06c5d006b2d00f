//! ACPI tables: how the guest learns its CPUs and interrupt controllers (MADT), and how
//! it powers off and resets (FADT PM1 control and reset registers, `\_S5` in the DSDT).
//!
//! The tables are built into one byte image placed at [`layout::ACPI_TABLES_START`],
//! where Linux finds the RSDP both through `boot_params.acpi_rsdp_addr` and by scanning
//! the BIOS area.

use acpi_tables::aml::{
    Device, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, ZERO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;

use super::layout::{self, irqs, ports};

const OEM_ID: [u8; 6] = *b"BLKHD ";
const OEM_TABLE_ID: [u8; 8] = *b"BULKHEAD";
const OEM_REVISION: u32 = 1;

/// The sleep type the DSDT's `\_S5` object names; the PM1 control device powers the
/// VM off when the guest writes it with SLP_EN.
pub const SLP_TYP_S5: u16 = 5;
/// Value the guest writes to the reset register (hard reset, as on the PC's 0xcf9).
pub const RESET_VALUE: u8 = 0x06;

const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_TYPE_LAPIC_NMI: u8 = 4;
/// MPS INTI flags: active high (01), level triggered (11 << 2).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0x000d;
const IAPC_BOOT_VGA_NOT_PRESENT: u16 = 1 << 2;
const CMOS_CENTURY_INDEX: u8 = 0x32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes but only {available} are reserved for them")]
    TooLarge { needed: usize, available: usize },
}

/// Where the RSDP is: the first bytes of the table area, which is also where the BIOS-area
/// scan finds it.
pub const RSDP_ADDRESS: u64 = layout::ACPI_TABLES_START;

/// The tables, ready to be copied to guest memory at `base`.
pub struct AcpiTables {
    pub base: u64,
    pub bytes: Vec<u8>,
}

/// Appends `table` at the next `align`-aligned offset; returns its guest address.
fn place(image: &mut Vec<u8>, base: u64, align: usize, table: &[u8]) -> u64 {
    let offset = image.len().next_multiple_of(align);
    image.resize(offset, 0);
    image.extend_from_slice(table);
    base + offset as u64
}

fn aml_bytes(object: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    object.to_aml_bytes(&mut bytes);
    bytes
}

fn io_register(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

/// A virtio-mmio device the guest should find through ACPI (no command-line hints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// `Device (VRnn) { _HID "LNRO0005", _UID, _CRS { Memory32Fixed, Interrupt } }`, the
/// binding Linux's virtio_mmio driver matches.
fn virtio_mmio_aml(index: usize, device: &VirtioMmioDevice) -> Vec<u8> {
    let hid: &'static str = "LNRO0005";
    let uid = index as u32;
    let memory = Memory32Fixed::new(true, device.base as u32, device.size as u32);
    // Edge-triggered, active high: the worker pulses it through an irqfd.
    let interrupt = Interrupt::new(true, true, false, false, device.gsi);
    let resources = ResourceTemplate::new(vec![&memory, &interrupt]);
    let hid = Name::new(Path::new("_HID"), &hid);
    let uid = Name::new(Path::new("_UID"), &uid);
    let crs = Name::new(Path::new("_CRS"), &resources);
    let path = format!("_SB_.VR{index:02X}");
    aml_bytes(&Device::new(Path::new(&path), vec![&hid, &uid, &crs]))
}

fn dsdt(virtio: &[VirtioMmioDevice]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for (index, device) in virtio.iter().enumerate() {
        dsdt.append_slice(&virtio_mmio_aml(index, device));
    }
    let slp_typ = SLP_TYP_S5 as u8;
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&slp_typ, &slp_typ, &ZERO, &ZERO]),
    );
    dsdt.append_slice(&aml_bytes(&s5));
    dsdt.as_slice().to_vec()
}

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        .flag(Flags::Wbinvd)
        // No PWR_BUTTON flag: the power button is the fixed-feature one in PM1
        // (`bulkhead stop` presses it), not a control-method device.
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.sci_int = irqs::ACPI_SCI.into();
    // No SMI command port: the platform is always in ACPI mode (SCI_EN reads as set).
    fadt.smi_cmd = 0.into();
    fadt.pm1a_evt_blk = u32::from(ports::PM1A_EVENT).into();
    fadt.pm1_evt_len = ports::PM1A_EVENT_LEN;
    fadt.pm1a_cnt_blk = u32::from(ports::PM1A_CONTROL).into();
    fadt.pm1_cnt_len = ports::PM1A_CONTROL_LEN;
    fadt.pm_tmr_blk = u32::from(ports::PM_TIMER).into();
    fadt.pm_tmr_len = ports::PM_TIMER_LEN;
    fadt.x_pm_tmr_blk = io_register(ports::PM_TIMER, 32, AccessSize::DwordAccess);
    fadt.x_pm1a_evt_blk = io_register(ports::PM1A_EVENT, 32, AccessSize::WordAccess);
    fadt.x_pm1a_cnt_blk = io_register(ports::PM1A_CONTROL, 16, AccessSize::WordAccess);
    fadt.reset_reg = io_register(ports::RESET_CONTROL, 8, AccessSize::ByteAccess);
    fadt.reset_value = RESET_VALUE;
    fadt.century = CMOS_CENTURY_INDEX;
    // No 8042 flag: Linux then skips probing for a PS/2 keyboard we do not emulate
    // (the i8042 here exists only for its reset line).
    fadt.iapc_boot_arch = IAPC_BOOT_VGA_NOT_PRESENT.into();
    aml_bytes(&fadt.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, layout::LAPIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..cpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(0, layout::IOAPIC_START as u32, 0)));
    // The PIT is wired to IOAPIC pin 2, not 0, on every PC (and in KVM's irqchip).
    madt.append_slice(&interrupt_override(0, 2, 0));
    madt.append_slice(&interrupt_override(
        irqs::ACPI_SCI as u8,
        u32::from(irqs::ACPI_SCI),
        INTI_ACTIVE_HIGH_LEVEL,
    ));
    // LINT1 of every processor (uid 0xff) is the NMI line.
    madt.append_slice(&[MADT_TYPE_LAPIC_NMI, 6, 0xff, 0, 0, 1]);
    madt.as_slice().to_vec()
}

fn interrupt_override(source: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut entry = [0u8; 10];
    entry[0] = MADT_TYPE_INTERRUPT_OVERRIDE;
    entry[1] = 10;
    entry[2] = 0; // ISA bus
    entry[3] = source;
    entry[4..8].copy_from_slice(&gsi.to_le_bytes());
    entry[8..10].copy_from_slice(&flags.to_le_bytes());
    entry
}

/// Builds RSDP, XSDT, FADT, FACS, MADT and DSDT for a guest with `cpus` vCPUs and the
/// given virtio-mmio devices.
pub fn build(cpus: u8, virtio: &[VirtioMmioDevice]) -> Result<AcpiTables, AcpiError> {
    let base = RSDP_ADDRESS;
    let mut image = Vec::new();
    // The RSDP goes first so that the BIOS-area scan finds it at a 16-byte boundary; its
    // XSDT pointer is patched in once the XSDT's address is known.
    let rsdp_len = Rsdp::len();
    image.resize(rsdp_len, 0);

    let dsdt = place(&mut image, base, 16, &dsdt(virtio));
    let facs = place(&mut image, base, 64, &aml_bytes(&FACS::new()));
    let fadt = place(&mut image, base, 16, &fadt(dsdt, facs));
    let madt = place(&mut image, base, 16, &madt(cpus));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = place(&mut image, base, 16, &aml_bytes(&xsdt));
    image[..rsdp_len].copy_from_slice(&aml_bytes(&Rsdp::new(OEM_ID, xsdt)));

    let available = (layout::ACPI_TABLES_END - base) as usize;
    if image.len() > available {
        return Err(AcpiError::TooLarge {
            needed: image.len(),
            available,
        });
    }
    Ok(AcpiTables { base, bytes: image })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_at(tables: &AcpiTables, addr: u64) -> &[u8] {
        let offset = (addr - tables.base) as usize;
        let len = u32::from_le_bytes(tables.bytes[offset + 4..offset + 8].try_into().unwrap());
        &tables.bytes[offset..offset + len as usize]
    }

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Walks RSDP -> XSDT -> tables the way the guest does; returns (signature, bytes).
    fn walk(tables: &AcpiTables) -> Vec<([u8; 4], Vec<u8>)> {
        let rsdp = &tables.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        let xsdt = table_at(tables, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(xsdt));
        xsdt[36..]
            .chunks(8)
            .map(|entry| {
                let table = table_at(tables, u64::from_le_bytes(entry.try_into().unwrap()));
                assert!(checksum_ok(table), "bad checksum");
                (table[..4].try_into().unwrap(), table.to_vec())
            })
            .collect()
    }

    #[test]
    fn tables_link_up_with_valid_checksums() {
        let tables = build(2, &[]).unwrap();
        let sigs: Vec<_> = walk(&tables).into_iter().map(|(s, _)| s).collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC"]);
        assert_eq!(tables.base, RSDP_ADDRESS);
        assert_eq!(tables.base % 16, 0);
    }

    #[test]
    fn madt_lists_every_cpu_the_ioapic_and_overrides() {
        for cpus in [1u8, 2, 8, 254] {
            let tables = build(cpus, &[]).unwrap();
            let (_, madt) = walk(&tables)
                .into_iter()
                .find(|(s, _)| s == b"APIC")
                .unwrap();
            let mut lapics = Vec::new();
            let mut ioapics = 0;
            let mut overrides = Vec::new();
            let mut offset = 44;
            while offset < madt.len() {
                let (kind, len) = (madt[offset], madt[offset + 1] as usize);
                match kind {
                    0 => lapics.push((madt[offset + 3], madt[offset + 4] & 1)),
                    1 => ioapics += 1,
                    2 => overrides.push((madt[offset + 3], madt[offset + 4])),
                    _ => {}
                }
                offset += len;
            }
            assert_eq!(offset, madt.len());
            assert_eq!(lapics.len(), usize::from(cpus));
            assert!(lapics
                .iter()
                .enumerate()
                .all(|(i, &(id, on))| id == i as u8 && on == 1));
            assert_eq!(ioapics, 1);
            assert!(overrides.contains(&(0, 2)), "PIT override missing");
        }
    }

    #[test]
    fn fadt_points_at_pm1_reset_and_dsdt_with_s5() {
        let tables = build(1, &[]).unwrap();
        let (_, fadt) = walk(&tables)
            .into_iter()
            .find(|(s, _)| s == b"FACP")
            .unwrap();
        let u32_at = |o: usize| u32::from_le_bytes(fadt[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(64), u32::from(ports::PM1A_CONTROL)); // PM1a_CNT_BLK
        assert_eq!(u32_at(56), u32::from(ports::PM1A_EVENT)); // PM1a_EVT_BLK
        assert_eq!(u32_at(76), u32::from(ports::PM_TIMER)); // PM_TMR_BLK
        assert_eq!(fadt[91], 4); // PM_TMR_LEN
        assert_eq!(u32_at(112) & (1 << 10), 1 << 10); // RESET_REG_SUP
        assert_eq!(fadt[116], 1); // reset register in system I/O space
        assert_eq!(u64_at(&fadt, 120), u64::from(ports::RESET_CONTROL));
        assert_eq!(fadt[128], RESET_VALUE);
        let dsdt = table_at(&tables, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(dsdt));
        let body = &dsdt[36..];
        let s5 = body
            .windows(4)
            .position(|w| w == b"_S5_")
            .expect("_S5_ in DSDT");
        // NameOp, name, PackageOp, PkgLength, NumElements, BytePrefix 5
        assert_eq!(body[s5 - 1], 0x08);
        assert_eq!(&body[s5 + 4..s5 + 5], &[0x12]);
        assert!(body[s5 + 5..]
            .windows(2)
            .any(|w| w == [0x0a, SLP_TYP_S5 as u8]));
    }
}
