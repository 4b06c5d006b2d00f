//! A bounded cache of cluster-sized metadata tables (L2 tables, refcount blocks), keyed by
//! host offset, with dirty tracking. Callers decide what eviction of a dirty table costs.

use std::collections::HashMap;

pub(super) struct Table {
    pub data: Vec<u8>,
    pub dirty: bool,
    used: u64,
}

impl Table {
    pub fn u64_at(&self, idx: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.data[idx * 8..idx * 8 + 8]);
        u64::from_be_bytes(b)
    }

    pub fn set_u64(&mut self, idx: usize, v: u64) {
        self.data[idx * 8..idx * 8 + 8].copy_from_slice(&v.to_be_bytes());
        self.dirty = true;
    }
}

pub(super) struct MetaCache {
    map: HashMap<u64, Table>,
    cap: usize,
    clock: u64,
}

impl MetaCache {
    pub fn new(cap: usize) -> MetaCache {
        MetaCache {
            map: HashMap::new(),
            cap: cap.max(2),
            clock: 0,
        }
    }

    pub fn contains(&self, off: u64) -> bool {
        self.map.contains_key(&off)
    }

    pub fn get(&mut self, off: u64) -> Option<&mut Table> {
        self.clock += 1;
        let clock = self.clock;
        let t = self.map.get_mut(&off)?;
        t.used = clock;
        Some(t)
    }

    /// The table to evict before inserting another, if the cache is full.
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.map.len() < self.cap {
            return None;
        }
        self.map
            .iter()
            .min_by_key(|(_, t)| t.used)
            .map(|(&off, t)| (off, t.dirty))
    }

    pub fn remove(&mut self, off: u64) -> Option<Table> {
        self.map.remove(&off)
    }

    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) {
        self.clock += 1;
        self.map.insert(
            off,
            Table {
                data,
                dirty,
                used: self.clock,
            },
        );
    }

    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn has_dirty(&self) -> bool {
        self.map.values().any(|t| t.dirty)
    }
}
