//! Where the display worker keeps what the guest set up - its 2D resources with their
//! guest backing, the scanout, the cursor - so that a replacement worker can rebuild it:
//! a memfd the VMM creates once and hands to every incarnation of the display worker (it
//! vanishes with the VMM). The pixels themselves are not kept: they live in the guest's
//! backing pages, and a replacement transfers them again from there.
//!
//! Layout: two slots of [`SLOT_SIZE`] bytes at offsets 0 and [`SLOT_SIZE`] (the file is
//! sparse: only what was written costs memory). Each slot is a 32-byte header - magic,
//! generation, body length, checksum of generation, length and body - and the body.
//!
//! Crash consistency (the worker may die at any instruction): a new record goes to the
//! slot not holding the current one, body first and header last, with the next
//! generation. A write cut short leaves that slot failing its checksum, and the other slot
//! still holds the previous record; the valid slot with the higher generation is the
//! record. The worker that wrote the store may have been compromised before it died, so
//! everything read is checked: a bad store is an error, never a crash.

use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use super::protocol::{MemEntry, PixelLayout};
use super::scanout::Cursor;
use crate::display::framebuffer::Rect;

/// Room for one record: the bounds below keep every record well inside it.
pub const SLOT_SIZE: u64 = 4 << 20;
/// Most resources the guest may hold at once, so that a record stays bounded.
pub const MAX_RESOURCES: u32 = 4096;
/// Most backing entries over all resources, for the same reason.
pub const MAX_TOTAL_BACKING_ENTRIES: u32 = 1 << 18;

const MAGIC: [u8; 8] = *b"BHGPUs01";
const HEADER_LEN: usize = 32;
const RESOURCE_LEN: usize = 20;
const ENTRY_LEN: usize = 12;
/// The scanout (resource id, rect) and the cursor (resource id, position, hot spot).
const TAIL_LEN: usize = 20 + 20;
/// The largest body a record of bounded size can have.
const MAX_BODY: usize = 4
    + MAX_RESOURCES as usize * RESOURCE_LEN
    + MAX_TOTAL_BACKING_ENTRIES as usize * ENTRY_LEN
    + TAIL_LEN;
const _: () = assert!(HEADER_LEN + MAX_BODY <= SLOT_SIZE as usize);

/// One resource as the guest created it and what backs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedResource {
    pub id: u32,
    pub format: u32,
    pub width: u32,
    pub height: u32,
    pub backing: Vec<MemEntry>,
}

/// Everything a replacement worker needs to show what its predecessor showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// In ascending id order.
    pub resources: Vec<SavedResource>,
    /// The scanout's resource (0: disabled) and the part of it shown.
    pub scanout: (u32, Rect),
    pub cursor: Cursor,
}

impl Record {
    pub fn is_empty(&self) -> bool {
        *self == Record::default()
    }

    fn encode(&self) -> Vec<u8> {
        let entries: usize = self.resources.iter().map(|r| r.backing.len()).sum();
        let mut out = Vec::with_capacity(
            4 + self.resources.len() * RESOURCE_LEN + entries * ENTRY_LEN + TAIL_LEN,
        );
        let put = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
        put(&mut out, self.resources.len() as u32);
        for r in &self.resources {
            for v in [r.id, r.format, r.width, r.height, r.backing.len() as u32] {
                put(&mut out, v);
            }
            for e in &r.backing {
                out.extend_from_slice(&e.addr.to_le_bytes());
                put(&mut out, e.length);
            }
        }
        let (id, rect) = self.scanout;
        for v in [id, rect.x, rect.y, rect.width, rect.height] {
            put(&mut out, v);
        }
        let c = self.cursor;
        for v in [c.resource_id, c.x, c.y, c.hot_x, c.hot_y] {
            put(&mut out, v);
        }
        out
    }

    /// Parses and checks a body: counts within the bounds, ids non-zero and distinct,
    /// formats known, sizes non-zero, the scanout and cursor naming resources that exist.
    /// Budgets and guest-memory bounds are checked again as the resources are rebuilt.
    fn decode(body: &[u8], max_backing_entries: u32) -> Result<Record, StoreError> {
        let mut fields = Reader { bytes: body };
        let count = fields.u32()?;
        if count > MAX_RESOURCES {
            return Err(bad(format!("{count} resources; at most {MAX_RESOURCES}")));
        }
        let mut resources: Vec<SavedResource> = Vec::with_capacity(count as usize);
        let mut total_entries = 0u32;
        for _ in 0..count {
            let [id, format, width, height, entries] = fields.u32s()?;
            if id == 0 || resources.iter().any(|r| r.id == id) {
                return Err(bad(format!("resource id {id} is 0 or given twice")));
            }
            if PixelLayout::of(format).is_none() {
                return Err(bad(format!("resource {id} has unknown format {format}")));
            }
            if width == 0 || height == 0 {
                return Err(bad(format!("resource {id} is {width}x{height}")));
            }
            if entries > max_backing_entries {
                return Err(bad(format!(
                    "resource {id} has {entries} backing entries; at most {max_backing_entries}"
                )));
            }
            total_entries = total_entries.saturating_add(entries);
            if total_entries > MAX_TOTAL_BACKING_ENTRIES {
                return Err(bad(format!(
                    "more than {MAX_TOTAL_BACKING_ENTRIES} backing entries in all"
                )));
            }
            let mut backing = Vec::with_capacity(entries as usize);
            for _ in 0..entries {
                let addr = fields.u64()?;
                let length = fields.u32()?;
                if addr.checked_add(u64::from(length)).is_none() {
                    return Err(bad(format!("resource {id}: backing {addr:#x}+{length}")));
                }
                backing.push(MemEntry { addr, length });
            }
            resources.push(SavedResource {
                id,
                format,
                width,
                height,
                backing,
            });
        }
        let [id, x, y, width, height] = fields.u32s()?;
        let rect = Rect::new(x, y, width, height);
        let [resource_id, cx, cy, hot_x, hot_y] = fields.u32s()?;
        if !fields.bytes.is_empty() {
            return Err(bad(format!(
                "{} bytes after the record",
                fields.bytes.len()
            )));
        }
        for named in [id, resource_id] {
            if named != 0 && !resources.iter().any(|r| r.id == named) {
                return Err(bad(format!(
                    "the scanout or cursor shows resource {named}, which is not recorded"
                )));
            }
        }
        resources.sort_by_key(|r| r.id);
        Ok(Record {
            resources,
            scanout: (id, rect),
            cursor: Cursor {
                resource_id,
                x: cx,
                y: cy,
                hot_x,
                hot_y,
            },
        })
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("the display state store is bad: {0}")]
    Corrupt(String),
    #[error("{what} the display state store")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn bad(why: String) -> StoreError {
    StoreError::Corrupt(why)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let Some((head, rest)) = self.bytes.split_first_chunk::<N>() else {
            return Err(bad("the record ends early".into()));
        };
        self.bytes = rest;
        Ok(*head)
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        self.take().map(u64::from_le_bytes)
    }

    fn u32s<const N: usize>(&mut self) -> Result<[u32; N], StoreError> {
        let mut out = [0; N];
        for v in &mut out {
            *v = self.u32()?;
        }
        Ok(out)
    }
}

/// FNV-1a: enough to tell a slot whose write was cut short; what it holds is checked anyway.
fn checksum(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A slot's header as read: None for a blank one.
struct SlotHeader {
    generation: u64,
    body_len: u32,
    checksum: u64,
}

fn parse_header(header: &[u8; HEADER_LEN]) -> Result<Option<SlotHeader>, StoreError> {
    if *header == [0; HEADER_LEN] {
        return Ok(None);
    }
    let mut fields = Reader { bytes: header };
    if fields.take::<8>()? != MAGIC {
        return Err(bad("a slot without the store's magic".into()));
    }
    let generation = fields.u64()?;
    let body_len = fields.u32()?;
    let _reserved = fields.u32()?;
    let checksum = fields.u64()?;
    Ok(Some(SlotHeader {
        generation,
        body_len,
        checksum,
    }))
}

/// The store, as one worker writes it.
pub struct StateStore {
    file: File,
    /// The slot holding the current record; the next goes to the other.
    active: usize,
    generation: u64,
    max_backing_entries: u32,
}

impl StateStore {
    /// Takes over `file` and reads its record: Ok(None) for a blank store, an error for a
    /// bad one (the store is then reset to an empty record, so the next worker starts
    /// empty too rather than tripping over the same bytes).
    pub fn open(
        file: File,
        max_backing_entries: u32,
    ) -> (StateStore, Result<Option<Record>, StoreError>) {
        let mut store = StateStore {
            file,
            active: 1,
            generation: 0,
            max_backing_entries,
        };
        let loaded = store.load();
        if let Err(e) = &loaded {
            if matches!(e, StoreError::Corrupt(_)) {
                if let Err(reset) = store.reset() {
                    tracing::warn!("cannot reset the display state store: {reset}");
                }
            }
        }
        (store, loaded)
    }

    fn load(&mut self) -> Result<Option<Record>, StoreError> {
        let mut best: Option<(usize, SlotHeader, Vec<u8>)> = None;
        let mut failure = None;
        for slot in 0..2 {
            match self.read_slot(slot) {
                Ok(None) => {}
                Ok(Some((header, body))) => {
                    if best
                        .as_ref()
                        .is_none_or(|(_, b, _)| header.generation > b.generation)
                    {
                        best = Some((slot, header, body));
                    }
                }
                Err(e @ StoreError::Io { .. }) => return Err(e),
                Err(e) => failure = Some(e),
            }
        }
        // A write cut short leaves its slot's header as it was (it goes last): blank for
        // the first record, failing its checksum for a later one while the other slot holds
        // the previous record. No valid slot and a bad one is thus no crash's doing.
        let Some((slot, header, body)) = best else {
            return match failure {
                Some(e) => Err(e),
                None => Ok(None),
            };
        };
        if header.generation == u64::MAX {
            return Err(bad("the generation cannot advance".into()));
        }
        let record = Record::decode(&body, self.max_backing_entries)?;
        self.active = slot;
        self.generation = header.generation;
        Ok(Some(record))
    }

    fn read_header(&self, slot: usize) -> Result<[u8; HEADER_LEN], StoreError> {
        let mut header = [0u8; HEADER_LEN];
        read_zero_fill(&self.file, &mut header, slot as u64 * SLOT_SIZE)?;
        Ok(header)
    }

    /// A slot's header and body, if it holds a whole record.
    fn read_slot(&self, slot: usize) -> Result<Option<(SlotHeader, Vec<u8>)>, StoreError> {
        let Some(header) = parse_header(&self.read_header(slot)?)? else {
            return Ok(None);
        };
        let len = header.body_len as usize;
        if len > MAX_BODY {
            return Err(bad(format!("a record of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        read_zero_fill(
            &self.file,
            &mut body,
            slot as u64 * SLOT_SIZE + HEADER_LEN as u64,
        )?;
        let sum = checksum(&[
            &header.generation.to_le_bytes(),
            &header.body_len.to_le_bytes(),
            &body,
        ]);
        if sum != header.checksum {
            return Err(bad(format!("slot {slot} fails its checksum")));
        }
        Ok(Some((header, body)))
    }

    /// Makes `record` the store's record: the inactive slot, body first, header last.
    pub fn save(&mut self, record: &Record) -> Result<(), StoreError> {
        let body = record.encode();
        let generation = self.generation.checked_add(1).ok_or_else(|| {
            // Unreachable from a store this worker formatted; load refuses u64::MAX.
            bad("the generation cannot advance".into())
        })?;
        let slot = 1 - self.active;
        let at = slot as u64 * SLOT_SIZE;
        let body_len = body.len() as u32;
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..16].copy_from_slice(&generation.to_le_bytes());
        header[16..20].copy_from_slice(&body_len.to_le_bytes());
        let sum = checksum(&[&generation.to_le_bytes(), &body_len.to_le_bytes(), &body]);
        header[24..32].copy_from_slice(&sum.to_le_bytes());
        let write = |bytes: &[u8], at: u64| {
            self.file
                .write_all_at(bytes, at)
                .map_err(|source| StoreError::Io {
                    what: "writing",
                    source,
                })
        };
        write(&body, at + HEADER_LEN as u64)?;
        write(&header, at)?;
        self.active = slot;
        self.generation = generation;
        Ok(())
    }

    /// After a bad store: slot 1 blanked first, then an empty record in slot 0. Cut short
    /// anywhere, what is left reads as bad or blank, and the device starts empty either way.
    fn reset(&mut self) -> Result<(), StoreError> {
        self.file
            .write_all_at(&[0; HEADER_LEN], SLOT_SIZE)
            .map_err(|source| StoreError::Io {
                what: "resetting",
                source,
            })?;
        self.active = 1;
        self.generation = 0;
        self.save(&Record::default())
    }
}

/// Reads `buf` at `at`; what lies past the end of the file reads as zeros.
fn read_zero_fill(file: &File, buf: &mut [u8], at: u64) -> Result<(), StoreError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(StoreError::Io {
                    what: "reading",
                    source,
                })
            }
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// A fresh, empty store: what the VMM makes once per display device.
pub fn new_store() -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated string literal; memfd_create reads nothing else
    // of ours and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"bulkhead-display".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    Ok(File::from(unsafe {
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            resources: vec![
                SavedResource {
                    id: 1,
                    format: 2,
                    width: 64,
                    height: 32,
                    backing: vec![
                        MemEntry {
                            addr: 0x10_0000,
                            length: 4096,
                        },
                        MemEntry {
                            addr: 0x20_0000,
                            length: 4096,
                        },
                    ],
                },
                SavedResource {
                    id: 7,
                    format: 134,
                    width: 64,
                    height: 64,
                    backing: Vec::new(),
                },
            ],
            scanout: (1, Rect::new(0, 0, 64, 32)),
            cursor: Cursor {
                resource_id: 7,
                x: 10,
                y: 20,
                hot_x: 1,
                hot_y: 2,
            },
        }
    }

    fn open(file: &File) -> (StateStore, Result<Option<Record>, StoreError>) {
        StateStore::open(file.try_clone().unwrap(), 16384)
    }

    #[test]
    fn a_blank_store_is_empty_and_records_round_trip() {
        let file = new_store().unwrap();
        let (mut store, loaded) = open(&file);
        assert!(loaded.unwrap().is_none());
        store.save(&sample()).unwrap();
        assert_eq!(open(&file).1.unwrap(), Some(sample()));
        // A second save lands in the other slot; the newer wins.
        let mut changed = sample();
        changed.scanout = (0, Rect::default());
        store.save(&changed).unwrap();
        let (mut again, loaded) = open(&file);
        assert_eq!(loaded.unwrap(), Some(changed.clone()));
        // The next incarnation carries on from the generation it found.
        again.save(&sample()).unwrap();
        assert_eq!(open(&file).1.unwrap(), Some(sample()));
    }

    #[test]
    fn a_write_cut_short_leaves_the_previous_record() {
        let file = new_store().unwrap();
        let (mut store, _) = open(&file);
        store.save(&sample()).unwrap();
        let mut newer = sample();
        newer.cursor.x = 99;
        let body = newer.encode();
        // The next save goes to slot 1: its body written, its header not yet.
        file.write_all_at(&body, SLOT_SIZE + HEADER_LEN as u64)
            .unwrap();
        assert_eq!(open(&file).1.unwrap(), Some(sample()));
        // A header with the next generation but a body torn halfway.
        store.save(&newer).unwrap();
        file.write_all_at(&[0xee; 8], SLOT_SIZE + HEADER_LEN as u64)
            .unwrap();
        assert_eq!(open(&file).1.unwrap(), Some(sample()));
        // The very first save cut short, its header not yet written: nothing recorded.
        let first = new_store().unwrap();
        first.write_all_at(&body, HEADER_LEN as u64).unwrap();
        assert!(open(&first).1.unwrap().is_none());
    }

    /// A record that checks out byte-wise but says something impossible.
    fn stored(record_body: &[u8]) -> File {
        let file = new_store().unwrap();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..16].copy_from_slice(&5u64.to_le_bytes());
        let len = record_body.len() as u32;
        header[16..20].copy_from_slice(&len.to_le_bytes());
        let sum = checksum(&[&5u64.to_le_bytes(), &len.to_le_bytes(), record_body]);
        header[24..32].copy_from_slice(&sum.to_le_bytes());
        file.write_all_at(record_body, HEADER_LEN as u64).unwrap();
        file.write_all_at(&header, 0).unwrap();
        file
    }

    #[test]
    fn bad_stores_are_refused_and_reset_to_empty() {
        let good = sample().encode();
        let word = |record: &mut Vec<u8>, at: usize, v: u32| {
            record[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        let mut zero_id = good.clone();
        word(&mut zero_id, 4, 0);
        cases.push((zero_id, "is 0 or given twice"));
        let mut twice = good.clone();
        // The second resource starts after the first's 20 bytes and two 12-byte entries.
        word(&mut twice, 4 + 20 + 24, 1);
        cases.push((twice, "is 0 or given twice"));
        let mut format = good.clone();
        word(&mut format, 8, 999);
        cases.push((format, "unknown format"));
        let mut empty = good.clone();
        word(&mut empty, 12, 0);
        cases.push((empty, "is 0x32"));
        let mut entries = good.clone();
        word(&mut entries, 20, 20000);
        cases.push((entries, "backing entries"));
        let mut many = good.clone();
        word(&mut many, 0, MAX_RESOURCES + 1);
        cases.push((many, "resources; at most"));
        let mut scanout = good.clone();
        let tail = good.len() - TAIL_LEN;
        word(&mut scanout, tail, 3);
        cases.push((scanout, "not recorded"));
        let mut wrap = good.clone();
        wrap[28..36].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push((wrap, "backing 0x"));
        cases.push((good[..good.len() - 1].to_vec(), "ends early"));
        let mut trailing = good.clone();
        trailing.push(0);
        cases.push((trailing, "after the record"));
        for (body, says) in cases {
            let file = stored(&body);
            let error = open(&file).1.unwrap_err().to_string();
            assert!(error.contains(says), "{says}: {error}");
            // Reset: the next worker finds an empty record, not the same bad one.
            assert_eq!(open(&file).1.unwrap(), Some(Record::default()), "{says}");
        }
        // Bytes that are no store at all.
        let file = new_store().unwrap();
        file.write_all_at(b"garbage!", 0).unwrap();
        file.write_all_at(b"garbage!", SLOT_SIZE).unwrap();
        assert!(open(&file).1.unwrap_err().to_string().contains("magic"));
        assert_eq!(open(&file).1.unwrap(), Some(Record::default()));
        // A length past any possible record.
        let file = stored(&good);
        file.write_all_at(&u32::MAX.to_le_bytes(), 16).unwrap();
        assert!(open(&file).1.is_err());
    }
}
