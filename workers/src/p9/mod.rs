//! A 9P2000.L file server sharing one host directory, confined to it.
//!
//! - [`wire`]: the encoding: little-endian fields, strings and qids, bounds-checked.
//! - [`messages`]: requests parsed from frames and replies encoded into them.
//! - [`confined`]: every host file system call, beneath the shared directory's descriptor.
//! - [`journal`]: a session's fids as a replacement worker rebuilds them, in a memfd the
//!   VMM keeps.
//! - [`server`]: fids, msize negotiation and one handler per request: a request frame in,
//!   a reply frame out, whatever carries them.
//! - [`transport_unix`]: the standalone debug transport, 9P over a Unix stream socket.
//! - [`virtio`]: the virtio-9p device, served over vhost-user.
//!
//! A transport holds one [`Export`] and one [`Session`] per client (a virtio-9p device is
//! one client: the guest's Tversion starts its session afresh) and, per request:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use bulkhead_workers::p9::{Export, Root, Session};
//! # fn send(_: &[u8]) {}
//! # fn main() -> std::io::Result<()> {
//! # let (dir_fd, read_only, request): (std::os::fd::OwnedFd, bool, Vec<u8>) = todo!();
//! let export = Arc::new(Export::new(Root::from_fd(dir_fd)?, read_only));
//! let session = Session::new(export);
//! // A whole 9P message, size field included, at most session.msize() bytes.
//! let pending = session.receive(request);
//! match pending.handle() {
//!     Ok(reply) => send(&reply), // at most session.msize() bytes
//!     Err(garbage) => { /* not 9P: drop the client */ }
//! }
//! // Only now is the request no longer in flight: a Tflush for it may be answered.
//! drop(pending);
//! # Ok(()) }
//! ```
//!
//! Requests may be handled on several threads at once. A Tflush
//! ([`Pending::waits_for_others`]) waits until the request it names is dropped, so it
//! must not run on the only thread that would handle that request.

pub mod confined;
pub mod journal;
pub mod messages;
pub mod server;
pub mod transport_unix;
pub mod virtio;
pub mod wire;

pub use confined::Root;
pub use server::{Export, FrameError, Pending, Session, MAX_MSIZE};
pub use virtio::{P9Device, P9DeviceError};
