//! Turning [`LandlockRules`] into a Landlock ruleset and restricting the calling thread.

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus,
};

use std::os::fd::BorrowedFd;

use crate::error::SandboxError;
use crate::landlock_rules::{Enforcement, GrantRoot, LandlockRules, REQUIRED_ABI};

/// How much of a policy's Landlock rules the running kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// Every handled right and scope.
    Full,
    /// Some: the kernel's Landlock ABI predates part of the policy.
    Partial,
    /// None: Landlock is not built in or not enabled at boot.
    None,
}

impl LandlockOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            LandlockOutcome::Full => "fully",
            LandlockOutcome::Partial => "partially",
            LandlockOutcome::None => "not at all",
        }
    }
}

/// Restricts the calling thread. With [`Enforcement::Required`], a kernel that cannot
/// enforce every handled right of [`REQUIRED_ABI`] is an error before anything is
/// enforced (the crate refuses unsupported rights up front); rights of newer ABIs, and
/// everything with [`Enforcement::BestEffort`], are enforced where the kernel has them,
/// the rest logged as a warning. A grant loses only the rights the kernel does not
/// handle: what it allows never grows.
pub fn restrict_self(rules: &LandlockRules) -> Result<LandlockOutcome, SandboxError> {
    let mut ruleset = Ruleset::default();
    if rules.enforcement == Enforcement::Required {
        let floor = rules.handled_fs & AccessFs::from_all(REQUIRED_ABI);
        ruleset = ruleset
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(floor)?;
    }
    let mut ruleset = ruleset.set_compatibility(CompatLevel::BestEffort);
    if !rules.handled_fs.is_empty() {
        ruleset = ruleset.handle_access(rules.handled_fs)?;
    }
    if !rules.handled_net.is_empty() {
        ruleset = ruleset.handle_access(rules.handled_net)?;
    }
    if !rules.scopes.is_empty() {
        ruleset = ruleset.scope(rules.scopes)?;
    }
    let mut created = ruleset.create()?;
    for grant in &rules.paths {
        created = match &grant.root {
            GrantRoot::Path(path) => {
                let parent = PathFd::new(path).map_err(|source| SandboxError::LandlockPath {
                    path: path.clone(),
                    source,
                })?;
                created.add_rule(PathBeneath::new(parent, grant.access))?
            }
            GrantRoot::Fd { fd, .. } => {
                // SAFETY: the policy keeps this descriptor open (validated before anything
                // was closed), and it is only borrowed for the duration of add_rule.
                let parent = unsafe { BorrowedFd::borrow_raw(*fd) };
                created.add_rule(PathBeneath::new(parent, grant.access))?
            }
            GrantRoot::AtLaunch { what } => return Err(SandboxError::LandlockUnboundGrant(what)),
        };
    }
    for grant in &rules.ports {
        created = created.add_rule(NetPort::new(grant.port, grant.access))?;
    }
    // no_new_privs is already set by the caller; the crate setting it again is harmless.
    let status = created.restrict_self()?;
    let outcome = match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::Full,
        RulesetStatus::PartiallyEnforced => LandlockOutcome::Partial,
        RulesetStatus::NotEnforced => LandlockOutcome::None,
    };
    match (outcome, rules.enforcement) {
        (LandlockOutcome::Full, _) => {}
        (LandlockOutcome::None, Enforcement::Required) => {
            return Err(SandboxError::LandlockNotEnforced(outcome.as_str()));
        }
        (_, Enforcement::Required) => tracing::warn!(
            "Landlock is enforced partially on this kernel: every path this worker may \
             reach is confined, and the seccomp filter refuses what the missing rights \
             would police"
        ),
        (_, Enforcement::BestEffort) => tracing::warn!(
            "Landlock is enforced {} on this kernel; the seccomp filter still keeps this \
             worker out of the filesystem and the network",
            outcome.as_str()
        ),
    }
    Ok(outcome)
}
