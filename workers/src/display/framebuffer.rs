//! The scanout as the host sees it: pixels in one canonical format (`0x00RRGGBB` in a
//! `u32`), a serial number per change and a short history of dirty rectangles, so that each
//! VNC session can ask "what changed since I last looked?" without the device knowing who
//! is watching.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How many dirty rectangles are remembered; a session further behind gets a full update.
const DIRTY_HISTORY: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// Whether the rectangle lies inside a `width` x `height` area (without overflow).
    pub fn fits_in(&self, width: u32, height: u32) -> bool {
        matches!(self.x.checked_add(self.width), Some(end) if end <= width)
            && matches!(self.y.checked_add(self.height), Some(end) if end <= height)
    }

    /// The part of `self` inside `other`; empty when they do not meet.
    pub fn intersect(&self, other: &Rect) -> Rect {
        let x0 = self.x.max(other.x);
        let y0 = self.y.max(other.y);
        let x1 = (u64::from(self.x) + u64::from(self.width))
            .min(u64::from(other.x) + u64::from(other.width));
        let y1 = (u64::from(self.y) + u64::from(self.height))
            .min(u64::from(other.y) + u64::from(other.height));
        if x1 <= u64::from(x0) || y1 <= u64::from(y0) {
            return Rect::default();
        }
        // Both ends are at most a u32 plus a u32 and the minimum of two such.
        Rect::new(
            x0,
            y0,
            (x1 - u64::from(x0)) as u32,
            (y1 - u64::from(y0)) as u32,
        )
    }

    /// The smallest rectangle holding both.
    pub fn union(&self, other: &Rect) -> Rect {
        if self.is_empty() {
            return *other;
        }
        if other.is_empty() {
            return *self;
        }
        let x0 = self.x.min(other.x);
        let y0 = self.y.min(other.y);
        let x1 = (self.x + self.width).max(other.x + other.width);
        let y1 = (self.y + self.height).max(other.y + other.height);
        Rect::new(x0, y0, x1 - x0, y1 - y0)
    }
}

/// The pixels and change history, under the framebuffer's lock.
#[derive(Debug)]
pub struct FramebufferState {
    pub width: u32,
    pub height: u32,
    /// `width * height` pixels, row after row, `0x00RRGGBB`.
    pub pixels: Vec<u32>,
    /// Bumped on every change of pixels or size.
    pub serial: u64,
    /// The serial of the last size change.
    pub mode_serial: u64,
    /// `(serial, rect)` of the latest changes, oldest first.
    dirty: VecDeque<(u64, Rect)>,
}

impl FramebufferState {
    /// What changed after `since`: `None` when the history does not reach back that far
    /// (or the size changed), so the caller must send everything.
    pub fn dirty_since(&self, since: u64) -> Option<Rect> {
        if since < self.mode_serial {
            return None;
        }
        if since >= self.serial {
            return Some(Rect::default());
        }
        match self.dirty.front() {
            Some(&(oldest, _)) if oldest <= since + 1 => {}
            _ => return None,
        }
        Some(
            self.dirty
                .iter()
                .filter(|(serial, _)| *serial > since)
                .fold(Rect::default(), |acc, (_, rect)| acc.union(rect)),
        )
    }

    pub fn full(&self) -> Rect {
        Rect::new(0, 0, self.width, self.height)
    }
}

/// Shared between the device (writer) and every VNC session (readers).
#[derive(Debug)]
pub struct Framebuffer {
    state: Mutex<FramebufferState>,
    changed: Condvar,
}

impl Framebuffer {
    /// A black `width` x `height` screen; the caller keeps the size within its limits.
    pub fn new(width: u32, height: u32) -> Framebuffer {
        Framebuffer {
            state: Mutex::new(FramebufferState {
                width,
                height,
                pixels: vec![0; width as usize * height as usize],
                serial: 1,
                mode_serial: 1,
                dirty: VecDeque::new(),
            }),
            changed: Condvar::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, FramebufferState> {
        // A panicking holder cannot leave the pixels inconsistent in a way that matters:
        // the worst is a torn frame, which the next flush repaints.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the size (a new mode): black pixels, every session told.
    pub fn resize(&self, width: u32, height: u32) {
        let mut state = self.lock();
        if state.width == width && state.height == height {
            return;
        }
        state.width = width;
        state.height = height;
        state.pixels = vec![0; width as usize * height as usize];
        state.serial += 1;
        state.mode_serial = state.serial;
        state.dirty.clear();
        drop(state);
        self.changed.notify_all();
    }

    /// Runs `paint` on the pixels, then records `rect` as changed.
    pub fn update(&self, rect: Rect, paint: impl FnOnce(&mut FramebufferState)) {
        let mut state = self.lock();
        paint(&mut state);
        let rect = rect.intersect(&state.full());
        if rect.is_empty() {
            return;
        }
        state.serial += 1;
        let serial = state.serial;
        if state.dirty.len() == DIRTY_HISTORY {
            state.dirty.pop_front();
        }
        state.dirty.push_back((serial, rect));
        drop(state);
        self.changed.notify_all();
    }

    /// Wakes every waiting session (one of them has new work that is not a pixel change).
    pub fn wake_all(&self) {
        let _state = self.lock();
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for a change (or a [`Framebuffer::wake_all`]).
    pub fn wait<'a>(
        &self,
        guard: MutexGuard<'a, FramebufferState>,
        timeout: Duration,
    ) -> MutexGuard<'a, FramebufferState> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(e) => e.into_inner().0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectangles_intersect_and_unite() {
        let a = Rect::new(10, 10, 20, 20);
        assert_eq!(
            a.intersect(&Rect::new(0, 0, 15, 100)),
            Rect::new(10, 10, 5, 20)
        );
        assert!(a.intersect(&Rect::new(40, 40, 5, 5)).is_empty());
        assert_eq!(a.union(&Rect::new(0, 0, 1, 1)), Rect::new(0, 0, 30, 30));
        assert!(!Rect::new(u32::MAX, 0, 2, 1).fits_in(u32::MAX, 1));
    }

    #[test]
    fn dirty_history_unites_changes_and_forgets_old_ones() {
        let fb = Framebuffer::new(100, 100);
        let start = fb.lock().serial;
        fb.update(Rect::new(0, 0, 10, 10), |_| {});
        fb.update(Rect::new(50, 50, 10, 10), |_| {});
        assert_eq!(fb.lock().dirty_since(start), Some(Rect::new(0, 0, 60, 60)));
        for _ in 0..DIRTY_HISTORY + 1 {
            fb.update(Rect::new(1, 1, 1, 1), |_| {});
        }
        assert_eq!(fb.lock().dirty_since(start), None);
        let now = fb.lock().serial;
        assert_eq!(fb.lock().dirty_since(now), Some(Rect::default()));
        fb.resize(20, 20);
        assert_eq!(fb.lock().dirty_since(now), None);
    }
}
