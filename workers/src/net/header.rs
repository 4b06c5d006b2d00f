//! The vnet header in front of each frame the guest sends, checked before the frame goes
//! to the TAP. The kernel checks it again (`virtio_net_hdr_to_skb`), but a frame refused
//! here is counted as the guest's mistake instead of looking like a host write failure,
//! and the worker never asks the kernel to offload what the guest did not negotiate.

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};

use super::tap::VNET_HDR_LEN;

/// Shortest Ethernet frame there is: destination, source, ethertype.
pub const ETH_HLEN: usize = 14;
/// Longest frame either way: a 64 KiB IP packet (what TSO/GRO produce at most) behind an
/// Ethernet header with a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65535 + ETH_HLEN + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HeaderError {
    #[error("the frame is {0} bytes, shorter than an Ethernet header")]
    ShortFrame(usize),
    #[error("the frame is {0} bytes, more than {MAX_FRAME_LEN}")]
    Oversized(usize),
    #[error("unknown header flags {0:#x}")]
    UnknownFlags(u8),
    #[error("NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated")]
    ChecksumNotNegotiated,
    #[error("checksum at {start}+{offset} lies beyond the {frame_len}-byte frame")]
    ChecksumOutside {
        start: u16,
        offset: u16,
        frame_len: usize,
    },
    #[error("unknown GSO type {0:#x}")]
    UnknownGso(u8),
    #[error("GSO type {0:#x} was not negotiated")]
    GsoNotNegotiated(u8),
    #[error("GSO type {0:#x} with gso_size 0")]
    ZeroGsoSize(u8),
    #[error("GSO without NEEDS_CSUM")]
    GsoWithoutChecksum,
    #[error("hdr_len {hdr_len} exceeds the {frame_len}-byte frame")]
    HeaderBeyondFrame { hdr_len: u16, frame_len: usize },
}

/// `struct virtio_net_hdr_v1`, little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHeader {
    pub fn parse(bytes: &[u8; VNET_HDR_LEN]) -> VnetHeader {
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        VnetHeader {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut bytes = [0; VNET_HDR_LEN];
        bytes[0] = self.flags;
        bytes[1] = self.gso_type;
        bytes[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        bytes[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        bytes[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        bytes[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        bytes[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        bytes
    }

    /// Checks a transmitted frame's header against the frame (`frame_len` bytes after the
    /// header) and the features the guest acknowledged.
    pub fn check_tx(&self, frame_len: usize, features: u64) -> Result<(), HeaderError> {
        let has = |bit: u32| features & (1 << bit) != 0;
        if frame_len < ETH_HLEN {
            return Err(HeaderError::ShortFrame(frame_len));
        }
        if frame_len > MAX_FRAME_LEN {
            return Err(HeaderError::Oversized(frame_len));
        }
        let known = (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8;
        if self.flags & !known != 0 {
            return Err(HeaderError::UnknownFlags(self.flags));
        }
        let needs_csum = self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0;
        if needs_csum {
            if !has(VIRTIO_NET_F_CSUM) {
                return Err(HeaderError::ChecksumNotNegotiated);
            }
            // The 16-bit checksum field itself must lie inside the frame.
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(HeaderError::ChecksumOutside {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    frame_len,
                });
            }
        }
        if usize::from(self.hdr_len) > frame_len {
            return Err(HeaderError::HeaderBeyondFrame {
                hdr_len: self.hdr_len,
                frame_len,
            });
        }
        let gso = self.gso_type;
        let base = u32::from(gso & !(VIRTIO_NET_HDR_GSO_ECN as u8));
        let needed = match base {
            VIRTIO_NET_HDR_GSO_NONE if gso == 0 => return Ok(()),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            _ => return Err(HeaderError::UnknownGso(gso)),
        };
        if !has(needed) || (gso & VIRTIO_NET_HDR_GSO_ECN as u8 != 0 && !has(VIRTIO_NET_F_HOST_ECN))
        {
            return Err(HeaderError::GsoNotNegotiated(gso));
        }
        if self.gso_size == 0 {
            return Err(HeaderError::ZeroGsoSize(gso));
        }
        if !needs_csum {
            return Err(HeaderError::GsoWithoutChecksum);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_UFO)
        | (1 << VIRTIO_NET_F_HOST_ECN);
    const CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    const TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;

    fn tso(gso_size: u16) -> VnetHeader {
        VnetHeader {
            flags: CSUM,
            gso_type: TCPV4,
            hdr_len: 54,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    #[test]
    fn round_trips() {
        let header = tso(1448);
        assert_eq!(VnetHeader::parse(&header.to_bytes()), header);
    }

    #[test]
    fn accepts_plain_checksummed_and_tso_frames() {
        assert_eq!(VnetHeader::default().check_tx(60, 0), Ok(()));
        assert_eq!(tso(1448).check_tx(9000, ALL), Ok(()));
        let csum = VnetHeader {
            flags: CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHeader::default()
        };
        assert_eq!(csum.check_tx(42, ALL), Ok(()));
    }

    #[test]
    fn refuses_bogus_headers() {
        assert_eq!(
            tso(0).check_tx(9000, ALL),
            Err(HeaderError::ZeroGsoSize(TCPV4))
        );
        assert_eq!(
            tso(1448).check_tx(9000, 1 << VIRTIO_NET_F_CSUM),
            Err(HeaderError::GsoNotNegotiated(TCPV4))
        );
        assert!(matches!(
            tso(1448).check_tx(40, ALL),
            Err(HeaderError::ChecksumOutside { .. })
        ));
        let beyond = VnetHeader {
            hdr_len: 61,
            ..VnetHeader::default()
        };
        assert!(matches!(
            beyond.check_tx(60, ALL),
            Err(HeaderError::HeaderBeyondFrame { .. })
        ));
        let csum = VnetHeader {
            flags: CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHeader::default()
        };
        assert_eq!(
            csum.check_tx(60, 0),
            Err(HeaderError::ChecksumNotNegotiated)
        );
        let unknown = VnetHeader {
            gso_type: 0x42,
            ..VnetHeader::default()
        };
        assert_eq!(
            unknown.check_tx(60, ALL),
            Err(HeaderError::UnknownGso(0x42))
        );
        assert_eq!(
            VnetHeader::default().check_tx(10, ALL),
            Err(HeaderError::ShortFrame(10))
        );
        assert_eq!(
            VnetHeader::default().check_tx(MAX_FRAME_LEN + 1, ALL),
            Err(HeaderError::Oversized(MAX_FRAME_LEN + 1))
        );
        let no_csum = VnetHeader {
            flags: 0,
            ..tso(1448)
        };
        assert_eq!(
            no_csum.check_tx(9000, ALL),
            Err(HeaderError::GsoWithoutChecksum)
        );
    }
}
