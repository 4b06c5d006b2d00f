//! ACPI PM1a event and control registers: the fixed hardware through which the guest
//! powers off (SLP_TYP = S5 with SLP_EN in PM1 control).
//!
//! It also carries the fixed-feature power button (`bulkhead stop`): pressing it sets
//! PWRBTN_STS and, when the guest enabled PWRBTN_EN, raises the SCI.
//!
//! Layout from the FADT: status (2 bytes, write 1 to clear) and enable (2 bytes) at the
//! event block, control (2 bytes) right after it.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::arch::x86_64::acpi::SLP_TYP_S5;
use crate::exit::{ExitSignal, VmExit};

/// Length of the register block: PM1a_EVT (4 bytes) followed by PM1a_CNT (2 bytes).
pub const REGISTER_BLOCK_LEN: u64 = 6;
const STATUS: usize = 0;
const ENABLE: usize = 2;
const CONTROL: usize = 4;

const SCI_EN: u16 = 1;
/// PWRBTN_STS in PM1 status and PWRBTN_EN in PM1 enable.
pub const PWRBTN: u16 = 1 << 8;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;

pub struct AcpiPm {
    registers: [u8; REGISTER_BLOCK_LEN as usize],
    exit: Arc<ExitSignal>,
    /// Raises the SCI (an irqfd on its GSI); `None` in unit tests.
    sci: Option<EventFd>,
}

impl AcpiPm {
    pub fn new(exit: Arc<ExitSignal>, sci: Option<EventFd>) -> Self {
        let mut registers = [0; REGISTER_BLOCK_LEN as usize];
        // No SMI command port exists, so the platform is in ACPI mode from reset.
        registers[CONTROL..CONTROL + 2].copy_from_slice(&SCI_EN.to_le_bytes());
        Self {
            registers,
            exit,
            sci,
        }
    }

    fn word(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.registers[at], self.registers[at + 1]])
    }

    fn control(&self) -> u16 {
        self.word(CONTROL)
    }

    /// Presses the power button: the guest's OSPM sees PWRBTN_STS (by SCI when it
    /// enabled the event, or by polling) and decides how to shut down.
    pub fn press_power_button(&mut self) {
        let status = self.word(STATUS) | PWRBTN;
        self.registers[STATUS..STATUS + 2].copy_from_slice(&status.to_le_bytes());
        self.update_sci();
    }

    /// Pulses the SCI while an enabled event is pending. The line is level-triggered in
    /// the MADT; a pulse is enough because the guest's handler clears the status bit
    /// before it acknowledges the interrupt.
    fn update_sci(&self) {
        let pending = self.word(STATUS) & self.word(ENABLE);
        if pending != 0 && self.control() & SCI_EN != 0 {
            if let Some(sci) = &self.sci {
                if let Err(e) = sci.write(1) {
                    tracing::warn!("cannot raise the SCI: {e}");
                }
            }
        }
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
        // Enabling an event that is already pending raises it, as on real hardware.
        let end = offset.saturating_add(data.len() as u64);
        if offset < CONTROL as u64 && end > ENABLE as u64 {
            self.update_sci();
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
        (AcpiPm::new(exit.clone(), None), exit)
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
    fn power_button_sets_its_status_and_raises_the_enabled_sci() {
        let exit = Arc::new(ExitSignal::default());
        let sci = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut pm = AcpiPm::new(exit, Some(sci.try_clone().unwrap()));
        pm.press_power_button();
        let mut status = [0u8; 2];
        pm.read(STATUS as u64, &mut status);
        assert_eq!(u16::from_le_bytes(status) & PWRBTN, PWRBTN);
        assert!(sci.read().is_err(), "no SCI while the event is disabled");
        pm.write(ENABLE as u64, &PWRBTN.to_le_bytes());
        assert_eq!(
            sci.read().unwrap(),
            1,
            "enabling a pending event raises the SCI"
        );
        pm.write(STATUS as u64, &PWRBTN.to_le_bytes());
        pm.read(STATUS as u64, &mut status);
        assert_eq!(u16::from_le_bytes(status) & PWRBTN, 0);
        pm.press_power_button();
        assert_eq!(sci.read().unwrap(), 1);
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
