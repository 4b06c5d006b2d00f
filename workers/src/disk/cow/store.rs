//! Where a copy-on-write disk's changes live: a memfd the VMM creates once and hands to
//! every incarnation of the disk's worker, so that a replacement finds every write its
//! predecessor completed; the changes still vanish with the VMM.
//!
//! Layout, in 4 KiB pages (the file is sparse: only what was written costs memory):
//!
//! | at | what |
//! | --- | --- |
//! | 0 | header: magic, disk size, block size, blocks per chunk (little-endian) |
//! | 4 KiB | one summary byte per chunk of 16384 blocks: 0 = its bitmap page says, 1 = all zero |
//! | after the summary | one bitmap page per chunk: 2 bits per block, 0 = base, 1 = data here, 2 = zero |
//! | after the bitmap | the data: the disk's byte `pos` at `data_at + pos` |
//!
//! Crash consistency (the worker may die at any instruction): a block's data is written
//! before its bitmap says it is here, and a chunk's bitmap page before its summary byte
//! stops saying "all zero". A block is thus always either as before an interrupted write or
//! as after it. The worker that wrote the store may have been compromised before it died,
//! so everything loaded from it is checked, and a bad store is an error, not a crash.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::disk::io;
use crate::disk::{DiskError, Result};

/// Granularity of the overlay: a write smaller than this copies the rest of its block up.
pub const BLOCK: u64 = 4096;
/// The largest disk an overlay covers: its chunk table (16 bytes per 64 MiB) stays small.
pub const MAX_DISK_SIZE: u64 = 1 << 46;

const PAGE: u64 = 4096;
const MAGIC: [u8; 8] = *b"BHCOWv01";
const HEADER_LEN: usize = 24;
/// Blocks whose states fit in one page, 2 bits each.
const CHUNK_BLOCKS: u64 = PAGE * 4;
const WORDS: usize = (PAGE / 8) as usize;
const BLOCKS_PER_WORD: u64 = 32;
/// The low bit of every 2-bit state.
const LOW_BITS: u64 = 0x5555_5555_5555_5555;
/// How much of the bitmap one read loads at startup.
const LOAD_PAGES: u64 = 256;

const SUMMARY_PAGE: u8 = 0;
const SUMMARY_ZERO: u8 = 1;

/// Where a block's content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    Base = 0,
    Data = 1,
    Zero = 2,
}

impl BlockState {
    fn of(bits: u64) -> BlockState {
        match bits & 3 {
            1 => BlockState::Data,
            2 => BlockState::Zero,
            _ => BlockState::Base,
        }
    }
}

enum Chunk {
    /// Every block reads from the base image; the bitmap page in the store is all zero.
    Base,
    /// Every block reads as zeros (summary byte 1); the page in the store means nothing.
    Zero,
    /// The bitmap page, as in the store.
    Mixed(Box<[u64; WORDS]>),
}

impl Chunk {
    fn state(&self, block: u64) -> BlockState {
        match self {
            Chunk::Base => BlockState::Base,
            Chunk::Zero => BlockState::Zero,
            Chunk::Mixed(words) => {
                let word = words[(block / BLOCKS_PER_WORD) as usize];
                BlockState::of(word >> ((block % BLOCKS_PER_WORD) * 2))
            }
        }
    }

    fn data_blocks(&self) -> u64 {
        match self {
            Chunk::Mixed(words) => words.iter().map(|&w| data_bits(w)).sum(),
            _ => 0,
        }
    }
}

/// Blocks in state Data among the 32 of `word`.
fn data_bits(word: u64) -> u64 {
    u64::from((word & !(word >> 1) & LOW_BITS).count_ones())
}

/// Where things are in the store, for a disk of a given size.
#[derive(Debug, Clone, Copy)]
struct Layout {
    disk_len: u64,
    blocks: u64,
    chunks: u64,
    bitmap_at: u64,
    data_at: u64,
}

impl Layout {
    fn new(disk_len: u64) -> Result<Layout> {
        if disk_len > MAX_DISK_SIZE {
            return Err(DiskError::Unsupported(format!(
                "a copy-on-write disk is at most {MAX_DISK_SIZE} bytes; this one has {disk_len}"
            )));
        }
        let blocks = disk_len.div_ceil(BLOCK);
        let chunks = blocks.div_ceil(CHUNK_BLOCKS);
        let bitmap_at = PAGE + chunks.div_ceil(PAGE) * PAGE;
        Ok(Layout {
            disk_len,
            blocks,
            chunks,
            bitmap_at,
            data_at: bitmap_at + chunks * PAGE,
        })
    }

    fn page_at(&self, chunk: u64) -> u64 {
        self.bitmap_at + chunk * PAGE
    }

    /// Blocks of the disk in `chunk` (the last one may be short).
    fn blocks_in(&self, chunk: u64) -> u64 {
        (self.blocks - chunk * CHUNK_BLOCKS).min(CHUNK_BLOCKS)
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..16].copy_from_slice(&self.disk_len.to_le_bytes());
        h[16..20].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        h[20..24].copy_from_slice(&(CHUNK_BLOCKS as u32).to_le_bytes());
        h
    }
}

fn corrupt(why: String) -> DiskError {
    DiskError::Corrupt(format!("copy-on-write overlay store: {why}"))
}

struct State {
    chunks: Vec<Chunk>,
    data_blocks: u64,
}

/// The overlay's bitmap, in memory and in the store, and the store's data area.
pub struct OverlayStore {
    file: File,
    layout: Layout,
    state: RwLock<State>,
}

impl OverlayStore {
    /// Takes over `file` for a disk of `disk_len` bytes: an empty store (all zeros where
    /// the header goes) is formatted, one a previous worker left is loaded and checked.
    pub fn open(file: File, disk_len: u64) -> Result<OverlayStore> {
        let layout = Layout::new(disk_len)?;
        let mut header = [0u8; HEADER_LEN];
        io::read_zero_fill(&file, &mut header, 0)
            .map_err(DiskError::io("reading the overlay store"))?;
        let state = if header == [0; HEADER_LEN] {
            // Whatever lies past a blank header is nobody's: start from an empty file.
            file.set_len(0)
                .map_err(DiskError::io("emptying the overlay store"))?;
            io::write_all(&file, &layout.header(), 0)
                .map_err(DiskError::io("writing the overlay store's header"))?;
            State {
                chunks: (0..layout.chunks).map(|_| Chunk::Base).collect(),
                data_blocks: 0,
            }
        } else {
            check_header(&header, &layout)?;
            load(&file, &layout)?
        };
        Ok(OverlayStore {
            file,
            layout,
            state: RwLock::new(state),
        })
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks of guest data held in the store.
    pub fn data_blocks(&self) -> u64 {
        self.read_state().data_blocks
    }

    /// The states of blocks `first..end`.
    pub fn states(&self, first: u64, end: u64) -> Vec<BlockState> {
        let state = self.read_state();
        (first..end.min(self.layout.blocks))
            .map(|b| state.chunks[(b / CHUNK_BLOCKS) as usize].state(b % CHUNK_BLOCKS))
            .collect()
    }

    /// Reads the disk's bytes at `pos` from the data area; only for blocks in state Data.
    pub fn read_data(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, self.layout.data_at + pos)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => corrupt(format!(
                    "it ends before the data of disk offset {pos:#x} its bitmap says it holds"
                )),
                _ => DiskError::Io {
                    what: "reading the overlay store",
                    source: e,
                },
            })
    }

    /// Writes the disk's bytes at `pos` into the data area; they count once [`set`] says
    /// their blocks are Data.
    ///
    /// [`set`]: OverlayStore::set
    pub fn write_data(&self, buf: &[u8], pos: u64) -> Result<()> {
        io::write_all(&self.file, buf, self.layout.data_at + pos)
            .map_err(DiskError::io("writing the overlay store"))
    }

    /// Frees the data of blocks `first..end`, which no longer say Data.
    pub fn free_data(&self, first: u64, end: u64) {
        let (at, len) = (self.layout.data_at + first * BLOCK, (end - first) * BLOCK);
        // Only memory is at stake: the blocks read as zeros whether or not it is freed.
        if let Err(e) = io::punch_hole(&self.file, at, len) {
            tracing::debug!("cannot free overlay data: {e}");
        }
    }

    /// Gives blocks `first..end` state `new`, in memory and in the store.
    pub fn set(&self, first: u64, end: u64, new: BlockState) -> Result<()> {
        let end = end.min(self.layout.blocks);
        let mut state = self.write_state();
        let mut block = first;
        while block < end {
            let chunk = block / CHUNK_BLOCKS;
            let start = chunk * CHUNK_BLOCKS;
            let chunk_end = start + self.layout.blocks_in(chunk);
            let stop = end.min(chunk_end);
            self.set_in_chunk(&mut state, chunk, block - start, stop - start, new)?;
            block = stop;
        }
        Ok(())
    }

    /// [`set`](OverlayStore::set) for blocks `lo..hi` of one chunk.
    fn set_in_chunk(
        &self,
        state: &mut State,
        chunk: u64,
        lo: u64,
        hi: u64,
        new: BlockState,
    ) -> Result<()> {
        let index = chunk as usize;
        let whole = lo == 0 && hi == self.layout.blocks_in(chunk);
        if new == BlockState::Zero {
            if matches!(state.chunks[index], Chunk::Zero) {
                return Ok(());
            }
            if whole {
                self.write_summary(chunk, SUMMARY_ZERO)?;
                state.data_blocks -= state.chunks[index].data_blocks();
                state.chunks[index] = Chunk::Zero;
                return Ok(());
            }
        }
        if matches!(state.chunks[index], Chunk::Zero) {
            // The page first, all zero blocks: only then may the summary stop saying so.
            let mut words = Box::new([0u64; WORDS]);
            for block in 0..self.layout.blocks_in(chunk) {
                set_bits(&mut words, block, BlockState::Zero);
            }
            self.write_words(chunk, &words[..], 0)?;
            self.write_summary(chunk, SUMMARY_PAGE)?;
            state.chunks[index] = Chunk::Mixed(words);
        }
        if matches!(state.chunks[index], Chunk::Base) {
            // Its page in the store is all zero already: only changed words are written.
            state.chunks[index] = Chunk::Mixed(Box::new([0; WORDS]));
        }
        let Chunk::Mixed(words) = &mut state.chunks[index] else {
            unreachable!("the chunk was given a page above")
        };
        let (first_word, end_word) = (
            (lo / BLOCKS_PER_WORD) as usize,
            hi.div_ceil(BLOCKS_PER_WORD) as usize,
        );
        let before: u64 = words[first_word..end_word]
            .iter()
            .map(|&w| data_bits(w))
            .sum();
        let old = words[first_word..end_word].to_vec();
        for block in lo..hi {
            set_bits(words, block, new);
        }
        let after: u64 = words[first_word..end_word]
            .iter()
            .map(|&w| data_bits(w))
            .sum();
        if old[..] != words[first_word..end_word] {
            if let Err(e) = self.write_words(chunk, &words[first_word..end_word], first_word) {
                // What the store does not say, memory must not either.
                words[first_word..end_word].copy_from_slice(&old);
                return Err(e);
            }
        }
        state.data_blocks = state.data_blocks - before + after;
        Ok(())
    }

    fn write_summary(&self, chunk: u64, value: u8) -> Result<()> {
        io::write_all(&self.file, &[value], PAGE + chunk)
            .map_err(DiskError::io("writing the overlay store's bitmap"))
    }

    fn write_words(&self, chunk: u64, words: &[u64], first_word: usize) -> Result<()> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let at = self.layout.page_at(chunk) + first_word as u64 * 8;
        io::write_all(&self.file, &bytes, at)
            .map_err(DiskError::io("writing the overlay store's bitmap"))
    }
}

fn set_bits(words: &mut [u64; WORDS], block: u64, state: BlockState) {
    let word = &mut words[(block / BLOCKS_PER_WORD) as usize];
    let shift = (block % BLOCKS_PER_WORD) * 2;
    *word = (*word & !(3 << shift)) | ((state as u64) << shift);
}

fn check_header(header: &[u8; HEADER_LEN], layout: &Layout) -> Result<()> {
    if header[..8] != MAGIC {
        return Err(corrupt("no overlay header".into()));
    }
    let field = |at: usize, len: usize| {
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(&header[at..at + len]);
        u64::from_le_bytes(b)
    };
    let (disk_len, block, chunk_blocks) = (field(8, 8), field(16, 4), field(20, 4));
    if (block, chunk_blocks) != (BLOCK, CHUNK_BLOCKS) {
        return Err(corrupt(format!(
            "blocks of {block} bytes, {chunk_blocks} a chunk: this worker knows {BLOCK} and \
             {CHUNK_BLOCKS}"
        )));
    }
    if disk_len != layout.disk_len {
        return Err(corrupt(format!(
            "it belongs to a disk of {disk_len} bytes, this one has {}",
            layout.disk_len
        )));
    }
    Ok(())
}

/// Reads the summary and every bitmap page a store holds, refusing any state the writer
/// never gives: a summary byte other than 0 or 1, a 2-bit state 3, a state for a block past
/// the end of the disk, or data the file does not hold.
fn load(file: &File, layout: &Layout) -> Result<State> {
    let read = |buf: &mut [u8], at: u64| {
        io::read_zero_fill(file, buf, at).map_err(DiskError::io("reading the overlay store"))
    };
    let mut summary = vec![0u8; layout.chunks as usize];
    read(&mut summary, PAGE)?;
    if let Some(c) = summary.iter().position(|&s| s > SUMMARY_ZERO) {
        return Err(corrupt(format!(
            "chunk {c} has summary byte {}, not 0 or 1",
            summary[c]
        )));
    }
    let store_len = io::file_len(file).map_err(DiskError::io("reading the overlay store"))?;
    let mut chunks = Vec::with_capacity(summary.len());
    let mut data_blocks = 0;
    let mut pages = Vec::new();
    for chunk in 0..layout.chunks {
        if chunk % LOAD_PAGES == 0 {
            let n = (layout.chunks - chunk).min(LOAD_PAGES);
            pages.resize((n * PAGE) as usize, 0);
            read(&mut pages, layout.page_at(chunk))?;
        }
        if summary[chunk as usize] == SUMMARY_ZERO {
            chunks.push(Chunk::Zero);
            continue;
        }
        let at = ((chunk % LOAD_PAGES) * PAGE) as usize;
        let mut words = Box::new([0u64; WORDS]);
        for (w, bytes) in words
            .iter_mut()
            .zip(pages[at..at + PAGE as usize].chunks_exact(8))
        {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            *w = u64::from_le_bytes(b);
        }
        if words.iter().all(|&w| w == 0) {
            chunks.push(Chunk::Base);
            continue;
        }
        check_page(&words, chunk, layout, store_len)?;
        let page = Chunk::Mixed(words);
        data_blocks += page.data_blocks();
        chunks.push(page);
    }
    Ok(State {
        chunks,
        data_blocks,
    })
}

/// Checks one chunk's bitmap page.
fn check_page(words: &[u64; WORDS], chunk: u64, layout: &Layout, store_len: u64) -> Result<()> {
    let blocks = layout.blocks_in(chunk);
    let mut last_data = None;
    for (i, &w) in words.iter().enumerate() {
        if w & (w >> 1) & LOW_BITS != 0 {
            return Err(corrupt(format!("chunk {chunk} word {i} holds state 3")));
        }
        let first = i as u64 * BLOCKS_PER_WORD;
        let valid = blocks.saturating_sub(first).min(BLOCKS_PER_WORD);
        let beyond = if valid == BLOCKS_PER_WORD {
            0
        } else {
            w >> (valid * 2)
        };
        if beyond != 0 {
            return Err(corrupt(format!(
                "chunk {chunk} gives a state to a block past the end of the disk"
            )));
        }
        let data = w & !(w >> 1) & LOW_BITS;
        if data != 0 {
            last_data = Some(first + u64::from(63 - data.leading_zeros()) / 2);
        }
    }
    if let Some(block) = last_data {
        let block = chunk * CHUNK_BLOCKS + block;
        let end = layout.data_at + (block * BLOCK + BLOCK).min(layout.disk_len);
        if store_len < end {
            return Err(corrupt(format!(
                "block {block} is said to be held, but the file ends at {store_len:#x}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_leaves_room_for_every_chunk() {
        let l = Layout::new(1 << 40).unwrap();
        assert_eq!(l.blocks, 1 << 28);
        assert_eq!(l.chunks, 1 << 14);
        assert_eq!(l.bitmap_at, PAGE + (1 << 14));
        assert_eq!(l.data_at, l.bitmap_at + (1 << 26));
        let small = Layout::new(5000).unwrap();
        assert_eq!((small.blocks, small.chunks), (2, 1));
        assert_eq!(small.blocks_in(0), 2);
        assert!(Layout::new(MAX_DISK_SIZE + 1).is_err());
    }

    #[test]
    fn data_bits_count_only_data() {
        assert_eq!(data_bits(0b01_10_00_01), 2);
        assert_eq!(data_bits(LOW_BITS), 32);
        assert_eq!(data_bits(LOW_BITS << 1), 0);
    }
}
