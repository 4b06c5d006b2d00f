//! `,cow`: the guest's writes land in memory, block by block, and vanish at exit; the image
//! underneath is only ever read.

use std::collections::HashMap;
use std::sync::RwLock;

use super::{check_range, DiskImage, Result};

/// Granularity of the overlay: a write smaller than this copies the rest of its block up.
pub const COW_BLOCK: u64 = 4096;

enum Block {
    Data(Box<[u8]>),
    Zero,
}

pub struct CowOverlay {
    base: Box<dyn DiskImage>,
    blocks: RwLock<HashMap<u64, Block>>,
}

impl CowOverlay {
    pub fn new(base: Box<dyn DiskImage>) -> CowOverlay {
        CowOverlay {
            base,
            blocks: RwLock::new(HashMap::new()),
        }
    }

    /// Bytes of guest data held in memory.
    pub fn memory_used(&self) -> u64 {
        let blocks = self.blocks.read().unwrap_or_else(|e| e.into_inner());
        blocks
            .values()
            .filter(|b| matches!(b, Block::Data(_)))
            .count() as u64
            * COW_BLOCK
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
    fn load_block(&self, blocks: &HashMap<u64, Block>, idx: u64) -> Result<Box<[u8]>> {
        let mut data = vec![0u8; COW_BLOCK as usize].into_boxed_slice();
        match blocks.get(&idx) {
            Some(Block::Data(d)) => data.copy_from_slice(d),
            Some(Block::Zero) => {}
            None => {
                let start = idx * COW_BLOCK;
                let n = COW_BLOCK.min(self.base.len() - start) as usize;
                self.base.read_at(&mut data[..n], start)?;
            }
        }
        Ok(data)
    }

    fn update(&self, offset: u64, len: u64, src: Option<&[u8]>) -> Result<()> {
        check_range(offset, len, self.len())?;
        let mut blocks = self.blocks.write().unwrap_or_else(|e| e.into_inner());
        let size = self.len();
        Self::pieces(offset, len, |idx, in_block, n, at| {
            let whole =
                in_block == 0 && (n as u64 == COW_BLOCK || idx * COW_BLOCK + n as u64 == size);
            let new = match (src, whole) {
                (None, true) => Block::Zero,
                (Some(s), true) if n as u64 == COW_BLOCK => Block::Data(s[at..at + n].into()),
                _ => {
                    let mut data = self.load_block(&blocks, idx)?;
                    match src {
                        Some(s) => data[in_block..in_block + n].copy_from_slice(&s[at..at + n]),
                        None => data[in_block..in_block + n].fill(0),
                    }
                    Block::Data(data)
                }
            };
            blocks.insert(idx, new);
            Ok(())
        })
    }
}

impl DiskImage for CowOverlay {
    fn len(&self) -> u64 {
        self.base.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        let blocks = self.blocks.read().unwrap_or_else(|e| e.into_inner());
        Self::pieces(offset, buf.len() as u64, |idx, in_block, n, at| {
            let out = &mut buf[at..at + n];
            match blocks.get(&idx) {
                Some(Block::Data(d)) => out.copy_from_slice(&d[in_block..in_block + n]),
                Some(Block::Zero) => out.fill(0),
                None => self.base.read_at(out, offset + at as u64)?,
            }
            Ok(())
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.update(offset, buf.len() as u64, Some(buf))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Drops the overlay's copies of whole blocks (they read as zeros after) and leaves
    /// everything else alone: discard may free memory but never takes any.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.len())?;
        let mut blocks = self.blocks.write().unwrap_or_else(|e| e.into_inner());
        let first = offset.div_ceil(COW_BLOCK);
        let end = (offset + len) / COW_BLOCK;
        if end.saturating_sub(first) < blocks.len() as u64 {
            for idx in first..end {
                if let Some(b) = blocks.get_mut(&idx) {
                    *b = Block::Zero;
                }
            }
        } else {
            for (_, b) in blocks.iter_mut().filter(|(i, _)| (first..end).contains(*i)) {
                *b = Block::Zero;
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.update(offset, len, None)
    }

    fn is_read_only(&self) -> bool {
        false
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
