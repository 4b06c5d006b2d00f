//! 2D resources: host pixel storage created by the guest, the guest pages backing each one,
//! and TRANSFER_TO_HOST_2D copying from the latter to the former.

use std::collections::HashMap;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::protocol::{
    MemEntry, PixelLayout, BYTES_PER_PIXEL, RESP_ERR_INVALID_PARAMETER,
    RESP_ERR_INVALID_RESOURCE_ID, RESP_ERR_OUT_OF_MEMORY, RESP_ERR_UNSPEC,
};
use super::store::{MAX_RESOURCES, MAX_TOTAL_BACKING_ENTRIES};
use crate::display::framebuffer::Rect;

/// Why a command failed; each maps to the response the guest gets.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("resource {0} does not exist")]
    NoSuchResource(u32),
    #[error("resource id {0} is 0 or already in use")]
    ResourceIdTaken(u32),
    #[error("format {0} is not supported")]
    BadFormat(u32),
    #[error("{width}x{height} is not a valid size")]
    BadSize { width: u32, height: u32 },
    #[error("resource of {bytes} bytes exceeds the memory budget ({budget} bytes left)")]
    OverBudget { bytes: u64, budget: u64 },
    #[error("the guest already holds the most resources or backing entries the device keeps")]
    TooMany,
    #[error("rectangle {0:?} is outside the resource")]
    RectOutside(Rect),
    #[error("backing entry at {addr:#x}+{length} is outside guest memory")]
    BackingOutsideMemory { addr: u64, length: u32 },
    #[error("the backing ({have} bytes) is smaller than the transfer needs ({need})")]
    BackingTooSmall { have: u64, need: u64 },
    #[error("resource {0} has no backing")]
    NoBacking(u32),
    #[error("scanout rectangle {0:?} is larger than the device shows")]
    ScanoutTooLarge(Rect),
    #[error("scanout {0} does not exist")]
    NoSuchScanout(u32),
    #[error("guest memory could not be read: {0}")]
    GuestMemory(String),
}

impl CommandError {
    /// The response type for this error.
    pub fn response(&self) -> u32 {
        use super::protocol::RESP_ERR_INVALID_SCANOUT_ID;
        match self {
            CommandError::NoSuchResource(_) | CommandError::ResourceIdTaken(_) => {
                RESP_ERR_INVALID_RESOURCE_ID
            }
            CommandError::OverBudget { .. } | CommandError::TooMany => RESP_ERR_OUT_OF_MEMORY,
            CommandError::NoSuchScanout(_) => RESP_ERR_INVALID_SCANOUT_ID,
            CommandError::BadFormat(_)
            | CommandError::BadSize { .. }
            | CommandError::RectOutside(_)
            | CommandError::ScanoutTooLarge(_)
            | CommandError::BackingOutsideMemory { .. }
            | CommandError::BackingTooSmall { .. } => RESP_ERR_INVALID_PARAMETER,
            CommandError::NoBacking(_) | CommandError::GuestMemory(_) => RESP_ERR_UNSPEC,
        }
    }
}

pub struct Resource {
    /// The format number the guest gave, kept for the state store.
    pub format: u32,
    pub width: u32,
    pub height: u32,
    pub layout: PixelLayout,
    /// The guest's pixels as transferred, `width * 4` bytes a row, in the guest's format.
    pub pixels: Vec<u8>,
    backing: Vec<MemEntry>,
}

impl Resource {
    pub fn stride(&self) -> usize {
        self.width as usize * BYTES_PER_PIXEL as usize
    }

    /// The pixel at (x, y) as `0x00RRGGBB`; the caller keeps (x, y) inside.
    /// The guest pages attached, in order.
    pub fn backing(&self) -> &[MemEntry] {
        &self.backing
    }

    pub fn rgb_at(&self, x: u32, y: u32) -> u32 {
        let offset = y as usize * self.stride() + x as usize * BYTES_PER_PIXEL as usize;
        self.pixels
            .get(offset..offset + BYTES_PER_PIXEL as usize)
            .map_or(0, |p| self.layout.to_rgb(p))
    }
}

/// Every resource the guest created, within a memory budget.
pub struct Resources {
    resources: HashMap<u32, Resource>,
    bytes_used: u64,
    /// Backing entries over all resources: bounded, like their count, so that the state
    /// store's record of them is.
    entries_used: u32,
    budget: u64,
    max_dimension: u32,
}

impl Resources {
    pub fn new(budget: u64, max_dimension: u32) -> Self {
        Resources {
            resources: HashMap::new(),
            bytes_used: 0,
            entries_used: 0,
            budget,
            max_dimension,
        }
    }

    pub fn get(&self, id: u32) -> Result<&Resource, CommandError> {
        self.resources
            .get(&id)
            .ok_or(CommandError::NoSuchResource(id))
    }

    pub fn create(
        &mut self,
        id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<(), CommandError> {
        if id == 0 || self.resources.contains_key(&id) {
            return Err(CommandError::ResourceIdTaken(id));
        }
        if self.resources.len() >= MAX_RESOURCES as usize {
            return Err(CommandError::TooMany);
        }
        let layout = PixelLayout::of(format).ok_or(CommandError::BadFormat(format))?;
        let bad_size = CommandError::BadSize { width, height };
        if width == 0 || height == 0 {
            return Err(bad_size);
        }
        let bytes = u64::from(width)
            .checked_mul(u64::from(height))
            .and_then(|n| n.checked_mul(u64::from(BYTES_PER_PIXEL)))
            .ok_or(bad_size)?;
        let left = self.budget - self.bytes_used;
        if bytes > left || width > self.max_dimension || height > self.max_dimension {
            return Err(CommandError::OverBudget {
                bytes,
                budget: left,
            });
        }
        let size = usize::try_from(bytes).map_err(|_| CommandError::OverBudget {
            bytes,
            budget: left,
        })?;
        self.resources.insert(
            id,
            Resource {
                format,
                width,
                height,
                layout,
                pixels: vec![0; size],
                backing: Vec::new(),
            },
        );
        self.bytes_used += bytes;
        Ok(())
    }

    pub fn unref(&mut self, id: u32) -> Result<(), CommandError> {
        let resource = self
            .resources
            .remove(&id)
            .ok_or(CommandError::NoSuchResource(id))?;
        self.bytes_used -= resource.pixels.len() as u64;
        self.entries_used -= resource.backing.len() as u32;
        Ok(())
    }

    /// Attaches guest pages; every entry must lie in guest memory now (they are checked
    /// again on every transfer, as the memory table may change).
    pub fn attach_backing(
        &mut self,
        id: u32,
        entries: Vec<MemEntry>,
        memory: &GuestMemoryMmap,
    ) -> Result<(), CommandError> {
        let resource = self
            .resources
            .get_mut(&id)
            .ok_or(CommandError::NoSuchResource(id))?;
        for entry in &entries {
            if !memory.check_range(
                GuestAddress(entry.addr),
                entry.length as usize,
                Permissions::Read,
            ) {
                return Err(CommandError::BackingOutsideMemory {
                    addr: entry.addr,
                    length: entry.length,
                });
            }
        }
        // At most max_backing_entries each, far below u32::MAX.
        let entries_used = self.entries_used - resource.backing.len() as u32;
        if entries_used + entries.len() as u32 > MAX_TOTAL_BACKING_ENTRIES {
            return Err(CommandError::TooMany);
        }
        self.entries_used = entries_used + entries.len() as u32;
        resource.backing = entries;
        Ok(())
    }

    pub fn detach_backing(&mut self, id: u32) -> Result<(), CommandError> {
        let resource = self
            .resources
            .get_mut(&id)
            .ok_or(CommandError::NoSuchResource(id))?;
        if resource.backing.is_empty() {
            return Err(CommandError::NoBacking(id));
        }
        self.entries_used -= resource.backing.len() as u32;
        resource.backing.clear();
        Ok(())
    }

    /// Copies `rect` of the resource from its backing, rows `width * 4` bytes apart starting
    /// at `offset` in the backing (what Linux sends: the rectangle's first byte).
    pub fn transfer_to_host(
        &mut self,
        id: u32,
        rect: Rect,
        offset: u64,
        memory: &GuestMemoryMmap,
    ) -> Result<(), CommandError> {
        let resource = self
            .resources
            .get_mut(&id)
            .ok_or(CommandError::NoSuchResource(id))?;
        if !rect.fits_in(resource.width, resource.height) {
            return Err(CommandError::RectOutside(rect));
        }
        if rect.is_empty() {
            return Ok(());
        }
        if resource.backing.is_empty() {
            return Err(CommandError::NoBacking(id));
        }
        let stride = resource.stride() as u64;
        let row_bytes = u64::from(rect.width) * u64::from(BYTES_PER_PIXEL);
        let have: u64 = resource.backing.iter().map(|e| u64::from(e.length)).sum();
        // The last byte read: offset + (height - 1) * stride + row_bytes.
        let need = (u64::from(rect.height) - 1)
            .checked_mul(stride)
            .and_then(|n| n.checked_add(row_bytes))
            .and_then(|n| n.checked_add(offset))
            .unwrap_or(u64::MAX);
        if need > have {
            return Err(CommandError::BackingTooSmall { have, need });
        }
        for row in 0..u64::from(rect.height) {
            let src = offset + row * stride;
            let dst =
                (u64::from(rect.y) + row) * stride + u64::from(rect.x) * u64::from(BYTES_PER_PIXEL);
            // In bounds: the rectangle fits in the resource.
            let dst = dst as usize;
            let out = &mut resource.pixels[dst..dst + row_bytes as usize];
            read_backing(&resource.backing, memory, src, out)?;
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        self.resources.clear();
        self.bytes_used = 0;
        self.entries_used = 0;
    }

    /// Every resource, by ascending id.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Resource)> {
        let mut ids: Vec<u32> = self.resources.keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| self.resources.get(&id).map(|r| (id, r)))
    }
}

/// Reads `out.len()` bytes at linear offset `offset` of the scatter list `backing`.
fn read_backing(
    backing: &[MemEntry],
    memory: &GuestMemoryMmap,
    mut offset: u64,
    mut out: &mut [u8],
) -> Result<(), CommandError> {
    for entry in backing {
        if out.is_empty() {
            break;
        }
        let len = u64::from(entry.length);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(out.len() as u64) as usize;
        let (chunk, rest) = out.split_at_mut(n);
        let addr = entry
            .addr
            .checked_add(offset)
            .ok_or(CommandError::BackingOutsideMemory {
                addr: entry.addr,
                length: entry.length,
            })?;
        memory
            .read_slice(chunk, GuestAddress(addr))
            .map_err(|e| CommandError::GuestMemory(e.to_string()))?;
        out = rest;
        offset = 0;
    }
    if out.is_empty() {
        Ok(())
    } else {
        Err(CommandError::GuestMemory("backing ended early".into()))
    }
}
