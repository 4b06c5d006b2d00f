//! Where viewers' keyboard and pointer events go: to the input worker's virtio-input
//! device through the events socket ([`EventSocketSink`]), or, without one, only to the
//! log (target `bulkhead::input`, debug level) ([`LoggingInputSink`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Framebuffer;
use crate::input::event::encode_report;
use crate::input::Translator;

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

/// Logs and counts: for a display without an input device.
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

/// Translates events into virtio-input reports and sends each as one datagram on the
/// events socket (`SOCK_SEQPACKET`, non-blocking). A report that does not fit because the
/// input worker is not reading (not started yet, restarting) is dropped: a viewer must
/// never wait on the guest.
pub struct EventSocketSink {
    socket: OwnedFd,
    framebuffer: Arc<Framebuffer>,
    translator: Mutex<Translator>,
    dropped: AtomicU64,
}

impl EventSocketSink {
    pub fn new(socket: OwnedFd, framebuffer: Arc<Framebuffer>) -> Self {
        Self {
            socket,
            framebuffer,
            translator: Mutex::new(Translator::default()),
            dropped: AtomicU64::new(0),
        }
    }
}

impl InputSink for EventSocketSink {
    fn send(&self, event: InputEvent) {
        tracing::debug!(target: "bulkhead::input", "{event:?}");
        // The lock also keeps two viewers' reports from interleaving with the state.
        let mut translator = self.translator.lock().unwrap_or_else(|e| e.into_inner());
        let report = match event {
            InputEvent::Key { down, keysym } => translator.key(down, keysym),
            InputEvent::Pointer { buttons, x, y } => {
                let (width, height) = {
                    let state = self.framebuffer.lock();
                    (state.width, state.height)
                };
                translator.pointer(buttons, x, y, width, height)
            }
        };
        let Some(report) = report else {
            return;
        };
        let bytes = encode_report(&report);
        // SAFETY: `bytes` is valid for reads of its length; the descriptor is ours.
        let sent =
            unsafe { libc::write(self.socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if sent < 0 {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    "input: {dropped} reports dropped so far ({})",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
