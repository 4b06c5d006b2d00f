//! L1 and L2 entries: decoding with every check an untrusted image needs.

use super::super::{DiskError, Result};

pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Every subcluster of an extended L2 entry allocated.
pub const ALL_ALLOCATED: u32 = u32::MAX;

/// Where a guest cluster's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Reads from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster still owned by the entry (or 0).
    Zero {
        host: u64,
    },
    Data {
        host: u64,
    },
    /// `host` is a byte offset; the stream is at most `len` bytes.
    Compressed {
        host: u64,
        len: u64,
    },
    /// Extended L2: per subcluster, allocated (read `host`), zero, or neither (backing).
    Sub {
        host: u64,
        alloc: u32,
        zero: u32,
    },
}

impl Mapping {
    /// Host clusters the entry owns, as (first byte, length) for freeing.
    pub fn owned(&self) -> Option<(u64, u64)> {
        match *self {
            Mapping::Data { host } | Mapping::Zero { host } | Mapping::Sub { host, .. }
                if host != 0 =>
            {
                Some((host, 1))
            }
            Mapping::Compressed { host, len } => Some((host & !511, (host & 511) + len)),
            _ => None,
        }
    }
}

/// Sorts cluster ranges (start, end) and merges overlaps, for [`in_ranges`].
pub fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|r| r.0 < r.1);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Whether cluster `c` lies in one of `ranges` (sorted and merged).
pub fn in_ranges(ranges: &[(u64, u64)], c: u64) -> bool {
    let i = ranges.partition_point(|&(s, _)| s <= c);
    i > 0 && c < ranges[i - 1].1
}

fn corrupt(s: impl Into<String>) -> DiskError {
    DiskError::Corrupt(s.into())
}

/// Checks an L1 entry and returns the L2 table offset it points to, if any. `end` is the
/// first byte past the file (or what the engine has allocated).
pub fn l1_target(
    e: u64,
    cluster_bits: u32,
    end: u64,
    reserved: &[(u64, u64)],
) -> Result<Option<u64>> {
    if e & L1_RESERVED != 0 {
        return Err(corrupt(format!("L1 entry {e:#x} has reserved bits set")));
    }
    let off = e & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    let cs = 1u64 << cluster_bits;
    if !off.is_multiple_of(cs) {
        return Err(corrupt(format!(
            "L2 table at {off:#x} is not cluster aligned"
        )));
    }
    if off >= end {
        return Err(corrupt(format!(
            "L2 table at {off:#x} is past the end of the file"
        )));
    }
    let c = off / cs;
    if in_ranges(reserved, c) {
        return Err(corrupt(format!(
            "L2 table at {off:#x} overlaps other metadata"
        )));
    }
    Ok(Some(off))
}

/// Decodes an L2 entry (and, for extended L2, its subcluster bitmap).
pub fn decode_l2(
    e: u64,
    bitmap: Option<u64>,
    cluster_bits: u32,
    end: u64,
    reserved: &[(u64, u64)],
) -> Result<Mapping> {
    let cs = 1u64 << cluster_bits;
    if e & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let host = e & ((1u64 << x) - 1);
        let sectors = ((e & !(COPIED | COMPRESSED)) >> x) + 1;
        if host < cs {
            return Err(corrupt(format!(
                "compressed cluster at {host:#x} overlaps the header"
            )));
        }
        if host >= end {
            return Err(corrupt(format!(
                "compressed cluster at {host:#x} is past the end of the file"
            )));
        }
        let len = sectors * 512 - (host & 511);
        return Ok(Mapping::Compressed { host, len });
    }
    if e & L2_RESERVED != 0 {
        return Err(corrupt(format!("L2 entry {e:#x} has reserved bits set")));
    }
    let host = e & OFFSET_MASK;
    if host != 0 {
        if !host.is_multiple_of(cs) {
            return Err(corrupt(format!(
                "data cluster at {host:#x} is not cluster aligned"
            )));
        }
        if host >= end {
            return Err(corrupt(format!(
                "data cluster at {host:#x} is past the end of the file"
            )));
        }
        // Guest writes go straight to a data cluster: one on top of metadata would let
        // the guest rewrite the image's own tables.
        let c = host / cs;
        if in_ranges(reserved, c) {
            return Err(corrupt(format!(
                "data cluster at {host:#x} overlaps other metadata"
            )));
        }
    }
    if let Some(b) = bitmap {
        let alloc = b as u32;
        let zero = (b >> 32) as u32;
        if alloc & zero != 0 {
            return Err(corrupt(format!(
                "subcluster bitmap {b:#x} marks subclusters both allocated and zero"
            )));
        }
        if host == 0 && alloc != 0 {
            return Err(corrupt(format!(
                "subcluster bitmap {b:#x} allocates without a cluster"
            )));
        }
        return Ok(Mapping::Sub { host, alloc, zero });
    }
    Ok(if e & ZERO != 0 {
        Mapping::Zero { host }
    } else if host == 0 {
        Mapping::Unallocated
    } else {
        Mapping::Data { host }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: u64 = 1 << 30;

    #[test]
    fn l2_entries_decode() {
        assert_eq!(
            decode_l2(0, None, 16, END, &[]).unwrap(),
            Mapping::Unallocated
        );
        assert_eq!(
            decode_l2(1, None, 16, END, &[]).unwrap(),
            Mapping::Zero { host: 0 }
        );
        assert_eq!(
            decode_l2(COPIED | 0x30000, None, 16, END, &[]).unwrap(),
            Mapping::Data { host: 0x30000 }
        );
        // 64 KiB clusters: offset in bits 0..54, additional sectors above.
        let e = COMPRESSED | (3u64 << 54) | 0x20123;
        assert_eq!(
            decode_l2(e, None, 16, END, &[]).unwrap(),
            Mapping::Compressed {
                host: 0x20123,
                len: 4 * 512 - 0x123
            }
        );
    }

    #[test]
    fn bad_l2_entries_are_errors() {
        for e in [
            0x30100u64,             // unaligned
            COPIED | (END + 65536), // past EOF
            0x30002,                // reserved bit
            COMPRESSED | 0x100,     // compressed inside the header
            COMPRESSED | (END + 5), // compressed past EOF
        ] {
            assert!(
                matches!(decode_l2(e, None, 16, END, &[]), Err(DiskError::Corrupt(_))),
                "{e:#x}"
            );
        }
        assert!(decode_l2(0, Some(1), 16, END, &[]).is_err());
        let on_metadata = decode_l2(COPIED | 0x30000, None, 16, END, &[(3, 4)]);
        assert!(matches!(on_metadata, Err(DiskError::Corrupt(m)) if m.contains("overlaps")));
        assert!(decode_l2(0x30000, Some(1 | (1 << 32)), 16, END, &[]).is_err());
    }

    #[test]
    fn bad_l1_entries_are_errors() {
        let reserved = [(0, 1), (3, 4)];
        assert_eq!(l1_target(0, 16, END, &reserved).unwrap(), None);
        assert_eq!(
            l1_target(COPIED | 0x50000, 16, END, &reserved).unwrap(),
            Some(0x50000)
        );
        assert!(l1_target(0x50200, 16, END, &reserved).is_err());
        assert!(l1_target(END, 16, END, &reserved).is_err());
        assert!(l1_target(0x30000, 16, END, &reserved).is_err());
        assert!(l1_target(1 << 62, 16, END, &reserved).is_err());
    }
}
