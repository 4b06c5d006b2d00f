//! The display worker: a virtio-gpu 2D device (virtio id 16) whose scanout is shown to VNC
//! viewers by an RFB 3.8 server in the same process.
//!
//! - [`gpu`]: the guest-facing device - command parsing, 2D resources with their guest
//!   backing, the scanout - served over vhost-user like every other device.
//! - [`framebuffer`]: the host copy of what the scanout shows; the device writes it on
//!   RESOURCE_FLUSH, the VNC sessions read it. It is the only thing the two halves share.
//! - [`vnc`]: the RFB server, on a listening socket the worker was given.
//! - [`input`]: where viewers' keys and pointer moves go ([`InputSink`]); virtio-input will
//!   consume them, today they are logged and counted.

pub mod framebuffer;
pub mod gpu;
pub mod input;
pub mod vnc;

pub use framebuffer::{Framebuffer, Rect};
pub use gpu::{GpuDevice, GpuLimits};
pub use input::{InputEvent, InputSink, LoggingInputSink};
