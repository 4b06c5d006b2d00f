//! The guest-visible machine bulkhead promises (ports, MMIO, memory map), as micro-guests see it.

/// COM1 data register (THR on write, RBR on read).
pub const COM1_DATA: u16 = 0x3f8;
/// COM1 interrupt enable register: bit 0 = received data, bit 1 = THR empty.
pub const COM1_IER: u16 = 0x3f9;
pub const IER_RECEIVED_DATA: u8 = 1 << 0;
pub const IER_THR_EMPTY: u8 = 1 << 1;
/// COM1 interrupt identification register (read).
pub const COM1_IIR: u16 = 0x3fa;
/// COM1 modem control register; bit 3 (OUT2) gates the IRQ line on a PC.
pub const COM1_MCR: u16 = 0x3fc;
pub const MCR_OUT2: u8 = 1 << 3;
/// COM1 line status register.
pub const COM1_LSR: u16 = 0x3fd;
/// LSR bit 0: a received byte is waiting in RBR.
pub const LSR_DATA_READY: u8 = 1 << 0;
/// LSR bit 5: THR is empty, the next byte may be written.
pub const LSR_THR_EMPTY: u8 = 1 << 5;

/// i8042 command port; command 0xFE pulses the CPU reset line.
pub const I8042_COMMAND: u16 = 0x64;
pub const I8042_RESET_CPU: u8 = 0xfe;

/// ACPI PM1a status register (write 1 to clear) and its power button bit, PWRBTN_STS,
/// which `bulkhead stop` sets.
pub const PM1A_STATUS: u16 = 0x600;
pub const PM1_PWRBTN: u16 = 1 << 8;

/// ACPI PM timer: a free-running 24-bit counter at 3.579545 MHz.
pub const PM_TIMER: u16 = 0x608;
pub const PM_TIMER_HZ: u32 = 3_579_545;

/// ACPI PM1a control block, and the value that requests S5 (soft off): SLP_TYP=5 | SLP_EN.
pub const PM1A_CONTROL: u16 = 0x604;
pub const PM1A_SLEEP_S5: u16 = (5 << 10) | (1 << 13);

/// Reset control register; 0x06 = SYS_RST | RST_CPU (hard reset).
pub const RESET_CONTROL: u16 = 0xcf9;
pub const RESET_CONTROL_HARD_RESET: u8 = 0x06;

/// CMOS RTC index and data ports.
pub const CMOS_INDEX: u16 = 0x70;
pub const CMOS_DATA: u16 = 0x71;

/// The legacy 8259 PICs' data ports; writing 0xff there masks every line (OCW1).
pub const PIC_MASTER_DATA: u16 = 0x21;
pub const PIC_SLAVE_DATA: u16 = 0xa1;

/// The in-kernel IOAPIC: registers are selected through IOREGSEL and accessed via IOWIN.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
pub const IOAPIC_IOWIN: u64 = 0x10;
pub const IOAPIC_REG_VERSION: u32 = 0x01;
/// Low dword of redirection entry `pin` is register 0x10 + 2 * pin; the high dword follows.
pub const fn ioapic_redirection_low(pin: u32) -> u32 {
    0x10 + 2 * pin
}
/// COM1's ISA IRQ, which is also its IOAPIC pin.
pub const COM1_IRQ: u32 = 4;

/// The in-kernel local APIC (xAPIC MMIO) and the registers SMP bring-up needs.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const LAPIC_ID: u64 = 0x20;
pub const LAPIC_VERSION: u64 = 0x30;
pub const LAPIC_SPURIOUS_VECTOR: u64 = 0xf0;
pub const LAPIC_ICR_LOW: u64 = 0x300;
pub const LAPIC_ICR_HIGH: u64 = 0x310;

/// Where bulkhead puts the Linux zero page (boot_params) and passes it in rsi.
pub const ZERO_PAGE: u64 = 0x7000;
/// boot_params offsets (Documentation/arch/x86/zero-page.rst, boot.rst).
pub const BOOT_PARAMS_E820_ENTRIES: u64 = 0x1e8;
pub const BOOT_PARAMS_RAMDISK_IMAGE: u64 = 0x218;
pub const BOOT_PARAMS_RAMDISK_SIZE: u64 = 0x21c;
pub const BOOT_PARAMS_CMD_LINE_PTR: u64 = 0x228;
pub const BOOT_PARAMS_E820_TABLE: u64 = 0x2d0;
/// Size of one packed e820 entry: u64 address, u64 size, u32 type.
pub const E820_ENTRY_SIZE: u64 = 20;
pub const E820_RAM: u32 = 1;

pub const MIB: u64 = 1 << 20;
