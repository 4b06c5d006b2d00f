//! The i8042 keyboard controller, present only for its CPU reset line: writing 0xfe to
//! the command port is how Linux (`reboot=k`, and as a fallback) resets a PC.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// vm-superio's i8042 wants a trigger for its reset line; ours ends the VM.
pub struct ResetLine(pub Arc<ExitSignal>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExit::Reset);
        Ok(())
    }
}

/// Offset of the command/status port (0x64) from the data port (0x60).
pub const COMMAND_OFFSET: u64 = 4;

/// Spans ports 0x60..=0x64; 0x61 (speaker) is claimed earlier by KVM's in-kernel PIT.
pub struct I8042 {
    controller: I8042Device<ResetLine>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self {
            controller: I8042Device::new(ResetLine(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(self.controller.read(offset as u8));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            // Infallible: the reset trigger cannot fail.
            let _ = self.controller.write(offset as u8, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = Arc::new(ExitSignal::default());
        let mut i8042 = I8042::new(exit.clone());
        i8042.write(0, &[0xfe]);
        assert!(!exit.is_requested(), "data port writes must not reset");
        i8042.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(exit.wait(), VmExit::Reset);
    }
}
