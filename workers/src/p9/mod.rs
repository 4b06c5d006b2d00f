//! A 9P2000.L file server sharing one host directory, confined to it.
//!
//! - [`wire`]: the encoding: little-endian fields, strings and qids, bounds-checked.
//! - [`messages`]: requests parsed from frames and replies encoded into them.
//! - [`confined`]: every host file system call, beneath the shared directory's descriptor.
//! - [`server`]: fids, msize negotiation and one handler per request: a request frame in,
//!   a reply frame out, whatever carries them.
//! - [`transport_unix`]: the standalone debug transport, 9P over a Unix stream socket.

pub mod confined;
pub mod messages;
pub mod server;
pub mod transport_unix;
pub mod wire;

pub use confined::Root;
pub use server::{Export, FrameError, Pending, Session, MAX_MSIZE};
