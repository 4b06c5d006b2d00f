//! The client side of RFB 3.8 (RFC 6143), as much as a private viewer needs: security type
//! None, one pixel format (32 bpp, 0x00RRGGBB little-endian, what SDL calls RGB888), raw
//! rectangles and the DesktopSize pseudo-encoding for mode changes.

use std::io::{ErrorKind, Read, Write};

use thiserror::Error;

/// SetEncodings: raw, then DesktopSize so that a guest mode change resizes the window.
const ENCODING_RAW: i32 = 0;
const ENCODING_DESKTOP_SIZE: i32 = -223;
/// Longest server text (reasons, desktop name, cut text) this viewer reads.
const MAX_TEXT: u32 = 1 << 20;
/// Widest and tallest screen this viewer allocates for (RFB sizes are 16-bit anyway).
const MAX_SIDE: u32 = 16384;
pub const BYTES_PER_PIXEL: usize = 4;

#[derive(Debug, Error)]
pub enum RfbError {
    #[error("the connection failed")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("not an RFB server: it greeted with {0:?}")]
    NotRfb(String),
    #[error("the server refused the connection: {0}")]
    Refused(String),
    #[error("the server wants a password (it offers security types {0:?}, not None)")]
    NeedsPassword(Vec<u8>),
    #[error("the security handshake failed: {0}")]
    SecurityFailed(String),
    #[error("the server sent {0} bytes of text, more than this viewer reads")]
    TooLong(u32),
    #[error("a {0}x{1} screen is larger than this viewer shows")]
    TooLarge(u32, u32),
    #[error("server message type {0} is none this viewer knows")]
    UnknownMessage(u8),
    #[error("rectangle encoding {0} was not asked for")]
    UnknownEncoding(i32),
    #[error("rectangle at {x},{y} of {width}x{height} lies outside the {screen_width}x{screen_height} screen")]
    OutOfBounds {
        x: u32,
        y: u32,
        width: u32,
        height: u32,
        screen_width: u32,
        screen_height: u32,
    },
}

/// The screen as the server last described it, in SDL's RGB888 layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framebuffer {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl Framebuffer {
    pub fn new(width: u32, height: u32) -> Result<Self, RfbError> {
        if width > MAX_SIDE || height > MAX_SIDE {
            return Err(RfbError::TooLarge(width, height));
        }
        Ok(Self {
            width,
            height,
            pixels: vec![0; width as usize * height as usize * BYTES_PER_PIXEL],
        })
    }

    pub fn pitch(&self) -> usize {
        self.width as usize * BYTES_PER_PIXEL
    }
}

/// What the server said in ServerInit.
#[derive(Debug)]
pub struct ServerInit {
    pub width: u32,
    pub height: u32,
    pub name: String,
}

/// One server message, already applied to the framebuffer where it carries pixels.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerMessage {
    Update { resized: bool },
    Bell,
    CutText,
}

fn read_array<const N: usize>(stream: &mut impl Read) -> Result<[u8; N], RfbError> {
    let mut buf = [0u8; N];
    stream.read_exact(&mut buf).map_err(eof_is_closed)?;
    Ok(buf)
}

fn read_u32(stream: &mut impl Read) -> Result<u32, RfbError> {
    Ok(u32::from_be_bytes(read_array(stream)?))
}

fn read_text(stream: &mut impl Read) -> Result<String, RfbError> {
    let len = read_u32(stream)?;
    if len > MAX_TEXT {
        return Err(RfbError::TooLong(len));
    }
    let mut text = vec![0u8; len as usize];
    stream.read_exact(&mut text).map_err(eof_is_closed)?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

fn eof_is_closed(e: std::io::Error) -> RfbError {
    if e.kind() == ErrorKind::UnexpectedEof {
        RfbError::Closed
    } else {
        RfbError::Io(e)
    }
}

/// Version, security None, ClientInit (shared, so that other viewers stay connected),
/// ServerInit, then this viewer's pixel format and encodings.
pub fn handshake(reader: &mut impl Read, writer: &mut impl Write) -> Result<ServerInit, RfbError> {
    let version: [u8; 12] = read_array(reader)?;
    if !version.starts_with(b"RFB 003.") {
        return Err(RfbError::NotRfb(
            String::from_utf8_lossy(&version).into_owned(),
        ));
    }
    writer.write_all(b"RFB 003.008\n")?;
    let [count] = read_array(reader)?;
    if count == 0 {
        return Err(RfbError::Refused(read_text(reader)?));
    }
    let mut types = vec![0u8; usize::from(count)];
    reader.read_exact(&mut types).map_err(eof_is_closed)?;
    if !types.contains(&1) {
        return Err(RfbError::NeedsPassword(types));
    }
    writer.write_all(&[1])?;
    if read_u32(reader)? != 0 {
        return Err(RfbError::SecurityFailed(read_text(reader)?));
    }
    writer.write_all(&[1])?;
    let init: [u8; 20] = read_array(reader)?;
    let width = u32::from(u16::from_be_bytes([init[0], init[1]]));
    let height = u32::from(u16::from_be_bytes([init[2], init[3]]));
    let name = read_text(reader)?;
    // SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, red at bit 16.
    writer.write_all(&[
        0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
    ])?;
    let mut encodings = vec![2u8, 0, 0, 2];
    for encoding in [ENCODING_RAW, ENCODING_DESKTOP_SIZE] {
        encodings.extend(encoding.to_be_bytes());
    }
    writer.write_all(&encodings)?;
    Ok(ServerInit {
        width,
        height,
        name,
    })
}

/// Reads the next server message; an update lands in `screen`.
pub fn read_message(
    reader: &mut impl Read,
    screen: &mut Framebuffer,
) -> Result<ServerMessage, RfbError> {
    let [kind] = read_array(reader)?;
    match kind {
        0 => read_update(reader, screen),
        2 => Ok(ServerMessage::Bell),
        3 => {
            let _padding: [u8; 3] = read_array(reader)?;
            read_text(reader)?;
            Ok(ServerMessage::CutText)
        }
        other => Err(RfbError::UnknownMessage(other)),
    }
}

fn read_update(
    reader: &mut impl Read,
    screen: &mut Framebuffer,
) -> Result<ServerMessage, RfbError> {
    let [_padding, count_high, count_low] = read_array(reader)?;
    let mut resized = false;
    for _ in 0..u16::from_be_bytes([count_high, count_low]) {
        let header: [u8; 12] = read_array(reader)?;
        let field = |i: usize| u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        let (x, y, width, height) = (field(0), field(2), field(4), field(6));
        match i32::from_be_bytes([header[8], header[9], header[10], header[11]]) {
            ENCODING_RAW => {
                if x + width > screen.width || y + height > screen.height {
                    return Err(RfbError::OutOfBounds {
                        x,
                        y,
                        width,
                        height,
                        screen_width: screen.width,
                        screen_height: screen.height,
                    });
                }
                let pitch = screen.pitch();
                let row_len = width as usize * BYTES_PER_PIXEL;
                for row in y..y + height {
                    let start = row as usize * pitch + x as usize * BYTES_PER_PIXEL;
                    reader
                        .read_exact(&mut screen.pixels[start..start + row_len])
                        .map_err(eof_is_closed)?;
                }
            }
            ENCODING_DESKTOP_SIZE => {
                *screen = Framebuffer::new(width, height)?;
                resized = true;
            }
            other => return Err(RfbError::UnknownEncoding(other)),
        }
    }
    Ok(ServerMessage::Update { resized })
}

/// FramebufferUpdateRequest for the whole screen.
pub fn request_update<W: Write + ?Sized>(
    writer: &mut W,
    incremental: bool,
    width: u32,
    height: u32,
) -> std::io::Result<()> {
    let mut message = vec![3u8, u8::from(incremental), 0, 0, 0, 0];
    message.extend((width.min(u32::from(u16::MAX)) as u16).to_be_bytes());
    message.extend((height.min(u32::from(u16::MAX)) as u16).to_be_bytes());
    writer.write_all(&message)
}

/// KeyEvent with an X11 keysym.
pub fn key_event<W: Write + ?Sized>(
    writer: &mut W,
    down: bool,
    keysym: u32,
) -> std::io::Result<()> {
    let mut message = vec![4u8, u8::from(down), 0, 0];
    message.extend(keysym.to_be_bytes());
    writer.write_all(&message)
}

/// PointerEvent: `buttons` bit 0 is the left button, 1 middle, 2 right, 3 and 4 the wheel.
pub fn pointer_event<W: Write + ?Sized>(
    writer: &mut W,
    buttons: u8,
    x: u16,
    y: u16,
) -> std::io::Result<()> {
    let mut message = vec![5u8, buttons];
    message.extend(x.to_be_bytes());
    message.extend(y.to_be_bytes());
    writer.write_all(&message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_rectangles_land_where_they_say_and_strays_are_refused() {
        let mut screen = Framebuffer::new(4, 2).unwrap();
        // FramebufferUpdate, one rectangle: 2x1 at (1,1), raw.
        let mut update = vec![0u8, 0, 0, 1];
        update.extend([0, 1, 0, 1, 0, 2, 0, 1, 0, 0, 0, 0]);
        update.extend([1, 2, 3, 0, 4, 5, 6, 0]);
        let message = read_message(&mut update.as_slice(), &mut screen).unwrap();
        assert_eq!(message, ServerMessage::Update { resized: false });
        assert_eq!(&screen.pixels[20..28], &[1, 2, 3, 0, 4, 5, 6, 0]);
        let stray = [0u8, 0, 0, 1, 0, 3, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0];
        assert!(matches!(
            read_message(&mut stray.as_slice(), &mut screen),
            Err(RfbError::OutOfBounds { .. })
        ));
        let resize = [0u8, 0, 0, 1, 0, 0, 0, 0, 0, 8, 0, 6, 255, 255, 255, 33];
        let message = read_message(&mut resize.as_slice(), &mut screen).unwrap();
        assert_eq!(message, ServerMessage::Update { resized: true });
        assert_eq!(
            (screen.width, screen.height, screen.pixels.len()),
            (8, 6, 192)
        );
        assert!(matches!(
            read_message(&mut [9u8].as_slice(), &mut screen),
            Err(RfbError::UnknownMessage(9))
        ));
        assert!(matches!(
            read_message(&mut [0u8, 0].as_slice(), &mut screen),
            Err(RfbError::Closed)
        ));
    }
}
