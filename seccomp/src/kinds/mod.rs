//! One policy per worker kind, assembled from shared groups of rules.
//!
//! - [`runtime`]: what every Rust-on-glibc worker needs after setup.
//! - [`vhost_user`]: what serving a vhost-user connection adds.
//! - [`inflight`]: what a device that tracks in-flight requests adds.
//! - one module per kind for the rest and for its Landlock rules.

mod blk;
mod display;
mod inflight;
mod input;
mod net;
mod p9;
mod rng;
mod runtime;
mod vhost_user;

use std::os::fd::RawFd;

use bulkhead_protocol::WorkerKind;

use crate::policy::Policy;

/// The policy a worker of `kind` runs under, keeping only the standard descriptors; the
/// worker adds the ones it is launched with ([`Policy::keep_fd`]).
pub fn policy_for(kind: WorkerKind) -> Policy {
    match kind {
        WorkerKind::Rng => rng::policy(),
        WorkerKind::P9 => p9::policy(None, false),
        WorkerKind::Blk => blk::policy(),
        WorkerKind::Net => net::policy(),
        WorkerKind::Display => display::policy(),
        WorkerKind::Input => input::policy(),
    }
}

/// The policy of a p9 worker serving the directory it holds open as `root_fd`, which
/// the caller also keeps ([`Policy::keep_fd`]): Landlock grants only beneath it, with read
/// rights only when `read_only`.
pub fn p9_policy(root_fd: RawFd, read_only: bool) -> Policy {
    p9::policy(Some(root_fd), read_only)
}
