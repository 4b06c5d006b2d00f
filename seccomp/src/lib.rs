//! Sandboxing for bulkhead's device workers.
//!
//! Every device runs as its own `bulkhead-worker <kind>` process that parses
//! guest-controlled data, so each confines itself before reading any: the VMM opens every
//! host resource and passes descriptors, and the worker then gives up everything else. A
//! [`Policy`] says, per worker kind, what is left:
//!
//! - a seccomp allowlist ([`SyscallRule`]s with argument conditions); anything else
//!   kills the worker with SIGSYS ([`is_seccomp_violation`]);
//! - Landlock rules ([`LandlockRules`]): rights handled and the few grants;
//! - the descriptors kept open;
//! - and always: no_new_privs and no capabilities.
//!
//! ```no_run
//! # fn main() -> Result<(), bulkhead_seccomp::SandboxError> {
//! use bulkhead_protocol::WorkerKind;
//!
//! // In the worker, after reading the launch configuration, before serving:
//! let policy = bulkhead_seccomp::policy_for(WorkerKind::Rng).keep_fd(4, "vhost-user socket");
//! let report = bulkhead_seccomp::apply(&policy)?;
//!
//! // In the VMM: the audit log's digest, and `bulkhead policy rng`.
//! let digest = bulkhead_seccomp::policy_for(WorkerKind::Rng).digest().to_string();
//! print!("{}", bulkhead_seccomp::policy_for(WorkerKind::Rng).describe());
//! # Ok(()) }
//! ```

mod describe;
mod error;
mod filter;
mod kinds;
mod landlock_rules;
mod policy;
mod sandbox;
mod syscall_rule;
mod violation;

pub use describe::{canonical, PolicyDigest};
pub use error::SandboxError;
pub use filter::{CompiledFilter, FilterError};
pub use kinds::{p9_policy, policy_for, policy_for_device};
pub use landlock_rules::{
    Enforcement, GrantRoot, LandlockRules, PathGrant, PortGrant, TARGET_ABI, TARGET_ABI_VERSION,
};
pub use policy::{KeptFd, Policy, PolicyError};
pub use sandbox::{apply, LandlockOutcome, SandboxReport};
pub use syscall_rule::{
    Arg, ArgCondition, ArgMatch, ArgOp, ArgWidth, Constant, RuleAction, Syscall, SyscallRule,
};
pub use violation::{is_seccomp_signal, is_seccomp_violation};

/// Landlock's rights types, for building [`LandlockRules`].
pub use landlock::{AccessFs, AccessNet, BitFlags, Scope};

#[doc(hidden)]
pub use libc as __libc;
