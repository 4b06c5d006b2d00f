//! The display worker: a virtio-gpu 2D device (virtio id 16) whose scanout is shown to VNC
//! viewers by an RFB 3.8 server in the same process.
//!
//! - [`gpu`]: the guest-facing device - command parsing, 2D resources with their guest
//!   backing, the scanout - served over vhost-user like every other device.
//! - [`framebuffer`]: the host copy of what the scanout shows; the device writes it on
//!   RESOURCE_FLUSH, the VNC sessions read it. It is the only thing the two halves share.
//! - [`vnc`]: the RFB server, on a listening socket the worker was given.
//! - [`input`]: where viewers' keys and pointer moves go ([`InputSink`]): to the input
//!   worker's virtio-input device as event reports ([`EventSocketSink`]), or only to the
//!   log when the worker has no events socket.
//!
//! The VMM (`bulkhead run --display vnc`, `vmm/src/display.rs`) opens the VNC listener,
//! the events socket pair and the state store ([`gpu::store`]) and passes them as the
//! launch config's descriptors, the same ones to every incarnation of the worker: a
//! replacement rebuilds the guest's resources and screen from the store and guest memory,
//! serves viewers on the same listener and feeds the same input worker.
//!
//! `--display sdl` is one more RFB client: `bulkhead-viewer` on a private listener the VMM
//! opens, so the worker's sandbox does not change.
//!
//! A guest shows its console here with `CONFIG_DRM_VIRTIO_GPU` and fbcon (`console=tty0`).

pub mod framebuffer;
pub mod gpu;
pub mod input;
pub mod vnc;

pub use framebuffer::{Framebuffer, Rect};
pub use gpu::{GpuDevice, GpuLimits};
pub use input::{EventSocketSink, InputEvent, InputSink, LoggingInputSink};
