//! X11 keysyms, which RFB key events carry, to Linux evdev key codes on a US layout.
//!
//! A viewer sends the symbol a key produced ('A', '>') rather than the key itself, so a
//! symbol also says whether the guest must see Shift held to produce it; the translator
//! presses or releases Shift around such keys.

use super::event::{BTN_LEFT, BTN_MIDDLE, BTN_RIGHT};

pub const KEY_LEFTSHIFT: u16 = 42;
pub const KEY_RIGHTSHIFT: u16 = 54;

/// How a keysym is typed: the key, and whether Shift must be down (None: either way, as
/// for Return or the modifiers themselves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keystroke {
    pub code: u16,
    pub shift: Option<bool>,
}

/// The unshifted and shifted symbols of the keys that type characters, by key code.
const PRINTABLE: &[(u16, u8, u8)] = &[
    (2, b'1', b'!'),
    (3, b'2', b'@'),
    (4, b'3', b'#'),
    (5, b'4', b'$'),
    (6, b'5', b'%'),
    (7, b'6', b'^'),
    (8, b'7', b'&'),
    (9, b'8', b'*'),
    (10, b'9', b'('),
    (11, b'0', b')'),
    (12, b'-', b'_'),
    (13, b'=', b'+'),
    (16, b'q', b'Q'),
    (17, b'w', b'W'),
    (18, b'e', b'E'),
    (19, b'r', b'R'),
    (20, b't', b'T'),
    (21, b'y', b'Y'),
    (22, b'u', b'U'),
    (23, b'i', b'I'),
    (24, b'o', b'O'),
    (25, b'p', b'P'),
    (26, b'[', b'{'),
    (27, b']', b'}'),
    (30, b'a', b'A'),
    (31, b's', b'S'),
    (32, b'd', b'D'),
    (33, b'f', b'F'),
    (34, b'g', b'G'),
    (35, b'h', b'H'),
    (36, b'j', b'J'),
    (37, b'k', b'K'),
    (38, b'l', b'L'),
    (39, b';', b':'),
    (40, b'\'', b'"'),
    (41, b'`', b'~'),
    (43, b'\\', b'|'),
    (44, b'z', b'Z'),
    (45, b'x', b'X'),
    (46, b'c', b'C'),
    (47, b'v', b'V'),
    (48, b'b', b'B'),
    (49, b'n', b'N'),
    (50, b'm', b'M'),
    (51, b',', b'<'),
    (52, b'.', b'>'),
    (53, b'/', b'?'),
];

/// Keysyms of the keys that type no character, with their key codes.
const SPECIAL: &[(u32, u16)] = &[
    (0x20, 57),    // space
    (0xff08, 14),  // BackSpace
    (0xff09, 15),  // Tab
    (0xff0d, 28),  // Return
    (0xff1b, 1),   // Escape
    (0xffff, 111), // Delete
    (0xff50, 102), // Home
    (0xff51, 105), // Left
    (0xff52, 103), // Up
    (0xff53, 106), // Right
    (0xff54, 108), // Down
    (0xff55, 104), // Page_Up
    (0xff56, 109), // Page_Down
    (0xff57, 107), // End
    (0xff63, 110), // Insert
    (0xff8d, 96),  // KP_Enter
    (0xffe1, KEY_LEFTSHIFT),
    (0xffe2, KEY_RIGHTSHIFT),
    (0xffe3, 29),  // Control_L
    (0xffe4, 97),  // Control_R
    (0xffe5, 58),  // Caps_Lock
    (0xffe7, 125), // Meta_L
    (0xffe8, 126), // Meta_R
    (0xffe9, 56),  // Alt_L
    (0xffea, 100), // Alt_R
    (0xffeb, 125), // Super_L
    (0xffec, 126), // Super_R
    (0xff7f, 69),  // Num_Lock
    (0xff14, 70),  // Scroll_Lock
];

/// F1..F10 are 59..68, F11 and F12 87 and 88.
fn function_key(keysym: u32) -> Option<u16> {
    match keysym {
        0xffbe..=0xffc7 => Some(59 + (keysym - 0xffbe) as u16),
        0xffc8 => Some(87),
        0xffc9 => Some(88),
        _ => None,
    }
}

/// The key that types `keysym`, if a US keyboard has one.
pub fn keystroke(keysym: u32) -> Option<Keystroke> {
    if let Some(&(_, code)) = SPECIAL.iter().find(|(sym, _)| *sym == keysym) {
        return Some(Keystroke { code, shift: None });
    }
    if let Some(code) = function_key(keysym) {
        return Some(Keystroke { code, shift: None });
    }
    // ISO_Left_Tab: what Shift+Tab sends.
    if keysym == 0xfe20 {
        return Some(Keystroke {
            code: 15,
            shift: Some(true),
        });
    }
    let byte = u8::try_from(keysym).ok()?;
    PRINTABLE.iter().find_map(|&(code, plain, shifted)| {
        if byte == plain {
            Some(Keystroke {
                code,
                shift: Some(false),
            })
        } else if byte == shifted {
            Some(Keystroke {
                code,
                shift: Some(true),
            })
        } else {
            None
        }
    })
}

/// Every key code the device reports: the keyboard's keys and the tablet's buttons.
pub fn advertised_keys() -> impl Iterator<Item = u16> {
    PRINTABLE
        .iter()
        .map(|&(code, _, _)| code)
        .chain(SPECIAL.iter().map(|&(_, code)| code))
        .chain(59..=68)
        .chain([87, 88, BTN_LEFT, BTN_RIGHT, BTN_MIDDLE])
}

pub fn is_advertised_key(code: u16) -> bool {
    advertised_keys().any(|key| key == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_map_to_keys_and_shift() {
        let typed = |c: char| keystroke(c as u32).unwrap();
        assert_eq!(
            typed('a'),
            Keystroke {
                code: 30,
                shift: Some(false)
            }
        );
        assert_eq!(
            typed('A'),
            Keystroke {
                code: 30,
                shift: Some(true)
            }
        );
        assert_eq!(
            typed('>'),
            Keystroke {
                code: 52,
                shift: Some(true)
            }
        );
        assert_eq!(
            typed('/'),
            Keystroke {
                code: 53,
                shift: Some(false)
            }
        );
        assert_eq!(
            typed('-'),
            Keystroke {
                code: 12,
                shift: Some(false)
            }
        );
        assert_eq!(
            typed('$'),
            Keystroke {
                code: 5,
                shift: Some(true)
            }
        );
        assert_eq!(
            typed(' '),
            Keystroke {
                code: 57,
                shift: None
            }
        );
        assert_eq!(keystroke(0xff0d).unwrap().code, 28);
        assert_eq!(keystroke(0xffbe).unwrap().code, 59);
        assert_eq!(keystroke(0xffc9).unwrap().code, 88);
        assert_eq!(keystroke(0x20ac), None, "the euro sign has no US key");
        assert_eq!(keystroke(0x0100_0041), None);
        for c in ' '..='~' {
            assert!(keystroke(c as u32).is_some(), "{c:?} has no key");
        }
    }

    #[test]
    fn every_key_typed_is_advertised() {
        for sym in (0x20..0x7f).chain(0xff00..=0xffff) {
            if let Some(stroke) = keystroke(sym) {
                assert!(is_advertised_key(stroke.code), "{sym:#x}");
            }
        }
        assert!(is_advertised_key(BTN_LEFT));
        assert!(!is_advertised_key(0));
    }
}
