//! Guest-facing virtio helpers shared by the devices.

mod chain;
mod request;

pub use chain::{writable_len, ChainError};
pub use request::{walk_request, DescriptorTable, GuestSegment, Request, WalkError};
