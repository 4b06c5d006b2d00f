//! Guest-facing virtio helpers shared by the devices.

mod chain;
pub mod drain;
mod request;

pub use chain::{writable_len, ChainError};
pub use drain::{drain, Drained, Next, QueueFault};
pub use request::{walk_request, DescriptorTable, GuestSegment, Request, WalkError};
