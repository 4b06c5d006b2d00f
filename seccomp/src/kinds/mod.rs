//! One policy per worker kind, assembled from shared groups of rules.
//!
//! - [`runtime`]: what every Rust-on-glibc worker needs after setup.
//! - [`vhost_user`]: what serving a vhost-user connection adds.
//! - [`inflight`]: what a device that tracks in-flight requests adds.
//! - one module per kind for the rest and for its Landlock rules.

mod display;
mod inflight;
mod rng;
mod runtime;
mod vhost_user;

use bulkhead_protocol::WorkerKind;

use crate::policy::Policy;

/// The policy a worker of `kind` runs under, keeping only the standard descriptors; the
/// worker adds the ones it is launched with ([`Policy::keep_fd`]).
pub fn policy_for(kind: WorkerKind) -> Policy {
    match kind {
        WorkerKind::Rng => rng::policy(),
        WorkerKind::Display => display::policy(),
    }
}
