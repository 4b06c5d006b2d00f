//! RFB key and pointer events to virtio-input reports.
//!
//! Keys: the keysym's key, with Shift pressed or released around it when the symbol needs
//! a Shift state the viewer does not hold ('>' typed without Shift down, as scripted
//! clients send it). Pointer: absolute positions scaled from framebuffer pixels to the
//! tablet's 0..=[`ABS_MAX`] axes, and button changes since the last event; RFB buttons 4
//! and 5 are the wheel.

use super::event::{
    InputRecord, ABS_MAX, ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, EV_ABS, EV_KEY, EV_REL,
    REL_WHEEL,
};
use super::keymap::{keystroke, KEY_LEFTSHIFT, KEY_RIGHTSHIFT};

const UP: u32 = 0;
const DOWN: u32 = 1;

/// RFB button mask bits and the buttons they are.
const BUTTONS: [(u8, u16); 3] = [(0, BTN_LEFT), (1, BTN_MIDDLE), (2, BTN_RIGHT)];
const WHEEL_UP: u8 = 1 << 3;
const WHEEL_DOWN: u8 = 1 << 4;

/// What the viewers hold down; one for all viewers, as they share one keyboard.
#[derive(Debug, Default)]
pub struct Translator {
    left_shift: bool,
    right_shift: bool,
    buttons: u8,
    position: Option<(u32, u32)>,
}

impl Translator {
    /// The report for a key going down or up; None for a keysym with no key.
    pub fn key(&mut self, down: bool, keysym: u32) -> Option<Vec<InputRecord>> {
        let Some(stroke) = keystroke(keysym) else {
            tracing::debug!(target: "bulkhead::input", "keysym {keysym:#x} has no key, ignored");
            return None;
        };
        match stroke.code {
            KEY_LEFTSHIFT => self.left_shift = down,
            KEY_RIGHTSHIFT => self.right_shift = down,
            _ => {}
        }
        let key = |value| InputRecord::new(EV_KEY, stroke.code, value);
        let held = self.left_shift || self.right_shift;
        let report = match stroke.shift {
            // On the way down, with Shift changed for the moment of the press only: the
            // guest reads the character when the key goes down.
            Some(needed) if down && needed != held => {
                let shifts: Vec<u16> = if needed {
                    vec![KEY_LEFTSHIFT]
                } else {
                    [
                        (self.left_shift, KEY_LEFTSHIFT),
                        (self.right_shift, KEY_RIGHTSHIFT),
                    ]
                    .into_iter()
                    .filter_map(|(on, code)| on.then_some(code))
                    .collect()
                };
                let (change, restore) = if needed { (DOWN, UP) } else { (UP, DOWN) };
                let mut events: Vec<_> = shifts
                    .iter()
                    .map(|&code| InputRecord::new(EV_KEY, code, change))
                    .collect();
                events.push(key(DOWN));
                events.extend(
                    shifts
                        .iter()
                        .map(|&code| InputRecord::new(EV_KEY, code, restore)),
                );
                events
            }
            _ => vec![key(if down { DOWN } else { UP })],
        };
        Some(report)
    }

    /// The report for a pointer event at (`x`, `y`) on a `width` x `height` screen; None
    /// when nothing changed.
    pub fn pointer(
        &mut self,
        buttons: u8,
        x: u16,
        y: u16,
        width: u32,
        height: u32,
    ) -> Option<Vec<InputRecord>> {
        let mut events = Vec::new();
        let position = (scale(x, width), scale(y, height));
        if self.position != Some(position) {
            events.push(InputRecord::new(EV_ABS, ABS_X, position.0));
            events.push(InputRecord::new(EV_ABS, ABS_Y, position.1));
            self.position = Some(position);
        }
        let changed = buttons ^ self.buttons;
        for (bit, code) in BUTTONS {
            if changed & (1 << bit) != 0 {
                let value = if buttons & (1 << bit) != 0 { DOWN } else { UP };
                events.push(InputRecord::new(EV_KEY, code, value));
            }
        }
        // A wheel notch is a press; its release says nothing.
        let pressed = changed & buttons;
        if pressed & WHEEL_UP != 0 {
            events.push(InputRecord::new(EV_REL, REL_WHEEL, 1));
        }
        if pressed & WHEEL_DOWN != 0 {
            events.push(InputRecord::new(EV_REL, REL_WHEEL, u32::MAX));
        }
        self.buttons = buttons;
        (!events.is_empty()).then_some(events)
    }
}

/// A pixel coordinate on an axis of `size` pixels to 0..=ABS_MAX, the last pixel at
/// ABS_MAX; positions beyond the screen are clamped to its edge.
fn scale(pixel: u16, size: u32) -> u32 {
    let last = size.saturating_sub(1);
    if last == 0 {
        return 0;
    }
    let pixel = u32::from(pixel).min(last);
    // The quotient is at most ABS_MAX, since pixel <= last.
    (u64::from(pixel) * u64::from(ABS_MAX) / u64::from(last)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(report: &[InputRecord]) -> Vec<(u16, u32)> {
        report.iter().map(|e| (e.code, e.value)).collect()
    }

    #[test]
    fn shift_is_pressed_around_shifted_symbols() {
        let mut t = Translator::default();
        assert_eq!(keys(&t.key(true, 'a' as u32).unwrap()), [(30, 1)]);
        assert_eq!(keys(&t.key(false, 'a' as u32).unwrap()), [(30, 0)]);
        assert_eq!(
            keys(&t.key(true, '>' as u32).unwrap()),
            [(KEY_LEFTSHIFT, 1), (52, 1), (KEY_LEFTSHIFT, 0)]
        );
        assert_eq!(keys(&t.key(false, '>' as u32).unwrap()), [(52, 0)]);
        // A viewer that holds Shift itself gets no extra presses...
        t.key(true, 0xffe2);
        assert_eq!(keys(&t.key(true, 'A' as u32).unwrap()), [(30, 1)]);
        // ...and Shift let go for a symbol typed without it.
        assert_eq!(
            keys(&t.key(true, '1' as u32).unwrap()),
            [(KEY_RIGHTSHIFT, 0), (2, 1), (KEY_RIGHTSHIFT, 1)]
        );
        assert!(t.key(true, 0x20ac).is_none());
    }

    #[test]
    fn pointer_scales_and_reports_changes() {
        let mut t = Translator::default();
        let report = t.pointer(0, 1023, 0, 1024, 768).unwrap();
        assert_eq!(keys(&report), [(ABS_X, ABS_MAX), (ABS_Y, 0)]);
        assert!(t.pointer(0, 1023, 0, 1024, 768).is_none());
        let report = t.pointer(1, 1023, 0, 1024, 768).unwrap();
        assert_eq!(keys(&report), [(BTN_LEFT, 1)]);
        let report = t.pointer(WHEEL_DOWN, 9999, 767, 1024, 768).unwrap();
        assert_eq!(
            keys(&report),
            [
                (ABS_X, ABS_MAX),
                (ABS_Y, ABS_MAX),
                (BTN_LEFT, 0),
                (REL_WHEEL, u32::MAX)
            ]
        );
        assert_eq!(scale(0, 0), 0);
        assert_eq!(scale(5, 1), 0);
    }
}
