//! SDL key codes as the X11 keysyms RFB key events carry. As RFB wants, a key that types
//! a character is sent as the symbol it types in the US layout with the modifiers held
//! (`A` with Shift, `a` without), Shift itself as a key of its own: the display worker
//! presses or releases Shift around a symbol whose Shift state differs from what it was
//! told is held.

use sdl2::keyboard::{Keycode, Mod};

/// The US layout's shifted symbols, by unshifted one.
const SHIFTED: [(u8, u8); 21] = [
    (b'1', b'!'),
    (b'2', b'@'),
    (b'3', b'#'),
    (b'4', b'$'),
    (b'5', b'%'),
    (b'6', b'^'),
    (b'7', b'&'),
    (b'8', b'*'),
    (b'9', b'('),
    (b'0', b')'),
    (b'-', b'_'),
    (b'=', b'+'),
    (b'[', b'{'),
    (b']', b'}'),
    (b'\\', b'|'),
    (b';', b':'),
    (b'\'', b'"'),
    (b'`', b'~'),
    (b',', b'<'),
    (b'.', b'>'),
    (b'/', b'?'),
];

/// The keysym for `key` with modifiers `keymod`, or `None` for keys the guest's keyboard
/// has no use for.
pub fn keysym(key: Keycode, keymod: Mod) -> Option<u32> {
    let code = key.into_i32();
    // Printable ASCII: SDL's key codes and Latin-1 keysyms are the same numbers.
    if let Ok(byte @ 0x20..=0x7e) = u8::try_from(code) {
        let shift = keymod.intersects(Mod::LSHIFTMOD | Mod::RSHIFTMOD);
        let caps = keymod.contains(Mod::CAPSMOD);
        let symbol = if byte.is_ascii_lowercase() {
            if shift != caps {
                byte.to_ascii_uppercase()
            } else {
                byte
            }
        } else if shift {
            SHIFTED
                .iter()
                .find_map(|&(plain, shifted)| (plain == byte).then_some(shifted))
                .unwrap_or(byte)
        } else {
            byte
        };
        return Some(u32::from(symbol));
    }
    let sym = match key {
        Keycode::RETURN | Keycode::RETURN2 => 0xff0d,
        Keycode::KP_ENTER => 0xff8d,
        Keycode::BACKSPACE => 0xff08,
        Keycode::TAB => 0xff09,
        Keycode::ESCAPE => 0xff1b,
        Keycode::DELETE => 0xffff,
        Keycode::INSERT => 0xff63,
        Keycode::HOME => 0xff50,
        Keycode::LEFT => 0xff51,
        Keycode::UP => 0xff52,
        Keycode::RIGHT => 0xff53,
        Keycode::DOWN => 0xff54,
        Keycode::PAGEUP => 0xff55,
        Keycode::PAGEDOWN => 0xff56,
        Keycode::END => 0xff57,
        Keycode::PRINTSCREEN => 0xff61,
        Keycode::SCROLLLOCK => 0xff14,
        Keycode::PAUSE => 0xff13,
        Keycode::MENU | Keycode::APPLICATION => 0xff67,
        Keycode::NUMLOCKCLEAR => 0xff7f,
        Keycode::CAPSLOCK => 0xffe5,
        Keycode::LSHIFT => 0xffe1,
        Keycode::RSHIFT => 0xffe2,
        Keycode::LCTRL => 0xffe3,
        Keycode::RCTRL => 0xffe4,
        Keycode::LALT => 0xffe9,
        Keycode::RALT => 0xffea,
        Keycode::LGUI => 0xffeb,
        Keycode::RGUI => 0xffec,
        Keycode::KP_0 => 0xffb0,
        Keycode::KP_1 => 0xffb1,
        Keycode::KP_2 => 0xffb2,
        Keycode::KP_3 => 0xffb3,
        Keycode::KP_4 => 0xffb4,
        Keycode::KP_5 => 0xffb5,
        Keycode::KP_6 => 0xffb6,
        Keycode::KP_7 => 0xffb7,
        Keycode::KP_8 => 0xffb8,
        Keycode::KP_9 => 0xffb9,
        Keycode::KP_PERIOD => 0xffae,
        Keycode::KP_DIVIDE => 0xffaf,
        Keycode::KP_MULTIPLY => 0xffaa,
        Keycode::KP_MINUS => 0xffad,
        Keycode::KP_PLUS => 0xffab,
        _ => return function_key(code),
    };
    Some(sym)
}

/// The key that types `c` with Shift held in the US layout (`a` for `A`, `1` for `!`), or
/// `None` when `c` needs no Shift.
pub fn unshifted(c: char) -> Option<char> {
    let byte = u8::try_from(c).ok()?;
    if byte.is_ascii_uppercase() {
        return Some(char::from(byte.to_ascii_lowercase()));
    }
    SHIFTED
        .iter()
        .find_map(|&(plain, shifted)| (shifted == byte).then_some(char::from(plain)))
}

/// F1..F12: consecutive in SDL and in X11.
fn function_key(code: i32) -> Option<u32> {
    let f1 = Keycode::F1.into_i32();
    (f1..=Keycode::F12.into_i32())
        .contains(&code)
        .then(|| 0xffbe + (code - f1) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_x11_keysyms() {
        let none = Mod::NOMOD;
        assert_eq!(keysym(Keycode::A, none), Some(0x61));
        assert_eq!(keysym(Keycode::A, Mod::LSHIFTMOD), Some(0x41));
        assert_eq!(keysym(Keycode::A, Mod::CAPSMOD), Some(0x41));
        assert_eq!(
            keysym(Keycode::A, Mod::CAPSMOD | Mod::RSHIFTMOD),
            Some(0x61)
        );
        assert_eq!(keysym(Keycode::SPACE, Mod::LSHIFTMOD), Some(0x20));
        assert_eq!(keysym(Keycode::NUM_1, none), Some(0x31));
        assert_eq!(keysym(Keycode::NUM_1, Mod::LSHIFTMOD), Some(0x21));
        assert_eq!(keysym(Keycode::PERIOD, Mod::RSHIFTMOD), Some(0x3e));
        assert_eq!(keysym(Keycode::NUM_1, Mod::CAPSMOD), Some(0x31));
        assert_eq!(keysym(Keycode::RETURN, none), Some(0xff0d));
        assert_eq!(keysym(Keycode::LSHIFT, Mod::LSHIFTMOD), Some(0xffe1));
        assert_eq!(keysym(Keycode::F1, none), Some(0xffbe));
        assert_eq!(keysym(Keycode::F12, none), Some(0xffc9));
        assert_eq!(keysym(Keycode::VOLUMEUP, none), None);
        assert_eq!(unshifted('B'), Some('b'));
        assert_eq!(unshifted('>'), Some('.'));
        assert_eq!(unshifted('b'), None);
    }
}
