//! `,cow`: the guest's writes land in memory, block by block, and vanish at exit; the image
//! underneath is only ever read.

use std::collections::BTreeMap;
use std::sync::RwLock;

use super::{check_range, DiskImage, Result};

/// Granularity of the overlay: a write smaller than this copies the rest of its block up.
pub const COW_BLOCK: u64 = 4096;

/// What the guest changed. A block in `blocks` wins over `zeroed`, which wins over the base.
#[derive(Default)]
struct Overlay {
    blocks: BTreeMap<u64, Box<[u8]>>,
    /// Zeroed runs of blocks, start -> end (exclusive), disjoint and not adjacent: zeroing
    /// a large range costs one entry, not one per block.
    zeroed: BTreeMap<u64, u64>,
}

impl Overlay {
    fn is_zeroed(&self, idx: u64) -> bool {
        self.zeroed
            .range(..=idx)
            .next_back()
            .is_some_and(|(_, &end)| idx < end)
    }

    /// Makes blocks `first..end` read as zeros, dropping their copies.
    fn zero_blocks(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        let doomed: Vec<u64> = self.blocks.range(first..end).map(|(&k, _)| k).collect();
        for k in doomed {
            self.blocks.remove(&k);
        }
        let (mut s, mut e) = (first, end);
        if let Some((&ps, &pe)) = self.zeroed.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.zeroed.remove(&ps);
            }
        }
        while let Some((&ns, &ne)) = self.zeroed.range(s..=e).next() {
            e = e.max(ne);
            self.zeroed.remove(&ns);
        }
        self.zeroed.insert(s, e);
    }
}

pub struct CowOverlay {
    base: Box<dyn DiskImage>,
    overlay: RwLock<Overlay>,
}

impl CowOverlay {
    pub fn new(base: Box<dyn DiskImage>) -> CowOverlay {
        CowOverlay {
            base,
            overlay: RwLock::new(Overlay::default()),
        }
    }

    /// Bytes of guest data held in memory.
    pub fn memory_used(&self) -> u64 {
        let o = self.overlay.read().unwrap_or_else(|e| e.into_inner());
        o.blocks.len() as u64 * COW_BLOCK
    }

    /// Applies `f` to each block-sized piece of `offset..offset+len`:
    /// (block index, offset in block, piece length, offset in the caller's range).
    fn pieces(
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let in_block = (pos % COW_BLOCK) as usize;
            let n = (COW_BLOCK - in_block as u64).min(len - done) as usize;
            f(pos / COW_BLOCK, in_block, n, done as usize)?;
            done += n as u64;
        }
        Ok(())
    }

    /// The block's current content, for a partial update.
    fn load_block(&self, o: &Overlay, idx: u64) -> Result<Box<[u8]>> {
        let mut data = vec![0u8; COW_BLOCK as usize].into_boxed_slice();
        if let Some(d) = o.blocks.get(&idx) {
            data.copy_from_slice(d);
        } else if !o.is_zeroed(idx) {
            let start = idx * COW_BLOCK;
            let n = COW_BLOCK.min(self.base.len() - start) as usize;
            self.base.read_at(&mut data[..n], start)?;
        }
        Ok(data)
    }

    /// Whole blocks inside `offset..offset+len` (the disk's last block counts as whole when
    /// the range reaches the end of the disk).
    fn whole_blocks(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset + len;
        let last = if end == self.len() {
            end.div_ceil(COW_BLOCK)
        } else {
            end / COW_BLOCK
        };
        (offset.div_ceil(COW_BLOCK), last)
    }

    /// Overwrites part of one block.
    fn patch_block(
        &self,
        o: &mut Overlay,
        idx: u64,
        in_block: usize,
        src: Option<&[u8]>,
        n: usize,
    ) -> Result<()> {
        let mut data = self.load_block(o, idx)?;
        match src {
            Some(s) => data[in_block..in_block + n].copy_from_slice(s),
            None => data[in_block..in_block + n].fill(0),
        }
        o.blocks.insert(idx, data);
        Ok(())
    }

    /// Zeroes the range: whole blocks by metadata, the partial ends (when `partial`) by
    /// writing zeros into their copies.
    fn zero(&self, offset: u64, len: u64, partial: bool) -> Result<()> {
        check_range(offset, len, self.len())?;
        let mut o = self.overlay.write().unwrap_or_else(|e| e.into_inner());
        let (first, end) = self.whole_blocks(offset, len);
        if partial {
            let head_end = (first * COW_BLOCK).min(offset + len);
            if offset < head_end {
                let n = (head_end - offset) as usize;
                self.patch_block(
                    &mut o,
                    offset / COW_BLOCK,
                    (offset % COW_BLOCK) as usize,
                    None,
                    n,
                )?;
            }
            let tail_start = (end * COW_BLOCK).max(head_end);
            if tail_start < offset + len {
                let n = (offset + len - tail_start) as usize;
                self.patch_block(&mut o, tail_start / COW_BLOCK, 0, None, n)?;
            }
        }
        o.zero_blocks(first, end);
        Ok(())
    }
}

impl DiskImage for CowOverlay {
    fn len(&self) -> u64 {
        self.base.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        let o = self.overlay.read().unwrap_or_else(|e| e.into_inner());
        // Runs of blocks the overlay does not hold go to the base in one read.
        let mut base_run: Option<(usize, usize)> = None;
        let flush_run = |run: &mut Option<(usize, usize)>, buf: &mut [u8]| -> Result<()> {
            if let Some((at, n)) = run.take() {
                self.base
                    .read_at(&mut buf[at..at + n], offset + at as u64)?;
            }
            Ok(())
        };
        Self::pieces(offset, buf.len() as u64, |idx, in_block, n, at| {
            if let Some(d) = o.blocks.get(&idx) {
                flush_run(&mut base_run, buf)?;
                buf[at..at + n].copy_from_slice(&d[in_block..in_block + n]);
            } else if o.is_zeroed(idx) {
                flush_run(&mut base_run, buf)?;
                buf[at..at + n].fill(0);
            } else {
                base_run = Some(match base_run {
                    Some((s, l)) => (s, l + n),
                    None => (at, n),
                });
            }
            Ok(())
        })?;
        flush_run(&mut base_run, buf)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        let mut o = self.overlay.write().unwrap_or_else(|e| e.into_inner());
        Self::pieces(offset, buf.len() as u64, |idx, in_block, n, at| {
            if n as u64 == COW_BLOCK {
                o.blocks.insert(idx, buf[at..at + n].into());
                Ok(())
            } else {
                self.patch_block(&mut o, idx, in_block, Some(&buf[at..at + n]), n)
            }
        })
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Whole blocks read as zeros after (their copies dropped); partial blocks are left
    /// alone, so discard can free memory but never takes any.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero(offset, len, true)
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn discard_granularity(&self) -> u64 {
        COW_BLOCK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskError;

    struct Mem(Vec<u8>);
    impl DiskImage for Mem {
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            check_range(offset, buf.len() as u64, self.len())?;
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
            Err(DiskError::ReadOnly)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<()> {
            Err(DiskError::ReadOnly)
        }
        fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
            Err(DiskError::ReadOnly)
        }
        fn is_read_only(&self) -> bool {
            true
        }
    }

    /// A huge disk of base data, none of it in memory.
    struct Pattern(u64);
    impl DiskImage for Pattern {
        fn len(&self) -> u64 {
            self.0
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            check_range(offset, buf.len() as u64, self.len())?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8 | 1;
            }
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
            Err(DiskError::ReadOnly)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<()> {
            Err(DiskError::ReadOnly)
        }
        fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
            Err(DiskError::ReadOnly)
        }
        fn is_read_only(&self) -> bool {
            true
        }
    }

    #[test]
    fn random_operations_match_a_model() {
        let size = 70_000usize;
        let base: Vec<u8> = (0..size).map(|i| (i % 253) as u8 | 1).collect();
        let mut model = base.clone();
        let cow = CowOverlay::new(Box::new(Mem(base)));
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for round in 0..2000 {
            let off = next(size);
            let len = 1 + next((size - off).min(20_000));
            match next(4) {
                0 => {
                    cow.write_zeroes(off as u64, len as u64).unwrap();
                    model[off..off + len].fill(0);
                }
                1 => {
                    cow.discard(off as u64, len as u64).unwrap();
                    let b = COW_BLOCK as usize;
                    let first = off.div_ceil(b) * b;
                    let end = if off + len == size {
                        size
                    } else {
                        (off + len) / b * b
                    };
                    if first < end {
                        model[first..end].fill(0);
                    }
                }
                _ => {
                    let v = (round % 250 + 2) as u8;
                    cow.write_at(&vec![v; len], off as u64).unwrap();
                    model[off..off + len].fill(v);
                }
            }
            let roff = next(size);
            let rlen = 1 + next((size - roff).min(30_000));
            let mut out = vec![0u8; rlen];
            cow.read_at(&mut out, roff as u64).unwrap();
            assert_eq!(out, model[roff..roff + rlen], "round {round}");
        }
    }

    #[test]
    fn zeroing_a_huge_range_takes_no_memory() {
        let cow = CowOverlay::new(Box::new(Pattern(1 << 40)));
        cow.write_at(&[7; 10000], 5000).unwrap();
        cow.write_zeroes(100, (1 << 40) - 300).unwrap();
        cow.discard(0, (1 << 40) - COW_BLOCK).unwrap();
        assert!(cow.memory_used() <= 2 * COW_BLOCK);
        let mut b = [1u8; 8];
        cow.read_at(&mut b, 1 << 39).unwrap();
        assert_eq!(b, [0; 8]);
        cow.read_at(&mut b, (1 << 40) - 8).unwrap();
        assert!(
            b.iter().all(|&x| x != 0),
            "the last 200 bytes were not zeroed"
        );
        cow.write_at(&[5; 3], 1 << 30).unwrap();
        let mut c = [1u8; 5];
        cow.read_at(&mut c, (1 << 30) - 1).unwrap();
        assert_eq!(c, [0, 5, 5, 5, 0]);
    }

    #[test]
    fn overlay_keeps_writes_and_leaves_base_alone() {
        let base: Vec<u8> = (0..20000u32).map(|i| (i * 7) as u8).collect();
        let mut model = base.clone();
        let cow = CowOverlay::new(Box::new(Mem(base.clone())));
        let ops: [(u64, usize, u8); 5] = [
            (10, 5000, 1),
            (4096, 4096, 2),
            (19990, 10, 3),
            (100, 1, 4),
            (8000, 3000, 0),
        ];
        for (off, len, val) in ops {
            if val == 0 {
                cow.write_zeroes(off, len as u64).unwrap();
            } else {
                cow.write_at(&vec![val; len], off).unwrap();
            }
            model[off as usize..off as usize + len].fill(val);
        }
        let mut out = vec![0u8; model.len()];
        cow.read_at(&mut out, 0).unwrap();
        assert_eq!(out, model);
        assert!(cow.write_at(&[0], 20000).is_err());
        // Discard zeroes whole overlay blocks, keeps partial ones and never copies up.
        let before = cow.memory_used();
        cow.discard(4000, 9000).unwrap();
        model[4096..12288].fill(0);
        cow.discard(16384, 3000).unwrap();
        cow.read_at(&mut out, 0).unwrap();
        assert_eq!(out, model);
        assert!(cow.memory_used() < before);
        assert!(cow.discard(0, 20001).is_err());
    }
}
