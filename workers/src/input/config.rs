//! The virtio-input config space (virtio 1.2, 5.8.4): the driver writes `select` and
//! `subsel`, then reads `size` and the answer from the union that follows.

use super::event::{ABS_MAX, ABS_X, ABS_Y, EV_ABS, EV_KEY, EV_REL, REL_WHEEL};
use super::keymap::advertised_keys;

/// select (1), subsel (1), size (1), reserved (5), the 128-byte union.
pub const CONFIG_SIZE: usize = 136;
const UNION_OFFSET: usize = 8;
const UNION_SIZE: usize = 128;

const CFG_ID_NAME: u8 = 0x01;
const CFG_ID_SERIAL: u8 = 0x02;
const CFG_ID_DEVIDS: u8 = 0x03;
const CFG_EV_BITS: u8 = 0x11;
const CFG_ABS_INFO: u8 = 0x12;

pub const DEVICE_NAME: &str = "bulkhead VNC keyboard and tablet";
const BUS_VIRTUAL: u16 = 0x06;

#[derive(Debug, Default)]
pub struct InputConfigSpace {
    select: u8,
    subsel: u8,
}

impl InputConfigSpace {
    /// The bytes at `offset..offset + size`, clipped to the config space.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = [0u8; CONFIG_SIZE];
        config[0] = self.select;
        config[1] = self.subsel;
        let answer = self.answer();
        // At most UNION_SIZE bytes by construction of `answer`.
        let len = answer.len().min(UNION_SIZE);
        config[2] = len as u8;
        config[UNION_OFFSET..UNION_OFFSET + len].copy_from_slice(&answer[..len]);
        let start = (offset as usize).min(CONFIG_SIZE);
        let end = start.saturating_add(size as usize).min(CONFIG_SIZE);
        config[start..end].to_vec()
    }

    /// Only `select` and `subsel` are writable; writes elsewhere are ignored.
    pub fn write(&mut self, offset: u32, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            match (offset as usize).checked_add(i) {
                Some(0) => self.select = byte,
                Some(1) => self.subsel = byte,
                _ => {}
            }
        }
    }

    fn answer(&self) -> Vec<u8> {
        match (self.select, self.subsel) {
            (CFG_ID_NAME, 0) => DEVICE_NAME.as_bytes().to_vec(),
            (CFG_ID_SERIAL, 0) => b"bulkhead-input".to_vec(),
            (CFG_ID_DEVIDS, 0) => [BUS_VIRTUAL, 0, 0, 1]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            (CFG_EV_BITS, sub) if u16::from(sub) == EV_KEY => bitmap(advertised_keys()),
            (CFG_EV_BITS, sub) if u16::from(sub) == EV_REL => bitmap([REL_WHEEL]),
            (CFG_EV_BITS, sub) if u16::from(sub) == EV_ABS => bitmap([ABS_X, ABS_Y]),
            (CFG_ABS_INFO, sub) if [ABS_X, ABS_Y].contains(&u16::from(sub)) => {
                // min, max, fuzz, flat, res
                [0, ABS_MAX, 0, 0, 0]
                    .iter()
                    .flat_map(|v: &u32| v.to_le_bytes())
                    .collect()
            }
            _ => Vec::new(),
        }
    }
}

/// A bitmap with the bits `codes` set, as long as its highest set byte.
fn bitmap(codes: impl IntoIterator<Item = u16>) -> Vec<u8> {
    let mut bits = vec![0u8; UNION_SIZE];
    for code in codes {
        if let Some(byte) = bits.get_mut(usize::from(code / 8)) {
            *byte |= 1 << (code % 8);
        }
    }
    let len = bits
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last + 1);
    bits.truncate(len);
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::event::BTN_LEFT;

    fn select(space: &mut InputConfigSpace, select: u8, subsel: u8) -> Vec<u8> {
        space.write(0, &[select, subsel]);
        let size = space.read(2, 1)[0] as usize;
        space.read(UNION_OFFSET as u32, size as u32)
    }

    #[test]
    fn answers_what_the_driver_asks() {
        let mut space = InputConfigSpace::default();
        assert_eq!(select(&mut space, CFG_ID_NAME, 0), DEVICE_NAME.as_bytes());
        let keys = select(&mut space, CFG_EV_BITS, EV_KEY as u8);
        assert_eq!(keys.len(), usize::from(BTN_LEFT + 2) / 8 + 1);
        assert!(keys[30 / 8] & (1 << (30 % 8)) != 0, "KEY_A");
        assert!(keys[usize::from(BTN_LEFT / 8)] & (1 << (BTN_LEFT % 8)) != 0);
        assert_eq!(select(&mut space, CFG_EV_BITS, EV_ABS as u8), [0b11]);
        let abs = select(&mut space, CFG_ABS_INFO, ABS_Y as u8);
        assert_eq!(abs[4..8], ABS_MAX.to_le_bytes());
        assert!(select(&mut space, CFG_EV_BITS, 0x11).is_empty(), "no LEDs");
        assert!(select(&mut space, 0x7f, 0).is_empty());
        assert_eq!(space.read(0, 2), [0x7f, 0]);
        // Reads past the end are clipped, writes there ignored.
        assert!(space.read(200, 4).is_empty());
        space.write(u32::MAX, &[1, 2]);
        assert_eq!(space.read(0, 1000).len(), CONFIG_SIZE);
    }
}
