//! Compiling a policy's allowlist into seccomp BPF programs (with seccompiler) and
//! installing them.
//!
//! A policy becomes one or two filters. The *allowlist* allows every listed call whose
//! arguments match and kills the process (`SECCOMP_RET_KILL_PROCESS`) on anything else,
//! so a violation is a SIGSYS death the supervisor can see. Rules that answer with an
//! errno instead (`clone3` -> ENOSYS) are allowed by the allowlist and turned into that
//! errno by an *errno filter* per distinct errno, installed before it: the kernel runs
//! every filter and the most severe verdict wins (kill > errno > allow), so a call gets its
//! errno only when the allowlist does not kill it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

use crate::policy::{Policy, PolicyError};
use crate::syscall_rule::{ArgCondition, ArgOp, ArgWidth, RuleAction, SyscallRule};

#[derive(Debug, Error)]
pub enum FilterError {
    #[error("invalid policy")]
    Policy(#[from] PolicyError),
    #[error("seccomp filters are not built for architecture {0}")]
    Arch(&'static str),
    #[error("compiling the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// A policy's system call rules as BPF, ready to install.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    /// Installed first, one per errno a rule answers with.
    errno_filters: Vec<BpfProgram>,
    /// Installed last; kills the process on any call it does not list.
    allowlist: BpfProgram,
}

impl CompiledFilter {
    pub fn compile(policy: &Policy) -> Result<CompiledFilter, FilterError> {
        policy.validate()?;
        let arch = target_arch()?;

        let mut allowlist = BTreeMap::new();
        let mut by_errno: BTreeMap<u64, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
        for rule in &policy.syscalls {
            let chain = seccomp_rules(rule)?;
            if let RuleAction::Errno(errno) = rule.action {
                by_errno
                    .entry(errno.value)
                    .or_default()
                    .insert(rule.syscall.nr, chain.clone());
            }
            allowlist.insert(rule.syscall.nr, chain);
        }

        let errno_filters = by_errno
            .into_iter()
            .map(|(errno, rules)| {
                // Errnos are below 4096; the kernel keeps only the low 16 bits anyway.
                let errno = SeccompAction::Errno(errno as u32);
                bpf(rules, SeccompAction::Allow, errno, arch)
            })
            .collect::<Result<_, _>>()?;
        let allowlist = bpf(
            allowlist,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            arch,
        )?;
        Ok(CompiledFilter {
            errno_filters,
            allowlist,
        })
    }

    /// Installs the filters on every thread of the process (TSYNC). Nothing the filter
    /// does not list works afterwards, including installing another filter.
    pub fn install(&self) -> Result<(), FilterError> {
        for program in self.errno_filters.iter().chain([&self.allowlist]) {
            seccompiler::apply_filter_all_threads(program).map_err(FilterError::Install)?;
        }
        Ok(())
    }

    /// BPF instructions in all filters together (each must stay under 4096).
    pub fn instruction_count(&self) -> usize {
        self.errno_filters.iter().map(Vec::len).sum::<usize>() + self.allowlist.len()
    }
}

fn target_arch() -> Result<TargetArch, FilterError> {
    let arch = std::env::consts::ARCH;
    TargetArch::try_from(arch).map_err(|_| FilterError::Arch(arch))
}

fn bpf(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, FilterError> {
    let filter =
        SeccompFilter::new(rules, mismatch, matched, arch).map_err(FilterError::Compile)?;
    filter.try_into().map_err(FilterError::Compile)
}

/// One seccompiler rule per alternative; none at all means "any arguments".
fn seccomp_rules(rule: &SyscallRule) -> Result<Vec<SeccompRule>, FilterError> {
    rule.matches
        .iter()
        .map(|alternative| {
            let conditions = alternative
                .0
                .iter()
                .map(seccomp_condition)
                .collect::<Result<_, _>>()?;
            SeccompRule::new(conditions).map_err(FilterError::Compile)
        })
        .collect()
}

fn seccomp_condition(condition: &ArgCondition) -> Result<SeccompCondition, FilterError> {
    let width = match condition.arg.width {
        ArgWidth::U32 => SeccompCmpArgLen::Dword,
        ArgWidth::U64 => SeccompCmpArgLen::Qword,
    };
    let (op, value) = match condition.op {
        ArgOp::Eq(value) => (SeccompCmpOp::Eq, value.value),
        ArgOp::EqOwnPid => (SeccompCmpOp::Eq, u64::from(std::process::id())),
        ArgOp::MaskedEq { mask, value } => (SeccompCmpOp::MaskedEq(mask.value), value.value),
    };
    SeccompCondition::new(condition.arg.index, width, op, value).map_err(FilterError::Compile)
}

#[cfg(test)]
mod tests {
    use bulkhead_protocol::WorkerKind;

    use super::*;
    use crate::kinds::policy_for;
    use crate::sys;

    #[test]
    fn every_kind_compiles_within_the_bpf_limit() {
        for kind in WorkerKind::ALL {
            let filter = CompiledFilter::compile(&policy_for(kind)).expect("compiles");
            // The kernel refuses programs over BPF_MAXINSNS (4096) instructions.
            assert!(filter.allowlist.len() < 4096, "{kind}");
            assert!(
                filter.errno_filters.iter().all(|f| f.len() < 4096),
                "{kind}"
            );
        }
    }

    #[test]
    fn errno_rules_get_one_filter_per_errno() {
        // rng answers clone3 and statx with ENOSYS: one extra filter.
        let filter = CompiledFilter::compile(&policy_for(WorkerKind::Rng)).expect("compiles");
        assert_eq!(filter.errno_filters.len(), 1);

        let mut policy = policy_for(WorkerKind::Rng);
        policy.syscalls.push(SyscallRule::fail_with(
            sys!(SYS_sched_setaffinity),
            crate::constant!(EPERM),
        ));
        let filter = CompiledFilter::compile(&policy).expect("compiles");
        assert_eq!(filter.errno_filters.len(), 2);
    }

    #[test]
    fn invalid_policies_do_not_compile() {
        let mut policy = policy_for(WorkerKind::Rng);
        policy.syscalls.push(SyscallRule::allow(sys!(SYS_execve)));
        assert!(matches!(
            CompiledFilter::compile(&policy),
            Err(FilterError::Policy(PolicyError::Forbidden("execve")))
        ));
    }
}
