//! The pixel formats a viewer may ask for: true colour, 8, 16 or 32 bits a pixel, any
//! channel maxima and shifts, either byte order.

/// RFC 6143 section 7.4: the 16-byte PIXEL_FORMAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// What the server offers: 32 bits, depth 24, `0x00RRGGBB` little-endian (B, G, R, X
    /// in memory), the framebuffer's own layout.
    pub const SERVER: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = u8::from(self.true_colour);
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    /// Parses a viewer's SetPixelFormat; `None` for formats the server cannot produce
    /// (colour maps, 24 bits a pixel, shifts past the pixel).
    pub fn parse(b: &[u8; 16]) -> Option<PixelFormat> {
        let pf = PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        };
        let bits = u32::from(pf.bits_per_pixel);
        let fits = |max: u16, shift: u8| {
            u32::from(shift) < bits && (u64::from(max) << shift) < (1u64 << bits)
        };
        (pf.true_colour
            && matches!(pf.bits_per_pixel, 8 | 16 | 32)
            && fits(pf.red_max, pf.red_shift)
            && fits(pf.green_max, pf.green_shift)
            && fits(pf.blue_max, pf.blue_shift))
        .then_some(pf)
    }

    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// `0x00RRGGBB` as this format's pixel value.
    pub fn value(&self, rgb: u32) -> u32 {
        let scale = |c: u32, max: u16| (c * u32::from(max) + 127) / 255;
        (scale((rgb >> 16) & 0xff, self.red_max) << self.red_shift)
            | (scale((rgb >> 8) & 0xff, self.green_max) << self.green_shift)
            | (scale(rgb & 0xff, self.blue_max) << self.blue_shift)
    }

    /// Appends one pixel as the viewer expects it on the wire.
    pub fn push(&self, rgb: u32, out: &mut Vec<u8>) {
        let v = self.value(rgb);
        match (self.bits_per_pixel, self.big_endian) {
            (8, _) => out.push(v as u8),
            (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
            (_, false) => out.extend_from_slice(&v.to_le_bytes()),
            (_, true) => out.extend_from_slice(&v.to_be_bytes()),
        }
    }

    /// ZRLE's CPIXEL: 3 bytes when a 32-bit true-colour pixel's colour bits all lie in its
    /// low or high three bytes, else the whole pixel. Returns the byte range to keep of the
    /// 4-byte wire pixel.
    pub fn cpixel_range(&self) -> std::ops::Range<usize> {
        if self.bits_per_pixel != 32 || self.depth > 24 {
            return 0..self.bytes_per_pixel();
        }
        let mask = self.value(0xffffff);
        let low = mask & 0xff00_0000 == 0;
        let high = mask & 0x0000_00ff == 0;
        match (low, high, self.big_endian) {
            (true, _, false) => 0..3,
            (true, _, true) => 1..4,
            (false, true, false) => 1..4,
            (false, true, true) => 0..3,
            _ => 0..4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_to_the_formats_viewers_ask_for() {
        let rgb = 0x00ff8040;
        let mut out = vec![];
        PixelFormat::SERVER.push(rgb, &mut out);
        assert_eq!(out, [0x40, 0x80, 0xff, 0]);
        let rgbx = PixelFormat {
            red_shift: 0,
            blue_shift: 16,
            ..PixelFormat::SERVER
        };
        out.clear();
        rgbx.push(rgb, &mut out);
        assert_eq!(out, [0xff, 0x80, 0x40, 0]);
        let be = PixelFormat {
            big_endian: true,
            ..PixelFormat::SERVER
        };
        out.clear();
        be.push(rgb, &mut out);
        assert_eq!(out, [0, 0xff, 0x80, 0x40]);
        assert_eq!(be.cpixel_range(), 1..4);
        assert_eq!(PixelFormat::SERVER.cpixel_range(), 0..3);
        let rgb565 = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
            ..PixelFormat::SERVER
        };
        assert_eq!(rgb565.value(0xffffff), 0xffff);
        assert!(PixelFormat::parse(&rgb565.to_bytes()).is_some());
    }

    #[test]
    fn refuses_formats_it_cannot_produce() {
        let mut b = PixelFormat::SERVER.to_bytes();
        b[3] = 0; // colour map
        assert!(PixelFormat::parse(&b).is_none());
        let mut b = PixelFormat::SERVER.to_bytes();
        b[0] = 24;
        assert!(PixelFormat::parse(&b).is_none());
        let mut b = PixelFormat::SERVER.to_bytes();
        b[10] = 40; // shift past the pixel
        assert!(PixelFormat::parse(&b).is_none());
    }
}
