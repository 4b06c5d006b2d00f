//! Accepting viewers on the listening socket the worker was given.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::session::run_session;
use crate::display::framebuffer::Framebuffer;
use crate::display::input::InputSink;

/// Viewers served at once; more are turned away (each costs two threads).
pub const MAX_VIEWERS: usize = 16;

pub struct VncServer {
    listener: OwnedFd,
    framebuffer: Arc<Framebuffer>,
    input: Arc<dyn InputSink>,
    name: String,
    /// When set, viewers must pass VNC authentication.
    password: Option<Arc<[u8]>>,
}

impl VncServer {
    /// A server on `listener`, a socket already listening (TCP or Unix).
    pub fn new(
        listener: OwnedFd,
        framebuffer: Arc<Framebuffer>,
        input: Arc<dyn InputSink>,
        name: String,
        password: Option<Vec<u8>>,
    ) -> Self {
        VncServer {
            listener,
            framebuffer,
            input,
            name,
            password: password.map(Arc::from),
        }
    }

    /// Accepts viewers until the listener fails for good; each runs in its own threads.
    pub fn run(self) -> io::Result<()> {
        let viewers = Arc::new(AtomicUsize::new(0));
        let mut next_id = 0u64;
        loop {
            // SAFETY: accept4 on a descriptor this server owns; null address pointers ask
            // for no peer address. The result is a new descriptor or -1.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => continue,
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        tracing::warn!("vnc: cannot accept a viewer: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            // SAFETY: accept4 just returned this descriptor; nothing else owns it.
            let socket = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            next_id += 1;
            if viewers.fetch_add(1, Ordering::SeqCst) >= MAX_VIEWERS {
                viewers.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("vnc: viewer {next_id} turned away, {MAX_VIEWERS} already watching");
                continue;
            }
            let framebuffer = self.framebuffer.clone();
            let input = self.input.clone();
            let name = self.name.clone();
            let password = self.password.clone();
            let count = viewers.clone();
            let id = next_id;
            let spawned = std::thread::Builder::new()
                .name(format!("vnc-{id}"))
                .spawn(move || {
                    tracing::info!("vnc: viewer {id} connected");
                    match run_session(id, socket, framebuffer, input, &name, password.as_deref()) {
                        Ok(()) => tracing::info!("vnc: viewer {id} left"),
                        Err(e) => tracing::info!("vnc: viewer {id} dropped: {e}"),
                    }
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                viewers.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("vnc: no thread for viewer {id}: {e}");
            }
        }
    }
}
