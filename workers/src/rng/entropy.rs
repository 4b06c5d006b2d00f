//! Entropy from the host kernel: getrandom(2), the same pool /dev/urandom serves, without
//! needing any file open.

use std::io::{self, Write};

/// Fills `buf` from getrandom(2).
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we borrow
        // mutably for the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // getrandom returns at most the requested length.
        filled += n as usize;
    }
    Ok(())
}

/// Writes `len` random bytes to `out`, a chunk at a time.
pub fn write_random(out: &mut impl Write, len: usize) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        getrandom(&mut chunk[..n])?;
        out.write_all(&chunk[..n])?;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_buffers_with_distinct_noise() {
        let mut a = vec![0u8; 10_000];
        let mut b = Vec::new();
        getrandom(&mut a).unwrap();
        write_random(&mut b, 10_000).unwrap();
        assert_eq!(b.len(), 10_000);
        assert_ne!(a, b);
        // 10 000 zero bytes from a working RNG would be a miracle.
        assert!(a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0));
    }
}
