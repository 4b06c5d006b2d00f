//! 9P's wire format: little-endian integers, `u16`-length strings and 13-byte qids, read
//! with a bounds check on every field so that a short or lying message becomes an error
//! instead of a panic.

use thiserror::Error;

/// Size of the header every message starts with: `size[4] type[1] tag[2]`.
pub const HEADER_LEN: usize = 7;
/// Size of an encoded qid.
pub const QID_LEN: usize = 13;

/// A message that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("the message ends {needed} bytes early at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("a string is not UTF-8")]
    NotUtf8,
    #[error("{0} bytes are left over after the message")]
    Trailing(usize),
    #[error("the size field says {declared} bytes but the message has {actual}")]
    SizeMismatch { declared: u32, actual: usize },
}

/// qid type bits.
pub const QT_DIR: u8 = 0x80;
pub const QT_SYMLINK: u8 = 0x02;
pub const QT_FILE: u8 = 0x00;

/// The server's identity for a file: type, version, and a path unique per file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Qid {
    pub kind: u8,
    pub version: u32,
    pub path: u64,
}

impl Qid {
    pub fn is_dir(&self) -> bool {
        self.kind & QT_DIR != 0
    }

    pub fn is_symlink(&self) -> bool {
        self.kind & QT_SYMLINK != 0
    }
}

/// Reads fields from a received message, front to back.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.buf.len())
            .ok_or(WireError::Truncated {
                offset: self.pos,
                needed: len.saturating_sub(self.remaining()),
            })?;
        let slice = &self.buf[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A string as raw bytes: names are byte strings on Linux, not necessarily UTF-8.
    pub fn str_bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.u16()?;
        self.bytes(usize::from(len))
    }

    /// A string that must be UTF-8 (protocol version, user and share names).
    pub fn string(&mut self) -> Result<String, WireError> {
        let bytes = self.str_bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NotUtf8)
    }

    pub fn qid(&mut self) -> Result<Qid, WireError> {
        Ok(Qid {
            kind: self.u8()?,
            version: self.u32()?,
            path: self.u64()?,
        })
    }

    /// Fails when bytes remain: a well-formed message is consumed exactly.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

/// Builds a message; [`Writer::finish`] fills in the size field.
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// Starts a message of type `kind` with `tag`, the size left to [`Writer::finish`].
    pub fn new(kind: u8, tag: u16) -> Self {
        Self::with_capacity(kind, tag, 64)
    }

    pub fn with_capacity(kind: u8, tag: u16, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(HEADER_LEN));
        buf.extend_from_slice(&[0, 0, 0, 0, kind]);
        buf.extend_from_slice(&tag.to_le_bytes());
        Writer { buf }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() == HEADER_LEN
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A string; longer than 65535 bytes is cut there (no name or link target the kernel
    /// hands out is that long, so nothing real is lost).
    pub fn str_bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = v.len().min(usize::from(u16::MAX));
        // `len` fits in u16 by the line above.
        self.u16(len as u16);
        self.bytes(&v[..len])
    }

    pub fn qid(&mut self, qid: &Qid) -> &mut Self {
        self.u8(qid.kind).u32(qid.version).u64(qid.path)
    }

    /// The finished message with its size field set.
    pub fn finish(mut self) -> Vec<u8> {
        // Replies are bounded by msize (at most 512 KiB), far below u32::MAX.
        let size = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&size.to_le_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_fields() {
        let mut w = Writer::new(100, 0xffff);
        w.u32(8192).str_bytes(b"9P2000.L").qid(&Qid {
            kind: QT_DIR,
            version: 7,
            path: 42,
        });
        let msg = w.finish();
        assert_eq!(
            u32::from_le_bytes(msg[..4].try_into().unwrap()) as usize,
            msg.len()
        );
        let mut r = Reader::new(&msg[HEADER_LEN..]);
        assert_eq!(r.u32(), Ok(8192));
        assert_eq!(r.string().as_deref(), Ok("9P2000.L"));
        let qid = r.qid().unwrap();
        assert!(qid.is_dir());
        assert_eq!(qid.path, 42);
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn short_fields_are_errors() {
        assert!(Reader::new(&[1, 2, 3]).u32().is_err());
        // A string whose length runs past the end of the message.
        let mut r = Reader::new(&[0xff, 0xff, b'a']);
        assert!(matches!(r.str_bytes(), Err(WireError::Truncated { .. })));
        let r = Reader::new(&[0]);
        assert_eq!(r.finish(), Err(WireError::Trailing(1)));
    }
}
