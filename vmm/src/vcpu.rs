//! A vCPU thread: KVM_RUN in a loop, port I/O and MMIO exits dispatched to the buses.
//!
//! The exit path takes no VM-wide lock: the buses are immutable and shared, and each
//! device has its own mutex.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::Bus;
use crate::exit::{ExitSignal, VmExit};
use crate::pause::{self, VcpuGate};

/// What a read from an address no device claims returns: all ones, as on a PC bus
/// where nobody drives the data lines.
const UNCLAIMED_READ: u8 = 0xff;

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    /// Where this vCPU parks while the VM is paused.
    pub gate: Arc<VcpuGate>,
}

impl Vcpu {
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let exit = self.exit.clone();
        let cpu = self.id;
        // A bug in device emulation must end the VM with an error, not leave it hung
        // with one vCPU thread gone.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()));
        if outcome.is_err() {
            exit.request(VmExit::Internal {
                detail: format!("vCPU {cpu} thread panicked"),
            });
        }
    }

    fn run_loop(&mut self) {
        let id = self.id;
        tracing::debug!(cpu = id, "vCPU running");
        pause::register_current_vcpu(&mut self.fd);
        loop {
            self.gate.checkpoint(id, &mut self.fd, &self.exit);
            if self.exit.is_requested() {
                break;
            }
            if let Some(exit) = self.run_once() {
                self.exit.request(exit);
            }
            if self.exit.is_requested() {
                break;
            }
        }
        pause::unregister_current_vcpu();
        tracing::debug!(cpu = id, "vCPU stopped");
    }

    /// The registers that say where a crashed guest was and what it ran on: instruction
    /// and stack pointers, control registers (cr2 is the last page-fault address), and the
    /// descriptor tables a triple fault could not use.
    fn describe_state(&self) -> String {
        let (regs, sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => (regs, sregs),
            (Err(e), _) | (_, Err(e)) => return format!("registers unavailable: {e}"),
        };
        // KVM on AMD reinitialises the vCPU on a shutdown intercept (the VMCB is undefined
        // after one), so what it hands back is the reset state, not the crash's.
        if regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 {
            return "registers lost: KVM reset the vCPU on the shutdown (as it does on AMD)"
                .to_owned();
        }
        format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} \
             cr4={:#x} efer={:#x} idt={:#x}+{:#x} gdt={:#x}+{:#x}",
            regs.rip,
            regs.rsp,
            regs.rflags,
            sregs.cs.selector,
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.efer,
            sregs.idt.base,
            sregs.idt.limit,
            sregs.gdt.base,
            sregs.gdt.limit,
        )
    }

    /// Runs the guest until its next exit and handles it; returns how the VM ends if
    /// this exit ends it.
    fn run_once(&mut self) -> Option<VmExit> {
        let cpu = self.id;
        let kvm_error = |detail: String| Some(VmExit::KvmError { cpu, detail });
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    tracing::trace!(port, "read from unclaimed port");
                    data.fill(UNCLAIMED_READ);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.pio.write(u64::from(port), data) {
                    tracing::trace!(port, ?data, "write to unclaimed port");
                }
                None
            }
            Ok(VcpuExit::MmioRead(address, data)) => {
                if !self.mmio.read(address, data) {
                    tracing::debug!(cpu, address = format_args!("{address:#x}"), "read from unclaimed MMIO");
                    data.fill(UNCLAIMED_READ);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(address, data)) => {
                if !self.mmio.write(address, data) {
                    tracing::debug!(cpu, address = format_args!("{address:#x}"), "write to unclaimed MMIO");
                }
                None
            }
            Ok(VcpuExit::Shutdown) => Some(VmExit::TripleFault {
                cpu,
                state: self.describe_state(),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmExit::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(VmExit::Reset),
                other => kvm_error(format!("unexpected system event {other}")),
            },
            Ok(VcpuExit::FailEntry(reason, hw_cpu)) => kvm_error(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {hw_cpu}"
            )),
            Ok(VcpuExit::InternalError) => {
                let suberror = self.fd.get_kvm_run().__bindgen_anon_1;
                // SAFETY: KVM fills the `internal` member of the union for
                // KVM_EXIT_INTERNAL_ERROR, the exit we are handling.
                let internal = unsafe { suberror.internal };
                kvm_error(format!(
                    "KVM_EXIT_INTERNAL_ERROR (suberror {}): KVM could not emulate the guest",
                    internal.suberror
                ))
            }
            // A signal interrupted KVM_RUN; the loop re-checks whether to stop.
            Ok(VcpuExit::Intr) => None,
            // With the in-kernel LAPIC, KVM handles HLT itself; seeing it means the
            // irqchip is missing, which setup rules out.
            Ok(other) => kvm_error(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => kvm_error(format!("KVM_RUN failed: {e}")),
        }
    }
}
