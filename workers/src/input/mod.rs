//! The input worker: a virtio-input device (virtio id 18) that is a keyboard and an
//! absolute pointer (a tablet) at once, fed with what VNC viewers type and point.
//!
//! The display worker owns the viewers; it turns their RFB key and pointer events into
//! `virtio_input_event`s ([`keymap`], `display::input::EventSocketSink`) and sends them,
//! one datagram per report, on a `SOCK_SEQPACKET` socket pair the VMM made and passed to
//! both workers. This worker checks each datagram ([`event`]) and hands the events to
//! the guest's event queue ([`device`]); the config space ([`config`]) tells the guest's
//! driver which keys and axes exist. Two processes rather than two devices in one keep
//! the supervisor's one-device-one-process model: either worker may crash and be
//! replaced while the other keeps its end of the pair, which the VMM also holds.

pub mod config;
pub mod device;
pub mod event;
pub mod keymap;
pub mod translate;

pub use config::CONFIG_SIZE;
pub use device::InputDevice;
pub use event::{InputRecord, ABS_MAX};
pub use translate::Translator;
