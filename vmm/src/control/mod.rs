//! The per-VM control socket: where it lives, the server thread in the VMM, and the
//! client the `bulkhead list/stop/...` commands use. The protocol itself is in
//! [`bulkhead_protocol::control`].
//!
//! Who may connect: the socket's directory is 0700 and the socket 0600, and on top of
//! that the server checks SO_PEERCRED and refuses any peer whose uid is neither the
//! VMM's nor root's (root can ptrace the VMM anyway, so refusing it buys nothing).

pub mod client;
pub mod format;
pub mod server;

use std::path::PathBuf;

pub use client::{list, send, wait_until_gone, ClientError};
pub use server::{ControlContext, ControlError, ControlSocket};

/// Where VMs of the current user keep their control sockets: `$XDG_RUNTIME_DIR/bulkhead`
/// when that is set, else `/run/bulkhead` for root, else `/tmp/bulkhead-<uid>` (the
/// server creates it 0700 and refuses one another user owns).
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("bulkhead");
    }
    let uid = euid();
    if uid == 0 {
        PathBuf::from("/run/bulkhead")
    } else {
        std::env::temp_dir().join(format!("bulkhead-{uid}"))
    }
}

/// The control socket of the VM called `name`.
pub fn socket_path(name: &str) -> PathBuf {
    runtime_dir().join(format!("{name}.sock"))
}

/// This process's effective uid.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
