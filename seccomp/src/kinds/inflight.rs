//! What a worker whose device tracks in-flight requests adds (vhost-user
//! `INFLIGHT_SHMFD`, for devices that complete out of order: blk). Kinds whose requests
//! complete in order, like rng, do not offer the feature and do not get these.
//!
//! GET_INFLIGHT_FD makes the worker create the region: a memfd, sized with ftruncate,
//! then mapped (`mmap` is in the runtime set) and sent to the frontend. SET_INFLIGHT_FD
//! needs nothing new: it is fstat and mmap, like a memory table.

use crate::syscall_rule::{Arg, SyscallRule};
use crate::{constant, sys};

pub fn rules() -> Vec<SyscallRule> {
    vec![
        SyscallRule::allow(sys!(SYS_memfd_create))
            .when(Arg::int(1, "flags").eq(constant!(MFD_CLOEXEC)))
            .because(
                "GET_INFLIGHT_FD: the inflight region, an anonymous memfd; no sealing, no \
                 huge pages, no executable memfd (MFD_EXEC) - exactly MFD_CLOEXEC",
            ),
        SyscallRule::allow(sys!(SYS_ftruncate)).because(
            "sizing the new inflight region. Guest memory cannot be resized this way: the \
             VMM seals its memfd against growing and shrinking",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::CompiledFilter;
    use crate::kinds::rng;

    #[test]
    fn compiles_beside_a_kind_and_says_why() {
        let mut policy = rng::policy();
        policy.syscalls.extend(rules());
        assert!(CompiledFilter::compile(&policy).is_ok());
        assert!(rules().iter().all(|rule| !rule.reason.is_empty()));
        assert!(rules().iter().any(|rule| !rule.is_unconditional()));
    }
}
