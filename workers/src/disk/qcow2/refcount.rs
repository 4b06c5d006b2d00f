//! Refcounts: the refcount table, its blocks (any width from 1 to 64 bits), cluster
//! allocation and the deferred frees that keep a crash from leaving a referenced cluster
//! with a refcount of zero.
//!
//! Ordering rules kept here: a new refcount block is written before the table entry that
//! points to it; a decrement is applied only after the caller has made the removal of the
//! reference durable (see [`Refcounts::defer_free`]); so on disk a refcount is never lower
//! than the number of references, and a crash can at worst leak clusters.

use std::collections::BTreeSet;

use super::super::io::HostFile;
use super::super::{DiskError, Result};
use super::cache::MetaCache;
use super::header::{Header, MAX_REFTABLE_BYTES, OFF_REFTABLE};
use super::tables::{in_ranges, merge_ranges};

const ENTRY_OFFSET_MASK: u64 = !0x1ff;
/// How many in-use clusters past the end of the file allocation steps over before it
/// calls the refcounts garbage (a crash leaves a few leaked ones there).
const MAX_SKIPPED: u32 = 1 << 20;

pub(super) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    pub table: Vec<u64>,
    pub table_offset: u64,
    table_clusters: u32,
    table_dirty: BTreeSet<usize>,
    blocks: MetaCache,
    /// Clusters whose last reference is gone in memory but maybe not yet on disk.
    pending: Vec<u64>,
    /// Clusters freed this session, the only ones allocation reuses.
    reusable: BTreeSet<u64>,
    /// First cluster index past everything in the file or allocated.
    pub end: u64,
    /// Cluster ranges that must never be handed out whatever their refcount says
    /// (header, L1 table, refcount table): a corrupt refcount must not let data overwrite them.
    reserved: Vec<(u64, u64)>,
    /// The same, unmerged, so the refcount table's entry can move when it grows.
    reserved_raw: Vec<(u64, u64)>,
}

fn corrupt(s: impl Into<String>) -> DiskError {
    DiskError::Corrupt(s.into())
}

impl Refcounts {
    pub fn load(
        file: &HostFile,
        h: &Header,
        file_len: u64,
        reserved: Vec<(u64, u64)>,
        cache_blocks: usize,
    ) -> Result<Refcounts> {
        let (cluster_bits, order) = (h.cluster_bits, h.refcount_order);
        let (table_offset, table_clusters) = (h.refcount_table_offset, h.refcount_table_clusters);
        let cs = 1u64 << cluster_bits;
        let bytes = u64::from(table_clusters) * cs;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt("refcount table too large"));
        }
        let mut raw = vec![0u8; bytes as usize];
        file.read_zero_fill(&mut raw, table_offset)
            .map_err(DiskError::io("read refcount table"))?;
        let table = raw
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_be_bytes(b)
            })
            .collect();
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            table_dirty: BTreeSet::new(),
            blocks: MetaCache::new(cache_blocks),
            pending: Vec::new(),
            reusable: BTreeSet::new(),
            end: file_len.div_ceil(cs),
            reserved: merge_ranges(reserved.clone()),
            reserved_raw: reserved,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn per_block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// Host offset of the block holding cluster `c`'s refcount, or None if it has none yet.
    fn block_of(&self, c: u64) -> Result<Option<u64>> {
        let t = c >> self.per_block_bits();
        let Some(&e) = usize::try_from(t).ok().and_then(|t| self.table.get(t)) else {
            return Ok(None);
        };
        if e & 0x1ff != 0 {
            return Err(corrupt(format!(
                "refcount table entry {t} has reserved bits set"
            )));
        }
        let off = e & ENTRY_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) {
            return Err(corrupt(format!(
                "refcount block at {off:#x} is not cluster aligned"
            )));
        }
        if off / self.cs() >= self.end {
            return Err(corrupt(format!(
                "refcount block at {off:#x} is past the end of the file"
            )));
        }
        if in_ranges(&self.reserved, off / self.cs()) {
            return Err(corrupt(format!(
                "refcount block at {off:#x} overlaps other metadata"
            )));
        }
        Ok(Some(off))
    }

    fn load_block(&mut self, file: &HostFile, off: u64) -> Result<()> {
        if self.blocks.contains(off) {
            return Ok(());
        }
        if let Some((victim, dirty)) = self.blocks.victim() {
            if let Some(t) = self.blocks.remove(victim) {
                if dirty {
                    // Writing a block early is always safe: it holds no decrement whose
                    // reference removal is not already durable.
                    file.write_all(&t.data, victim)
                        .map_err(DiskError::io("write refcount block"))?;
                }
            }
        }
        let mut data = vec![0u8; self.cs() as usize];
        file.read_zero_fill(&mut data, off)
            .map_err(DiskError::io("read refcount block"))?;
        self.blocks.insert(off, data, false);
        Ok(())
    }

    fn entry_get(order: u32, data: &[u8], i: u64) -> u64 {
        let i = i as usize;
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let byte = data[i * bits / 8];
                u64::from((byte >> ((i * bits) % 8)) & ((1u16 << bits) - 1) as u8)
            }
            3 => u64::from(data[i]),
            4 => u64::from(u16::from_be_bytes([data[2 * i], data[2 * i + 1]])),
            5 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(&data[4 * i..4 * i + 4]);
                u64::from(u32::from_be_bytes(b))
            }
            _ => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[8 * i..8 * i + 8]);
                u64::from_be_bytes(b)
            }
        }
    }

    fn entry_set(order: u32, data: &mut [u8], i: u64, v: u64) {
        let i = i as usize;
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let mask = ((1u16 << bits) - 1) as u8;
                let shift = (i * bits) % 8;
                let byte = &mut data[i * bits / 8];
                *byte = (*byte & !(mask << shift)) | (((v as u8) & mask) << shift);
            }
            3 => data[i] = v as u8,
            4 => data[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
            5 => data[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
            _ => data[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
        }
    }

    pub fn get(&mut self, file: &HostFile, c: u64) -> Result<u64> {
        let Some(off) = self.block_of(c)? else {
            return Ok(0);
        };
        self.load_block(file, off)?;
        let i = c & ((1 << self.per_block_bits()) - 1);
        let order = self.order;
        match self.blocks.get(off) {
            Some(t) => Ok(Self::entry_get(order, &t.data, i)),
            None => Ok(0),
        }
    }

    /// Sets an existing block's entry; the block must exist ([`Self::ensure_block`]).
    fn set(&mut self, file: &HostFile, c: u64, v: u64) -> Result<()> {
        if v > self.max_refcount() {
            return Err(DiskError::RefcountOverflow {
                offset: c << self.cluster_bits,
                bits: 1 << self.order,
            });
        }
        let off = self
            .block_of(c)?
            .ok_or_else(|| corrupt("refcount block vanished"))?;
        self.load_block(file, off)?;
        let i = c & ((1 << self.per_block_bits()) - 1);
        let order = self.order;
        if let Some(t) = self.blocks.get(off) {
            Self::entry_set(order, &mut t.data, i, v);
            t.dirty = true;
        }
        Ok(())
    }

    /// Adds `delta` to cluster `c`'s refcount.
    pub fn add(&mut self, file: &HostFile, c: u64, delta: i64) -> Result<u64> {
        let cur = self.get(file, c)?;
        let new = if delta >= 0 {
            cur.checked_add(delta as u64)
        } else {
            cur.checked_sub(delta.unsigned_abs())
        }
        .ok_or(DiskError::RefcountOverflow {
            offset: c << self.cluster_bits,
            bits: 1 << self.order,
        })?;
        self.set(file, c, new)?;
        Ok(new)
    }

    /// Cluster ranges (start, end) of the header, L1 table and refcount table.
    pub fn reserved(&self) -> &[(u64, u64)] {
        &self.reserved
    }

    fn is_reserved(&self, c: u64) -> bool {
        in_ranges(&self.reserved, c)
    }

    /// Allocates one cluster (refcount 1, in memory) and returns its index.
    ///
    /// Only clusters this session freed are reused; otherwise allocation appends. Free
    /// space the image had at open stays unused: a corrupt image whose refcounts undercount
    /// could otherwise have live data handed out again.
    pub fn alloc(&mut self, file: &HostFile) -> Result<u64> {
        let mut skipped = 0u32;
        loop {
            let c = self.reusable.pop_first().unwrap_or(self.end);
            if self.is_reserved(c) || self.get(file, c)? != 0 {
                if c >= self.end {
                    // Refcounts past the end of the file: leaks of a crash, or garbage.
                    skipped += 1;
                    if skipped > MAX_SKIPPED {
                        return Err(corrupt("refcounts past the end of the file are all in use"));
                    }
                    self.end = c + 1;
                }
                continue;
            }
            if self.ensure_block(file, c)? {
                // New metadata may have taken `c`; if not, it is still free.
                if c < self.end && self.get(file, c)? == 0 {
                    self.reusable.insert(c);
                }
                continue;
            }
            self.set(file, c, 1)?;
            self.end = self.end.max(c + 1);
            return Ok(c);
        }
    }

    /// Makes sure cluster `c` has a refcount block; true if that allocated metadata.
    fn ensure_block(&mut self, file: &HostFile, c: u64) -> Result<bool> {
        if self.block_of(c)?.is_some() {
            return Ok(false);
        }
        let t = c >> self.per_block_bits();
        if t >= self.table.len() as u64 {
            self.grow_table(file, t)?;
            return Ok(true);
        }
        // The new block describes itself: it goes at `c`, which is free and in its range.
        // Any free cluster in range works, and `c` is one.
        let mut data = vec![0u8; self.cs() as usize];
        let i = c & ((1 << self.per_block_bits()) - 1);
        Self::entry_set(self.order, &mut data, i, 1);
        let off = c << self.cluster_bits;
        self.insert_block(file, off, data)?;
        self.table[t as usize] = off;
        self.table_dirty.insert(t as usize);
        self.end = self.end.max(c + 1);
        Ok(true)
    }

    fn insert_block(&mut self, file: &HostFile, off: u64, data: Vec<u8>) -> Result<()> {
        if let Some((victim, dirty)) = self.blocks.victim() {
            if let Some(t) = self.blocks.remove(victim) {
                if dirty {
                    file.write_all(&t.data, victim)
                        .map_err(DiskError::io("write refcount block"))?;
                }
            }
        }
        self.blocks.insert(off, data, true);
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the file, with blocks for the
    /// new table itself; the header switch is the commit point.
    fn grow_table(&mut self, file: &HostFile, needed: u64) -> Result<()> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let start = self.end;
        let pbb = self.per_block_bits();
        let mut want = (needed + 1).max(self.table.len() as u64 * 2);
        let (clusters, mut table, new_blocks) = loop {
            let clusters = want.div_ceil(per_cluster);
            if clusters * cs > MAX_REFTABLE_BYTES {
                return Err(DiskError::Full(format!(
                    "refcount table would exceed {MAX_REFTABLE_BYTES} bytes"
                )));
            }
            let mut table = self.table.clone();
            table.resize((clusters * per_cluster) as usize, 0);
            // Blocks for uncovered parts of the new region, then the table; more blocks can
            // need more coverage, so iterate to a fixed point.
            let mut new_blocks: Vec<u64> = Vec::new();
            loop {
                let region_end = start + new_blocks.len() as u64 + clusters;
                let need: Vec<u64> = (start >> pbb..=(region_end - 1) >> pbb)
                    .filter(|&t| table.get(t as usize).is_none_or(|&e| e == 0))
                    .collect();
                if need.len() == new_blocks.len() {
                    break;
                }
                new_blocks = need;
            }
            if new_blocks.iter().all(|&t| (t as usize) < table.len()) {
                break (clusters, table, new_blocks);
            }
            want *= 2;
        };
        let region_end = start + new_blocks.len() as u64 + clusters;
        for (k, &t) in new_blocks.iter().enumerate() {
            let off = (start + k as u64) * cs;
            self.insert_block(file, off, vec![0u8; cs as usize])?;
            table[t as usize] = off;
        }
        let old_table = std::mem::replace(&mut self.table, table);
        self.end = region_end;
        for c in start..region_end {
            self.set(file, c, 1)?;
        }
        let table_off = (start + new_blocks.len() as u64) * cs;
        // Everything the new table describes must be on disk before the header names it.
        self.write_blocks(file)?;
        let mut raw = Vec::with_capacity(self.table.len() * 8);
        for e in &self.table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        file.write_all(&raw, table_off)
            .map_err(DiskError::io("write refcount table"))?;
        file.sync_data().map_err(DiskError::io("sync"))?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        file.write_all(&hdr, OFF_REFTABLE)
            .map_err(DiskError::io("write header"))?;
        file.sync_data().map_err(DiskError::io("sync"))?;
        let old_off = self.table_offset;
        let old_clusters = u64::from(self.table_clusters);
        self.table_offset = table_off;
        self.table_clusters = clusters as u32;
        self.table_dirty.clear();
        let old_start = old_off / cs;
        for r in self.reserved_raw.iter_mut() {
            if *r == (old_start, old_start + old_clusters) {
                *r = (table_off / cs, table_off / cs + clusters);
            }
        }
        self.reserved = merge_ranges(self.reserved_raw.clone());
        // Nothing points at the old table once the header is durable.
        for c in old_start..old_start + old_clusters {
            self.add(file, c, -1)?;
            self.reusable.insert(c);
        }
        tracing::debug!(
            old = old_table.len(),
            new = self.table.len(),
            "grew qcow2 refcount table"
        );
        Ok(())
    }

    /// Forgets a reference in memory; the refcount drops at [`Self::apply_frees`], which
    /// the caller runs only once the reference's removal is durable.
    pub fn defer_free(&mut self, c: u64) {
        self.pending.push(c);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn apply_frees(&mut self, file: &HostFile) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        for c in pending {
            if self.get(file, c)? == 0 {
                tracing::warn!("qcow2: freeing cluster {c:#x} whose refcount is already 0");
                continue;
            }
            if self.add(file, c, -1)? == 0 {
                self.reusable.insert(c);
            }
        }
        Ok(())
    }

    pub fn is_dirty(&self) -> bool {
        self.blocks.has_dirty() || !self.table_dirty.is_empty()
    }

    /// Writes every dirty block (no sync).
    pub fn write_blocks(&mut self, file: &HostFile) -> Result<()> {
        for off in self.blocks.dirty_offsets() {
            if let Some(t) = self.blocks.get(off) {
                file.write_all(&t.data, off)
                    .map_err(DiskError::io("write refcount block"))?;
                t.dirty = false;
            }
        }
        Ok(())
    }

    /// Writes dirty blocks, then (after a sync) the table entries that point to new ones.
    /// The caller syncs afterwards.
    pub fn write_back(&mut self, file: &HostFile) -> Result<()> {
        self.write_blocks(file)?;
        if !self.table_dirty.is_empty() {
            file.sync_data().map_err(DiskError::io("sync"))?;
            for t in std::mem::take(&mut self.table_dirty) {
                let e = self.table[t];
                file.write_all(&e.to_be_bytes(), self.table_offset + t as u64 * 8)
                    .map_err(DiskError::io("write refcount table entry"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_memory(order: u32) -> Refcounts {
        let mut rc = Refcounts {
            cluster_bits: 9,
            order,
            table: vec![512],
            table_offset: 0,
            table_clusters: 1,
            table_dirty: BTreeSet::new(),
            blocks: MetaCache::new(2),
            pending: vec![],
            reusable: BTreeSet::new(),
            end: 4,
            reserved: vec![],
            reserved_raw: vec![],
        };
        rc.blocks.insert(512, vec![0u8; 512], false);
        rc
    }

    #[test]
    fn refcounts_never_overflow_or_underflow() {
        let file = HostFile::new(std::fs::File::open("/dev/null").unwrap(), None);
        for order in 0..=6u32 {
            let mut rc = in_memory(order);
            let max = rc.max_refcount();
            rc.set(&file, 2, max).unwrap();
            assert!(matches!(
                rc.add(&file, 2, 1),
                Err(DiskError::RefcountOverflow { offset: 1024, .. })
            ));
            assert_eq!(rc.get(&file, 2).unwrap(), max);
            assert!(rc.set(&file, 2, max.wrapping_add(1)).is_err() || order == 6);
            assert!(matches!(
                rc.add(&file, 3, -1),
                Err(DiskError::RefcountOverflow { .. })
            ));
            // A deferred free of a cluster already at zero is skipped, not wrapped.
            rc.defer_free(3);
            rc.apply_frees(&file).unwrap();
            assert_eq!(rc.get(&file, 3).unwrap(), 0);
        }
    }

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6u32 {
            let rc = Refcounts {
                cluster_bits: 9,
                order,
                table: vec![],
                table_offset: 0,
                table_clusters: 1,
                table_dirty: BTreeSet::new(),
                blocks: MetaCache::new(2),
                pending: vec![],
                reusable: BTreeSet::new(),
                end: 0,
                reserved: vec![],
                reserved_raw: vec![],
            };
            let n = (512 * 8) >> order;
            let mut data = vec![0u8; 512];
            let max = rc.max_refcount();
            for i in 0..n {
                Refcounts::entry_set(order, &mut data, i, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    Refcounts::entry_get(order, &data, i),
                    (i * 7 + 3) & max,
                    "order {order} entry {i}"
                );
            }
        }
    }
}
