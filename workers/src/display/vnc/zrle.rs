//! ZRLE (RFC 6143, section 7.7.6): 64x64 tiles, each solid, packed-palette or raw CPIXELs,
//! all through one zlib stream that lives as long as the connection.

use miniz_oxide::deflate::core::{create_comp_flags_from_zip_params, CompressorOxide};
use miniz_oxide::deflate::stream::deflate;
use miniz_oxide::{MZFlush, MZStatus};

use super::pixel_format::PixelFormat;

const TILE: usize = 64;
/// zlib level: fast enough for full-screen updates at 1080p, still compressing well.
const LEVEL: i32 = 1;

/// One connection's ZRLE state: the zlib stream the viewer inflates continuously.
pub struct ZrleEncoder {
    compressor: Box<CompressorOxide>,
}

impl Default for ZrleEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ZrleEncoder {
    pub fn new() -> Self {
        // 15 window bits: a zlib header and trailer, as the spec requires.
        let flags = create_comp_flags_from_zip_params(LEVEL, 15, 0);
        ZrleEncoder {
            compressor: Box::new(CompressorOxide::new(flags)),
        }
    }

    /// Encodes `pixels` (`width` x `height`, `0x00RRGGBB`) as one ZRLE rectangle's data:
    /// the 4-byte length and the zlib bytes.
    pub fn encode(
        &mut self,
        pixels: &[u32],
        width: usize,
        height: usize,
        pf: &PixelFormat,
    ) -> Vec<u8> {
        let raw = tiles(pixels, width, height, pf);
        let mut compressed = Vec::with_capacity(raw.len() / 4 + 64);
        let mut input = &raw[..];
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let result = deflate(&mut self.compressor, input, &mut buf, MZFlush::Sync);
            compressed.extend_from_slice(&buf[..result.bytes_written]);
            input = &input[result.bytes_consumed..];
            let progressed = result.bytes_consumed > 0 || result.bytes_written > 0;
            // Done when the input is gone and the flush did not fill the buffer.
            if (input.is_empty() && result.bytes_written < buf.len())
                || !matches!(result.status, Ok(MZStatus::Ok))
                || !progressed
            {
                break;
            }
        }
        let mut out = Vec::with_capacity(compressed.len() + 4);
        out.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
        out.extend_from_slice(&compressed);
        out
    }
}

/// The uncompressed tile stream.
fn tiles(pixels: &[u32], width: usize, height: usize, pf: &PixelFormat) -> Vec<u8> {
    let cpixel = pf.cpixel_range();
    let mut out = Vec::with_capacity(width * height * cpixel.len() + 64);
    let mut wire = Vec::with_capacity(4);
    let mut push_cpixel = |rgb: u32, out: &mut Vec<u8>| {
        wire.clear();
        pf.push(rgb, &mut wire);
        out.extend_from_slice(&wire[cpixel.clone()]);
    };
    let mut palette: Vec<u32> = Vec::with_capacity(16);
    for ty in (0..height).step_by(TILE) {
        for tx in (0..width).step_by(TILE) {
            let tw = TILE.min(width - tx);
            let th = TILE.min(height - ty);
            let row = |y: usize| &pixels[(ty + y) * width + tx..(ty + y) * width + tx + tw];
            palette.clear();
            let mut too_many = false;
            'scan: for y in 0..th {
                for &p in row(y) {
                    if !palette.contains(&p) {
                        if palette.len() == 16 {
                            too_many = true;
                            break 'scan;
                        }
                        palette.push(p);
                    }
                }
            }
            if palette.len() == 1 {
                out.push(1);
                push_cpixel(palette[0], &mut out);
            } else if !too_many {
                out.push(palette.len() as u8);
                for &p in &palette {
                    push_cpixel(p, &mut out);
                }
                let bits = match palette.len() {
                    2 => 1,
                    3 | 4 => 2,
                    _ => 4,
                };
                for y in 0..th {
                    let (mut byte, mut used) = (0u8, 0);
                    for &p in row(y) {
                        let index = palette.iter().position(|&c| c == p).unwrap_or(0) as u8;
                        byte = (byte << bits) | index;
                        used += bits;
                        if used == 8 {
                            out.push(byte);
                            byte = 0;
                            used = 0;
                        }
                    }
                    if used > 0 {
                        out.push(byte << (8 - used));
                    }
                }
            } else {
                out.push(0);
                for y in 0..th {
                    for &p in row(y) {
                        push_cpixel(p, &mut out);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solid_and_palette_tiles() {
        let pf = PixelFormat::SERVER;
        let solid = vec![0x123456; 64 * 64];
        assert_eq!(tiles(&solid, 64, 64, &pf), [1, 0x56, 0x34, 0x12]);
        let two: Vec<u32> = (0..8)
            .map(|i| if i % 2 == 0 { 0 } else { 0xffffff })
            .collect();
        let t = tiles(&two, 8, 1, &pf);
        assert_eq!(t, [2, 0, 0, 0, 0xff, 0xff, 0xff, 0b0101_0101]);
    }

    #[test]
    fn one_stream_across_rectangles() {
        let pf = PixelFormat::SERVER;
        let mut encoder = ZrleEncoder::new();
        let pixels: Vec<u32> = (0..100 * 70)
            .map(|i: u32| i.wrapping_mul(2_654_435_761) & 0xffffff)
            .collect();
        let a = encoder.encode(&pixels, 100, 70, &pf);
        let b = encoder.encode(&pixels, 100, 70, &pf);
        let mut stream = a[4..].to_vec();
        stream.extend_from_slice(&b[4..]);
        // A sync flush ends each rectangle on a byte boundary; the stream stays open, so
        // inflate it whole with a fresh zlib trailer-less decoder.
        let mut d = miniz_oxide::inflate::stream::InflateState::new(miniz_oxide::DataFormat::Zlib);
        let mut out = vec![0u8; 200_000];
        let r = miniz_oxide::inflate::stream::inflate(&mut d, &stream, &mut out, MZFlush::Sync);
        let expected = tiles(&pixels, 100, 70, &pf);
        assert_eq!(r.bytes_written, expected.len() * 2);
        assert_eq!(&out[..expected.len()], &expected[..]);
    }
}
