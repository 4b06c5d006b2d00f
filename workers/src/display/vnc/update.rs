//! Sending a viewer what it asked for: waits until the viewer has a request and the
//! framebuffer has something new for it, copies that part out under the lock, and encodes
//! and writes it outside the lock, so a slow viewer holds up only itself.

use std::fs::File;
use std::io::{self, Write};
use std::time::Duration;

use super::pixel_format::PixelFormat;
use super::session::{hang_up, Client};
use super::zrle::ZrleEncoder;
use super::{ENCODING_DESKTOP_SIZE, ENCODING_ZRLE};
use crate::display::framebuffer::{Framebuffer, Rect};

/// How often a waiting updater looks at its viewer even without a wake-up.
const POLL: Duration = Duration::from_millis(200);

/// One update, copied out of the framebuffer.
struct Pending {
    new_size: Option<(u32, u32)>,
    rect: Rect,
    pixels: Vec<u32>,
    pixel_format: PixelFormat,
    encoding: i32,
}

pub fn run_updates(
    id: u64,
    mut socket: File,
    client: &Client,
    framebuffer: &Framebuffer,
    initial_size: (u32, u32),
) -> io::Result<()> {
    let mut size = initial_size;
    // 0: everything is new to this viewer.
    let mut seen = 0u64;
    let mut zrle = ZrleEncoder::new();
    loop {
        let Some(update) = next_update(client, framebuffer, &mut size, &mut seen) else {
            return Ok(());
        };
        let bytes = encode(&update, &mut zrle);
        if let Err(e) = socket.write_all(&bytes) {
            hang_up(&socket);
            return Err(e);
        }
        tracing::trace!("vnc: viewer {id} sent {} bytes", bytes.len());
    }
}

/// Waits for something to send; `None` once the viewer is gone.
fn next_update(
    client: &Client,
    framebuffer: &Framebuffer,
    size: &mut (u32, u32),
    seen: &mut u64,
) -> Option<Pending> {
    let mut fb = framebuffer.lock();
    loop {
        let mut state = client.lock();
        if state.closed {
            return None;
        }
        if let Some(request) = state.request {
            let full = fb.full();
            let mut new_size = None;
            let region = if (fb.width, fb.height) != *size {
                // A new mode: a viewer that understands DesktopSize gets the new size and
                // everything; another keeps its size and gets what fits.
                if state.desktop_size {
                    *size = (fb.width, fb.height);
                    new_size = Some(*size);
                    full
                } else {
                    Rect::new(0, 0, size.0, size.1).intersect(&full)
                }
            } else if !request.incremental {
                request.rect.intersect(&full)
            } else {
                match fb.dirty_since(*seen) {
                    None => full,
                    Some(dirty) => dirty.intersect(&request.rect),
                }
            };
            if (!region.is_empty() || new_size.is_some()) || !request.incremental {
                *seen = fb.serial;
                state.request = None;
                let mut pixels = Vec::with_capacity(region.width as usize * region.height as usize);
                let width = fb.width as usize;
                for y in region.y..region.y + region.height {
                    let start = y as usize * width + region.x as usize;
                    pixels.extend_from_slice(&fb.pixels[start..start + region.width as usize]);
                }
                return Some(Pending {
                    new_size,
                    rect: region,
                    pixels,
                    pixel_format: state.pixel_format,
                    encoding: state.encoding,
                });
            }
            *seen = fb.serial;
        }
        drop(state);
        fb = framebuffer.wait(fb, POLL);
    }
}

fn encode(update: &Pending, zrle: &mut ZrleEncoder) -> Vec<u8> {
    let rects = u16::from(update.new_size.is_some()) + u16::from(!update.rect.is_empty());
    let pf = &update.pixel_format;
    let mut out = Vec::with_capacity(16 + update.pixels.len() * pf.bytes_per_pixel());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&rects.to_be_bytes());
    let header = |out: &mut Vec<u8>, r: Rect, encoding: i32| {
        for v in [r.x, r.y, r.width, r.height] {
            out.extend_from_slice(&(v.min(0xffff) as u16).to_be_bytes());
        }
        out.extend_from_slice(&encoding.to_be_bytes());
    };
    if let Some((w, h)) = update.new_size {
        header(&mut out, Rect::new(0, 0, w, h), ENCODING_DESKTOP_SIZE);
    }
    if !update.rect.is_empty() {
        header(&mut out, update.rect, update.encoding);
        if update.encoding == ENCODING_ZRLE {
            let data = zrle.encode(
                &update.pixels,
                update.rect.width as usize,
                update.rect.height as usize,
                pf,
            );
            out.extend_from_slice(&data);
        } else {
            for &p in &update.pixels {
                pf.push(p, &mut out);
            }
        }
    }
    out
}
