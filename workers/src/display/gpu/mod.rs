//! virtio-gpu 2D (virtio 1.2, section 5.7) as a vhost-user backend.
//!
//! - [`protocol`]: the wire structures and how a command is parsed from guest bytes.
//! - `resources`: 2D resources, their guest-memory backing and TRANSFER_TO_HOST_2D.
//! - `scanout`: the one scanout, RESOURCE_FLUSH into the shared framebuffer, the cursor.
//! - [`edid`]: the EDID block describing the configured mode.
//! - [`store`]: what the guest set up, kept in a memfd the VMM hands to every incarnation
//!   of the worker, and rebuilt from it by a replacement.
//! - `device`: the queues, config space and command dispatch.

mod device;
pub mod edid;
pub mod protocol;
mod resources;
mod scanout;
pub mod store;

pub use device::{GpuDevice, GpuLimits, CONFIG_SIZE, CONTROL_QUEUE, CURSOR_QUEUE, NUM_QUEUES};
