//! The QCOW2 header and its extensions (docs/interop/qcow2.txt in QEMU), parsed and checked
//! before anything else in the image is trusted.

use super::super::{DiskError, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// The largest L1 table accepted (QEMU's own limit): 32 MiB of entries.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table accepted (QEMU's own limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Virtual sizes above this are refused (QEMU's limit, 32 EiB minus change, is far beyond any
/// real disk; this keeps offset arithmetic clear of overflow).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_CRYPTO: u32 = 0x0537_be77;

/// Offsets of fields the engine rewrites.
pub const OFF_REFTABLE: u64 = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    /// Names of incompatible feature bits from the feature name table, for error messages.
    feature_names: Vec<(u8, String)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn corrupt(s: impl Into<String>) -> DiskError {
    DiskError::Corrupt(s.into())
}

impl Header {
    /// Parses the header from the image's first cluster (or as much of it as the file has,
    /// zero-padded); `file_len` bounds every table the header points to.
    pub fn parse(first: &[u8], file_len: u64) -> Result<Header> {
        if first.len() < 72 || first[..4] != MAGIC {
            return Err(DiskError::UnknownFormat);
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(DiskError::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        if (first.len() as u64) < cluster_size.min(4096) {
            return Err(corrupt("header is truncated"));
        }
        let mut h = Header {
            version,
            backing_file: None,
            backing_format: None,
            cluster_bits,
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Deflate,
            feature_names: Vec::new(),
        };
        let crypt = be32(first, 32);
        if crypt != 0 {
            return Err(DiskError::Unsupported(format!("encryption method {crypt}")));
        }
        if version == 3 {
            h.incompatible_features = be64(first, 72);
            h.compatible_features = be64(first, 80);
            h.autoclear_features = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            if h.header_length < 104
                || u64::from(h.header_length) > cluster_size
                || h.header_length as usize > first.len()
                || !h.header_length.is_multiple_of(8)
            {
                return Err(corrupt(format!("header_length {}", h.header_length)));
            }
            if h.refcount_order > 6 {
                return Err(corrupt(format!("refcount_order {}", h.refcount_order)));
            }
            if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
                if h.header_length < 105 {
                    return Err(corrupt("compression type bit set but no compression_type"));
                }
                h.compression = match first[104] {
                    0 => Compression::Deflate,
                    1 => Compression::Zstd,
                    t => return Err(DiskError::Unsupported(format!("compression type {t}"))),
                };
            } else if h.header_length >= 105 && first[104] != 0 {
                return Err(corrupt("compression_type set without the incompatible bit"));
            }
        }
        h.parse_extensions(first)?;
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| {
                    h.feature_names
                        .iter()
                        .find(|(bit, _)| *bit == b)
                        .map_or(format!("bit {b}"), |(_, n)| format!("bit {b} ({n})"))
                })
                .collect();
            return Err(DiskError::Unsupported(format!(
                "unknown incompatible features: {}",
                names.join(", ")
            )));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(DiskError::ExternalDataFile);
        }
        h.check_layout(file_len)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, first: &[u8]) -> Result<()> {
        let cluster_size = 1usize << self.cluster_bits;
        let backing_off = be64(first, 8);
        let backing_len = be32(first, 16);
        // Extensions run from the end of the header up to the backing file name, if any.
        let end = if backing_off != 0 {
            if backing_len == 0 || backing_len > 1023 {
                return Err(corrupt(format!("backing file name length {backing_len}")));
            }
            let start = usize::try_from(backing_off).unwrap_or(usize::MAX);
            let stop = start.saturating_add(backing_len as usize);
            if start < self.header_length as usize || stop > cluster_size || stop > first.len() {
                return Err(corrupt("backing file name is outside the header cluster"));
            }
            let name = std::str::from_utf8(&first[start..stop])
                .map_err(|_| corrupt("backing file name is not UTF-8"))?;
            self.backing_file = Some(name.to_owned());
            start
        } else {
            cluster_size.min(first.len())
        };
        let mut at = self.header_length as usize;
        while at + 8 <= end {
            let kind = be32(first, at);
            let len = be32(first, at + 4) as usize;
            let data_start = at + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= end)
                .ok_or_else(|| corrupt(format!("header extension {kind:#x} runs past its end")))?;
            let data = &first[data_start..data_end];
            match kind {
                EXT_END => return Ok(()),
                EXT_BACKING_FORMAT => {
                    let f = std::str::from_utf8(data)
                        .map_err(|_| corrupt("backing format is not UTF-8"))?;
                    self.backing_format = Some(f.trim_end_matches('\0').to_owned());
                }
                EXT_FEATURE_NAMES => {
                    for entry in data.chunks_exact(48) {
                        if entry[0] == 0 {
                            let name = entry[2..]
                                .split(|&c| c == 0)
                                .next()
                                .map(|n| String::from_utf8_lossy(n).into_owned())
                                .unwrap_or_default();
                            self.feature_names.push((entry[1], name));
                        }
                    }
                }
                EXT_DATA_FILE => return Err(DiskError::ExternalDataFile),
                EXT_CRYPTO => return Err(DiskError::Unsupported("encrypted image".into())),
                _ => tracing::debug!("ignoring qcow2 header extension {kind:#x}"),
            }
            at = data_end.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn check_layout(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(format!("virtual size {:#x} is absurd", self.size)));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {} entries is too large",
                self.l1_size
            )));
        }
        let needed = self.size.div_ceil(cs * self.l2_entries());
        if u64::from(self.l1_size) < needed {
            return Err(corrupt(format!(
                "L1 table has {} entries, the disk needs {needed}",
                self.l1_size
            )));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters is too large",
                self.refcount_table_clusters
            )));
        }
        if self.refcount_table_clusters == 0 {
            return Err(corrupt("refcount table is empty"));
        }
        let l1 = (self.l1_table_offset, l1_bytes);
        let rt = (self.refcount_table_offset, rt_bytes);
        for (name, (off, len)) in [("L1 table", l1), ("refcount table", rt)] {
            if len == 0 {
                continue;
            }
            if off % cs != 0 {
                return Err(corrupt(format!(
                    "{name} offset {off:#x} is not cluster aligned"
                )));
            }
            if off < cs {
                return Err(corrupt(format!("{name} overlaps the header")));
            }
            if off.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(corrupt(format!(
                    "{name} at {off:#x} lies past the end of the file"
                )));
            }
        }
        if l1_bytes > 0 && l1.0 < rt.0 + rt.1 && rt.0 < l1.0 + l1.1 {
            return Err(corrupt("L1 table overlaps the refcount table"));
        }
        Ok(())
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Entries per L2 table (an extended entry counts once, though it takes 16 bytes).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid v3 header in a 64 KiB first cluster, for tests to break.
    pub(crate) fn v3_header(cluster_bits: u32, size: u64) -> Vec<u8> {
        let cs = 1usize << cluster_bits;
        let mut b = vec![0u8; cs];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&size.to_be_bytes());
        let l1 = size.div_ceil((cs as u64) * (cs as u64 / 8)) as u32;
        b[36..40].copy_from_slice(&l1.to_be_bytes());
        b[40..48].copy_from_slice(&(3 * cs as u64).to_be_bytes());
        b[48..56].copy_from_slice(&(cs as u64).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    fn parse(b: &[u8]) -> Result<Header> {
        Header::parse(b, 1 << 30)
    }

    #[test]
    fn good_header_parses() {
        let h = parse(&v3_header(16, 1 << 30)).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.refcount_bits(), 16);
        assert!(h.backing_file.is_none());
    }

    #[test]
    fn absurd_cluster_bits() {
        for bits in [0u32, 8, 22, 63, u32::MAX] {
            let mut b = v3_header(16, 1 << 30);
            b[20..24].copy_from_slice(&bits.to_be_bytes());
            assert!(matches!(parse(&b), Err(DiskError::Corrupt(_))), "{bits}");
        }
    }

    #[test]
    fn oversized_tables_are_refused() {
        let mut b = v3_header(16, 1 << 30);
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse(&b), Err(DiskError::Corrupt(m)) if m.contains("too large")));
        let mut b = v3_header(16, 1 << 30);
        b[56..60].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(matches!(parse(&b), Err(DiskError::Corrupt(m)) if m.contains("too large")));
    }

    #[test]
    fn overlapping_tables_are_refused() {
        let mut b = v3_header(16, 1 << 30);
        b[40..48].copy_from_slice(&0u64.to_be_bytes());
        assert!(matches!(parse(&b), Err(DiskError::Corrupt(m)) if m.contains("header")));
        let mut b = v3_header(16, 1 << 30);
        b[48..56].copy_from_slice(&(3u64 << 16).to_be_bytes());
        assert!(matches!(parse(&b), Err(DiskError::Corrupt(m)) if m.contains("overlaps")));
        let b = v3_header(16, 1 << 30);
        assert!(
            matches!(Header::parse(&b, 1 << 17), Err(DiskError::Corrupt(m)) if m.contains("past the end"))
        );
    }

    #[test]
    fn unknown_incompatible_feature_is_named() {
        let mut b = v3_header(16, 1 << 30);
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        let err = parse(&b).unwrap_err().to_string();
        assert!(err.contains("bit 9"), "{err}");
    }

    #[test]
    fn external_data_file_is_refused() {
        let mut b = v3_header(16, 1 << 30);
        b[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes());
        assert!(matches!(parse(&b), Err(DiskError::ExternalDataFile)));
    }

    #[test]
    fn extension_running_past_the_end_is_refused() {
        let mut b = v3_header(16, 1 << 30);
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse(&b), Err(DiskError::Corrupt(_))));
    }

    #[test]
    fn backing_name_and_format() {
        let mut b = v3_header(16, 1 << 30);
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&3u32.to_be_bytes());
        b[120..123].copy_from_slice(b"raw");
        b[8..16].copy_from_slice(&200u64.to_be_bytes());
        b[16..20].copy_from_slice(&4u32.to_be_bytes());
        b[200..204].copy_from_slice(b"base");
        let h = parse(&b).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        b[16..20].copy_from_slice(&70000u32.to_be_bytes());
        assert!(parse(&b).is_err());
    }
}
