//! Serving a device over vhost-user.
//!
//! `vhost-user-backend`'s daemon only serves sockets it connects or accepts itself, and its
//! request handler is private, so a worker handed an already-connected socket by the VMM
//! could not use it. This module is that daemon's counterpart built on public pieces: the
//! `vhost` crate's [`BackendReqHandler`](vhost::vhost_user::BackendReqHandler) parses and
//! checks every frontend message, [`Session`] answers them, and devices are plain
//! [`VhostUserBackend`](vhost_user_backend::VhostUserBackend) implementations served by
//! [`VringThread`]s, exactly as under the upstream daemon.
//!
//! It also does inflight I/O tracking (GET/SET_INFLIGHT_FD), which restarting a worker
//! mid-I/O needs and `vhost-user-backend` does not provide: the [`InflightRegion`] in
//! shared memory, and [`TrackedQueue`], the queue a device that completes requests out of
//! order serves its ring through.

mod inflight;
mod memory;
mod server;
mod session;
mod tracked_queue;
mod vring_thread;

pub use inflight::{InflightError, InflightLayout, InflightRegion, QueueRegion, Recovery};
pub use memory::{map_memory_table, AddressTranslation, MemoryTableError};
pub use server::{serve_connection, serve_listener, DeviceBackend, ServeError};
pub use session::{Session, SessionError};
pub use tracked_queue::{Completion, InflightTracking, QueueError, TrackedQueue};
pub use vring_thread::{is_running, EventSource, GuestRam, VringThread, VringThreadError};
