//! COM1: a 16550A-compatible UART (vm-superio) whose interrupt is an irqfd on IRQ 4 and
//! whose output is the VMM's stdout.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// Raises the UART's interrupt line by signalling an eventfd that KVM turned into an
/// irqfd, so the interrupt never goes through this process's vCPU threads.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type ConsoleOutput = Box<dyn Write + Send>;

pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOutput>,
}

impl SerialPort {
    pub fn new(irq: EventFd, output: ConsoleOutput) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), output),
        }
    }

    /// Queues console input for the guest; returns how many bytes fitted in the FIFO.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e}");
                0
            }
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for byte in data.iter_mut() {
            *byte = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for &byte in data {
            if let Err(e) = self.uart.write(offset as u8, byte) {
                // The only failures are the console output or the irqfd: the guest
                // cannot fix either, so report and carry on.
                tracing::warn!("serial write failed: {e}");
            }
        }
    }
}
