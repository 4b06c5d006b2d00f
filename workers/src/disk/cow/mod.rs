//! `,cow`: the guest's writes land in an overlay store, block by block, and the image
//! underneath is only ever read. The store is a memfd ([`store`]): the VMM creates one per
//! disk and hands it to each worker it starts for the disk, so that a restarted worker
//! carries on with every change its predecessor made; they vanish when the VMM exits. A
//! worker run without one (standalone, tests, benchmarks) makes its own.

pub mod store;

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use self::store::{BlockState, OverlayStore};
use super::{check_range, DiskError, DiskImage, Result};

pub use self::store::{BLOCK as COW_BLOCK, MAX_DISK_SIZE};

/// Locks serializing writes per block (block index modulo their number): a write that
/// copies a block up reads and rewrites all of it, which must not interleave with another
/// write to the same block.
const STRIPES: usize = 256;

/// An empty overlay store: an anonymous memfd, close-on-exec.
pub fn new_store() -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated string literal; memfd_create reads nothing else
    // of ours and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"bulkhead-cow".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

pub struct CowOverlay {
    base: Box<dyn DiskImage>,
    store: OverlayStore,
    stripes: [Mutex<()>; STRIPES],
}

impl CowOverlay {
    /// An overlay over `base` in a store of its own, empty.
    pub fn new(base: Box<dyn DiskImage>) -> Result<CowOverlay> {
        let store = new_store().map_err(DiskError::io("creating the overlay store"))?;
        CowOverlay::open(base, store)
    }

    /// An overlay over `base` in `store`: empty if the store is, else with every change a
    /// previous overlay on the same store completed.
    pub fn open(base: Box<dyn DiskImage>, store: File) -> Result<CowOverlay> {
        let store = OverlayStore::open(store, base.len())?;
        Ok(CowOverlay {
            base,
            store,
            stripes: std::array::from_fn(|_| Mutex::new(())),
        })
    }

    /// Bytes of guest data held in the store.
    pub fn memory_used(&self) -> u64 {
        self.store.data_blocks() * COW_BLOCK
    }

    /// Holds the write locks of blocks `first..=last`, in one order for every caller.
    fn lock_blocks(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = if last - first + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..=last)
                .map(|b| (b % STRIPES as u64) as usize)
                .collect()
        };
        stripes.sort_unstable();
        stripes
            .into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    fn lock_all(&self) -> Vec<MutexGuard<'_, ()>> {
        self.lock_blocks(0, STRIPES as u64 - 1)
    }

    /// Block `idx` as it reads now (short for the disk's last block when the disk is).
    fn load_block(&self, idx: u64, state: BlockState) -> Result<Vec<u8>> {
        let start = idx * COW_BLOCK;
        let mut data = vec![0u8; COW_BLOCK.min(self.len() - start) as usize];
        match state {
            BlockState::Data => self.store.read_data(&mut data, start)?,
            BlockState::Zero => {}
            BlockState::Base => self.base.read_at(&mut data, start)?,
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

    /// A write, with the locks of its blocks held. A block the write covers only partly and
    /// that the store does not hold yet is copied up whole; the rest goes straight to the
    /// store in one piece. The data is written before the bitmap says it is there.
    fn write_locked(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / COW_BLOCK, (end - 1) / COW_BLOCK);
        let states = self.store.states(first, last + 1);
        let (mut lo, mut hi) = (offset, end);
        let copy_up = |idx: u64, lo: &mut u64, hi: &mut u64| -> Result<()> {
            let start = idx * COW_BLOCK;
            let block_end = (start + COW_BLOCK).min(self.len());
            let (from, to) = (offset.max(start), end.min(block_end));
            let state = states[(idx - first) as usize];
            if (from, to) == (start, block_end) || state == BlockState::Data {
                return Ok(());
            }
            let mut data = self.load_block(idx, state)?;
            data[(from - start) as usize..(to - start) as usize]
                .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
            self.store.write_data(&data, start)?;
            if idx == first {
                *lo = to;
            }
            if idx == last {
                *hi = from.max(*lo);
            }
            Ok(())
        };
        copy_up(first, &mut lo, &mut hi)?;
        if last != first {
            copy_up(last, &mut lo, &mut hi)?;
        }
        if lo < hi {
            self.store
                .write_data(&buf[(lo - offset) as usize..(hi - offset) as usize], lo)?;
        }
        self.store.set(first, last + 1, BlockState::Data)
    }

    /// Zeroes the range: whole blocks in the bitmap, their data freed; the partial ends
    /// (when `partial`) by writing zeros into them.
    fn zero(&self, offset: u64, len: u64, partial: bool) -> Result<()> {
        check_range(offset, len, self.len())?;
        if len == 0 {
            return Ok(());
        }
        let _held = self.lock_all();
        let (first, end) = self.whole_blocks(offset, len);
        if partial {
            let head_end = (first * COW_BLOCK).min(offset + len);
            if offset < head_end {
                let zeros = vec![0u8; (head_end - offset) as usize];
                self.write_locked(&zeros, offset)?;
            }
            let tail_start = (end * COW_BLOCK).max(head_end);
            if tail_start < offset + len {
                let zeros = vec![0u8; (offset + len - tail_start) as usize];
                self.write_locked(&zeros, tail_start)?;
            }
        }
        if first < end {
            self.store.set(first, end, BlockState::Zero)?;
            self.store.free_data(first, end);
        }
        Ok(())
    }
}

impl DiskImage for CowOverlay {
    fn len(&self) -> u64 {
        self.base.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / COW_BLOCK, (end - 1) / COW_BLOCK);
        let states = self.store.states(first, last + 1);
        // Runs of blocks in one state are read in one go: the base's from the base, the
        // store's from its data area, where they lie at their disk offset.
        let mut pos = offset;
        while pos < end {
            let idx = pos / COW_BLOCK;
            let state = states[(idx - first) as usize];
            let mut run_end = idx + 1;
            while run_end <= last && states[(run_end - first) as usize] == state {
                run_end += 1;
            }
            let stop = (run_end * COW_BLOCK).min(end);
            let out = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            match state {
                BlockState::Base => self.base.read_at(out, pos)?,
                BlockState::Data => self.store.read_data(out, pos)?,
                BlockState::Zero => out.fill(0),
            }
            pos = stop;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let _held = self.lock_blocks(offset / COW_BLOCK, (end - 1) / COW_BLOCK);
        self.write_locked(buf, offset)
    }

    /// Nothing to make durable: the store is memory, and outlives the worker anyway.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Whole blocks read as zeros after (their data freed); partial blocks are left
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
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[derive(Clone)]
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
        let cow = CowOverlay::new(Box::new(Mem(base))).unwrap();
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for round in 0..2000 {
            random_op(&cow, &mut model, &mut rng, round, 20_000, 4);
            let roff = rng.below(size);
            let rlen = 1 + rng.below((size - roff).min(30_000));
            let mut out = vec![0u8; rlen];
            cow.read_at(&mut out, roff as u64).unwrap();
            assert_eq!(out, model[roff..roff + rlen], "round {round}");
        }
    }

    #[test]
    fn zeroing_a_huge_range_takes_no_memory() {
        let store = new_store().unwrap();
        let cow = CowOverlay::open(Box::new(Pattern(1 << 40)), store.try_clone().unwrap()).unwrap();
        cow.write_at(&[7; 10000], 5000).unwrap();
        cow.write_zeroes(100, (1 << 40) - 300).unwrap();
        cow.discard(0, (1 << 40) - COW_BLOCK).unwrap();
        assert!(cow.memory_used() <= 2 * COW_BLOCK);
        // The store holds a few pages, and a restarted worker loads it all.
        assert!(store.metadata().unwrap().blocks() * 512 < 1 << 20);
        drop(cow);
        let cow = CowOverlay::open(Box::new(Pattern(1 << 40)), store).unwrap();
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
        let cow = CowOverlay::new(Box::new(Mem(base.clone()))).unwrap();
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

    /// xorshift64: the tests' reproducible randomness.
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// One random write, zeroing or discard of at most `max_len` bytes over `cow`,
    /// mirrored in `model` (the disk as the guest should read it). Of `kinds` equally
    /// likely choices, one zeroes, one discards and the rest write.
    fn random_op(
        cow: &CowOverlay,
        model: &mut [u8],
        rng: &mut XorShift,
        round: usize,
        max_len: usize,
        kinds: usize,
    ) {
        let size = model.len();
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(max_len));
        match rng.below(kinds) {
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
    }

    /// `rounds` random operations over `cow`, mirrored in `model`.
    fn scramble(cow: &CowOverlay, model: &mut [u8], seed: u64, rounds: usize) {
        let mut rng = XorShift(seed);
        for round in 0..rounds {
            random_op(cow, model, &mut rng, round, 50_000, 5);
        }
    }

    fn read_all(cow: &CowOverlay) -> Vec<u8> {
        let mut out = vec![0u8; cow.len() as usize];
        cow.read_at(&mut out, 0).unwrap();
        out
    }

    /// What a restarted worker sees: a new overlay on the same store reads every write,
    /// zero and discard of the old one, and carries on from there.
    #[test]
    fn a_reopened_store_has_every_change() {
        // Over two chunks of blocks (16384 each) and a short last block.
        let size = (2 * 16384 + 7) * COW_BLOCK as usize + 1000;
        let base: Vec<u8> = (0..size).map(|i| (i % 241) as u8 | 1).collect();
        let mut model = base.clone();
        let store = new_store().unwrap();
        let first =
            CowOverlay::open(Box::new(Mem(base.clone())), store.try_clone().unwrap()).unwrap();
        scramble(&first, &mut model, 0x9e37_79b9_7f4a_7c15, 300);
        // A whole chunk zeroed, then written into again.
        first
            .write_zeroes(16384 * COW_BLOCK, 16384 * COW_BLOCK)
            .unwrap();
        model[16384 * 4096..2 * 16384 * 4096].fill(0);
        first.write_at(&[9; 100], 16384 * COW_BLOCK + 5).unwrap();
        model[16384 * 4096 + 5..16384 * 4096 + 105].fill(9);
        assert_eq!(read_all(&first), model);
        let used = first.memory_used();
        drop(first);

        let second =
            CowOverlay::open(Box::new(Mem(base.clone())), store.try_clone().unwrap()).unwrap();
        assert_eq!(read_all(&second), model);
        assert_eq!(second.memory_used(), used);
        scramble(&second, &mut model, 0x1234_5678, 200);
        drop(second);
        let third = CowOverlay::open(Box::new(Mem(base)), store).unwrap();
        assert_eq!(read_all(&third), model);
    }

    /// A store whose writer went wrong (or was compromised) is refused with a reason
    /// when the next overlay opens it, never trusted and never a panic.
    #[test]
    fn a_bad_store_is_refused() {
        let base = Mem(vec![1u8; 100 * COW_BLOCK as usize]);
        let fresh = || {
            let store = new_store().unwrap();
            let cow = CowOverlay::open(Box::new(base.clone()), store.try_clone().unwrap()).unwrap();
            cow.write_at(&[7; 4096], 3 * COW_BLOCK).unwrap();
            cow.write_zeroes(10 * COW_BLOCK, COW_BLOCK).unwrap();
            store
        };
        let refused = |store: File| match CowOverlay::open(Box::new(base.clone()), store) {
            Ok(_) => panic!("a bad store was accepted"),
            Err(e) => e.to_string(),
        };
        // The layout: header page, one summary page, one bitmap page, data.
        let (summary, bitmap) = (4096u64, 8192u64);

        let store = fresh();
        store.write_all_at(b"NOTACOW!", 0).unwrap();
        assert!(refused(store).contains("no overlay header"));

        let store = fresh();
        let other = Mem(vec![1u8; 50 * COW_BLOCK as usize]);
        let e = match CowOverlay::open(Box::new(other), store) {
            Ok(_) => panic!("a store for another disk size was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("disk of 409600 bytes"), "{e}");

        let store = fresh();
        store.write_all_at(&[7], summary).unwrap();
        assert!(refused(store).contains("summary byte 7"));

        let store = fresh();
        store.write_all_at(&[0xff], bitmap).unwrap();
        assert!(refused(store).contains("state 3"));

        // Block 100 is past the end of a 100-block disk.
        let store = fresh();
        store.write_all_at(&[1], bitmap + 100 / 4).unwrap();
        assert!(refused(store).contains("past the end"));

        // Block 99 said to be held, its data cut off.
        let store = fresh();
        store.write_all_at(&[0x40], bitmap + 99 / 4).unwrap();
        store.set_len(8192 + 4096 + 50 * 4096).unwrap();
        assert!(refused(store).contains("file ends"));

        // The same store untouched opens, and a blank one starts empty.
        let store = fresh();
        let cow = CowOverlay::open(Box::new(base.clone()), store).unwrap();
        let mut b = [0u8; 4];
        cow.read_at(&mut b, 3 * COW_BLOCK).unwrap();
        assert_eq!(b, [7; 4]);
        cow.read_at(&mut b, 10 * COW_BLOCK).unwrap();
        assert_eq!(b, [0; 4]);
        let blank = new_store().unwrap();
        blank.set_len(1 << 20).unwrap();
        let cow = CowOverlay::open(Box::new(base.clone()), blank).unwrap();
        cow.read_at(&mut b, 3 * COW_BLOCK).unwrap();
        assert_eq!(b, [1; 4]);
    }

    /// Queue threads writing different sectors of the same blocks at once: every sector
    /// ends up with its own write, none lost to another's copy-up.
    #[test]
    fn concurrent_partial_writes_to_one_block_all_land() {
        let base = Mem(vec![0xee; 64 * COW_BLOCK as usize]);
        let cow = CowOverlay::new(Box::new(base)).unwrap();
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let cow = &cow;
                s.spawn(move || {
                    for block in 0..64u64 {
                        let at = block * COW_BLOCK + t * 512;
                        cow.write_at(&[t as u8 + 1; 512], at).unwrap();
                    }
                });
            }
        });
        let all = read_all(&cow);
        for (i, sector) in all.chunks(512).enumerate() {
            assert!(sector.iter().all(|&b| b == (i % 8) as u8 + 1), "sector {i}");
        }
    }
}
