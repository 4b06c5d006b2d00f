//! QCOW2 v2 and v3: read and write, backing chains, compressed and zero clusters, extended
//! L2 entries, internal snapshots left intact.
//!
//! Locking: one metadata mutex per image. Reads and writes to clusters the image already
//! owns look their mapping up under it and then do the data I/O without it; writes that
//! allocate hold it across the data write so no other writer can map the same cluster twice.
//! Freed clusters become reusable only at a flush during which no unlocked I/O is in flight
//! (the I/O gate; asynchronous I/O mapped by `map_direct` holds it until it ends, and a
//! flush that finds it held leaves the frees for a later one), so a guest racing a discard
//! against a write cannot land data in a cluster that already belongs elsewhere.
//!
//! Crash safety comes from write-back metadata with a fixed order at flush: data, refcount
//! blocks, sync, L2 tables, sync, L1 entries, sync, then the deferred refcount decrements.
//! A crash anywhere leaves refcounts at or above the references (leaks, never corruption).

mod cache;
mod compressed;
pub mod header;
mod refcount;
mod snapshot;
mod tables;

use std::collections::BTreeSet;
use std::fs::File;
use std::sync::{Arc, Mutex};

use vm_memory::VolatileSlice;

use super::direct::{IoGate, IoHold};
use super::io::HostFile;
use super::{
    check_range, guest_buffers, open_inner, BackingResolver, DirectIo, DirectRun, DiskError,
    DiskImage, DiskOptions, Format, Result,
};
use cache::MetaCache;
use header::{Compression, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use refcount::Refcounts;
use tables::{decode_l2, l1_target, Mapping, ALL_ALLOCATED, COPIED, ZERO};

pub struct Qcow2 {
    file: HostFile,
    cluster_bits: u32,
    size: u64,
    l2_entries: u64,
    extended: bool,
    version: u32,
    compression: Compression,
    l1_offset: u64,
    backing: Option<Box<dyn DiskImage>>,
    writable: bool,
    meta: Mutex<Meta>,
    /// The last cluster decompressed, by host offset: sequential reads in pieces smaller
    /// than a cluster would otherwise decompress it once per piece. The engine never writes
    /// compressed clusters, so an offset keeps meaning the same stream.
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Held by data I/O outside the metadata lock; see [`Qcow2::io_gate`].
    io_gate: IoGate,
}

struct Meta {
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2: MetaCache,
    rc: Refcounts,
}

fn corrupt(s: impl Into<String>) -> DiskError {
    DiskError::Corrupt(s.into())
}

/// What goes into a newly allocated cluster.
enum Content<'a> {
    /// A whole cluster of the caller's buffer, from this offset.
    Caller(usize),
    /// The cluster as it must read, built in memory.
    Owned(Vec<u8>),
    /// Only this piece: the cluster lies past the end of the file, the rest reads zeros.
    Tail(&'a [u8]),
}

struct Planned<'a> {
    cluster: u64,
    host: u64,
    in_cluster: u64,
    content: Content<'a>,
}

/// What [`Qcow2::read_mapped`] found at a stretch of the guest disk.
#[derive(Debug, Clone, Copy)]
enum Run {
    /// Data clusters, contiguous on the host from `host`.
    Data { host: u64 },
    /// Part of one cluster of any other kind, `in_cluster` bytes into it.
    Other { map: Mapping, in_cluster: u64 },
}

/// One cluster's share of a request.
struct Piece {
    cluster: u64,
    in_cluster: u64,
    len: usize,
    /// Offset in the caller's buffer.
    at: usize,
}

impl Qcow2 {
    /// Opens a QCOW2 image; backing files come from `resolver`.
    pub fn open(
        file: File,
        writable: bool,
        resolver: &dyn BackingResolver,
        options: &DiskOptions,
    ) -> Result<Qcow2> {
        Self::open_with_depth(file, writable, resolver, options, 0)
    }

    pub(crate) fn open_with_depth(
        file: File,
        writable: bool,
        resolver: &dyn BackingResolver,
        options: &DiskOptions,
        depth: usize,
    ) -> Result<Qcow2> {
        let file = HostFile::new(file, options.fail_writes_after);
        let file_len = file.len().map_err(DiskError::io("size of qcow2 image"))?;
        let mut start = [0u8; 24];
        file.read_zero_fill(&mut start, 0)
            .map_err(DiskError::io("read qcow2 header"))?;
        let bits = u32::from_be_bytes([start[20], start[21], start[22], start[23]]);
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
            return Err(corrupt(format!("cluster_bits {bits} is out of range")));
        }
        let mut first = vec![0u8; 1 << bits];
        file.read_zero_fill(&mut first, 0)
            .map_err(DiskError::io("read qcow2 header"))?;
        let h = Header::parse(&first, file_len)?;
        if writable {
            if h.incompatible_features & INCOMPAT_DIRTY != 0 {
                return Err(DiskError::NeedsRepair(
                    "the dirty bit is set, so refcounts may be stale (lazy refcounts); \
                     repair with `qemu-img check -r all` or open read-only"
                        .into(),
                ));
            }
            if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(DiskError::NeedsRepair(
                    "the image is marked corrupt; repair with `qemu-img check -r all`".into(),
                ));
            }
        }
        let cs = h.cluster_size();
        let l1_bytes = u64::from(h.l1_size) * 8;
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_zero_fill(&mut raw, h.l1_table_offset)
            .map_err(DiskError::io("read L1 table"))?;
        let l1 = raw
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_be_bytes(b)
            })
            .collect();
        let mut reserved = vec![
            (0, 1),
            (
                h.l1_table_offset / cs,
                (h.l1_table_offset + l1_bytes).div_ceil(cs),
            ),
            (
                h.refcount_table_offset / cs,
                h.refcount_table_offset / cs + u64::from(h.refcount_table_clusters),
            ),
        ];
        if writable {
            reserved.extend(snapshot::metadata_ranges(&file, &h, file_len)?);
        }
        let rc = Refcounts::load(
            &file,
            &h,
            file_len,
            reserved,
            (options.refcount_cache_bytes / cs).clamp(2, 1024) as usize,
        )?;
        let backing = match &h.backing_file {
            None => None,
            Some(name) => {
                if depth >= super::MAX_BACKING_DEPTH {
                    return Err(DiskError::BackingTooDeep);
                }
                let bf =
                    resolver
                        .open_backing(name)
                        .map_err(|source| DiskError::BackingRefused {
                            name: name.clone(),
                            source,
                        })?;
                let format = match h.backing_format.as_deref() {
                    None => None,
                    Some("raw") => Some(Format::Raw),
                    Some("qcow2") => Some(Format::Qcow2),
                    Some(other) => {
                        return Err(DiskError::Unsupported(format!("backing format {other:?}")))
                    }
                };
                Some(open_inner(bf, format, false, resolver, options, depth + 1)?)
            }
        };
        let l2_cap = (options.l2_cache_bytes / cs).clamp(2, 4096) as usize;
        let q = Qcow2 {
            file,
            cluster_bits: h.cluster_bits,
            size: h.size,
            l2_entries: h.l2_entries(),
            extended: h.extended_l2(),
            version: h.version,
            compression: h.compression,
            l1_offset: h.l1_table_offset,
            backing,
            writable,
            last_compressed: Mutex::new(None),
            io_gate: IoGate::default(),
            meta: Mutex::new(Meta {
                l1,
                l1_dirty: BTreeSet::new(),
                l2: MetaCache::new(l2_cap),
                rc,
            }),
        };
        if writable && h.version == 3 && h.autoclear_features != 0 {
            // Autoclear features (bitmaps and the like) go stale once anyone who does not
            // maintain them writes: the spec says to clear them.
            q.file
                .write_all(&0u64.to_be_bytes(), 88)
                .and_then(|_| q.file.sync_data())
                .map_err(DiskError::io("clear autoclear features"))?;
        }
        Ok(q)
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Held across data I/O done outside the metadata lock; taken while that lock is held,
    /// so the mapping it uses cannot be freed before the I/O ends.
    fn io_gate(&self) -> IoHold {
        self.io_gate.enter()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Splits a request at cluster boundaries, lazily: a huge discard must not need a
    /// list as long as the disk.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> {
        let (cs, bits) = (self.cs(), self.cluster_bits);
        let mut done = 0u64;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let pos = offset + done;
            let in_cluster = pos & (cs - 1);
            let n = (cs - in_cluster).min(len - done);
            let p = Piece {
                cluster: pos >> bits,
                in_cluster,
                len: n as usize,
                at: done as usize,
            };
            done += n;
            Some(p)
        })
    }

    fn entry_bytes(&self) -> usize {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// Makes sure the L2 table at `off` is cached, evicting (and if needed flushing) another.
    fn load_l2(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.l2.contains(off) {
            return Ok(());
        }
        if let Some((victim, dirty)) = m.l2.victim() {
            if dirty {
                self.flush_metadata(m)?;
            }
            m.l2.remove(victim);
        }
        let mut data = vec![0u8; self.cs() as usize];
        self.file
            .read_zero_fill(&mut data, off)
            .map_err(DiskError::io("read L2 table"))?;
        m.l2.insert(off, data, false);
        Ok(())
    }

    fn end(&self, m: &Meta) -> u64 {
        m.rc.end << self.cluster_bits
    }

    fn l2_offset(&self, m: &Meta, cluster: u64) -> Result<Option<u64>> {
        let idx = (cluster / self.l2_entries) as usize;
        let e =
            m.l1.get(idx)
                .copied()
                .ok_or_else(|| corrupt("L1 table too short"))?;
        l1_target(e, self.cluster_bits, self.end(m), m.rc.reserved())
    }

    /// The raw L2 entry and bitmap for a guest cluster.
    fn raw_entry(&self, m: &mut Meta, cluster: u64) -> Result<(u64, Option<u64>)> {
        let Some(off) = self.l2_offset(m, cluster)? else {
            return Ok((0, self.extended.then_some(0)));
        };
        self.load_l2(m, off)?;
        let i = (cluster % self.l2_entries) as usize * self.entry_bytes() / 8;
        let t = m.l2.get(off).ok_or_else(|| corrupt("L2 table vanished"))?;
        let e = t.u64_at(i);
        let b = self.extended.then(|| t.u64_at(i + 1));
        Ok((e, b))
    }

    fn mapping(&self, m: &mut Meta, cluster: u64) -> Result<Mapping> {
        let (e, b) = self.raw_entry(m, cluster)?;
        decode_l2(e, b, self.cluster_bits, self.end(m), m.rc.reserved())
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let blen = b.len();
        if offset >= blen {
            buf.fill(0);
            return Ok(());
        }
        let n = ((blen - offset) as usize).min(buf.len());
        b.read_at(&mut buf[..n], offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    fn read_compressed(&self, host: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        let cached = || {
            self.last_compressed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        };
        if let Some((h, data)) = &*cached() {
            if *h == host {
                return Ok(data.clone());
            }
        }
        let mut input = vec![0u8; len as usize];
        self.file
            .read_zero_fill(&mut input, host)
            .map_err(DiskError::io("read compressed cluster"))?;
        let mut out = vec![0u8; self.cs() as usize];
        compressed::decompress(self.compression, &input, &mut out)
            .map_err(|why| DiskError::Decompress { offset: host, why })?;
        let out = Arc::new(out);
        *cached() = Some((host, out.clone()));
        Ok(out)
    }

    /// Walks the `len` bytes at `offset` as the image maps them, calling
    /// `read(at, len, guest offset, run)` for each run of data clusters that are contiguous
    /// on the host too (one read for many clusters) and for every other piece. The
    /// mappings are taken under the metadata lock, the reads done outside it under the I/O
    /// gate, so no cluster is freed under a read.
    fn read_mapped(
        &self,
        offset: u64,
        len: u64,
        mut read: impl FnMut(usize, usize, u64, Run) -> Result<()>,
    ) -> Result<()> {
        check_range(offset, len, self.size)?;
        let pieces: Vec<Piece> = self.pieces(offset, len).collect();
        let (maps, _gate) = {
            let mut m = self.lock();
            let maps = pieces
                .iter()
                .map(|p| self.mapping(&mut m, p.cluster))
                .collect::<Result<Vec<_>>>()?;
            (maps, self.io_gate())
        };
        let mut i = 0;
        while i < pieces.len() {
            let p = &pieces[i];
            let guest = offset + p.at as u64;
            if let Mapping::Data { host } = maps[i] {
                let start = host + p.in_cluster;
                let mut j = i + 1;
                let mut run = p.len;
                while j < pieces.len()
                    && maps[j]
                        == (Mapping::Data {
                            host: start + run as u64,
                        })
                {
                    run += pieces[j].len;
                    j += 1;
                }
                read(p.at, run, guest, Run::Data { host: start })?;
                i = j;
                continue;
            }
            read(
                p.at,
                p.len,
                guest,
                Run::Other {
                    map: maps[i],
                    in_cluster: p.in_cluster,
                },
            )?;
            i += 1;
        }
        Ok(())
    }

    /// Reads part of one guest cluster given its mapping; no lock held.
    fn read_piece(&self, map: Mapping, guest: u64, in_cluster: u64, buf: &mut [u8]) -> Result<()> {
        match map {
            Mapping::Unallocated => self.read_backing(buf, guest),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host } => self
                .file
                .read_zero_fill(buf, host + in_cluster)
                .map_err(DiskError::io("qcow2 read")),
            Mapping::Compressed { host, len } => {
                let data = self.read_compressed(host, len)?;
                let s = in_cluster as usize;
                buf.copy_from_slice(&data[s..s + buf.len()]);
                Ok(())
            }
            Mapping::Sub { host, alloc, zero } => {
                let sub = self.cs() / 32;
                let mut done = 0usize;
                while done < buf.len() {
                    let pos = in_cluster + done as u64;
                    let k = (pos / sub) as u32;
                    let n = ((sub - pos % sub) as usize).min(buf.len() - done);
                    let out = &mut buf[done..done + n];
                    if alloc & (1 << k) != 0 {
                        self.file
                            .read_zero_fill(out, host + pos)
                            .map_err(DiskError::io("qcow2 read"))?;
                    } else if zero & (1 << k) != 0 {
                        out.fill(0);
                    } else {
                        self.read_backing(out, guest - in_cluster + pos)?;
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Sets a guest cluster's L2 entry, creating or copying its L2 table as needed, and
    /// defers freeing what the old entry owned.
    fn set_entry(&self, m: &mut Meta, cluster: u64, entry: u64, bitmap: u64) -> Result<()> {
        let l1_idx = (cluster / self.l2_entries) as usize;
        let off = match self.l2_offset(m, cluster)? {
            Some(off) if m.rc.get(&self.file, off >> self.cluster_bits)? == 1 => off,
            old => {
                // No table yet, or one shared with a snapshot: this image needs its own.
                let data = match old {
                    Some(o) => {
                        self.load_l2(m, o)?;
                        m.l2.get(o)
                            .map(|t| t.data.clone())
                            .ok_or_else(|| corrupt("L2 table vanished"))?
                    }
                    None => vec![0u8; self.cs() as usize],
                };
                let c = m.rc.alloc(&self.file)?;
                let new = c << self.cluster_bits;
                if let Some((victim, dirty)) = m.l2.victim() {
                    if dirty {
                        self.flush_metadata(m)?;
                    }
                    m.l2.remove(victim);
                }
                m.l2.insert(new, data, true);
                if let Some(o) = old {
                    m.rc.defer_free(o >> self.cluster_bits);
                }
                m.l1[l1_idx] = new | COPIED;
                m.l1_dirty.insert(l1_idx);
                new
            }
        };
        self.load_l2(m, off)?;
        let old = self.mapping(m, cluster)?;
        let i = (cluster % self.l2_entries) as usize * self.entry_bytes() / 8;
        let extended = self.extended;
        let t = m.l2.get(off).ok_or_else(|| corrupt("L2 table vanished"))?;
        t.set_u64(i, entry);
        if extended {
            t.set_u64(i + 1, bitmap);
        }
        let new_host = entry & tables::OFFSET_MASK;
        if let Some((start, len)) = old.owned() {
            let first = start >> self.cluster_bits;
            let last = (start + len - 1) >> self.cluster_bits;
            for c in first..=last {
                if c << self.cluster_bits != new_host {
                    m.rc.defer_free(c);
                }
            }
        }
        Ok(())
    }

    /// The cluster's current content with `data` laid over it at `in_cluster`.
    fn merged_cluster(
        &self,
        map: Mapping,
        cluster: u64,
        in_cluster: u64,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<Vec<u8>> {
        let cs = self.cs() as usize;
        let mut buf = vec![0u8; cs];
        if in_cluster != 0 || len != cs {
            self.read_piece(map, cluster << self.cluster_bits, 0, &mut buf)?;
        }
        let s = in_cluster as usize;
        match data {
            Some(d) => buf[s..s + len].copy_from_slice(d),
            None => buf[s..s + len].fill(0),
        }
        Ok(buf)
    }

    /// Can this write go straight to the host cluster the entry already owns?
    fn in_place(&self, m: &mut Meta, map: Mapping, p: &Piece) -> Result<Option<u64>> {
        let host = match map {
            Mapping::Data { host } => host,
            Mapping::Sub { host, alloc, .. } if host != 0 => {
                let sub = self.cs() / 32;
                let first = p.in_cluster / sub;
                let last = (p.in_cluster + p.len as u64 - 1) / sub;
                if (first..=last).any(|k| alloc & (1 << k) == 0) {
                    return Ok(None);
                }
                host
            }
            _ => return Ok(None),
        };
        // A cluster shared with a snapshot must be copied, whatever its COPIED flag says.
        Ok((m.rc.get(&self.file, host >> self.cluster_bits)? == 1).then_some(host))
    }

    /// Writes (or zeroes, with `data` None) one piece through a freshly allocated cluster.
    fn write_allocating(
        &self,
        m: &mut Meta,
        map: Mapping,
        p: &Piece,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let full = self.merged_cluster(map, p.cluster, p.in_cluster, data, p.len)?;
        let c = m.rc.alloc(&self.file)?;
        let host = c << self.cluster_bits;
        self.file
            .write_all(&full, host)
            .map_err(DiskError::io("qcow2 write"))?;
        self.set_entry(m, p.cluster, host | COPIED, self.full_bitmap())
    }

    fn full_bitmap(&self) -> u64 {
        if self.extended {
            u64::from(ALL_ALLOCATED)
        } else {
            0
        }
    }

    /// Does the whole cluster read as zeros?
    fn reads_zero(&self, map: Mapping) -> bool {
        match map {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing.is_none(),
            Mapping::Sub { host: 0, zero, .. } => zero == ALL_ALLOCATED || self.backing.is_none(),
            _ => false,
        }
    }

    /// Plans the data write for a piece that needs a new cluster, and allocates it.
    fn plan_allocation<'a>(
        &self,
        m: &mut Meta,
        map: Mapping,
        p: &Piece,
        data: &'a [u8],
    ) -> Result<Planned<'a>> {
        let whole = p.len as u64 == self.cs();
        let content = if whole {
            Content::Caller(p.at)
        } else if self.reads_zero(map) {
            // Decided after allocating: a cluster past the end of the file needs only the
            // piece written, the rest reads as zeros anyway.
            Content::Tail(data)
        } else {
            Content::Owned(self.merged_cluster(map, p.cluster, p.in_cluster, Some(data), p.len)?)
        };
        let host = m.rc.alloc(&self.file)? << self.cluster_bits;
        let content = match content {
            Content::Tail(_) if host < self.file.written_end() => Content::Owned(
                self.merged_cluster(map, p.cluster, p.in_cluster, Some(data), p.len)?,
            ),
            c => c,
        };
        Ok(Planned {
            cluster: p.cluster,
            host,
            in_cluster: p.in_cluster,
            content,
        })
    }

    /// Writes the data of planned allocations, runs of whole clusters that are contiguous
    /// both in `buf` and on the host as one write.
    fn write_planned(&self, plans: &[Planned<'_>], buf: &[u8]) -> Result<()> {
        let cs = self.cs() as usize;
        let mut i = 0;
        while i < plans.len() {
            let p = &plans[i];
            let io = DiskError::io("qcow2 write");
            match &p.content {
                Content::Owned(v) => self.file.write_all(v, p.host).map_err(io)?,
                Content::Tail(d) => self.file.write_all(d, p.host + p.in_cluster).map_err(io)?,
                Content::Caller(at) => {
                    let mut j = i + 1;
                    while j < plans.len()
                        && plans[j].host == p.host + ((j - i) * cs) as u64
                        && matches!(plans[j].content, Content::Caller(a) if a == at + (j - i) * cs)
                    {
                        j += 1;
                    }
                    self.file
                        .write_all(&buf[*at..*at + (j - i) * cs], p.host)
                        .map_err(io)?;
                    i = j;
                    continue;
                }
            }
            i += 1;
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    /// Makes whole clusters read as zeros (`zero`) or drops them (discard), through metadata
    /// only; partial clusters are zeroed by writing when `zero`, left alone otherwise.
    fn zero_or_discard(&self, offset: u64, len: u64, zero: bool) -> Result<()> {
        self.check_write(offset, len)?;
        let cs = self.cs();
        let mut m = self.lock();
        for p in self.pieces(offset, len) {
            let map = self.mapping(&mut m, p.cluster)?;
            let whole = p.len as u64 == cs
                || (p.in_cluster == 0
                    && (p.cluster << self.cluster_bits) + p.len as u64 == self.size);
            if !whole {
                if zero {
                    let zeros = vec![0u8; p.len];
                    self.write_piece(&mut m, map, &p, &zeros)?;
                }
                continue;
            }
            if self.reads_zero(map) && map.owned().is_none() {
                continue;
            }
            if self.extended {
                self.set_entry(&mut m, p.cluster, 0, u64::from(ALL_ALLOCATED) << 32)?;
            } else if self.version >= 3 {
                self.set_entry(&mut m, p.cluster, ZERO, 0)?;
            } else if self.backing.is_none() {
                self.set_entry(&mut m, p.cluster, 0, 0)?;
            } else if zero {
                // v2 over a backing file has no zero flag: write real zeros.
                self.write_allocating(&mut m, map, &p, None)?;
            }
        }
        Ok(())
    }

    fn write_piece(&self, m: &mut Meta, map: Mapping, p: &Piece, data: &[u8]) -> Result<()> {
        if let Some(host) = self.in_place(m, map, p)? {
            return self
                .file
                .write_all(data, host + p.in_cluster)
                .map_err(DiskError::io("qcow2 write"));
        }
        self.write_allocating(m, map, p, Some(data))
    }

    /// Writes back all dirty metadata in crash-safe order and makes it durable.
    fn flush_metadata(&self, m: &mut Meta) -> Result<()> {
        let sync = || self.file.sync_data().map_err(DiskError::io("sync"));
        if m.rc.is_dirty() {
            m.rc.write_back(&self.file)?;
        }
        // Data and refcount increments are durable before any L2 entry can point at them.
        sync()?;
        let dirty = m.l2.dirty_offsets();
        if !dirty.is_empty() || !m.l1_dirty.is_empty() {
            for off in dirty {
                if let Some(t) = m.l2.get(off) {
                    self.file
                        .write_all(&t.data, off)
                        .map_err(DiskError::io("write L2 table"))?;
                    t.dirty = false;
                }
            }
            if !m.l1_dirty.is_empty() {
                sync()?;
                for i in std::mem::take(&mut m.l1_dirty) {
                    self.file
                        .write_all(&m.l1[i].to_be_bytes(), self.l1_offset + i as u64 * 8)
                        .map_err(DiskError::io("write L1 entry"))?;
                }
            }
            sync()?;
        }
        if m.rc.has_pending() {
            // Only now is every dropped reference gone from the disk too. Data I/O that
            // looked its mapping up earlier may still be using a freed cluster: while any
            // is in flight the frees wait (a leak at worst if we die meanwhile), or the
            // cluster could be handed out again under its feet. Waiting here instead could
            // deadlock: an asynchronous I/O is released by its queue's thread, which may be
            // waiting for this lock.
            if self.io_gate.is_idle() {
                m.rc.apply_frees(&self.file)?;
                m.rc.write_back(&self.file)?;
                sync()?;
            } else {
                tracing::debug!("qcow2: I/O in flight, freed clusters wait for a later flush");
            }
        }
        Ok(())
    }
}

impl DiskImage for Qcow2 {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_mapped(offset, buf.len() as u64, |at, len, guest, run| {
            let out = &mut buf[at..at + len];
            match run {
                Run::Data { host } => self
                    .file
                    .read_zero_fill(out, host)
                    .map_err(DiskError::io("qcow2 read")),
                Run::Other { map, in_cluster } => self.read_piece(map, guest, in_cluster, out),
            }
        })
    }

    /// Data clusters are read straight into the guest's buffers; the rest (zeros, backing
    /// data, compressed clusters) is staged a piece at a time.
    fn read_into(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<()> {
        let total = guest_buffers::total_len(bufs) as u64;
        self.read_mapped(offset, total, |at, len, guest, run| {
            let out = guest_buffers::sub_slices(bufs, at, len);
            match run {
                Run::Data { host } => self
                    .file
                    .read_vectored_zero_fill(&out, host)
                    .map_err(DiskError::io("qcow2 read")),
                Run::Other { map, in_cluster } => guest_buffers::with_scratch(len, |scratch| {
                    self.read_piece(map, guest, in_cluster, scratch)?;
                    guest_buffers::scatter(scratch, &out);
                    Ok(())
                }),
            }
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        let mut direct = Vec::new();
        let _gate = {
            let mut m = self.lock();
            let mut plans = Vec::new();
            for p in self.pieces(offset, buf.len() as u64) {
                let map = self.mapping(&mut m, p.cluster)?;
                let data = &buf[p.at..p.at + p.len];
                match self.in_place(&mut m, map, &p)? {
                    Some(host) => direct.push((host + p.in_cluster, data)),
                    None => plans.push(self.plan_allocation(&mut m, map, &p, data)?),
                }
            }
            // Data first: only then may an L2 entry (written back at any later eviction or
            // flush) point at it.
            self.write_planned(&plans, buf)?;
            let bitmap = self.full_bitmap();
            for p in &plans {
                self.set_entry(&mut m, p.cluster, p.host | COPIED, bitmap)?;
            }
            self.io_gate()
        };
        for (host, data) in direct {
            self.file
                .write_all(data, host)
                .map_err(DiskError::io("qcow2 write"))?;
        }
        Ok(())
    }

    /// Writes to clusters the image already owns alone go straight from the guest's
    /// buffers; a write that must allocate or copy a cluster is staged and takes the
    /// `write_at` path, which merges it into a whole new cluster.
    fn write_from(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<()> {
        let total = guest_buffers::total_len(bufs);
        self.check_write(offset, total as u64)?;
        let (direct, _gate) = {
            let mut m = self.lock();
            // (host offset, offset into the buffers, length), host-contiguous runs merged.
            let mut direct: Vec<(u64, usize, usize)> = Vec::new();
            for p in self.pieces(offset, total as u64) {
                let map = self.mapping(&mut m, p.cluster)?;
                let Some(host) = self.in_place(&mut m, map, &p)? else {
                    drop(m);
                    return guest_buffers::with_scratch(total, |scratch| {
                        guest_buffers::gather(bufs, scratch);
                        self.write_at(scratch, offset)
                    });
                };
                let host = host + p.in_cluster;
                match direct.last_mut() {
                    Some((start, _, len)) if *start + *len as u64 == host => *len += p.len,
                    _ => direct.push((host, p.at, p.len)),
                }
            }
            (direct, self.io_gate())
        };
        for (host, at, len) in direct {
            self.file
                .write_vectored_all(&guest_buffers::sub_slices(bufs, at, len), host)
                .map_err(DiskError::io("qcow2 write"))?;
        }
        Ok(())
    }

    /// Data clusters the image already owns (for a write: alone, so no copy) map straight
    /// to the file; anything else (allocation, zero, backing, compressed, subclusters not
    /// all allocated for a read) is the engine's to serve.
    fn map_direct(&self, offset: u64, len: u64, write: bool) -> Result<Option<DirectIo>> {
        if write {
            // Fault injection counts every data write: those stay on the counted path.
            if self.file.injects_faults() {
                return Ok(None);
            }
            self.check_write(offset, len)?;
        } else {
            check_range(offset, len, self.size)?;
        }
        let fd = self.file.as_raw_fd();
        let mut m = self.lock();
        let mut runs: Vec<DirectRun> = Vec::new();
        for p in self.pieces(offset, len) {
            let map = self.mapping(&mut m, p.cluster)?;
            let host = if write {
                self.in_place(&mut m, map, &p)?
            } else {
                match map {
                    Mapping::Data { host } => Some(host),
                    _ => None,
                }
            };
            let Some(host) = host else {
                return Ok(None);
            };
            let host = host + p.in_cluster;
            match runs.last_mut() {
                Some(run) if run.host + run.len == host => run.len += p.len as u64,
                _ => runs.push(DirectRun {
                    fd,
                    host,
                    at: p.at as u64,
                    len: p.len as u64,
                }),
            }
        }
        if write {
            // A cluster allocated past the file's end may not be written whole yet; what
            // the caller writes there is data a later allocation must not assume zero.
            if let Some(end) = runs.iter().map(|r| r.host + r.len).max() {
                self.file.note_written(end);
            }
        }
        Ok(Some(DirectIo {
            runs,
            hold: Some(self.io_gate()),
        }))
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut m = self.lock();
        if m.rc.is_dirty() || m.l2.has_dirty() || !m.l1_dirty.is_empty() || m.rc.has_pending() {
            return self.flush_metadata(&mut m);
        }
        // Only data to sync: no ordering to keep, so the other queues need not wait.
        drop(m);
        self.file.sync_data().map_err(DiskError::io("sync"))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, true)
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn discard_granularity(&self) -> u64 {
        self.cs()
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.writable {
            if let Err(e) = self.flush() {
                tracing::warn!("qcow2: flush at close failed: {e}");
            }
        }
    }
}
