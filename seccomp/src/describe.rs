//! Policies for people: the rendering `bulkhead policy <kind>` prints, and the digest the
//! audit log records for every worker started.
//!
//! The digest is SHA-256 over a canonical form of what the policy *enforces*: syscall
//! numbers with their conditions and actions, the target architecture, Landlock's handled
//! rights, grants and enforcement mode, and the fixed privilege steps. It leaves out the
//! reasons (comments do not change what a worker may do) and the kept descriptor numbers
//! (they belong to a launch, not to a kind), so `bulkhead policy rng` and every rng
//! worker's audit record show the same digest, and it changes exactly when the rules do.

use std::fmt::{self, Write};

use sha2::{Digest, Sha256};

use crate::landlock_rules::{
    fs_right_name, net_right_name, scope_name, Enforcement, LandlockRules, TARGET_ABI_VERSION,
};
use crate::policy::Policy;
use crate::syscall_rule::{ArgCondition, ArgMatch, ArgOp, ArgWidth, RuleAction, SyscallRule};

/// Version of the canonical form; bump it if the form ever changes.
const CANONICAL_VERSION: u32 = 1;
/// Column where a rule's conditions start.
const CONDITION_COLUMN: usize = 22;

/// SHA-256 of a policy's canonical form; displays as `sha256:<64 hex digits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyDigest(pub [u8; 32]);

impl fmt::Display for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

pub fn digest(policy: &Policy) -> PolicyDigest {
    PolicyDigest(Sha256::digest(canonical(policy).as_bytes()).into())
}

/// The text the digest is computed over: one fact per line, sorted, numbers in hex.
pub fn canonical(policy: &Policy) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!("bulkhead-policy {CANONICAL_VERSION}"));
    line(format!("kind {}", policy.kind));
    line(format!("arch {}", std::env::consts::ARCH));
    line("seccomp default kill_process".into());
    let mut rules: Vec<&SyscallRule> = policy.syscalls.iter().collect();
    rules.sort_by_key(|rule| rule.syscall.nr);
    for rule in rules {
        let action = match rule.action {
            RuleAction::Allow => "allow".to_string(),
            RuleAction::Errno(errno) => format!("errno {:#x}", errno.value),
        };
        let mut alternatives: Vec<String> = rule.matches.iter().map(canonical_match).collect();
        alternatives.sort();
        let when = match alternatives.is_empty() {
            true => "any".to_string(),
            false => alternatives.join(" or "),
        };
        line(format!(
            "syscall {} {} {action} when {when}",
            rule.syscall.nr,
            rule.syscall.name()
        ));
    }
    let landlock = &policy.landlock;
    line(format!(
        "landlock enforcement {}",
        match landlock.enforcement {
            Enforcement::BestEffort => "best_effort",
            Enforcement::Required => "required",
        }
    ));
    line(format!(
        "landlock handled_fs {:#x}",
        landlock.handled_fs.bits()
    ));
    let mut paths: Vec<String> = landlock
        .paths
        .iter()
        .map(|grant| {
            format!(
                "landlock path {} {:#x}",
                grant.root.label(),
                grant.access.bits()
            )
        })
        .collect();
    paths.sort();
    paths.into_iter().for_each(&mut line);
    line(format!(
        "landlock handled_net {:#x}",
        landlock.handled_net.bits()
    ));
    let mut ports: Vec<String> = landlock
        .ports
        .iter()
        .map(|grant| format!("landlock port {} {:#x}", grant.port, grant.access.bits()))
        .collect();
    ports.sort();
    ports.into_iter().for_each(&mut line);
    line(format!("landlock scopes {:#x}", landlock.scopes.bits()));
    line("privileges no_new_privs drop_all_capabilities close_unlisted_fds".into());
    out
}

fn canonical_match(alternative: &ArgMatch) -> String {
    let mut conditions: Vec<String> = alternative
        .0
        .iter()
        .map(|c| {
            let width = match c.arg.width {
                ArgWidth::U32 => 32,
                ArgWidth::U64 => 64,
            };
            match c.op {
                ArgOp::Eq(value) => format!("a{}:{width} == {:#x}", c.arg.index, value.value),
                ArgOp::EqOwnPid => format!("a{}:{width} == own_pid", c.arg.index),
                ArgOp::MaskedEq { mask, value } => format!(
                    "a{}:{width} & {:#x} == {:#x}",
                    c.arg.index, mask.value, value.value
                ),
            }
        })
        .collect();
    conditions.sort();
    conditions.join(" and ")
}

/// The audit rendering: every rule with its reason, Landlock rights by their kernel names,
/// the privilege steps and the kept descriptors. Deterministic: rules sorted by name.
pub fn render(policy: &Policy) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_policy(&mut out, policy);
    out
}

fn write_policy(out: &mut String, policy: &Policy) -> fmt::Result {
    writeln!(
        out,
        "sandbox policy of `bulkhead-worker {}` workers",
        policy.kind
    )?;
    writeln!(out, "digest {}", digest(policy))?;

    writeln!(out)?;
    writeln!(
        out,
        "seccomp allowlist ({}): {} system calls; any other kills the worker with SIGSYS",
        std::env::consts::ARCH,
        policy.syscalls.len()
    )?;
    let mut rules: Vec<&SyscallRule> = policy.syscalls.iter().collect();
    rules.sort_by_key(|rule| rule.syscall.name());
    for rule in rules {
        write_rule(out, rule)?;
    }

    writeln!(out)?;
    write_landlock(out, &policy.landlock)?;

    writeln!(out)?;
    writeln!(out, "privileges")?;
    writeln!(out, "  no_new_privs      set")?;
    writeln!(
        out,
        "  capabilities      all dropped: effective, permitted, inheritable, ambient, and \
         the bounding set when the worker starts with CAP_SETPCAP"
    )?;

    writeln!(out)?;
    writeln!(
        out,
        "descriptors kept open (every other one is closed; numbers are per launch and not \
         part of the digest)"
    )?;
    let mut kept = policy.keep_fds.clone();
    kept.sort_by_key(|k| k.fd);
    for k in kept {
        writeln!(out, "  {:<4} {}", k.fd, k.what)?;
    }
    Ok(())
}

fn write_rule(out: &mut String, rule: &SyscallRule) -> fmt::Result {
    let name = rule.syscall.name();
    let verdict = match rule.action {
        RuleAction::Allow => String::new(),
        RuleAction::Errno(errno) => format!("fails with {} ({}), ", errno.name, errno.value),
    };
    let mut alternatives = rule.matches.iter().map(render_match);
    let first = alternatives
        .next()
        .unwrap_or_else(|| "any arguments".to_string());
    writeln!(
        out,
        "  {name:<width$}{verdict}{first}",
        width = CONDITION_COLUMN - 2
    )?;
    for alternative in alternatives {
        writeln!(out, "{:CONDITION_COLUMN$}or {alternative}", "")?;
    }
    if !rule.reason.is_empty() {
        writeln!(out, "{:CONDITION_COLUMN$}# {}", "", rule.reason)?;
    }
    Ok(())
}

fn render_match(alternative: &ArgMatch) -> String {
    let conditions: Vec<String> = alternative.0.iter().map(render_condition).collect();
    conditions.join(" and ")
}

fn render_condition(condition: &ArgCondition) -> String {
    let arg = condition.arg.name;
    match condition.op {
        ArgOp::Eq(value) => format!("{arg} == {} ({:#x})", value.name, value.value),
        ArgOp::EqOwnPid => format!("{arg} == the worker's own pid"),
        ArgOp::MaskedEq { mask, value } if value.value == 0 => {
            format!("{arg} without {} ({:#x})", mask.name, mask.value)
        }
        ArgOp::MaskedEq { mask, value } if value.value == mask.value => {
            format!("{arg} with {} ({:#x})", mask.name, mask.value)
        }
        ArgOp::MaskedEq { mask, value } => format!(
            "{arg} & {} ({:#x}) == {} ({:#x})",
            mask.name, mask.value, value.name, value.value
        ),
    }
}

fn write_landlock(out: &mut String, rules: &LandlockRules) -> fmt::Result {
    let mode = match rules.enforcement {
        Enforcement::BestEffort => {
            "best effort: what the kernel cannot enforce is logged as a warning"
        }
        Enforcement::Required => {
            "required: the worker refuses to run unless the kernel enforces at least the \
             filesystem rights of Landlock ABI 1; newer rights where it has them"
        }
    };
    writeln!(out, "landlock ({mode})")?;
    writeln!(
        out,
        "  filesystem        handles {}",
        names(rules.handled_fs.iter().map(fs_right_name))
    )?;
    if rules.paths.is_empty() {
        writeln!(out, "                    grants nothing beneath any path")?;
    }
    let mut paths = rules.paths.clone();
    paths.sort_by(|a, b| a.root.cmp(&b.root));
    for grant in paths {
        writeln!(
            out,
            "                    grants {} beneath {}",
            names(grant.access.iter().map(fs_right_name)),
            grant.root
        )?;
    }
    writeln!(
        out,
        "  network           handles {}",
        names(rules.handled_net.iter().map(net_right_name))
    )?;
    if rules.ports.is_empty() {
        writeln!(out, "                    grants nothing on any port")?;
    }
    let mut ports = rules.ports.clone();
    ports.sort_by_key(|grant| grant.port);
    for grant in ports {
        writeln!(
            out,
            "                    grants {} on port {}",
            names(grant.access.iter().map(net_right_name)),
            grant.port
        )?;
    }
    writeln!(
        out,
        "  scoped            {} (not reachable outside the worker)",
        names(rules.scopes.iter().map(scope_name))
    )?;
    writeln!(out, "  rights of         Landlock ABI {TARGET_ABI_VERSION}")?;
    Ok(())
}

fn names(names: impl Iterator<Item = &'static str>) -> String {
    let names: Vec<&str> = names.collect();
    match names.is_empty() {
        true => "nothing".to_string(),
        false => names.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_protocol::WorkerKind;

    use super::*;
    use crate::kinds::policy_for;
    use crate::syscall_rule::Arg;
    use crate::{constant, sys};

    fn rng() -> Policy {
        policy_for(WorkerKind::Rng)
    }

    /// The rng policy's digest, as auditors see it in the audit log. Changing the policy
    /// changes it; update it here deliberately, in the same change.
    #[cfg(target_arch = "x86_64")]
    const RNG_DIGEST: &str =
        "sha256:c16cd64f6a64d252e475d22534f7d083ab513e3c449f9a6cc06d335f7c11623f";

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rng_digest_is_pinned() {
        assert_eq!(rng().digest().to_string(), RNG_DIGEST);
    }

    /// The blk policy's digest; same rule as for rng.
    #[cfg(target_arch = "x86_64")]
    const BLK_DIGEST: &str =
        "sha256:056b58c4598465f9ecbf9bd8a37ba7ddcc613786bd736d170b2603adb8cf8885";

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blk_digest_is_pinned() {
        assert_eq!(policy_for(WorkerKind::Blk).digest().to_string(), BLK_DIGEST);
    }

    #[test]
    fn digest_displays_as_prefixed_hex() {
        let text = rng().digest().to_string();
        let hex = text.strip_prefix("sha256:").expect("sha256: prefix");
        assert_eq!(hex.len(), 64);
        assert!(hex
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn rendering_and_digest_do_not_depend_on_rule_order() {
        let policy = rng();
        let mut shuffled = policy.clone();
        shuffled.syscalls.reverse();
        shuffled.keep_fds.reverse();
        assert_eq!(render(&policy), render(&shuffled));
        // Alternatives are rendered in the order the policy lists them, but a different
        // order enforces the same thing.
        for rule in &mut shuffled.syscalls {
            rule.matches.reverse();
        }
        assert_eq!(digest(&policy), digest(&shuffled));
        assert_eq!(
            render(&policy),
            render(&rng()),
            "rendering is deterministic"
        );
    }

    #[test]
    fn digest_ignores_reasons_and_descriptor_numbers() {
        let policy = rng();
        let mut relabelled = policy.clone().keep_fd(4, "vhost-user socket");
        for rule in &mut relabelled.syscalls {
            rule.reason = "reworded";
        }
        assert_eq!(digest(&policy), digest(&relabelled));
        assert_ne!(render(&policy), render(&relabelled));
    }

    #[test]
    fn digest_changes_with_anything_enforced() {
        let base = digest(&rng());
        let mut added = rng();
        added
            .syscalls
            .push(SyscallRule::allow(sys!(SYS_sched_setaffinity)));
        let mut loosened = rng();
        let fcntl = loosened
            .syscalls
            .iter_mut()
            .find(|r| r.syscall.name() == "fcntl")
            .expect("rng allows fcntl");
        fcntl.matches.pop();
        let mut widened = rng();
        let ioctl = widened
            .syscalls
            .iter_mut()
            .find(|r| r.syscall.name() == "ioctl")
            .expect("rng allows ioctl");
        *ioctl =
            SyscallRule::allow(ioctl.syscall).when(Arg::long(1, "request").eq(constant!(FIONBIO)));
        let mut required = rng();
        required.landlock.enforcement = Enforcement::Required;
        let mut fewer_rights = rng();
        fewer_rights.landlock.handled_net = Default::default();
        for changed in [added, loosened, widened, required, fewer_rights] {
            assert_ne!(digest(&changed), base, "{}", canonical(&changed));
        }
    }

    #[test]
    fn canonical_form_is_versioned_and_line_per_fact() {
        let text = canonical(&rng());
        assert!(text.starts_with("bulkhead-policy 1\nkind rng\narch "));
        assert!(text.contains("\nseccomp default kill_process\n"));
        assert!(
            text.ends_with("privileges no_new_privs drop_all_capabilities close_unlisted_fds\n")
        );
        let fcntl = text
            .lines()
            .find(|l| l.contains(" fcntl "))
            .expect("fcntl line");
        assert!(
            fcntl.ends_with("allow when a1:32 == 0x1 or a1:32 == 0x2 or a1:32 == 0x3 or a1:32 == 0x4 or a1:32 == 0x406"),
            "{fcntl}"
        );
    }

    #[test]
    fn rendering_shows_conditions_actions_and_landlock() {
        let text = rng().keep_fd(4, "vhost-user socket").describe();
        let expected = [
            "sandbox policy of `bulkhead-worker rng` workers\n",
            "any other kills the worker with SIGSYS\n",
            "\n  fcntl               cmd == F_GETFD (0x1)\n                      or cmd == F_SETFD (0x2)\n",
            "\n  clone               flags with CLONE_THREAD (0x10000)\n",
            "\n  mmap                prot without PROT_EXEC (0x4)\n",
            "\n  clone3              fails with ENOSYS (38), any arguments\n",
            "\n  read                any arguments\n                      # ",
            "  filesystem        handles execute, write_file, read_file, read_dir,",
            "                    grants nothing beneath any path\n",
            "  network           handles bind_tcp, connect_tcp\n",
            "  scoped            abstract_unix_socket, signal",
            "  no_new_privs      set\n",
            "\n  4    vhost-user socket\n",
        ];
        for piece in expected {
            assert!(text.contains(piece), "missing {piece:?} in\n{text}");
        }
        assert!(text.contains(&format!("digest {}\n", rng().digest())));
        assert!(
            !text.contains("openat"),
            "rng renders no path syscall but newfstatat"
        );
    }
}
