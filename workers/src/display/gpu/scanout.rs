//! The single scanout: which resource it shows (and which part of it), RESOURCE_FLUSH
//! copying that part into the shared framebuffer, and the cursor's state.

use std::sync::Arc;

use super::resources::{CommandError, Resources};
use crate::display::framebuffer::{Framebuffer, Rect};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub resource_id: u32,
    pub x: u32,
    pub y: u32,
    pub hot_x: u32,
    pub hot_y: u32,
}

/// Largest scanout width or height. Every viewer copies and encodes whole scanouts, so
/// their size, not just the resources', bounds what a guest can make the worker allocate.
pub const MAX_SCANOUT_DIMENSION: u32 = 4096;

pub struct Scanout {
    /// 0 when the scanout is disabled.
    resource_id: u32,
    /// The part of the resource shown, at the framebuffer's origin.
    rect: Rect,
    pub cursor: Cursor,
    framebuffer: Arc<Framebuffer>,
}

impl Scanout {
    pub fn new(framebuffer: Arc<Framebuffer>) -> Self {
        Scanout {
            resource_id: 0,
            rect: Rect::default(),
            cursor: Cursor::default(),
            framebuffer,
        }
    }

    pub fn resource_id(&self) -> u32 {
        self.resource_id
    }

    /// The part of the resource shown.
    pub fn rect(&self) -> Rect {
        self.rect
    }

    /// SET_SCANOUT: resource 0 disables the scanout; otherwise `rect` must lie in the
    /// resource. A new size is a new mode for every viewer.
    pub fn set(
        &mut self,
        resources: &Resources,
        resource_id: u32,
        rect: Rect,
    ) -> Result<(), CommandError> {
        if resource_id == 0 {
            self.resource_id = 0;
            return Ok(());
        }
        let resource = resources.get(resource_id)?;
        if rect.is_empty() || !rect.fits_in(resource.width, resource.height) {
            return Err(CommandError::RectOutside(rect));
        }
        if rect.width > MAX_SCANOUT_DIMENSION || rect.height > MAX_SCANOUT_DIMENSION {
            return Err(CommandError::ScanoutTooLarge(rect));
        }
        self.resource_id = resource_id;
        self.rect = rect;
        self.framebuffer.resize(rect.width, rect.height);
        self.copy(resources, Rect::new(0, 0, rect.width, rect.height));
        Ok(())
    }

    /// The resource is going away: a scanout showing it goes dark.
    pub fn forget(&mut self, resource_id: u32) {
        if self.resource_id == resource_id {
            self.resource_id = 0;
        }
    }

    /// RESOURCE_FLUSH: `rect` (in resource coordinates) must lie in the resource; the part
    /// of it the scanout shows is copied out and marked dirty.
    pub fn flush(
        &mut self,
        resources: &Resources,
        resource_id: u32,
        rect: Rect,
    ) -> Result<(), CommandError> {
        let resource = resources.get(resource_id)?;
        if !rect.fits_in(resource.width, resource.height) {
            return Err(CommandError::RectOutside(rect));
        }
        if resource_id != self.resource_id {
            return Ok(());
        }
        let shown = rect.intersect(&self.rect);
        if shown.is_empty() {
            return Ok(());
        }
        let target = Rect::new(
            shown.x - self.rect.x,
            shown.y - self.rect.y,
            shown.width,
            shown.height,
        );
        self.copy(resources, target);
        Ok(())
    }

    /// Copies `target` (framebuffer coordinates) from the scanout's resource.
    fn copy(&self, resources: &Resources, target: Rect) {
        let Ok(resource) = resources.get(self.resource_id) else {
            return;
        };
        let (ox, oy) = (self.rect.x, self.rect.y);
        self.framebuffer.update(target, |fb| {
            // The framebuffer has the scanout's size unless a resize raced; clip to both.
            let target = target.intersect(&fb.full());
            let width = fb.width as usize;
            for y in target.y..target.y + target.height {
                let row = y as usize * width;
                for x in target.x..target.x + target.width {
                    fb.pixels[row + x as usize] = resource.rgb_at(x + ox, y + oy);
                }
            }
        });
    }
}
