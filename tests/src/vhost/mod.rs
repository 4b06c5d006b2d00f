//! A userspace vhost-user frontend and virtio driver: the guest's and the VMM's side of a
//! device worker, without a VM, for functional tests and benchmarks of any worker.
//!
//! - [`memory`]: [`SharedMemory`], memfd-backed "guest RAM" shared with the backend.
//! - [`frontend`]: [`UserspaceFrontend`], negotiation, memory table and queue setup.
//! - [`split_queue`]: [`SplitQueueDriver`], descriptors and rings written in shared memory,
//!   kicks, and used buffers read back; malformed chains on request.
//! - [`worker_process`]: [`WorkerProcess`], a `bulkhead-worker` spawned standalone or
//!   launched as the VMM launches it, with a watchdog.
//! - [`raw_message`]: hand-made vhost-user messages for protocol abuse tests.
//! - [`device`]: [`UserspaceDevice`], all of the above wired up for a device's queues.
//!
//! A worker test in four lines:
//!
//! ```no_run
//! # use bulkhead_tests::vhost::*;
//! # fn main() -> anyhow::Result<()> {
//! let worker = WorkerProcess::standalone("rng", &[])?;
//! let mut device = UserspaceDevice::start(worker.connect()?, &DeviceSetup::new(&[256]))?;
//! let buffer = device.memory.allocate(4096, 8)?;
//! device.queues[0].post(&[Buffer::writable(buffer, 4096)])?;
//! device.queues[0].kick()?;
//! let used = device.queues[0].wait_used(1, std::time::Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

pub mod device;
pub mod frontend;
pub mod memory;
pub mod raw_message;
pub mod split_queue;
pub mod worker_process;

pub use device::{DeviceSetup, UserspaceDevice};
pub use frontend::{FrontendError, Negotiated, UserspaceFrontend};
pub use memory::{MemoryError, SharedMemory};
pub use raw_message::Response;
pub use split_queue::{
    Buffer, Descriptor, DriverError, QueueLayout, SplitQueueDriver, UsedElement, DESC_F_INDIRECT,
    DESC_F_NEXT, DESC_F_WRITE,
};
pub use worker_process::{worker_bin, WorkerError, WorkerProcess};
