//! The ACPI power-management timer: a free-running 24-bit counter at 3.579545 MHz.
//!
//! Linux uses it as a reference when it calibrates the LAPIC timer and the TSC (far more
//! robust than counting PIT interrupts on a slow or nested host) and as a fallback
//! clocksource.

use std::time::Instant;

use super::BusDevice;

pub const FREQUENCY_HZ: u128 = 3_579_545;
pub const REGISTER_LEN: u64 = 4;
const COUNTER_MASK: u32 = 0x00ff_ffff;

pub struct AcpiPmTimer {
    start: Instant,
}

impl Default for AcpiPmTimer {
    fn default() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl AcpiPmTimer {
    fn counter(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * FREQUENCY_HZ / 1_000_000_000;
        (ticks as u32) & COUNTER_MASK
    }
}

impl BusDevice for AcpiPmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.counter().to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| value.get(o as usize))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// The counter is read-only.
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_at_the_acpi_rate() {
        let mut timer = AcpiPmTimer::default();
        let mut first = [0u8; 4];
        timer.read(0, &mut first);
        std::thread::sleep(Duration::from_millis(20));
        let mut second = [0u8; 4];
        timer.read(0, &mut second);
        let elapsed =
            u32::from_le_bytes(second).wrapping_sub(u32::from_le_bytes(first)) & COUNTER_MASK;
        // 20 ms is 71591 ticks; allow for a slow, busy test machine.
        assert!((71_000..3_579_545).contains(&elapsed), "{elapsed} ticks");
        assert_eq!(second[3], 0, "the counter is 24 bits wide");
    }
}
