//! A 128-byte EDID 1.4 base block that advertises exactly one mode, the configured one,
//! as the preferred detailed timing (what Linux's DRM uses to pick the console mode).

/// Largest dimension a detailed timing descriptor can state (12 bits).
pub const MAX_EDID_DIMENSION: u32 = 4095;

const H_BLANK: u32 = 160;
const V_BLANK: u32 = 30;
const REFRESH_HZ: u32 = 60;

/// The EDID block for a `width` x `height` mode at 60 Hz; dimensions are clamped to what
/// the format can express.
pub fn edid_for_mode(width: u32, height: u32) -> [u8; 128] {
    let w = width.clamp(1, MAX_EDID_DIMENSION);
    let h = height.clamp(1, MAX_EDID_DIMENSION);
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "BHD": three 5-bit letters, big-endian.
    let id =
        ((u16::from(b'B' - b'@')) << 10) | ((u16::from(b'H' - b'@')) << 5) | u16::from(b'D' - b'@');
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes()); // product code
    e[16] = 1; // week
    e[17] = 36; // year: 1990 + 36
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xa5; // digital input, 8 bits per colour, DisplayPort
                  // Physical size in cm: about 96 dpi.
    e[21] = (w * 254 / 9600).clamp(1, 255) as u8;
    e[22] = (h * 254 / 9600).clamp(1, 255) as u8;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // RGB 4:4:4, preferred timing is native
                  // Chromaticity of sRGB.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // No established timings; standard timings unused (0x01 0x01).
    for slot in e[38..54].chunks_mut(2) {
        slot.copy_from_slice(&[0x01, 0x01]);
    }
    e[54..72].copy_from_slice(&detailed_timing(w, h));
    e[72..90].copy_from_slice(&text_descriptor(0xfc, b"bulkhead"));
    e[90..108].copy_from_slice(&range_limits());
    e[108..126].copy_from_slice(&text_descriptor(0xfe, b"virtio-gpu"));
    e[126] = 0; // no extensions
    let sum = e[..127].iter().fold(0u8, |s, &b| s.wrapping_add(b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

fn detailed_timing(w: u32, h: u32) -> [u8; 18] {
    let clock_10khz = ((w + H_BLANK) * (h + V_BLANK) * REFRESH_HZ / 10_000).clamp(1, 0xffff);
    let (h_sync_offset, h_sync_width, v_sync_offset, v_sync_width) = (48u32, 32u32, 3u32, 5u32);
    let width_mm = w * 254 / 960;
    let height_mm = h * 254 / 960;
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&(clock_10khz as u16).to_le_bytes());
    d[2] = w as u8;
    d[3] = H_BLANK as u8;
    d[4] = (((w >> 8) & 0xf) << 4) as u8 | ((H_BLANK >> 8) & 0xf) as u8;
    d[5] = h as u8;
    d[6] = V_BLANK as u8;
    d[7] = (((h >> 8) & 0xf) << 4) as u8 | ((V_BLANK >> 8) & 0xf) as u8;
    d[8] = h_sync_offset as u8;
    d[9] = h_sync_width as u8;
    d[10] = ((v_sync_offset & 0xf) << 4) as u8 | (v_sync_width & 0xf) as u8;
    d[11] = 0;
    d[12] = width_mm as u8;
    d[13] = height_mm as u8;
    d[14] = ((((width_mm >> 8) & 0xf) << 4) | ((height_mm >> 8) & 0xf)) as u8;
    d[17] = 0x1e; // digital separate sync, both polarities positive
    d
}

fn text_descriptor(tag: u8, text: &[u8]) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    let mut body = [b' '; 13];
    let n = text.len().min(12);
    body[..n].copy_from_slice(&text[..n]);
    body[n] = b'\n';
    d[5..18].copy_from_slice(&body);
    d
}

fn range_limits() -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = 0xfd;
    // 50-75 Hz vertical, 30-160 kHz horizontal, 600 MHz pixel clock, no extra timing info.
    d[5..11].copy_from_slice(&[50, 75, 30, 160, 60, 0x01]);
    d[11..18].copy_from_slice(&[0x0a, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20]);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edid_is_valid_and_states_the_mode() {
        let e = edid_for_mode(1024, 768);
        assert_eq!(&e[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(e.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
        let hactive = u32::from(e[56]) | (u32::from(e[58] >> 4) << 8);
        let vactive = u32::from(e[59]) | (u32::from(e[61] >> 4) << 8);
        assert_eq!((hactive, vactive), (1024, 768));
        let big = edid_for_mode(1920, 1080);
        assert_eq!(u32::from(big[56]) | (u32::from(big[58] >> 4) << 8), 1920);
    }
}
