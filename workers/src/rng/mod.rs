//! virtio-rng: random bytes for the guest from the host kernel, optionally rate limited.

mod device;
mod entropy;
mod rate_limit;

pub use device::{RngDevice, RngError, MAX_QUEUE_SIZE, MAX_REQUEST_BYTES, NUM_QUEUES};
pub use rate_limit::{ByteBudget, RateLimitError, RateLimiter, MAX_PERIOD_MS};
