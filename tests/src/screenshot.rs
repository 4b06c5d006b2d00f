//! A screen grabbed over VNC, carried out of the nested lab on a serial console: encoded
//! as an RGB PNG (filter 0, one zlib stream) and that as base64 lines; decoded back on the
//! host into pixels to look for text. Only what `vnc-probe` writes is decoded.

use miniz_oxide::deflate::compress_to_vec_zlib;
use miniz_oxide::inflate::decompress_to_vec_zlib;

const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// `width` x `height` pixels, row after row, `0x00RRGGBB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screen {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u32>,
}

impl Screen {
    pub fn pixel(&self, x: u32, y: u32) -> u32 {
        self.pixels[(y * self.width + x) as usize]
    }

    /// The most common colour: the console's background.
    pub fn background(&self) -> u32 {
        let mut counts = std::collections::HashMap::new();
        for &p in &self.pixels {
            *counts.entry(p).or_insert(0u64) += 1;
        }
        counts
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map_or(0, |(p, _)| p)
    }

    /// Pixels that are not the background.
    pub fn foreground_pixels(&self) -> usize {
        let background = self.background();
        self.pixels.iter().filter(|&&p| p != background).count()
    }

    /// Bands of consecutive rows with foreground pixels in them, separated by blank rows:
    /// lines of text on a console, each a few to a few tens of pixels tall.
    pub fn text_rows(&self) -> Vec<(u32, u32)> {
        let background = self.background();
        let mut bands = Vec::new();
        let mut start = None;
        for y in 0..self.height {
            let row = &self.pixels[(y * self.width) as usize..((y + 1) * self.width) as usize];
            let inked = row.iter().any(|&p| p != background);
            match (inked, start) {
                (true, None) => start = Some(y),
                (false, Some(s)) => {
                    bands.push((s, y - s));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            bands.push((s, self.height - s));
        }
        bands
    }

    pub fn to_png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.width as usize * 3 + 1) * self.height as usize);
        for y in 0..self.height {
            raw.push(0); // filter: none
            for x in 0..self.width {
                let p = self.pixel(x, y);
                raw.extend([(p >> 16) as u8, (p >> 8) as u8, p as u8]);
            }
        }
        let mut header = Vec::new();
        header.extend(self.width.to_be_bytes());
        header.extend(self.height.to_be_bytes());
        header.extend([8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, filter 0, no interlace
        let mut png = SIGNATURE.to_vec();
        chunk(&mut png, b"IHDR", &header);
        chunk(&mut png, b"IDAT", &compress_to_vec_zlib(&raw, 6));
        chunk(&mut png, b"IEND", &[]);
        png
    }

    /// Decodes a PNG [`to_png`](Self::to_png) wrote; anything else is an error.
    pub fn from_png(png: &[u8]) -> Result<Screen, String> {
        let body = png
            .strip_prefix(&SIGNATURE[..])
            .ok_or("not a PNG signature")?;
        let (mut header, mut data) = (None, Vec::new());
        let mut rest = body;
        while rest.len() >= 12 {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let kind = &rest[4..8];
            let payload = rest.get(8..8 + len).ok_or("chunk past the end")?;
            match kind {
                b"IHDR" => header = Some(payload.to_vec()),
                b"IDAT" => data.extend_from_slice(payload),
                _ => {}
            }
            rest = rest.get(12 + len..).ok_or("chunk past the end")?;
        }
        let header = header.ok_or("no IHDR")?;
        if header.len() != 13 || header[8..13] != [8, 2, 0, 0, 0] {
            return Err(format!("not an 8-bit RGB PNG: {header:?}"));
        }
        let width = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let height = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let raw = decompress_to_vec_zlib(&data).map_err(|e| format!("inflate: {e:?}"))?;
        let stride = width as usize * 3 + 1;
        if raw.len() != stride * height as usize {
            return Err(format!(
                "{} bytes of pixels for {width}x{height}",
                raw.len()
            ));
        }
        let mut pixels = Vec::with_capacity(width as usize * height as usize);
        for row in raw.chunks_exact(stride) {
            if row[0] != 0 {
                return Err(format!("row filter {}", row[0]));
            }
            pixels.extend(
                row[1..]
                    .chunks_exact(3)
                    .map(|c| u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2])),
            );
        }
        Ok(Screen {
            width,
            height,
            pixels,
        })
    }
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], payload: &[u8]) {
    png.extend((payload.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend(kind);
    png.extend(payload);
    let crc = crc32(&png[start..]);
    png.extend(crc.to_be_bytes());
}

/// CRC-32 (IEEE, reflected), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(BASE64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = BASE64
            .iter()
            .position(|&b| b == c)
            .ok_or_else(|| format!("{:?} is not base64", c as char))?;
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_and_base64_round_trip() {
        let screen = Screen {
            width: 5,
            height: 3,
            pixels: (0..15).map(|i| i * 0x010203).collect(),
        };
        let png = screen.to_png();
        assert_eq!(Screen::from_png(&png).unwrap(), screen);
        for len in 0..7 {
            let bytes: Vec<u8> = (0..len).map(|i| i * 37).collect();
            assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn text_rows_are_bands_of_ink() {
        let mut pixels = vec![0u32; 10 * 10];
        for y in [2, 3, 6] {
            pixels[y * 10 + 4] = 0xffffff;
        }
        let screen = Screen {
            width: 10,
            height: 10,
            pixels,
        };
        assert_eq!(screen.text_rows(), [(2, 2), (6, 1)]);
        assert_eq!(screen.foreground_pixels(), 3);
    }
}
