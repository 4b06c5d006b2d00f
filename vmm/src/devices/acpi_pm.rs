//! ACPI PM1a event and control registers: the fixed hardware through which the guest
//! powers off (SLP_TYP = S5 with SLP_EN in PM1 control).
//!
//! Layout from the FADT: status (2 bytes, write 1 to clear) and enable (2 bytes) at the
//! event block, control (2 bytes) right after it.

use std::sync::Arc;

use super::BusDevice;
use crate::arch::x86_64::acpi::SLP_TYP_S5;
use crate::exit::{ExitSignal, VmExit};

/// Length of the register block: PM1a_EVT (4 bytes) followed by PM1a_CNT (2 bytes).
pub const REGISTER_BLOCK_LEN: u64 = 6;
const STATUS: usize = 0;
const ENABLE: usize = 2;
const CONTROL: usize = 4;

const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;

pub struct AcpiPm {
    registers: [u8; REGISTER_BLOCK_LEN as usize],
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        let mut registers = [0; REGISTER_BLOCK_LEN as usize];
        // No SMI command port exists, so the platform is in ACPI mode from reset.
        registers[CONTROL..CONTROL + 2].copy_from_slice(&SCI_EN.to_le_bytes());
        Self { registers, exit }
    }

    fn control(&self) -> u16 {
        u16::from_le_bytes([self.registers[CONTROL], self.registers[CONTROL + 1]])
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| self.registers.get(o as usize))
                .copied()
                .unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let Some(index) = offset.checked_add(i as u64).map(|o| o as usize) else {
                continue;
            };
            match index {
                // Status bits are write-1-to-clear.
                i if (STATUS..ENABLE).contains(&i) => self.registers[i] &= !value,
                i if i < REGISTER_BLOCK_LEN as usize => self.registers[i] = value,
                _ => {}
            }
        }
        let control = self.control();
        if control & SLP_EN != 0 {
            let sleep_type = (control >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            // SLP_EN is a write-only trigger: it never reads back as set.
            let cleared = (control & !SLP_EN) | SCI_EN;
            self.registers[CONTROL..CONTROL + 2].copy_from_slice(&cleared.to_le_bytes());
            if sleep_type == SLP_TYP_S5 {
                self.exit.request(VmExit::PowerOff);
            } else {
                tracing::warn!(sleep_type, "guest asked for an unsupported sleep state");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (AcpiPm, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::default());
        (AcpiPm::new(exit.clone()), exit)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut pm, exit) = pm();
        let mut control = [0u8; 2];
        pm.read(CONTROL as u64, &mut control);
        assert_eq!(u16::from_le_bytes(control) & SCI_EN, SCI_EN);
        pm.write(CONTROL as u64, &(SLP_TYP_S5 << SLP_TYP_SHIFT).to_le_bytes());
        assert!(!exit.is_requested(), "SLP_TYP alone must not power off");
        pm.write(
            CONTROL as u64,
            &((SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes(),
        );
        assert_eq!(exit.wait(), VmExit::PowerOff);
    }

    #[test]
    fn byte_wide_writes_work_too() {
        let (mut pm, exit) = pm();
        let value = ((SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes();
        pm.write(CONTROL as u64, &value[..1]);
        pm.write(CONTROL as u64 + 1, &value[1..]);
        assert_eq!(exit.wait(), VmExit::PowerOff);
    }

    #[test]
    fn other_sleep_states_are_ignored_and_status_is_write_one_to_clear() {
        let (mut pm, exit) = pm();
        pm.write(
            CONTROL as u64,
            &((3 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes(),
        );
        assert!(!exit.is_requested());
        pm.registers[STATUS] = 0x11;
        pm.write(STATUS as u64, &[0x01]);
        assert_eq!(pm.registers[STATUS], 0x10);
        let mut beyond = [0u8; 4];
        pm.read(4, &mut beyond);
        assert_eq!(&beyond[2..], &[0xff, 0xff]);
    }
}
