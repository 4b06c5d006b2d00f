//! The MC146818 CMOS real-time clock at ports 0x70 (index) / 0x71 (data): Linux reads
//! the wall-clock time from it at boot. Time registers follow the host's UTC clock; the
//! guest may switch between BCD and binary and between 12- and 24-hour mode through
//! status register B, as on real hardware. Writes to the time registers are ignored:
//! the guest cannot move the host's clock, and a per-VM offset is not worth the state.

use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;

const CMOS_SIZE: usize = 128;
const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
pub const CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz periodic rate; UIP (bit 7) is never set because our
/// registers are always consistent.
const STATUS_A_DEFAULT: u8 = 0x26;
/// 24-hour mode, BCD.
const STATUS_B_DEFAULT: u8 = 0x02;
const STATUS_B_24H: u8 = 0x02;
const STATUS_B_BINARY: u8 = 0x04;
/// Valid RAM and time (VRT).
const STATUS_D_VALID: u8 = 0x80;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 1 = Sunday, as the RTC counts.
    pub weekday: u8,
}

impl CivilTime {
    /// Converts seconds since the Unix epoch (days-from-civil inverse, proleptic
    /// Gregorian calendar).
    pub fn from_unix(seconds: u64) -> Self {
        let days = (seconds / 86_400) as i64;
        let rest = seconds % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: (rest / 3600) as u8,
            minute: (rest / 60 % 60) as u8,
            second: (rest % 60) as u8,
            // 1970-01-01 was a Thursday (weekday 5 when Sunday is 1).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }
}

fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

pub struct Rtc {
    index: u8,
    cmos: [u8; CMOS_SIZE],
    clock: fn() -> u64,
}

fn host_unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(host_unix_time)
    }
}

impl Rtc {
    pub fn with_clock(clock: fn() -> u64) -> Self {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[STATUS_A as usize] = STATUS_A_DEFAULT;
        cmos[STATUS_B as usize] = STATUS_B_DEFAULT;
        cmos[STATUS_D as usize] = STATUS_D_VALID;
        Self {
            index: 0,
            cmos,
            clock,
        }
    }

    fn encode(&self, value: u8) -> u8 {
        if self.cmos[STATUS_B as usize] & STATUS_B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.cmos[STATUS_B as usize] & STATUS_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | pm
    }

    fn register(&self, index: u8) -> u8 {
        let now = CivilTime::from_unix((self.clock)());
        match index {
            SECONDS => self.encode(now.second),
            MINUTES => self.encode(now.minute),
            HOURS => self.encode_hour(now.hour),
            WEEKDAY => self.encode(now.weekday),
            DAY_OF_MONTH => self.encode(now.day),
            MONTH => self.encode(now.month),
            YEAR => self.encode(now.year.rem_euclid(100) as u8),
            CENTURY => self.encode(now.year.div_euclid(100).clamp(0, 99) as u8),
            // Reading status C acknowledges interrupts; we raise none.
            STATUS_C => 0,
            i => self.cmos[usize::from(i) % CMOS_SIZE],
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            _ => self.register(self.index),
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port masks NMIs on real hardware; not ours to emulate.
            0 => self.index = value & 0x7f,
            _ => match self.index {
                SECONDS..=YEAR | CENTURY | STATUS_C | STATUS_D => {}
                i => self.cmos[usize::from(i)] = value,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-25 13:45:07 UTC, a Wednesday.
    fn fixed() -> u64 {
        1_795_614_307
    }

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut value = [0u8];
        rtc.read(1, &mut value);
        value[0]
    }

    #[test]
    fn civil_time_conversion() {
        assert_eq!(
            CivilTime::from_unix(0),
            CivilTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        // 2000-02-29 12:34:56 UTC, a Tuesday: leap day of a century leap year.
        let t = CivilTime::from_unix(951_827_696);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2000, 2, 29, 12, 34, 56, 3)
        );
        let t = CivilTime::from_unix(fixed());
        assert_eq!((t.year, t.month, t.day, t.weekday), (2026, 11, 25, 4));
    }

    #[test]
    fn reads_bcd_time_by_default() {
        let mut rtc = Rtc::with_clock(fixed);
        let t = CivilTime::from_unix(fixed());
        assert_eq!(read(&mut rtc, YEAR), 0x26);
        assert_eq!(read(&mut rtc, CENTURY), 0x20);
        assert_eq!(read(&mut rtc, MONTH), 0x11);
        assert_eq!(read(&mut rtc, DAY_OF_MONTH), 0x25);
        assert_eq!(read(&mut rtc, HOURS), to_bcd(t.hour));
        assert_eq!(read(&mut rtc, STATUS_A) & 0x80, 0, "UIP must be clear");
        assert_eq!(read(&mut rtc, STATUS_D), STATUS_D_VALID);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut rtc = Rtc::with_clock(fixed);
        let t = CivilTime::from_unix(fixed());
        rtc.write(0, &[STATUS_B]);
        rtc.write(1, &[STATUS_B_BINARY]);
        assert_eq!(read(&mut rtc, YEAR), 26);
        let hour = read(&mut rtc, HOURS);
        assert_eq!(
            hour & 0x7f,
            if t.hour.is_multiple_of(12) {
                12
            } else {
                t.hour % 12
            }
        );
        assert_eq!(hour & 0x80 != 0, t.hour >= 12);
    }

    #[test]
    fn cmos_ram_is_writable_but_the_clock_is_not() {
        let mut rtc = Rtc::with_clock(fixed);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
        rtc.write(0, &[YEAR]);
        rtc.write(1, &[0x99]);
        assert_eq!(read(&mut rtc, YEAR), 0x26);
        // The NMI-mask bit of the index port does not change the register selected.
        assert_eq!(read(&mut rtc, 0x80 | 0x40), 0xab);
    }
}
