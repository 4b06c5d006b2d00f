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
//! The VMM (`bulkhead run --display vnc`, `vmm/src/display.rs`) opens the VNC listener and
//! the events socket pair and passes them as the launch config's descriptors.
//!
//! # Still to do
//!
//! - A restarted worker starts with no resources: the guest's next flush gets
//!   ERR_INVALID_RESOURCE_ID and the screen freezes. Until the device can replay them, a
//!   display worker crash should mark the device as needing a reset (the driver then
//!   re-creates its framebuffer) rather than resume the rings.
//! - SDL: a viewer process that is just another RFB client on a Unix listener the VMM
//!   opens, so the worker's sandbox does not change.
//! - The guest kernel needs `CONFIG_DRM_VIRTIO_GPU` and fbcon (`console=tty0`).

pub mod framebuffer;
pub mod gpu;
pub mod input;
pub mod vnc;

pub use framebuffer::{Framebuffer, Rect};
pub use gpu::{GpuDevice, GpuLimits};
pub use input::{EventSocketSink, InputEvent, InputSink, LoggingInputSink};
