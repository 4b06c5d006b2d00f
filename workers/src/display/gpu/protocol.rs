//! virtio-gpu's wire format: command and response types, the structures that follow the
//! control header, and their parsing. All fields are little-endian.

use crate::display::framebuffer::Rect;

pub const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
pub const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
pub const CMD_RESOURCE_UNREF: u32 = 0x0102;
pub const CMD_SET_SCANOUT: u32 = 0x0103;
pub const CMD_RESOURCE_FLUSH: u32 = 0x0104;
pub const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
pub const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
pub const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
pub const CMD_GET_EDID: u32 = 0x010a;
pub const CMD_UPDATE_CURSOR: u32 = 0x0300;
pub const CMD_MOVE_CURSOR: u32 = 0x0301;

pub const RESP_OK_NODATA: u32 = 0x1100;
pub const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
pub const RESP_OK_EDID: u32 = 0x1104;
pub const RESP_ERR_UNSPEC: u32 = 0x1200;
pub const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
pub const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
pub const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
pub const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

pub const FLAG_FENCE: u32 = 1;

/// Feature bit: the device answers GET_EDID.
pub const VIRTIO_GPU_F_EDID: u32 = 1;

/// The formats Linux's driver and others use, 4 bytes a pixel; the name gives the byte
/// order in memory.
pub const FORMAT_B8G8R8A8_UNORM: u32 = 1;
pub const FORMAT_B8G8R8X8_UNORM: u32 = 2;
pub const FORMAT_A8R8G8B8_UNORM: u32 = 3;
pub const FORMAT_X8R8G8B8_UNORM: u32 = 4;
pub const FORMAT_R8G8B8A8_UNORM: u32 = 67;
pub const FORMAT_X8B8G8R8_UNORM: u32 = 68;
pub const FORMAT_A8B8G8R8_UNORM: u32 = 121;
pub const FORMAT_R8G8B8X8_UNORM: u32 = 134;

pub const CTRL_HDR_SIZE: usize = 24;
pub const MAX_SCANOUTS: usize = 16;
pub const DISPLAY_INFO_SIZE: usize = CTRL_HDR_SIZE + MAX_SCANOUTS * 24;
pub const EDID_RESPONSE_SIZE: usize = CTRL_HDR_SIZE + 8 + 1024;
pub const MEM_ENTRY_SIZE: usize = 16;

/// Where the red, green and blue bytes of a pixel are, for a supported format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelLayout {
    pub red: usize,
    pub green: usize,
    pub blue: usize,
}

impl PixelLayout {
    pub fn of(format: u32) -> Option<PixelLayout> {
        let (red, green, blue) = match format {
            FORMAT_B8G8R8A8_UNORM | FORMAT_B8G8R8X8_UNORM => (2, 1, 0),
            FORMAT_A8R8G8B8_UNORM | FORMAT_X8R8G8B8_UNORM => (1, 2, 3),
            FORMAT_R8G8B8A8_UNORM | FORMAT_R8G8B8X8_UNORM => (0, 1, 2),
            FORMAT_X8B8G8R8_UNORM | FORMAT_A8B8G8R8_UNORM => (3, 2, 1),
            _ => return None,
        };
        Some(PixelLayout { red, green, blue })
    }

    /// One pixel's bytes as `0x00RRGGBB`.
    pub fn to_rgb(&self, pixel: &[u8]) -> u32 {
        let byte = |i: usize| u32::from(pixel.get(i).copied().unwrap_or(0));
        (byte(self.red) << 16) | (byte(self.green) << 8) | byte(self.blue)
    }
}

pub const BYTES_PER_PIXEL: u32 = 4;

/// The header every command and response starts with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlHeader {
    pub kind: u32,
    pub flags: u32,
    pub fence_id: u64,
    pub ctx_id: u32,
    pub ring_idx: u8,
}

/// A command's bytes were shorter than its structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

/// Reads little-endian fields from a command's bytes.
pub struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Fields { bytes }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let (head, rest) = self.bytes.split_first_chunk::<N>().ok_or(Truncated)?;
        self.bytes = rest;
        Ok(*head)
    }

    pub fn u32(&mut self) -> Result<u32, Truncated> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, Truncated> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    pub fn rect(&mut self) -> Result<Rect, Truncated> {
        Ok(Rect::new(
            self.u32()?,
            self.u32()?,
            self.u32()?,
            self.u32()?,
        ))
    }

    pub fn header(&mut self) -> Result<CtrlHeader, Truncated> {
        let kind = self.u32()?;
        let flags = self.u32()?;
        let fence_id = self.u64()?;
        let ctx_id = self.u32()?;
        let [ring_idx, _, _, _] = self.take::<4>()?;
        Ok(CtrlHeader {
            kind,
            flags,
            fence_id,
            ctx_id,
            ring_idx,
        })
    }
}

/// One backing entry of RESOURCE_ATTACH_BACKING.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemEntry {
    pub addr: u64,
    pub length: u32,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    GetDisplayInfo,
    GetEdid {
        scanout: u32,
    },
    ResourceCreate2d {
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    },
    ResourceUnref {
        resource_id: u32,
    },
    SetScanout {
        rect: Rect,
        scanout_id: u32,
        resource_id: u32,
    },
    ResourceFlush {
        rect: Rect,
        resource_id: u32,
    },
    TransferToHost2d {
        rect: Rect,
        offset: u64,
        resource_id: u32,
    },
    AttachBacking {
        resource_id: u32,
        entries: Vec<MemEntry>,
    },
    DetachBacking {
        resource_id: u32,
    },
    UpdateCursor {
        scanout_id: u32,
        x: u32,
        y: u32,
        resource_id: u32,
        hot_x: u32,
        hot_y: u32,
    },
    MoveCursor {
        scanout_id: u32,
        x: u32,
        y: u32,
    },
}

/// Why a command could not be parsed; each maps to an error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Truncated,
    Unknown(u32),
    TooManyEntries(u32),
}

impl From<Truncated> for ParseError {
    fn from(_: Truncated) -> Self {
        ParseError::Truncated
    }
}

/// Parses the command after `header`; `body` is everything the driver sent after it.
/// `max_entries` bounds RESOURCE_ATTACH_BACKING before anything is allocated for it.
pub fn parse_command(
    header: &CtrlHeader,
    body: &[u8],
    max_entries: u32,
) -> Result<Command, ParseError> {
    let mut f = Fields::new(body);
    Ok(match header.kind {
        CMD_GET_DISPLAY_INFO => Command::GetDisplayInfo,
        CMD_GET_EDID => Command::GetEdid { scanout: f.u32()? },
        CMD_RESOURCE_CREATE_2D => Command::ResourceCreate2d {
            resource_id: f.u32()?,
            format: f.u32()?,
            width: f.u32()?,
            height: f.u32()?,
        },
        CMD_RESOURCE_UNREF => Command::ResourceUnref {
            resource_id: f.u32()?,
        },
        CMD_SET_SCANOUT => Command::SetScanout {
            rect: f.rect()?,
            scanout_id: f.u32()?,
            resource_id: f.u32()?,
        },
        CMD_RESOURCE_FLUSH => Command::ResourceFlush {
            rect: f.rect()?,
            resource_id: f.u32()?,
        },
        CMD_TRANSFER_TO_HOST_2D => Command::TransferToHost2d {
            rect: f.rect()?,
            offset: f.u64()?,
            resource_id: f.u32()?,
        },
        CMD_RESOURCE_ATTACH_BACKING => {
            let resource_id = f.u32()?;
            let count = f.u32()?;
            if count > max_entries {
                return Err(ParseError::TooManyEntries(count));
            }
            let mut entries = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let addr = f.u64()?;
                let length = f.u32()?;
                f.u32()?;
                entries.push(MemEntry { addr, length });
            }
            Command::AttachBacking {
                resource_id,
                entries,
            }
        }
        CMD_RESOURCE_DETACH_BACKING => Command::DetachBacking {
            resource_id: f.u32()?,
        },
        CMD_UPDATE_CURSOR | CMD_MOVE_CURSOR => {
            let scanout_id = f.u32()?;
            let x = f.u32()?;
            let y = f.u32()?;
            f.u32()?;
            if header.kind == CMD_MOVE_CURSOR {
                Command::MoveCursor { scanout_id, x, y }
            } else {
                Command::UpdateCursor {
                    scanout_id,
                    x,
                    y,
                    resource_id: f.u32()?,
                    hot_x: f.u32()?,
                    hot_y: f.u32()?,
                }
            }
        }
        other => return Err(ParseError::Unknown(other)),
    })
}

/// A response header answering `request`: the fence is echoed as the spec requires.
pub fn response_header(request: &CtrlHeader, kind: u32) -> [u8; CTRL_HDR_SIZE] {
    let mut out = [0u8; CTRL_HDR_SIZE];
    out[0..4].copy_from_slice(&kind.to_le_bytes());
    let flags = request.flags & FLAG_FENCE;
    out[4..8].copy_from_slice(&flags.to_le_bytes());
    if flags != 0 {
        out[8..16].copy_from_slice(&request.fence_id.to_le_bytes());
        out[16..20].copy_from_slice(&request.ctx_id.to_le_bytes());
        out[20] = request.ring_idx;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u32) -> CtrlHeader {
        CtrlHeader {
            kind,
            ..CtrlHeader::default()
        }
    }

    #[test]
    fn short_commands_are_truncated_not_panics() {
        for kind in [
            CMD_RESOURCE_CREATE_2D,
            CMD_SET_SCANOUT,
            CMD_TRANSFER_TO_HOST_2D,
            CMD_RESOURCE_ATTACH_BACKING,
            CMD_UPDATE_CURSOR,
        ] {
            assert_eq!(
                parse_command(&header(kind), &[0; 3], 16),
                Err(ParseError::Truncated)
            );
        }
        assert_eq!(
            parse_command(&header(0x9999), &[], 16),
            Err(ParseError::Unknown(0x9999))
        );
    }

    #[test]
    fn attach_backing_entry_count_is_bounded_before_allocating() {
        let mut body = vec![];
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse_command(&header(CMD_RESOURCE_ATTACH_BACKING), &body, 1024),
            Err(ParseError::TooManyEntries(u32::MAX))
        );
    }

    #[test]
    fn formats_place_their_colours() {
        let pixel = [0x11, 0x22, 0x33, 0x44];
        let rgb = |f| PixelLayout::of(f).unwrap().to_rgb(&pixel);
        assert_eq!(rgb(FORMAT_B8G8R8X8_UNORM), 0x332211);
        assert_eq!(rgb(FORMAT_X8R8G8B8_UNORM), 0x223344);
        assert_eq!(rgb(FORMAT_R8G8B8A8_UNORM), 0x112233);
        assert_eq!(rgb(FORMAT_A8B8G8R8_UNORM), 0x443322);
        assert!(PixelLayout::of(999).is_none());
    }
}
