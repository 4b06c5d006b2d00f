//! What the driver learns about the disk: feature bits and the `virtio_blk_config`
//! structure (virtio 1.2, 5.2.4), little-endian, served through GET_CONFIG.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};

/// The unit of `sector` fields and of the capacity, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of `virtio_blk_config` up to and including the write-zeroes fields; the secure
/// erase and zoned fields after them belong to features never offered.
pub const CONFIG_LEN: usize = 60;

/// The disk as the device presents it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkGeometry {
    /// Disk size in bytes; the driver sees whole sectors of it.
    pub size: u64,
    pub read_only: bool,
    pub num_queues: u16,
    /// Most data segments in one request (descriptors besides header and status).
    pub seg_max: u32,
    /// Discards smaller or less aligned than this free nothing, in bytes.
    pub discard_granularity: u64,
    /// Most sectors one DISCARD or WRITE_ZEROES segment may cover.
    pub max_discard_sectors: u32,
    /// Most segments in one DISCARD or WRITE_ZEROES request.
    pub max_discard_segments: u32,
}

impl BlkGeometry {
    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// The device's virtio-blk feature bits (the transport and vhost-user bits are the
    /// device's business). A read-only disk does not offer DISCARD or WRITE_ZEROES: the
    /// driver would send them only to be refused.
    pub fn features(&self) -> u64 {
        let mut features = (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ);
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        features
    }

    /// The configuration space.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let alignment = (self.discard_granularity / SECTOR_SIZE).clamp(1, u64::from(u32::MAX));
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        // 8..12 size_max: not offered; 16..20 geometry: not offered.
        c[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // 24..32 topology: not offered. 32 writeback, 33 unused.
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        c[40..44].copy_from_slice(&self.max_discard_segments.to_le_bytes());
        c[44..48].copy_from_slice(&(alignment as u32).to_le_bytes());
        c[48..52].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        c[52..56].copy_from_slice(&self.max_discard_segments.to_le_bytes());
        // The engine's write_zeroes may deallocate (punch holes, zero clusters).
        c[56] = 1;
        c
    }

    /// GET_CONFIG: `size` bytes at `offset`, or nothing (vhost-user's "failed") for a
    /// range outside the structure.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= space.len() => space[start..end].to_vec(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(read_only: bool) -> BlkGeometry {
        BlkGeometry {
            size: (1 << 30) + 100,
            read_only,
            num_queues: 4,
            seg_max: 254,
            discard_granularity: 65536,
            max_discard_sectors: 1 << 21,
            max_discard_segments: 32,
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        let c = geometry(false).config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 1 << 21);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 128);
        assert_eq!(u32::from_le_bytes(c[52..56].try_into().unwrap()), 32);
    }

    #[test]
    fn read_only_offers_no_discard() {
        let ro = geometry(true).features();
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let rw = geometry(false).features();
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn config_reads_outside_are_empty() {
        let g = geometry(false);
        assert_eq!(g.read_config(0, 8).len(), 8);
        assert_eq!(g.read_config(56, 4).len(), 4);
        assert!(g.read_config(56, 8).is_empty());
        assert!(g.read_config(u32::MAX, 2).is_empty());
    }
}
