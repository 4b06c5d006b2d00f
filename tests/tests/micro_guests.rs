//! Micro-guests against the real `bulkhead` binary on /dev/kvm: serial I/O, the ways a VM
//! ends, the legacy devices, SMP bring-up, memory sizing and the boot protocol.
//!
//! Each guest prints `name=value` markers on COM1 (bulkhead's stdout) that the test checks,
//! then powers off. Guest code runs in KVM's instruction emulator here (PVM, see
//! docs/environment.md), so loops stay short and bounded.

use anyhow::{Context, Result};
use bulkhead_tests::micro::elf::{patch_program_header, ProgramHeaderField};
use bulkhead_tests::micro::guest::{CODE_BASE, STILL_RUNNING};
use bulkhead_tests::micro::hw::*;
use bulkhead_tests::micro::runner::{run_kernel_image, RunOutcome};
use bulkhead_tests::micro::{real_mode_segment, MicroGuest, ScratchDir};
use iced_x86::code_asm::*;

/// Bound for polling loops: 100k iterations take about 0.15 s of emulated execution here.
const SPIN_LIMIT: u32 = 100_000;

/// The hex value of the guest's output line `name=<hex>`.
fn marker(outcome: &RunOutcome, name: &str) -> u64 {
    let prefix = format!("{name}=");
    let value = outcome
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in the guest's output:\n{outcome}"));
    u64::from_str_radix(value, 16)
        .unwrap_or_else(|_| panic!("`{prefix}{value}` is not hex:\n{outcome}"))
}

/// Emits `print("{name}=")`, the low `digits` hex digits of `value`, and a newline.
fn print_marker(
    guest: &mut MicroGuest,
    name: &str,
    value: AsmRegister64,
    digits: u32,
) -> Result<()> {
    guest.print(&format!("{name}="))?;
    guest.print_hex(value, digits)?;
    guest.print("\n")
}

/// A short busy wait (`counter` is clobbered).
fn spin(guest: &mut MicroGuest, counter: AsmRegister32, iterations: u32) -> Result<()> {
    let a = guest.asm();
    a.mov(counter, iterations)?;
    let mut again = a.create_label();
    a.set_label(&mut again)?;
    a.pause()?;
    a.dec(counter)?;
    a.jnz(again)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Serial console
// ---------------------------------------------------------------------------------------

#[test]
fn serial_output_reaches_stdout() -> Result<()> {
    let mut guest = MicroGuest::new()?;
    guest.print("hello from micro-guest\n")?;
    guest.power_off()?;

    let outcome = guest.run(&[])?;
    outcome.assert_clean_exit();
    assert!(
        outcome.stdout.contains("hello from micro-guest\n"),
        "{outcome}"
    );
    Ok(())
}

/// A guest that echoes its serial input upper-cased, up to and including the first '\n'.
fn upper_case_echo_guest() -> Result<MicroGuest> {
    let mut guest = MicroGuest::new()?;
    guest.print("echo>")?;
    let mut next_byte = guest.asm().create_label();
    let mut wait_for_data = guest.asm().create_label();
    let mut emit = guest.asm().create_label();
    let a = guest.asm();
    a.set_label(&mut next_byte)?;
    a.mov(dx, COM1_LSR as u32)?;
    a.set_label(&mut wait_for_data)?;
    // Unbounded on purpose: input arrives whenever bulkhead forwards it; the test's
    // timeout catches input that never does.
    a.in_(al, dx)?;
    a.test(al, LSR_DATA_READY as u32)?;
    a.jz(wait_for_data)?;
    a.mov(dx, COM1_DATA as u32)?;
    a.in_(al, dx)?;
    a.cmp(al, b'a' as i32)?;
    a.jb(emit)?;
    a.cmp(al, b'z' as i32)?;
    a.ja(emit)?;
    a.sub(al, 0x20)?;
    a.set_label(&mut emit)?;
    guest.print_al()?;
    let a = guest.asm();
    a.cmp(al, b'\n' as i32)?;
    a.jne(next_byte)?;
    guest.power_off()?;
    Ok(guest)
}

#[test]
fn console_input_reaches_the_guest() -> Result<()> {
    let outcome = upper_case_echo_guest()?.run_with_stdin(&[], b"shout this, please\n")?;
    outcome.assert_clean_exit();
    assert!(
        outcome.stdout.contains("echo>SHOUT THIS, PLEASE\n"),
        "{outcome}"
    );
    Ok(())
}

/// More input than a 16550's 16-byte FIFO (and vm-superio's 64-byte one) holds: bulkhead
/// must hold back what the guest has not read yet rather than drop it.
#[test]
fn long_console_input_is_not_dropped() -> Result<()> {
    let line: String = (0..300)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let outcome = upper_case_echo_guest()?.run_with_stdin(&[], format!("{line}\n").as_bytes())?;
    outcome.assert_clean_exit();
    let expected = format!("echo>{}\n", line.to_uppercase());
    assert!(
        outcome.stdout.contains(&expected),
        "lost or garbled input:\n{outcome}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// How a VM ends
// ---------------------------------------------------------------------------------------

#[test]
fn i8042_reset_ends_the_vm_cleanly() -> Result<()> {
    let mut guest = MicroGuest::new()?;
    guest.print("resetting via i8042\n")?;
    guest.reset_via_i8042()?;

    let outcome = guest.run(&[])?;
    // assert_clean_exit also checks the guest did not run on past the reset request.
    outcome.assert_clean_exit();
    assert!(
        outcome.stdout.contains("resetting via i8042\n"),
        "{outcome}"
    );
    Ok(())
}

#[test]
fn cf9_reset_ends_the_vm_cleanly() -> Result<()> {
    let mut guest = MicroGuest::new()?;
    guest.print("resetting via 0xcf9\n")?;
    guest.reset_via_cf9()?;

    let outcome = guest.run(&[])?;
    outcome.assert_clean_exit();
    assert!(
        outcome.stdout.contains("resetting via 0xcf9\n"),
        "{outcome}"
    );
    Ok(())
}

#[test]
fn triple_fault_fails_with_a_clear_error() -> Result<()> {
    let mut guest = MicroGuest::new()?;
    guest.print("about to triple fault\n")?;
    guest.triple_fault()?;

    let outcome = guest.run(&[])?;
    assert!(
        !outcome.status.success(),
        "a crashed guest must fail the run:\n{outcome}"
    );
    assert!(
        outcome.stdout.contains("about to triple fault\n"),
        "{outcome}"
    );
    let errors = outcome.error_lines().join("\n");
    assert!(
        errors.contains("triple fault"),
        "no `error: ...triple fault` line:\n{outcome}"
    );
    // Where it crashed: the empty IDT it loaded is what made the #UD a triple fault
    // (unless KVM reset the vCPU, as it does on AMD, and the error says so).
    assert!(
        (errors.contains(" rip=0x") && errors.contains(" idt=0x0+0x0 "))
            || errors.contains("registers lost: KVM reset the vCPU"),
        "the error does not give the crashed vCPU's registers:\n{outcome}"
    );
    assert!(!outcome.stderr.contains("panicked"), "{outcome}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Unclaimed ports and addresses
// ---------------------------------------------------------------------------------------

#[test]
fn unmapped_mmio_reads_all_ones_and_ignores_writes() -> Result<()> {
    // With 64 MiB of RAM, 0xd000_0000 is neither RAM nor a device (and not the LAPIC or
    // IOAPIC), but the 4 GiB identity map covers it.
    let mut guest = MicroGuest::new()?;
    let a = guest.asm();
    a.mov(rdi, 0xd000_0000u64)?;
    a.mov(r8d, dword_ptr(rdi))?;
    a.movzx(r9d, byte_ptr(rdi + 3))?;
    a.mov(dword_ptr(rdi), 0x1234_5678)?;
    a.mov(r10d, dword_ptr(rdi))?;
    print_marker(&mut guest, "read32", r8, 8)?;
    print_marker(&mut guest, "read8", r9, 2)?;
    print_marker(&mut guest, "after-write", r10, 8)?;
    guest.power_off()?;

    let outcome = guest.run(&["--memory", "64M"])?;
    outcome.assert_clean_exit();
    assert_eq!(marker(&outcome, "read32"), 0xffff_ffff, "{outcome}");
    assert_eq!(marker(&outcome, "read8"), 0xff, "{outcome}");
    assert_eq!(
        marker(&outcome, "after-write"),
        0xffff_ffff,
        "the write stuck:\n{outcome}"
    );
    Ok(())
}

#[test]
fn unknown_ports_read_all_ones_and_ignore_writes() -> Result<()> {
    const NOBODY: u32 = 0x1234; // no device of bulkhead's lives here
    let mut guest = MicroGuest::new()?;
    let a = guest.asm();
    a.mov(dx, NOBODY)?;
    a.mov(al, 0x5a)?;
    a.out(dx, al)?;
    a.in_(al, dx)?;
    a.movzx(r8d, al)?;
    a.in_(ax, dx)?;
    a.movzx(r9d, ax)?;
    a.in_(eax, dx)?;
    a.mov(r10d, eax)?;
    print_marker(&mut guest, "in8", r8, 2)?;
    print_marker(&mut guest, "in16", r9, 4)?;
    print_marker(&mut guest, "in32", r10, 8)?;
    guest.power_off()?;

    let outcome = guest.run(&[])?;
    outcome.assert_clean_exit();
    assert_eq!(marker(&outcome, "in8"), 0xff, "{outcome}");
    assert_eq!(marker(&outcome, "in16"), 0xffff, "{outcome}");
    assert_eq!(marker(&outcome, "in32"), 0xffff_ffff, "{outcome}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// CMOS RTC
// ---------------------------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn host_utc_day() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (now.as_secs() / 86_400) as i64
}

/// A BCD byte's value, or None if either nibble is not a decimal digit.
fn from_bcd(byte: u64) -> Option<i64> {
    let (high, low) = ((byte >> 4) & 0xf, byte & 0xf);
    (byte <= 0xff && high <= 9 && low <= 9).then_some((high * 10 + low) as i64)
}

#[test]
fn rtc_reports_the_host_date_in_bcd() -> Result<()> {
    // (CMOS register, marker): century, year, month, day, hours, minutes, seconds, status B.
    const FIELDS: [(u8, &str); 8] = [
        (0x32, "century"),
        (0x09, "year"),
        (0x08, "month"),
        (0x07, "day"),
        (0x04, "hours"),
        (0x02, "minutes"),
        (0x00, "seconds"),
        (0x0b, "status-b"),
    ];
    let mut guest = MicroGuest::new()?;
    // Read while no update is in progress (status A bit 7), as a driver would.
    let mut poll = guest.asm().create_label();
    let mut settled = guest.asm().create_label();
    let a = guest.asm();
    a.mov(r8d, SPIN_LIMIT)?;
    a.set_label(&mut poll)?;
    a.mov(al, 0x0a)?;
    a.out(CMOS_INDEX as u32, al)?;
    a.in_(al, CMOS_DATA as u32)?;
    a.test(al, 0x80)?;
    a.jz(settled)?;
    a.dec(r8d)?;
    a.jnz(poll)?;
    a.set_label(&mut settled)?;
    for (register, name) in FIELDS {
        let a = guest.asm();
        a.mov(al, register as u32)?;
        a.out(CMOS_INDEX as u32, al)?;
        a.in_(al, CMOS_DATA as u32)?;
        a.movzx(r9d, al)?;
        print_marker(&mut guest, name, r9, 2)?;
    }
    guest.power_off()?;

    let day_before = host_utc_day();
    let outcome = guest.run(&[])?;
    let day_after = host_utc_day();
    outcome.assert_clean_exit();

    assert_eq!(
        marker(&outcome, "status-b") & 0b100,
        0,
        "status B says binary, not BCD:\n{outcome}"
    );
    let field = |name: &str| {
        from_bcd(marker(&outcome, name)).unwrap_or_else(|| panic!("{name} is not BCD:\n{outcome}"))
    };
    let year = field("century") * 100 + field("year");
    let (month, day) = (field("month"), field("day"));
    assert!(
        (1..=12).contains(&month) && (1..=31).contains(&day),
        "{outcome}"
    );
    assert!(field("minutes") < 60 && field("seconds") < 60, "{outcome}");
    // A day of slack either way: the RTC may legitimately run on local time.
    let guest_day = days_from_civil(year, month, day);
    assert!(
        (day_before - 1..=day_after + 1).contains(&guest_day),
        "guest date {year}-{month:02}-{day:02} is not today (UTC):\n{outcome}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// SMP bring-up
// ---------------------------------------------------------------------------------------

/// The AP trampoline's page: SIPI vector 0x08 starts APs at 0800:0000.
const TRAMPOLINE: u64 = 0x8000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;
/// The APs' check-in counter, inside the trampoline's (zero-filled) page.
const AP_COUNTER_OFFSET: u32 = 0xf00;
/// ICR command words: all-excluding-self shorthand (bits 18-19), level assert (bit 14).
const ICR_INIT_ALL_BUT_SELF: u32 = 0x000c_4500;
const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000c_4600;

/// A guest whose BSP wakes every AP with INIT-SIPI-SIPI, waits (bounded) until `expected`
/// APs have checked in, waits a little longer so that any extra one would show up too, and
/// prints how many did as `aps=`.
fn smp_guest(expected: u16) -> Result<MicroGuest> {
    let mut guest = MicroGuest::new()?;
    guest.add_segment(real_mode_segment(TRAMPOLINE, 0x1000, |a| {
        a.cli()?;
        a.mov(ax, cs)?;
        a.mov(ds, ax)?;
        a.lock().inc(word_ptr(AP_COUNTER_OFFSET))?;
        let mut park = a.create_label();
        a.set_label(&mut park)?;
        a.hlt()?;
        a.jmp(park)?;
        Ok(())
    })?);

    let a = guest.asm();
    a.mov(rdi, LAPIC_BASE)?;
    // Software-enable the BSP's LAPIC (spurious vector 0xff), as firmware does first.
    a.mov(dword_ptr(rdi + LAPIC_SPURIOUS_VECTOR), 0x1ff)?;
    a.mov(dword_ptr(rdi + LAPIC_ICR_HIGH), 0)?;
    a.mov(dword_ptr(rdi + LAPIC_ICR_LOW), ICR_INIT_ALL_BUT_SELF)?;
    spin(&mut guest, ecx, 1000)?;
    for _ in 0..2 {
        let a = guest.asm();
        a.mov(
            dword_ptr(rdi + LAPIC_ICR_LOW),
            ICR_SIPI_ALL_BUT_SELF | SIPI_VECTOR,
        )?;
        spin(&mut guest, ecx, 1000)?;
    }

    let mut poll = guest.asm().create_label();
    let mut done = guest.asm().create_label();
    let a = guest.asm();
    a.mov(rsi, TRAMPOLINE + u64::from(AP_COUNTER_OFFSET))?;
    // Generous, since AP threads must first get host CPU time; a pass exits early.
    a.mov(ecx, 10 * SPIN_LIMIT)?;
    a.set_label(&mut poll)?;
    a.cmp(word_ptr(rsi), i32::from(expected))?;
    a.je(done)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(poll)?;
    a.set_label(&mut done)?;
    spin(&mut guest, ecx, SPIN_LIMIT)?;
    guest.asm().movzx(r8d, word_ptr(rsi))?;
    print_marker(&mut guest, "aps", r8, 4)?;
    guest.power_off()?;
    Ok(guest)
}

fn started_aps(cpus: u16) -> Result<u64> {
    let outcome = smp_guest(cpus - 1)?.run(&["--cpus", &cpus.to_string()])?;
    // Power-off must also stop the APs, which sit in `hlt` inside KVM_RUN.
    outcome.assert_clean_exit();
    Ok(marker(&outcome, "aps"))
}

#[test]
fn four_cpus_start_three_aps() -> Result<()> {
    assert_eq!(started_aps(4)?, 3);
    Ok(())
}

#[test]
fn two_cpus_start_one_ap() -> Result<()> {
    assert_eq!(started_aps(2)?, 1);
    Ok(())
}

#[test]
fn one_cpu_starts_no_aps() -> Result<()> {
    assert_eq!(started_aps(1)?, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Interrupt controllers and COM1's interrupt
// ---------------------------------------------------------------------------------------

#[test]
fn interrupt_controllers_answer_at_their_documented_addresses() -> Result<()> {
    let mut guest = MicroGuest::new()?;
    let a = guest.asm();
    a.mov(rdi, IOAPIC_BASE)?;
    a.mov(dword_ptr(rdi), IOAPIC_REG_VERSION)?;
    a.mov(r8d, dword_ptr(rdi + IOAPIC_IOWIN))?;
    a.mov(rdi, LAPIC_BASE)?;
    a.mov(r9d, dword_ptr(rdi + LAPIC_ID))?;
    a.mov(r10d, dword_ptr(rdi + LAPIC_VERSION))?;
    print_marker(&mut guest, "ioapic-version", r8, 8)?;
    print_marker(&mut guest, "lapic-id", r9, 8)?;
    print_marker(&mut guest, "lapic-version", r10, 8)?;
    guest.power_off()?;

    let outcome = guest.run(&[])?;
    outcome.assert_clean_exit();
    // An absent chip would read all-ones. KVM's IOAPIC: version 0x11, 24 pins.
    let ioapic = marker(&outcome, "ioapic-version");
    assert_eq!(ioapic & 0xff, 0x11, "{outcome}");
    assert_eq!(
        (ioapic >> 16) & 0xff,
        23,
        "max redirection entry:\n{outcome}"
    );
    assert_eq!(
        marker(&outcome, "lapic-id") >> 24,
        0,
        "the BSP has APIC id 0:\n{outcome}"
    );
    assert_ne!(marker(&outcome, "lapic-version"), 0xffff_ffff, "{outcome}");
    Ok(())
}

/// Routes IRQ 4 through the IOAPIC to a handler, enables the UART interrupts in `ier`, and
/// waits (bounded) with interrupts on. The handler prints IIR and RBR and powers off.
fn serial_interrupt_guest(ier: u8, spin_limit: u32) -> Result<MicroGuest> {
    const VECTOR: u8 = 0x40;
    let mut guest = MicroGuest::new()?;
    let mut handler = guest.asm().create_label();
    guest.set_interrupt_handler(VECTOR, handler)?;
    let a = guest.asm();
    // Mask the 8259s: bulkhead wires LINT0 as ExtINT, so an unmasked PIC would deliver
    // IRQ 4 a second time, at a vector this guest has no gate for.
    a.mov(al, 0xff)?;
    a.out(PIC_MASTER_DATA as u32, al)?;
    a.out(PIC_SLAVE_DATA as u32, al)?;
    a.mov(rdi, LAPIC_BASE)?;
    a.mov(dword_ptr(rdi + LAPIC_SPURIOUS_VECTOR), 0x1ff)?;
    a.mov(rdi, IOAPIC_BASE)?;
    a.mov(dword_ptr(rdi), ioapic_redirection_low(COM1_IRQ))?;
    // Fixed delivery, physical destination, edge-triggered, active high, unmasked.
    a.mov(dword_ptr(rdi + IOAPIC_IOWIN), u32::from(VECTOR))?;
    a.mov(dword_ptr(rdi), ioapic_redirection_low(COM1_IRQ) + 1)?;
    a.mov(dword_ptr(rdi + IOAPIC_IOWIN), 0)?; // destination: APIC id 0, the BSP
    a.mov(dx, COM1_MCR as u32)?;
    a.mov(al, MCR_OUT2 as u32)?;
    a.out(dx, al)?;
    a.mov(dx, COM1_IER as u32)?;
    a.mov(al, ier as u32)?;
    a.out(dx, al)?;
    a.sti()?;
    spin(&mut guest, ecx, spin_limit)?;
    guest.asm().cli()?;
    guest.print("no serial interrupt\n")?;
    guest.power_off()?;

    guest.asm().set_label(&mut handler)?;
    let a = guest.asm();
    a.mov(dx, COM1_IIR as u32)?;
    a.in_(al, dx)?;
    a.movzx(r8d, al)?;
    a.mov(dx, COM1_DATA as u32)?;
    a.in_(al, dx)?;
    a.movzx(r9d, al)?;
    print_marker(&mut guest, "iir", r8, 2)?;
    print_marker(&mut guest, "rbr", r9, 2)?;
    guest.power_off()?;
    Ok(guest)
}

#[test]
fn serial_transmit_interrupt_reaches_the_guest() -> Result<()> {
    let outcome = serial_interrupt_guest(IER_THR_EMPTY, SPIN_LIMIT)?.run(&[])?;
    outcome.assert_clean_exit();
    // IIR bits 3:0 = 0b0010: "THR empty" is the pending interrupt.
    assert_eq!(marker(&outcome, "iir") & 0xf, 0x2, "{outcome}");
    Ok(())
}

#[test]
fn serial_receive_interrupt_reaches_the_guest() -> Result<()> {
    // A longer wait: the input has to travel through bulkhead's stdin thread first.
    let guest = serial_interrupt_guest(IER_RECEIVED_DATA, 10 * SPIN_LIMIT)?;
    let outcome = guest.run_with_stdin(&[], b"x")?;
    outcome.assert_clean_exit();
    // IIR bits 3:0 = 0b0100: "received data available".
    assert_eq!(marker(&outcome, "iir") & 0xf, 0x4, "{outcome}");
    assert_eq!(marker(&outcome, "rbr"), u64::from(b'x'), "{outcome}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Guest memory
// ---------------------------------------------------------------------------------------

#[test]
fn memory_size_is_honoured() -> Result<()> {
    const TOP: u64 = 64 * MIB;
    let mut guest = MicroGuest::new()?;
    let a = guest.asm();
    // The last qword of RAM and one a MiB lower keep distinct patterns.
    a.mov(rdi, TOP - 8)?;
    a.mov(rax, 0x0123_4567_89ab_cdefu64)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rdi, TOP - MIB)?;
    a.mov(rax, 0xfedc_ba98_7654_3210u64)?;
    a.mov(qword_ptr(rdi), rax)?;
    // The first byte past the end is not RAM: all-ones, and writes vanish.
    a.mov(rdi, TOP)?;
    a.mov(dword_ptr(rdi), 0)?;
    a.mov(r10d, dword_ptr(rdi))?;
    a.mov(rdi, TOP - 8)?;
    a.mov(r8, qword_ptr(rdi))?;
    a.mov(rdi, TOP - MIB)?;
    a.mov(r9, qword_ptr(rdi))?;
    print_marker(&mut guest, "last-qword", r8, 16)?;
    print_marker(&mut guest, "mib-below", r9, 16)?;
    print_marker(&mut guest, "past-end", r10, 8)?;
    guest.power_off()?;

    let outcome = guest.run(&["--memory", "64M"])?;
    outcome.assert_clean_exit();
    assert_eq!(
        marker(&outcome, "last-qword"),
        0x0123_4567_89ab_cdef,
        "{outcome}"
    );
    assert_eq!(
        marker(&outcome, "mib-below"),
        0xfedc_ba98_7654_3210,
        "{outcome}"
    );
    assert_eq!(
        marker(&outcome, "past-end"),
        0xffff_ffff,
        "RAM goes past 64M:\n{outcome}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Boot protocol: entry state, zero page, command line, e820, initrd, image formats
// ---------------------------------------------------------------------------------------

#[test]
fn entry_state_is_long_mode_with_the_zero_page_in_rsi() -> Result<()> {
    // Everything here runs on the stack bulkhead provided, which proves it usable.
    let mut guest = MicroGuest::on_vmm_stack()?;
    let a = guest.asm();
    a.mov(r15, rsi)?;
    a.mov(r14, rsp)?;
    a.pushfq()?;
    a.pop(r13)?;
    a.mov(r12, cr0)?;
    a.mov(r11, cr4)?;
    a.mov(ecx, 0xc000_0080u32)?; // IA32_EFER
    a.rdmsr()?;
    a.mov(r10d, eax)?;
    print_marker(&mut guest, "rsi", r15, 16)?;
    print_marker(&mut guest, "rsp", r14, 16)?;
    print_marker(&mut guest, "rflags", r13, 8)?;
    print_marker(&mut guest, "cr0", r12, 8)?;
    print_marker(&mut guest, "cr4", r11, 8)?;
    print_marker(&mut guest, "efer", r10, 8)?;
    guest.power_off()?;

    let outcome = guest.run(&[])?;
    outcome.assert_clean_exit();
    assert_eq!(marker(&outcome, "rsi"), ZERO_PAGE, "{outcome}");
    assert_eq!(
        marker(&outcome, "rflags") & (1 << 9),
        0,
        "interrupts enabled:\n{outcome}"
    );
    let cr0_bits = marker(&outcome, "cr0");
    assert!(
        cr0_bits & 1 != 0 && cr0_bits & (1 << 31) != 0,
        "CR0.PE/PG clear:\n{outcome}"
    );
    assert!(
        marker(&outcome, "cr4") & (1 << 5) != 0,
        "CR4.PAE clear:\n{outcome}"
    );
    let efer = marker(&outcome, "efer");
    assert!(
        efer & (1 << 8) != 0 && efer & (1 << 10) != 0,
        "EFER.LME/LMA clear:\n{outcome}"
    );
    assert_ne!(marker(&outcome, "rsp"), 0, "{outcome}");
    Ok(())
}

/// Prints the command line the zero page points to, and the end of the highest e820 RAM
/// entry.
fn boot_params_guest() -> Result<MicroGuest> {
    let mut guest = MicroGuest::new()?;
    guest.asm().mov(r15, rsi)?;
    guest.print("cmdline=[")?;
    guest
        .asm()
        .mov(esi, dword_ptr(r15 + BOOT_PARAMS_CMD_LINE_PTR))?;
    guest.print_string_at_rsi()?;
    guest.print("]\n")?;

    // r12 = entries left, r13 = current entry, r14 = highest RAM end seen.
    let mut next = guest.asm().create_label();
    let mut skip = guest.asm().create_label();
    let mut done = guest.asm().create_label();
    let a = guest.asm();
    a.movzx(r12d, byte_ptr(r15 + BOOT_PARAMS_E820_ENTRIES))?;
    a.lea(r13, ptr(r15 + BOOT_PARAMS_E820_TABLE))?;
    a.xor(r14d, r14d)?;
    a.set_label(&mut next)?;
    a.test(r12, r12)?;
    a.jz(done)?;
    a.cmp(dword_ptr(r13 + 16), E820_RAM)?;
    a.jne(skip)?;
    a.mov(rax, qword_ptr(r13))?;
    a.add(rax, qword_ptr(r13 + 8))?;
    a.cmp(rax, r14)?;
    a.jbe(skip)?;
    a.mov(r14, rax)?;
    a.set_label(&mut skip)?;
    a.add(r13, E820_ENTRY_SIZE as i32)?;
    a.dec(r12)?;
    a.jmp(next)?;
    a.set_label(&mut done)?;
    print_marker(&mut guest, "e820-ram-end", r14, 16)?;
    guest.power_off()?;
    Ok(guest)
}

#[test]
fn zero_page_has_the_cmdline_and_memory_map() -> Result<()> {
    let cmdline = "console=ttyS0 micro.guest=yes";
    let outcome = boot_params_guest()?.run(&["--memory", "96M", "--cmdline", cmdline])?;
    outcome.assert_clean_exit();
    assert!(
        outcome.stdout.contains(&format!("cmdline=[{cmdline}]")),
        "{outcome}"
    );
    assert_eq!(marker(&outcome, "e820-ram-end"), 96 * MIB, "{outcome}");
    Ok(())
}

#[test]
fn default_memory_is_256m() -> Result<()> {
    let outcome = boot_params_guest()?.run(&[])?;
    outcome.assert_clean_exit();
    assert_eq!(marker(&outcome, "e820-ram-end"), 256 * MIB, "{outcome}");
    Ok(())
}

#[test]
fn initrd_is_loaded_and_described_in_the_zero_page() -> Result<()> {
    const INITRD_LEN: usize = 10_000;
    let mut initrd = b"initrd says hi\0".to_vec();
    initrd.resize(INITRD_LEN - 1, 0xa5);
    initrd.push(0x5a); // a distinct last byte shows the whole file arrived

    let mut guest = MicroGuest::new()?;
    let a = guest.asm();
    a.mov(r15, rsi)?;
    a.mov(r8d, dword_ptr(r15 + BOOT_PARAMS_RAMDISK_IMAGE))?;
    a.mov(r9d, dword_ptr(r15 + BOOT_PARAMS_RAMDISK_SIZE))?;
    a.movzx(r10d, byte_ptr(r8 + r9 - 1))?;
    print_marker(&mut guest, "initrd-addr", r8, 8)?;
    print_marker(&mut guest, "initrd-size", r9, 8)?;
    print_marker(&mut guest, "initrd-last", r10, 2)?;
    guest.print("initrd-text=")?;
    guest.asm().mov(rsi, r8)?;
    guest.print_string_at_rsi()?;
    guest.print("\n")?;
    guest.power_off()?;

    let dir = ScratchDir::new("initrd")?;
    let initrd_path = dir.write("initrd.img", &initrd)?;
    let initrd_arg = initrd_path.to_str().context("temp path is UTF-8")?;
    let outcome = guest.run(&["--memory", "64M", "--initrd", initrd_arg])?;
    outcome.assert_clean_exit();
    assert_eq!(
        marker(&outcome, "initrd-size"),
        INITRD_LEN as u64,
        "{outcome}"
    );
    assert_eq!(marker(&outcome, "initrd-last"), 0x5a, "{outcome}");
    assert!(
        outcome.stdout.contains("initrd-text=initrd says hi\n"),
        "{outcome}"
    );
    let address = marker(&outcome, "initrd-addr");
    // Clear of the kernel (code segment ends at CODE_BASE + 64 KiB), inside RAM.
    assert!(
        address >= CODE_BASE + 0x1_0000,
        "initrd overlaps the kernel:\n{outcome}"
    );
    assert!(
        address + INITRD_LEN as u64 <= 64 * MIB,
        "initrd past the end of RAM:\n{outcome}"
    );
    Ok(())
}

/// vmlinux links at a high virtual address and loads at a low physical one; only p_paddr
/// says where the bytes go.
#[test]
fn elf_segments_load_at_their_physical_address() -> Result<()> {
    let mut guest = MicroGuest::new()?;
    guest.print("loaded by p_paddr\n")?;
    guest.power_off()?;
    let mut image = guest.build()?;
    patch_program_header(
        &mut image,
        0,
        ProgramHeaderField::VirtAddr,
        0xffff_ffff_8000_0000 + CODE_BASE,
    );

    let outcome = run_kernel_image(&image, &[])?;
    outcome.assert_clean_exit();
    assert!(outcome.stdout.contains("loaded by p_paddr\n"), "{outcome}");
    Ok(())
}

/// The same kind of guest, as a bzImage entered at its 64-bit entry point.
#[test]
fn bzimage_boots_at_its_64bit_entry_point() -> Result<()> {
    let mut guest = MicroGuest::on_vmm_stack()?;
    guest.asm().mov(r15, rsi)?; // before print() clobbers rsi
    guest.print("hello from a bzImage\n")?;
    print_marker(&mut guest, "rsi", r15, 16)?;
    guest.power_off()?;

    let outcome = run_kernel_image(&guest.build_bzimage()?, &[])?;
    outcome.assert_clean_exit();
    assert!(
        outcome.stdout.contains("hello from a bzImage\n"),
        "{outcome}"
    );
    assert_eq!(marker(&outcome, "rsi"), ZERO_PAGE, "{outcome}");
    assert!(!outcome.stdout.contains(STILL_RUNNING), "{outcome}");
    Ok(())
}
