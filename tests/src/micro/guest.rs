//! [`MicroGuest`]: a 64-bit micro-guest assembled with iced-x86, packaged as an ELF kernel.
//!
//! The guest's code is linked and loaded at [`CODE_BASE`] (1 MiB, where a vmlinux loads) and
//! entered there by bulkhead in long mode. The builder adds a small runtime after the test's
//! code: serial output routines and the ways a guest can end (power-off, reset, triple
//! fault). Extra segments, such as a real-mode AP trampoline, ride along as more PT_LOADs.
//!
//! Register convention for the runtime calls ([`MicroGuest::print`] and friends): they clobber
//! rax, rbx, rcx, rdx, rsi and flags; rdi, rbp and r8-r15 are preserved.

use anyhow::{ensure, Context, Result};
use iced_x86::code_asm::*;

use super::bzimage::bzimage;
use super::elf::{build_elf, Segment};
use super::hw::*;
use super::runner::{run_kernel_image, run_kernel_image_with_stdin, RunOutcome};

/// Guest-physical (= identity-mapped virtual) address of the code, and the ELF entry point.
pub const CODE_BASE: u64 = 0x10_0000;
/// In-memory size of the code segment; its zero-filled tail past the code holds the stack.
const CODE_SEGMENT_SIZE: u64 = 0x1_0000;
const STACK_SIZE: u64 = 0x4000;
/// Initial rsp of a guest built with [`MicroGuest::new`].
pub const STACK_TOP: u64 = CODE_BASE + CODE_SEGMENT_SIZE;

/// Offset of the 64-bit entry point in a bzImage's protected-mode payload (boot protocol).
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;

/// 256 gates of 16 bytes.
const IDT_SIZE: usize = 256 * 16;

/// Printed when execution continues past a power-off or reset request, i.e. the VMM ignored
/// it. The guest then halts with interrupts off, so the test times out and shows this line.
pub const STILL_RUNNING: &str = "micro-guest: still running after";

/// Entry points of the runtime appended after the test's code.
struct Runtime {
    /// al = byte to send to COM1. Clobbers rdx only.
    putc: CodeLabel,
    /// rsi = NUL-terminated string.
    puts: CodeLabel,
    /// rbx = value, ecx = number of low hex digits to print (1..=16).
    put_hex: CodeLabel,
    /// cli; hlt forever: with the in-kernel LAPIC this never returns.
    halt_forever: CodeLabel,
}

pub struct MicroGuest {
    asm: CodeAssembler,
    runtime: Runtime,
    /// Constant data placed after the runtime, each with the label code refers to it by.
    data: Vec<(CodeLabel, Vec<u8>)>,
    extra_segments: Vec<Segment>,
    /// A 256-entry IDT in the image, once a handler has been installed.
    idt: Option<CodeLabel>,
    /// Whether the prologue set rsp to [`STACK_TOP`], an absolute address.
    own_stack: bool,
}

impl MicroGuest {
    /// A guest that first switches to its own stack, so it relies on nothing from the VMM but
    /// the documented entry state.
    pub fn new() -> Result<Self> {
        let mut guest = Self::on_vmm_stack()?;
        guest.asm.mov(rsp, STACK_TOP)?;
        guest.own_stack = true;
        Ok(guest)
    }

    /// A guest that keeps the rsp bulkhead entered it with, and every other register as well.
    pub fn on_vmm_stack() -> Result<Self> {
        let mut asm = CodeAssembler::new(64)?;
        let runtime = Runtime {
            putc: asm.create_label(),
            puts: asm.create_label(),
            put_hex: asm.create_label(),
            halt_forever: asm.create_label(),
        };
        Ok(MicroGuest {
            asm,
            runtime,
            data: Vec::new(),
            extra_segments: Vec::new(),
            idt: None,
            own_stack: false,
        })
    }

    /// The assembler, positioned after everything emitted so far.
    pub fn asm(&mut self) -> &mut CodeAssembler {
        &mut self.asm
    }

    /// Places `bytes` in the image and returns a label for RIP-relative access to them.
    pub fn data(&mut self, bytes: &[u8]) -> CodeLabel {
        let label = self.asm.create_label();
        self.data.push((label, bytes.to_vec()));
        label
    }

    /// Writes `text` to COM1.
    pub fn print(&mut self, text: &str) -> Result<()> {
        let mut string = text.as_bytes().to_vec();
        string.push(0);
        let label = self.data(&string);
        self.asm.lea(rsi, ptr(label))?;
        self.asm.call(self.runtime.puts)?;
        Ok(())
    }

    /// Writes the NUL-terminated string at [rsi] to COM1.
    pub fn print_string_at_rsi(&mut self) -> Result<()> {
        self.asm.call(self.runtime.puts)?;
        Ok(())
    }

    /// Writes the low `digits` hex digits of `value` to COM1, zero-padded, lower case.
    pub fn print_hex(&mut self, value: AsmRegister64, digits: u32) -> Result<()> {
        assert!((1..=16).contains(&digits));
        self.asm.mov(rbx, value)?;
        self.asm.mov(ecx, digits)?;
        self.asm.call(self.runtime.put_hex)?;
        Ok(())
    }

    /// Writes the byte in al to COM1 (waiting for THR empty). Preserves rax; clobbers rdx.
    pub fn print_al(&mut self) -> Result<()> {
        self.asm.call(self.runtime.putc)?;
        Ok(())
    }

    /// Requests ACPI S5 through PM1a_CNT: bulkhead should exit 0 without running further.
    pub fn power_off(&mut self) -> Result<()> {
        self.asm.mov(dx, PM1A_CONTROL as u32)?;
        self.asm.mov(ax, PM1A_SLEEP_S5 as u32)?;
        self.asm.out(dx, ax)?;
        self.stop_after("power-off")
    }

    /// Pulses the reset line through the i8042 controller (what Linux's `reboot=k` does).
    pub fn reset_via_i8042(&mut self) -> Result<()> {
        self.asm.mov(al, I8042_RESET_CPU as u32)?;
        self.asm.out(I8042_COMMAND as u32, al)?;
        self.stop_after("i8042 reset")
    }

    /// Hard reset through the reset control register (what Linux's `reboot=pci` does).
    pub fn reset_via_cf9(&mut self) -> Result<()> {
        self.asm.mov(dx, RESET_CONTROL as u32)?;
        self.asm.mov(al, RESET_CONTROL_HARD_RESET as u32)?;
        self.asm.out(dx, al)?;
        self.stop_after("0xcf9 reset")
    }

    /// Loads an empty IDT and raises #UD: #UD -> #GP (no IDT entry) -> #DF -> triple fault.
    pub fn triple_fault(&mut self) -> Result<()> {
        let empty_idt_descriptor = self.data(&[0; 10]); // limit 0, base 0
        self.asm.lidt(ptr(empty_idt_descriptor))?;
        self.asm.ud2()?;
        Ok(())
    }

    /// Points IDT entry `vector` at `handler` (a 64-bit interrupt gate) and loads the IDT.
    /// Every other vector stays not-present, so a stray interrupt ends in a visible triple
    /// fault. Clobbers rax, rdx and rdi.
    pub fn set_interrupt_handler(&mut self, vector: u8, handler: CodeLabel) -> Result<()> {
        let idt = match self.idt {
            Some(idt) => idt,
            None => {
                let idt = self.data(&[0; IDT_SIZE]);
                self.idt = Some(idt);
                idt
            }
        };
        let a = &mut self.asm;
        a.lea(rdi, ptr(idt))?;
        a.add(rdi, i32::from(vector) * 16)?;
        a.lea(rax, ptr(handler))?;
        a.mov(word_ptr(rdi), ax)?; // offset 15:0
        a.mov(dx, cs)?;
        a.mov(word_ptr(rdi + 2), dx)?; // selector: the code segment bulkhead set up
        a.mov(word_ptr(rdi + 4), 0x8e00)?; // present, DPL 0, interrupt gate, no IST
        a.shr(rax, 16)?;
        a.mov(word_ptr(rdi + 6), ax)?; // offset 31:16
        a.shr(rax, 16)?;
        a.mov(dword_ptr(rdi + 8), eax)?; // offset 63:32
                                         // The IDTR (16-bit limit, 64-bit base) is built on the stack.
        a.lea(rax, ptr(idt))?;
        a.sub(rsp, 16)?;
        a.mov(word_ptr(rsp), (IDT_SIZE - 1) as i32)?;
        a.mov(qword_ptr(rsp + 2), rax)?;
        a.lidt(ptr(rsp))?;
        a.add(rsp, 16)?;
        Ok(())
    }

    /// Adds another PT_LOAD segment to the image (e.g. an AP trampoline).
    pub fn add_segment(&mut self, segment: Segment) {
        self.extra_segments.push(segment);
    }

    /// Appends the runtime and data, assembles, and returns the ELF image.
    pub fn build(mut self) -> Result<Vec<u8>> {
        let code = self.assemble(CODE_BASE)?;
        ensure!(
            code.len() as u64 <= CODE_SEGMENT_SIZE - STACK_SIZE,
            "micro-guest code ({} bytes) would overlap its stack",
            code.len()
        );
        let mut segments = vec![Segment::new(CODE_BASE, code).with_mem_size(CODE_SEGMENT_SIZE)];
        segments.append(&mut self.extra_segments);
        Ok(build_elf(CODE_BASE, &segments))
    }

    /// Packages the guest as a bzImage instead: its code is the 64-bit entry point, 0x200
    /// bytes into the protected-mode payload. A bzImage lands wherever the VMM puts it, so
    /// this needs a position-independent guest: one made with [`MicroGuest::on_vmm_stack`]
    /// (the runtime and [`MicroGuest::print`] only use relative addressing).
    pub fn build_bzimage(mut self) -> Result<Vec<u8>> {
        ensure!(
            !self.own_stack,
            "a bzImage guest must not use the absolute STACK_TOP"
        );
        ensure!(
            self.extra_segments.is_empty(),
            "a bzImage has no room for extra segments"
        );
        let mut payload = vec![0u8; BZIMAGE_64BIT_ENTRY as usize];
        // The nominal load address (code32_start); the code does not depend on it.
        payload.extend(self.assemble(0x10_0000 + BZIMAGE_64BIT_ENTRY)?);
        Ok(bzimage(4, &payload))
    }

    /// Builds the guest and runs `bulkhead run --kernel <it> <args>`.
    pub fn run(self, args: &[&str]) -> Result<RunOutcome> {
        Ok(run_kernel_image(&self.build()?, args)?)
    }

    /// Like [`MicroGuest::run`], with `stdin` fed to the guest's serial input.
    pub fn run_with_stdin(self, args: &[&str], stdin: &[u8]) -> Result<RunOutcome> {
        Ok(run_kernel_image_with_stdin(&self.build()?, args, stdin)?)
    }

    /// Appends the runtime and the data to the test's code and assembles it all at `base`.
    fn assemble(&mut self, base: u64) -> Result<Vec<u8>> {
        // Falling off the end of the test's code must not run into the runtime.
        self.asm.jmp(self.runtime.halt_forever)?;
        self.emit_runtime()?;
        for (mut label, bytes) in std::mem::take(&mut self.data) {
            self.asm.set_label(&mut label)?;
            self.asm.db(&bytes)?;
        }
        self.asm
            .assemble(base)
            .context("assembling the micro-guest")
    }

    /// Reached only if bulkhead let the guest continue after `request`.
    fn stop_after(&mut self, request: &str) -> Result<()> {
        self.print(&format!("{STILL_RUNNING} {request}\n"))?;
        self.asm.jmp(self.runtime.halt_forever)?;
        Ok(())
    }

    fn emit_runtime(&mut self) -> Result<()> {
        let Runtime {
            mut putc,
            mut puts,
            mut put_hex,
            mut halt_forever,
        } = self.runtime;
        let a = &mut self.asm;

        a.set_label(&mut putc)?;
        a.push(rax)?;
        a.mov(dx, COM1_LSR as u32)?;
        let mut wait_for_thr = a.create_label();
        a.set_label(&mut wait_for_thr)?;
        a.in_(al, dx)?;
        a.test(al, LSR_THR_EMPTY as u32)?;
        a.jz(wait_for_thr)?;
        a.pop(rax)?;
        a.mov(dx, COM1_DATA as u32)?;
        a.out(dx, al)?;
        a.ret()?;

        a.set_label(&mut puts)?; // also the loop head: iced allows one label per instruction
        let mut end_of_string = a.create_label();
        a.mov(al, byte_ptr(rsi))?;
        a.test(al, al)?;
        a.jz(end_of_string)?;
        a.call(putc)?;
        a.inc(rsi)?;
        a.jmp(puts)?;
        a.set_label(&mut end_of_string)?;
        a.ret()?;

        a.set_label(&mut put_hex)?;
        a.shl(ecx, 2)?; // ecx = bit position just above the top digit
        let mut next_digit = a.create_label();
        let mut decimal = a.create_label();
        a.set_label(&mut next_digit)?;
        a.sub(ecx, 4)?;
        a.mov(rax, rbx)?;
        a.shr(rax, cl)?;
        a.and(eax, 0xf)?;
        a.cmp(al, 10)?;
        a.jb(decimal)?;
        a.add(al, (b'a' - b'0' - 10) as i32)?;
        a.set_label(&mut decimal)?;
        a.add(al, b'0' as i32)?;
        a.call(putc)?;
        a.test(ecx, ecx)?;
        a.jnz(next_digit)?;
        a.ret()?;

        a.set_label(&mut halt_forever)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(halt_forever)?;
        Ok(())
    }
}

/// A PT_LOAD segment of 16-bit real-mode code at `base`, assembled with IP 0 relative to
/// CS = `base` >> 4: exactly how an AP starts after a SIPI with vector `base` >> 12.
/// `mem_size` lets the segment carry zero-filled data after the code.
pub fn real_mode_segment(
    base: u64,
    mem_size: u64,
    emit: impl FnOnce(&mut CodeAssembler) -> Result<()>,
) -> Result<Segment> {
    ensure!(
        base & 0xfff == 0 && base < 0x10_0000,
        "a SIPI target is a page below 1 MiB"
    );
    let mut asm = CodeAssembler::new(16)?;
    emit(&mut asm)?;
    let code = asm.assemble(0).context("assembling real-mode code")?;
    ensure!(
        code.len() as u64 <= mem_size,
        "real-mode code larger than its segment"
    );
    Ok(Segment::new(base, code).with_mem_size(mem_size))
}
