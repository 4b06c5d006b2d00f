//! Guest-facing virtio helpers shared by the devices.

mod chain;

pub use chain::{writable_len, ChainError};
