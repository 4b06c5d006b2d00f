//! Compressed clusters: raw deflate (QEMU's default) or zstd, one cluster per stream.

use std::io::Read;

use super::header::Compression;

/// Decompresses `input` into exactly `out.len()` bytes (one cluster). Trailing input is
/// ignored: the descriptor counts whole sectors, so the data is usually followed by slack.
pub(super) fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Deflate => {
            use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
            let mut state = Box::<DecompressorOxide>::default();
            let (status, _, written) = decompress(
                &mut state,
                input,
                out,
                0,
                inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
            );
            if written == out.len() {
                Ok(())
            } else {
                Err(format!(
                    "deflate gave {written} of {} bytes ({status:?})",
                    out.len()
                ))
            }
        }
        Compression::Zstd => {
            let mut src = input;
            let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
                .map_err(|e| format!("zstd frame: {e}"))?;
            dec.read_exact(out).map_err(|e| format!("zstd: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        let junk: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11) as u8).collect();
        assert!(decompress(Compression::Deflate, &junk, &mut out).is_err());
        assert!(decompress(Compression::Zstd, &junk, &mut out).is_err());
        assert!(decompress(Compression::Deflate, &[], &mut out).is_err());
        assert!(decompress(Compression::Zstd, &[], &mut out).is_err());
    }

    #[test]
    fn deflate_round_trip() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        let packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Deflate, &packed, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
