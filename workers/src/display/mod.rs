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
//!
//! # What the VMM side still needs (`bulkhead run --display vnc|sdl`)
//!
//! - Open the listener itself - TCP `127.0.0.1:5900` by default, `--display vnc=ADDR:PORT`
//!   or a Unix socket - and pass it as one more inherited descriptor, named by
//!   `DisplayConfig::vnc_listen_fd` with the mode (`width`, `height`, 64..=4095) and an
//!   optional `vnc_password` (require one for a non-loopback address). The supervisor must
//!   keep its copy and pass the same listener to a restarted worker.
//! - A virtio-mmio device with device id 16, two queues (0 control, 1 cursor; 256
//!   entries at most) and a 16-byte config space forwarded with GET_CONFIG/SET_CONFIG: the
//!   worker offers the CONFIG protocol feature besides REPLY_ACK and RESET_DEVICE, and the
//!   virtio features VERSION_1, EVENT_IDX, INDIRECT_DESC and VIRTIO_GPU_F_EDID (bit 1).
//! - A restarted worker starts with no resources: the guest's next flush gets
//!   ERR_INVALID_RESOURCE_ID and the screen freezes. Until the device can replay them, a
//!   display worker crash should mark the device as needing a reset (the driver then
//!   re-creates its framebuffer) rather than resume the rings.
//! - virtio-input (device id 18, keyboard and tablet) belongs in this process: the
//!   [`InputSink`] is where its event queues get fed. Viewers send X11 keysyms (RFB's
//!   QEMU extended key event, -258, would give scancodes directly); the pointer is absolute
//!   in framebuffer pixels, to be scaled to the tablet's ABS range.
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
