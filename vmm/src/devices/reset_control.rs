//! The PC reset control register at port 0xcf9, which the FADT names as the ACPI reset
//! register: Linux's default `reboot` path writes 0x06 there.

use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitSignal, VmExit};

const RST_CPU: u8 = 1 << 2;

pub struct ResetControl {
    value: u8,
    exit: Arc<ExitSignal>,
}

impl ResetControl {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { value: 0, exit }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.value);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            self.value = value & !RST_CPU;
            if value & RST_CPU != 0 {
                self.exit.request(VmExit::Reset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rst_cpu_resets() {
        let exit = Arc::new(ExitSignal::default());
        let mut reg = ResetControl::new(exit.clone());
        reg.write(0, &[0x02]);
        assert!(!exit.is_requested());
        reg.write(0, &[0x06]);
        assert_eq!(exit.wait(), VmExit::Reset);
    }
}
