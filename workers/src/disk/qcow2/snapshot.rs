//! The internal snapshot table, read only to learn which clusters it and the snapshots' L1
//! tables occupy: the engine never changes snapshots, but must not let a guest write land
//! on their metadata.

use super::super::io::HostFile;
use super::super::{DiskError, Result};
use super::header::{Header, MAX_L1_BYTES};

/// QEMU's limits: snapshots per image and extra data per entry.
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_EXTRA: u32 = 1024;
const ENTRY_FIXED: u64 = 40;

fn corrupt(s: impl Into<String>) -> DiskError {
    DiskError::Corrupt(s.into())
}

/// Cluster ranges (start, end) of the snapshot table and every snapshot's L1 table.
pub(super) fn metadata_ranges(
    file: &HostFile,
    h: &Header,
    file_len: u64,
) -> Result<Vec<(u64, u64)>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(corrupt(format!("{} snapshots is too many", h.nb_snapshots)));
    }
    let cs = h.cluster_size();
    let table = h.snapshots_offset;
    if !table.is_multiple_of(cs) || table < cs || table >= file_len {
        return Err(corrupt(format!(
            "snapshot table at {table:#x} is misplaced"
        )));
    }
    let mut ranges = Vec::new();
    let mut pos = table;
    for i in 0..h.nb_snapshots {
        let mut e = [0u8; ENTRY_FIXED as usize];
        if pos + ENTRY_FIXED > file_len {
            return Err(corrupt(format!(
                "snapshot {i} runs past the end of the file"
            )));
        }
        file.read_zero_fill(&mut e, pos)
            .map_err(DiskError::io("read snapshot table"))?;
        let be64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&e[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let be32 = |at: usize| u32::from_be_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]);
        let l1_off = be64(0);
        let l1_bytes = u64::from(be32(8)) * 8;
        let id_len = u64::from(u16::from_be_bytes([e[12], e[13]]));
        let name_len = u64::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = be32(36);
        if extra > MAX_EXTRA {
            return Err(corrupt(format!(
                "snapshot {i} has {extra} bytes of extra data"
            )));
        }
        if l1_bytes > MAX_L1_BYTES
            || (l1_bytes > 0
                && (!l1_off.is_multiple_of(cs) || l1_off < cs || l1_off + l1_bytes > file_len))
        {
            return Err(corrupt(format!(
                "snapshot {i} has a bad L1 table at {l1_off:#x}"
            )));
        }
        if l1_bytes > 0 {
            ranges.push((l1_off / cs, (l1_off + l1_bytes).div_ceil(cs)));
        }
        pos += (ENTRY_FIXED + u64::from(extra) + id_len + name_len).div_ceil(8) * 8;
    }
    ranges.push((table / cs, pos.div_ceil(cs)));
    Ok(ranges)
}
