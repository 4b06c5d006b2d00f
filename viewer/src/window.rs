//! The SDL window: the framebuffer blitted into the window's surface, and the surface read
//! back for `--snapshot`, so that a test sees what the window shows, not what the viewer
//! meant to show.

use std::io::Write;
use std::path::Path;

use sdl2::pixels::PixelFormatEnum;
use sdl2::surface::Surface;
use sdl2::video::Window;
use sdl2::EventPump;

use bulkhead_viewer::rfb::Framebuffer;

#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("SDL: {0}")]
    Sdl(String),
    #[error("writing the snapshot {path}")]
    Snapshot {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn sdl(e: impl ToString) -> WindowError {
    WindowError::Sdl(e.to_string())
}

/// Copies `screen` into the window, resizing the window first if the guest changed mode.
pub fn present(
    window: &mut Window,
    pump: &EventPump,
    screen: &mut Framebuffer,
) -> Result<(), WindowError> {
    if window.size() != (screen.width, screen.height) && screen.width > 0 && screen.height > 0 {
        window.set_size(screen.width, screen.height).map_err(sdl)?;
    }
    let (width, height, pitch) = (screen.width, screen.height, screen.pitch() as u32);
    let source = Surface::from_data(
        &mut screen.pixels,
        width,
        height,
        pitch,
        PixelFormatEnum::RGB888,
    )
    .map_err(sdl)?;
    let mut target = window.surface(pump).map_err(sdl)?;
    source.blit(None, &mut target, None).map_err(sdl)?;
    target.update_window().map_err(sdl)
}

/// Writes what the window's surface holds as a binary PPM (P6), which Pillow and most image
/// tools read.
pub fn snapshot(window: &Window, pump: &EventPump, path: &Path) -> Result<(), WindowError> {
    let shown = window.surface(pump).map_err(sdl)?;
    let (width, height) = (shown.width(), shown.height());
    let mut rgb = Surface::new(width, height, PixelFormatEnum::RGB24).map_err(sdl)?;
    shown.blit(None, &mut rgb, None).map_err(sdl)?;
    let pitch = rgb.pitch() as usize;
    let mut ppm = format!("P6\n{width} {height}\n255\n").into_bytes();
    rgb.with_lock(|pixels| {
        for row in pixels.chunks(pitch).take(height as usize) {
            ppm.extend_from_slice(&row[..width as usize * 3]);
        }
    });
    let failed = |source| WindowError::Snapshot {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::create(path).map_err(failed)?;
    file.write_all(&ppm).map_err(failed)
}
