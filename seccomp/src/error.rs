//! Why a worker could not be sandboxed. Every variant is fatal: a worker that cannot
//! confine itself must not go on to read anything from the guest.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::filter::FilterError;
use crate::policy::PolicyError;

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("invalid policy")]
    Policy(#[from] PolicyError),
    #[error("seccomp filter")]
    Filter(#[from] FilterError),
    #[error("counting the process's threads in /proc/self/task")]
    ThreadCount(#[source] io::Error),
    #[error(
        "the process has {0} threads; sandboxing must happen before any thread starts, \
         because Landlock and capabilities only change the calling thread"
    )]
    NotSingleThreaded(usize),
    #[error("closing inherited descriptors")]
    CloseFds(#[source] io::Error),
    #[error("setting no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    #[error("dropping capabilities: {step}")]
    Capabilities {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("building or enforcing the Landlock ruleset")]
    Landlock(#[from] landlock::RulesetError),
    #[error("opening {path:?} for a Landlock rule")]
    LandlockPath {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("a Landlock rule beneath the {0} has no descriptor yet")]
    LandlockUnboundGrant(&'static str),
    #[error("the policy requires Landlock but the kernel enforced it only {0}")]
    LandlockNotEnforced(&'static str),
}
