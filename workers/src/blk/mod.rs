//! virtio-blk (virtio 1.2, section 5.2) over vhost-user, on top of the [`crate::disk`]
//! engine: one disk image shared by every request queue, each queue served by its own
//! vring thread, requests tracked in the inflight region so a restarted worker finishes
//! those its predecessor left in flight.
//!
//! - [`config`]: the feature bits and the configuration space the driver reads.
//! - [`request`]: one request, from the guest's buffers to the engine and back to a
//!   status byte.
//! - [`device`]: the vhost-user backend that pops, serves and completes requests.
//! - [`uring`]: asynchronous reads and writes, one restricted io_uring per queue.

pub mod config;
mod device;
pub mod request;
pub mod uring;

pub use config::{BlkGeometry, SECTOR_SIZE};
pub use device::{BlkDevice, BlkOptions, MAX_QUEUES, MAX_QUEUE_SIZE};
pub use uring::{AsyncIo, UringOptions};
