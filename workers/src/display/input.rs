//! Where viewers' keyboard and pointer events go.
//!
//! The virtio-input device that will hand them to the guest is not written yet; until then
//! the sink logs them (target `bulkhead::input`, debug level) and counts them.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEvent {
    /// An X11 keysym pressed (`down`) or released.
    Key { down: bool, keysym: u32 },
    /// Absolute position in framebuffer pixels; bit N of `buttons` is button N+1.
    Pointer { buttons: u8, x: u16, y: u16 },
}

/// Consumes input events from every viewer; called from the sessions' threads.
pub trait InputSink: Send + Sync {
    fn send(&self, event: InputEvent);
}

/// Logs and counts; the stand-in until virtio-input exists.
#[derive(Debug, Default)]
pub struct LoggingInputSink {
    keys: AtomicU64,
    pointer: AtomicU64,
}

impl LoggingInputSink {
    pub fn keys(&self) -> u64 {
        self.keys.load(Ordering::Relaxed)
    }

    pub fn pointer_events(&self) -> u64 {
        self.pointer.load(Ordering::Relaxed)
    }
}

impl InputSink for LoggingInputSink {
    fn send(&self, event: InputEvent) {
        match event {
            InputEvent::Key { down, keysym } => {
                self.keys.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target: "bulkhead::input", "key {} keysym {keysym:#x}", if down { "down" } else { "up" });
            }
            InputEvent::Pointer { buttons, x, y } => {
                self.pointer.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target: "bulkhead::input", "pointer buttons {buttons:#x} at {x},{y}");
            }
        }
    }
}
