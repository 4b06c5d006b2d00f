//! A 9P session's journal: what a replacement worker needs to carry on with the guest's
//! fids. The VMM creates one memfd per 9p device and hands it to every incarnation of the
//! device's worker; each records its session there, and the next one rebuilds the fid
//! table from it (the server does that, through its confined lookups: this module only
//! reads, checks and writes records).
//!
//! Layout:
//!
//! | at | what |
//! | --- | --- |
//! | 0, 64 | two header slots: magic, generation, where the generation's log starts, CRC |
//! | the header's start | the generation's log: a snapshot, then appended records |
//!
//! A record is `len: u32, crc: u32, payload[len]`, the CRC over the generation and the
//! payload, so a record left behind by an older generation never reads as current. Its
//! payload is one of: the session's msize (Tversion done), a fid's state (number, uid,
//! how it was opened, its qid path, its path relative to the root), a clunk.
//!
//! Crash consistency (the worker may die at any instruction): records are appended before
//! the reply that depends on them is sent, and the log ends at the first record whose
//! length or CRC does not check (a torn last record is ignored). Compaction writes the
//! live table as a new generation's snapshot beyond everything written so far, then
//! points the other header slot at it (the valid slot with the higher generation wins),
//! and only then punches the old generation's pages out of memory. A new incarnation
//! starts a new generation the same way, after whatever its predecessor left.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use thiserror::Error;

const MAGIC: &[u8; 8] = b"BHP9JNL1";
const HEADER_SLOT: u64 = 64;
/// magic, generation, start, crc.
const HEADER_LEN: usize = 8 + 8 + 8 + 4;
const PAGE: u64 = 4096;
/// A record's length and CRC.
const RECORD_HEADER: usize = 8;
/// Longest record payload: a fid's fixed fields and a path of up to this many bytes.
pub const MAX_PATH_LEN: usize = 64 * 1024;
const FID_FIXED: usize = 1 + 4 + 4 + 1 + 4 + 8;
const MAX_PAYLOAD: usize = FID_FIXED + MAX_PATH_LEN;
/// Most fids a journal may name (the server holds at most as many).
pub const MAX_FIDS: usize = 64 * 1024;
/// Largest generation read back: every fid with the longest path, with room for appends.
const MAX_GENERATION_BYTES: u64 = 512 << 20;
/// A generation is compacted once its log is this long and four times the live table.
const COMPACT_AT: u64 = 1 << 20;

const KIND_VERSION: u8 = 1;
const KIND_FID: u8 = 2;
const KIND_CLUNK: u8 = 3;

const OPEN_NONE: u8 = 0;
const OPEN_FLAGS: u8 = 1;
const OPEN_XATTR: u8 = 2;

/// How a fid was opened, as a replacement must open it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRecord {
    /// Walked to, not opened.
    None,
    /// Tlopen or Tlcreate with these 9P2000.L flags.
    Flags(u32),
    /// An xattr fid (Txattrwalk, Txattrcreate): its value lived in the worker, so a
    /// replacement cannot rebuild it.
    Xattr,
}

/// One fid as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FidRecord {
    pub uid: u32,
    pub open: OpenRecord,
    /// The qid path it had: a file found at `path` with another is not this fid's file.
    pub qid_path: u64,
    /// Relative to the export's root, plain names only (empty: the root).
    pub path: PathBuf,
}

/// A journal's content as read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Some once a Tversion was answered.
    pub msize: Option<u32>,
    pub fids: HashMap<u32, FidRecord>,
}

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("cannot read the session journal: {0}")]
    Io(#[from] io::Error),
    #[error("the session journal has no valid header")]
    NoHeader,
    #[error("the session journal's generation at {start} is {len} bytes, more than {MAX_GENERATION_BYTES}")]
    TooLarge { start: u64, len: u64 },
    #[error("the session journal's record at {at} is refused: {why}")]
    BadRecord { at: u64, why: &'static str },
}

/// Reads and checks the journal in `file`; an empty file is an empty journal.
pub fn load(file: &File) -> Result<Replayed, JournalError> {
    let size = file.metadata()?.len();
    if size == 0 {
        return Ok(Replayed::default());
    }
    let Some((generation, start)) = load_header(file)? else {
        return Err(JournalError::NoHeader);
    };
    let len = size.saturating_sub(start);
    if len > MAX_GENERATION_BYTES {
        return Err(JournalError::TooLarge { start, len });
    }
    // Read a window at a time: a journal that claims to be large (sparse zeros, say)
    // costs reading, never that much memory.
    let mut window = Window {
        file,
        start,
        end: start + len,
        at: start,
        bytes: Vec::new(),
    };
    let mut replayed = Replayed::default();
    let mut offset = start;
    while let Some(payload) = window.record(offset, generation)? {
        apply(&mut replayed, &payload)
            .map_err(|why| JournalError::BadRecord { at: offset, why })?;
        offset += (RECORD_HEADER + payload.len()) as u64;
    }
    if offset < start + len {
        tracing::debug!("session journal: the log ends at {offset}");
    }
    Ok(replayed)
}

/// Reading window over a generation's log.
struct Window<'a> {
    file: &'a File,
    /// Where the generation starts and the file ends.
    start: u64,
    end: u64,
    /// The file offset of `bytes[0]`.
    at: u64,
    bytes: Vec<u8>,
}

/// Bytes read at once.
const WINDOW: usize = 1 << 20;

impl Window<'_> {
    /// `len` bytes at `offset`, or None past the end of the file.
    fn get(&mut self, offset: u64, len: usize) -> io::Result<Option<&[u8]>> {
        debug_assert!(offset >= self.start);
        let want_end = offset + len as u64;
        if want_end > self.end {
            return Ok(None);
        }
        if offset < self.at || want_end > self.at + self.bytes.len() as u64 {
            // Bounded by the file's end, itself bounded by MAX_GENERATION_BYTES.
            let size = ((self.end - offset) as usize).min(WINDOW.max(len));
            self.bytes.resize(size, 0);
            let n = read_full(self.file, &mut self.bytes, offset)?;
            self.bytes.truncate(n);
            self.at = offset;
            if n < len {
                return Ok(None);
            }
        }
        let from = (offset - self.at) as usize;
        Ok(Some(&self.bytes[from..from + len]))
    }

    /// The payload of the record at `offset`, if one is there whole and checks.
    fn record(&mut self, offset: u64, generation: u64) -> io::Result<Option<Vec<u8>>> {
        let Some(head) = self.get(offset, RECORD_HEADER)? else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 || len > MAX_PAYLOAD {
            return Ok(None);
        }
        let Some(payload) = self.get(offset + RECORD_HEADER as u64, len)? else {
            return Ok(None);
        };
        Ok((record_crc(generation, payload) == crc).then(|| payload.to_vec()))
    }
}

fn apply(replayed: &mut Replayed, payload: &[u8]) -> Result<(), &'static str> {
    let (&kind, body) = payload.split_first().ok_or("empty")?;
    match kind {
        KIND_VERSION => {
            let msize = u32_at(body, 0).ok_or("short version record")?;
            if body.len() != 4 {
                return Err("version record of the wrong length");
            }
            // A new Tversion starts a new session.
            replayed.fids.clear();
            replayed.msize = Some(msize);
        }
        KIND_CLUNK => {
            let fid = u32_at(body, 0).ok_or("short clunk record")?;
            if body.len() != 4 {
                return Err("clunk record of the wrong length");
            }
            replayed.fids.remove(&fid);
        }
        KIND_FID => {
            if body.len() < FID_FIXED - 1 {
                return Err("short fid record");
            }
            let fid = u32_at(body, 0).ok_or("short fid record")?;
            let uid = u32_at(body, 4).ok_or("short fid record")?;
            let flags = u32_at(body, 9).ok_or("short fid record")?;
            let open = match body[8] {
                OPEN_NONE => OpenRecord::None,
                OPEN_FLAGS => OpenRecord::Flags(flags),
                OPEN_XATTR => OpenRecord::Xattr,
                _ => return Err("unknown open state"),
            };
            let qid_path = u64_at(body, 13).ok_or("short fid record")?;
            let path = check_path(&body[FID_FIXED - 1..])?;
            if replayed.msize.is_none() {
                return Err("a fid before any Tversion");
            }
            if !replayed.fids.contains_key(&fid) && replayed.fids.len() >= MAX_FIDS {
                return Err("more fids than a session may hold");
            }
            replayed.fids.insert(
                fid,
                FidRecord {
                    uid,
                    open,
                    qid_path,
                    path,
                },
            );
        }
        _ => return Err("unknown record kind"),
    }
    Ok(())
}

/// A recorded path, refused unless it is plain names beneath the root: no `..`, `.`,
/// leading `/`, NUL or empty component.
fn check_path(bytes: &[u8]) -> Result<PathBuf, &'static str> {
    if bytes.contains(&0) {
        return Err("a path with a NUL byte");
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err("a path too long");
    }
    if bytes.is_empty() {
        return Ok(PathBuf::new());
    }
    if bytes.starts_with(b"/") || bytes.ends_with(b"/") || bytes.windows(2).any(|w| w == b"//") {
        return Err("a path with an empty component or not relative");
    }
    let path = Path::new(std::ffi::OsStr::from_bytes(bytes));
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err("a path with `.` or `..`");
    }
    // Components() folds `a/./b` into `a/b`: compare the count of names too.
    if path.components().count() != bytes.split(|&b| b == b'/').count() {
        return Err("a path with `.` or `..`");
    }
    Ok(path.to_path_buf())
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

fn parse_header(slot: &[u8]) -> Option<(u64, u64)> {
    if &slot[..8] != MAGIC {
        return None;
    }
    let generation = u64_at(slot, 8)?;
    let start = u64_at(slot, 16)?;
    let crc = u32_at(slot, 24)?;
    (crc32(&slot[..24]) == crc && start >= PAGE && start % PAGE == 0).then_some((generation, start))
}

fn encode_header(generation: u64, start: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&generation.to_le_bytes());
    out[16..24].copy_from_slice(&start.to_le_bytes());
    let crc = crc32(&out[..24]);
    out[24..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn version_payload(msize: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(5);
    out.push(KIND_VERSION);
    out.extend_from_slice(&msize.to_le_bytes());
    out
}

fn clunk_payload(fid: u32) -> [u8; 5] {
    let mut out = [KIND_CLUNK, 0, 0, 0, 0];
    out[1..].copy_from_slice(&fid.to_le_bytes());
    out
}

fn fid_payload(fid: u32, record: &FidRecord) -> Option<Vec<u8>> {
    let path = record.path.as_os_str().as_bytes();
    if path.len() > MAX_PATH_LEN {
        return None;
    }
    let (open, flags) = match record.open {
        OpenRecord::None => (OPEN_NONE, 0),
        OpenRecord::Flags(flags) => (OPEN_FLAGS, flags),
        OpenRecord::Xattr => (OPEN_XATTR, 0),
    };
    let mut out = Vec::with_capacity(FID_FIXED + path.len());
    out.push(KIND_FID);
    out.extend_from_slice(&fid.to_le_bytes());
    out.extend_from_slice(&record.uid.to_le_bytes());
    out.push(open);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&record.qid_path.to_le_bytes());
    out.extend_from_slice(path);
    Some(out)
}

fn push_record(out: &mut Vec<u8>, generation: u64, payload: &[u8]) {
    // Payloads are at most MAX_PAYLOAD bytes.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&record_crc(generation, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn record_crc(generation: u64, payload: &[u8]) -> u32 {
    crc32_update(crc32_update(!0, &generation.to_le_bytes()), payload) ^ !0
}

fn crc32(bytes: &[u8]) -> u32 {
    crc32_update(!0, bytes) ^ !0
}

/// CRC-32 (IEEE), table-driven.
fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// The journal a session writes to.
#[derive(Debug)]
pub struct Journal {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    generation: u64,
    start: u64,
    /// Where the next record goes.
    tail: u64,
    msize: Option<u32>,
    /// Each live fid's payload: the next snapshot.
    live: HashMap<u32, Vec<u8>>,
    live_bytes: u64,
    /// A write failed: the journal was invalidated and records no more.
    broken: bool,
}

impl Journal {
    /// Starts a new generation in `file` holding `state` (what the session was rebuilt
    /// to, or nothing), after everything already in the file.
    pub fn start(file: File, state: &Replayed) -> io::Result<Journal> {
        let previous = load_header(&file)?;
        let size = file.metadata()?.len();
        let mut inner = Inner {
            file,
            generation: previous.map_or(0, |(generation, _)| generation),
            start: 0,
            tail: size.max(PAGE),
            msize: state.msize,
            live: HashMap::new(),
            live_bytes: 0,
            broken: false,
        };
        if state.msize.is_some() {
            for (&fid, record) in &state.fids {
                if let Some(payload) = fid_payload(fid, record) {
                    inner.live_bytes += (RECORD_HEADER + payload.len()) as u64;
                    inner.live.insert(fid, payload);
                }
            }
        }
        let old_start = previous.map(|(_, start)| start);
        inner.compact(old_start)?;
        Ok(Journal {
            inner: Mutex::new(inner),
        })
    }

    /// A Tversion was answered: a new session, with no fids (`None`: not 9P2000.L).
    pub fn version(&self, msize: Option<u32>) {
        self.with(|inner| {
            inner.msize = msize;
            inner.live.clear();
            inner.live_bytes = 0;
            let old = inner.start;
            inner.compact(Some(old))
        });
    }

    /// `fid` now stands for `record` (a walk, an attach, an open, a rename).
    pub fn set_fid(&self, fid: u32, record: &FidRecord) {
        let Some(payload) = fid_payload(fid, record) else {
            // A path deeper than any the guest's kernel names; forgotten rather than
            // left as what it was before, so a replacement answers EBADF for it.
            tracing::warn!("fid {fid}: path too long to journal");
            self.clunk(fid);
            return;
        };
        self.with(|inner| {
            inner.append(&payload)?;
            let len = (RECORD_HEADER + payload.len()) as u64;
            if let Some(old) = inner.live.insert(fid, payload) {
                inner.live_bytes -= (RECORD_HEADER + old.len()) as u64;
            }
            inner.live_bytes += len;
            inner.maybe_compact()
        });
    }

    pub fn clunk(&self, fid: u32) {
        self.with(|inner| {
            let Some(old) = inner.live.remove(&fid) else {
                return Ok(());
            };
            inner.live_bytes -= (RECORD_HEADER + old.len()) as u64;
            inner.append(&clunk_payload(fid))?;
            inner.maybe_compact()
        });
    }

    fn with(&self, change: impl FnOnce(&mut Inner) -> io::Result<()>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.broken {
            return;
        }
        if let Err(e) = change(&mut inner) {
            // A journal that misses a change would rebuild the wrong table: better none.
            tracing::warn!("session journal: {e}; a replacement worker will start afresh");
            inner.broken = true;
            let _ = inner.file.write_all_at(&[0u8; 2 * HEADER_SLOT as usize], 0);
        }
    }
}

/// The newest valid header slot's generation and start, if any. Slots past the end of
/// a short file read as zeros, which no slot matches.
fn load_header(file: &File) -> io::Result<Option<(u64, u64)>> {
    let mut header = [0u8; 2 * HEADER_SLOT as usize];
    read_full(file, &mut header, 0)?;
    Ok(header
        .chunks(HEADER_SLOT as usize)
        .filter_map(parse_header)
        .max_by_key(|&(generation, _)| generation))
}

impl Inner {
    fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut record = Vec::with_capacity(RECORD_HEADER + payload.len());
        push_record(&mut record, self.generation, payload);
        self.file.write_all_at(&record, self.tail)?;
        self.tail += record.len() as u64;
        Ok(())
    }

    fn maybe_compact(&mut self) -> io::Result<()> {
        let log = self.tail - self.start;
        if log >= COMPACT_AT && log >= 4 * self.live_bytes {
            let old = self.start;
            self.compact(Some(old))?;
        }
        Ok(())
    }

    /// Writes the live table as a new generation past everything written, switches the
    /// header to it, then frees the generation that started at `old`.
    fn compact(&mut self, old: Option<u64>) -> io::Result<()> {
        let generation = self.generation.wrapping_add(1);
        let start = self.tail.div_ceil(PAGE) * PAGE;
        let mut snapshot = Vec::with_capacity(self.live_bytes as usize + 16);
        if let Some(msize) = self.msize {
            push_record(&mut snapshot, generation, &version_payload(msize));
            for payload in self.live.values() {
                push_record(&mut snapshot, generation, payload);
            }
        }
        self.file.write_all_at(&snapshot, start)?;
        let slot = generation % 2 * HEADER_SLOT;
        self.file
            .write_all_at(&encode_header(generation, start), slot)?;
        self.generation = generation;
        self.start = start;
        self.tail = start + snapshot.len() as u64;
        if let Some(old) = old.filter(|&old| old < start) {
            punch(&self.file, old, start - old);
        }
        Ok(())
    }
}

/// Frees `len` bytes at `offset` (they read as zero); only memory is at stake, so a
/// failure is logged, not fatal.
fn punch(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: fallocate takes no memory; the descriptor is the journal's own.
    let ret = unsafe {
        libc::fallocate64(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if ret < 0 {
        tracing::debug!(
            "session journal: cannot free an old generation: {}",
            io::Error::last_os_error()
        );
    }
}

/// A new, empty journal: a memfd (sparse, growing as records are appended).
pub fn new_journal() -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated string literal; memfd_create reads nothing else
    // of ours and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"bulkhead-p9-journal".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    Ok(File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
mod tests;
