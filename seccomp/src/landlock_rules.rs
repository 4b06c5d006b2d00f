//! The Landlock half of a policy: which kinds of access the kernel is asked to police
//! (the *handled* rights) and the few exceptions granted beneath paths or on ports.
//!
//! A right that is handled and never granted is denied everywhere, so "handle every
//! right, grant nothing" is the empty filesystem and network a worker that receives all
//! its resources as descriptors should live in.

use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;

use landlock::{Access, AccessFs, AccessNet, BitFlags, Scope, ABI};

/// The newest Landlock ABI whose rights policies ask for. Rights of newer ABIs are left
/// out on purpose until they are tested here; ABI 7 added only audit-log controls, so a
/// kernel at 6 or above enforces everything a policy built on this asks for.
pub const TARGET_ABI: ABI = ABI::V6;
/// [`TARGET_ABI`] as the kernel numbers it.
pub const TARGET_ABI_VERSION: u32 = 6;

/// What to do on a kernel that cannot enforce every handled right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Enforcement {
    /// Enforce what the kernel supports and log a warning about the rest. For policies
    /// whose seccomp filter already keeps the worker out of the filesystem and the network
    /// (no path-taking or socket-creating system calls): Landlock is a second wall there.
    BestEffort,
    /// Refuse to run unless the kernel enforces every handled right of [`REQUIRED_ABI`]
    /// and every grant: what polices opening, creating, removing and renaming by path.
    /// Mandatory when the seccomp filter lets path-taking system calls through, because
    /// Landlock is then the only thing between the worker and the host's files
    /// ([`crate::Policy::validate`] checks). Rights of newer ABIs are enforced where the
    /// kernel has them and logged as missing otherwise; what they add is already refused
    /// by such a policy's filter (no path `truncate`, which `validate` checks; no sockets,
    /// device ioctls or signals but the worker's own abort), and without `refer` (ABI 2)
    /// the kernel refuses every rename or link across directories instead.
    Required,
}

/// The Landlock ABI a [`Enforcement::Required`] policy cannot run without: 1, Linux 5.13.
/// Its rights are the filesystem's: reading, writing, executing, creating and removing
/// beneath a path. Asking for more (the target ABI's truncate, network and scopes) would
/// shut out kernels such as Linux 6.1 (ABI 2), where the filter covers what is missing.
pub const REQUIRED_ABI: ABI = ABI::V1;

/// Where a grant applies: the file hierarchy beneath it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GrantRoot {
    /// A host path, opened when the sandbox is applied.
    Path(PathBuf),
    /// A directory the worker already holds open: a worker that receives its resources
    /// as descriptors never names a host path. The descriptor must be kept
    /// ([`crate::Policy::validate`] checks), since the sandbox closes the others before
    /// building the ruleset.
    Fd { fd: RawFd, what: &'static str },
    /// The rule's shape before the worker has its descriptor (`bulkhead policy p9` has no
    /// directory to show); applying a policy that still holds one is an error.
    AtLaunch { what: &'static str },
}

impl GrantRoot {
    /// The same for every descriptor number, so a policy's digest does not depend on
    /// which number the directory arrived as.
    pub fn label(&self) -> String {
        match self {
            GrantRoot::Path(path) => format!("{path:?}"),
            GrantRoot::Fd { what, .. } | GrantRoot::AtLaunch { what } => format!("<{what}>"),
        }
    }
}

impl fmt::Display for GrantRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantRoot::Path(path) => write!(f, "{}", path.display()),
            GrantRoot::Fd { fd, what } => write!(f, "the {what} (descriptor {fd})"),
            GrantRoot::AtLaunch { what } => {
                write!(f, "the {what} (a descriptor received at launch)")
            }
        }
    }
}

/// Rights granted beneath one path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathGrant {
    pub root: GrantRoot,
    pub access: BitFlags<AccessFs>,
}

/// Rights granted on one TCP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortGrant {
    pub port: u16,
    pub access: BitFlags<AccessNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LandlockRules {
    /// Filesystem rights the ruleset polices.
    pub handled_fs: BitFlags<AccessFs>,
    /// Exceptions to `handled_fs`.
    pub paths: Vec<PathGrant>,
    /// Network rights the ruleset polices (TCP bind and connect).
    pub handled_net: BitFlags<AccessNet>,
    /// Exceptions to `handled_net`.
    pub ports: Vec<PortGrant>,
    /// IPC the worker may not reach outside its own domain: abstract Unix sockets,
    /// signals to other processes.
    pub scopes: BitFlags<Scope>,
    pub enforcement: Enforcement,
}

impl LandlockRules {
    /// Every right of [`TARGET_ABI`] handled, nothing granted: no filesystem access by
    /// path, no TCP bind or connect, no abstract Unix sockets or signals outside the
    /// worker itself.
    pub fn deny_all(enforcement: Enforcement) -> LandlockRules {
        LandlockRules {
            handled_fs: AccessFs::from_all(TARGET_ABI),
            paths: Vec::new(),
            handled_net: AccessNet::from_all(TARGET_ABI),
            ports: Vec::new(),
            scopes: Scope::from_all(TARGET_ABI),
            enforcement,
        }
    }
}

/// The kernel's name for a filesystem right (`LANDLOCK_ACCESS_FS_READ_FILE` -> `read_file`).
pub fn fs_right_name(right: AccessFs) -> &'static str {
    match right {
        AccessFs::Execute => "execute",
        AccessFs::WriteFile => "write_file",
        AccessFs::ReadFile => "read_file",
        AccessFs::ReadDir => "read_dir",
        AccessFs::RemoveDir => "remove_dir",
        AccessFs::RemoveFile => "remove_file",
        AccessFs::MakeChar => "make_char",
        AccessFs::MakeDir => "make_dir",
        AccessFs::MakeReg => "make_reg",
        AccessFs::MakeSock => "make_sock",
        AccessFs::MakeFifo => "make_fifo",
        AccessFs::MakeBlock => "make_block",
        AccessFs::MakeSym => "make_sym",
        AccessFs::Refer => "refer",
        AccessFs::Truncate => "truncate",
        AccessFs::IoctlDev => "ioctl_dev",
        AccessFs::ResolveUnix => "resolve_unix",
        _ => "unknown",
    }
}

/// The kernel's name for a network right.
pub fn net_right_name(right: AccessNet) -> &'static str {
    match right {
        AccessNet::BindTcp => "bind_tcp",
        AccessNet::ConnectTcp => "connect_tcp",
        AccessNet::BindUdp => "bind_udp",
        AccessNet::ConnectSendUdp => "connect_send_udp",
        _ => "unknown",
    }
}

/// The kernel's name for a scope.
pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::AbstractUnixSocket => "abstract_unix_socket",
        Scope::Signal => "signal",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_abi_number_matches_the_abi() {
        assert_eq!(ABI::from(TARGET_ABI_VERSION as i32), TARGET_ABI);
    }

    #[test]
    fn deny_all_handles_every_right_of_the_target_abi_and_grants_none() {
        let rules = LandlockRules::deny_all(Enforcement::BestEffort);
        assert_eq!(rules.handled_fs, AccessFs::from_all(TARGET_ABI));
        assert_eq!(rules.handled_fs.len(), 16);
        assert_eq!(
            rules.handled_net,
            AccessNet::BindTcp | AccessNet::ConnectTcp
        );
        assert_eq!(rules.scopes, Scope::AbstractUnixSocket | Scope::Signal);
        assert!(rules.paths.is_empty() && rules.ports.is_empty());
    }

    #[test]
    fn every_right_has_a_kernel_name() {
        for right in AccessFs::from_all(ABI::V10) {
            assert_ne!(fs_right_name(right), "unknown", "{right:?}");
        }
        for right in AccessNet::from_all(ABI::V10) {
            assert_ne!(net_right_name(right), "unknown", "{right:?}");
        }
        for scope in Scope::from_all(ABI::V10) {
            assert_ne!(scope_name(scope), "unknown", "{scope:?}");
        }
    }
}
