//! One entry of a seccomp allowlist: a system call, the argument values it may be made
//! with, and why the worker needs it.
//!
//! Rules are plain data so that the same value is compiled into BPF
//! ([`crate::filter`]), printed for auditors and hashed ([`crate::describe`]). Numbers and
//! names come from the same `libc` constant through [`sys!`](crate::sys) and
//! [`constant!`](crate::constant), so the two cannot drift apart.

/// A system call of the running architecture, as `libc` names and numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Syscall {
    /// The `libc` constant, `SYS_read`.
    pub constant: &'static str,
    pub nr: i64,
}

impl Syscall {
    /// The name people use, `read`.
    pub fn name(&self) -> &'static str {
        self.constant.strip_prefix("SYS_").unwrap_or(self.constant)
    }
}

/// `sys!(SYS_read)` is the [`Syscall`] `read` of the architecture being built for.
#[macro_export]
macro_rules! sys {
    ($constant:ident) => {
        $crate::Syscall {
            constant: stringify!($constant),
            nr: $crate::__libc::$constant,
        }
    };
}

/// A named constant that appears in a condition (`F_GETFD`, `PROT_EXEC`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Constant {
    pub name: &'static str,
    pub value: u64,
}

impl Constant {
    pub const ZERO: Constant = Constant {
        name: "0",
        value: 0,
    };
}

/// `constant!(F_GETFD)` is `libc::F_GETFD` together with its name.
#[macro_export]
macro_rules! constant {
    ($name:ident) => {
        $crate::Constant {
            name: stringify!($name),
            // Flags and commands are small non-negative integers in every ABI we target;
            // the cast only widens.
            value: $crate::__libc::$name as u64,
        }
    };
}

/// How many bytes of an argument a comparison looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArgWidth {
    /// A C `int` or `unsigned int`: only the low 32 bits are defined, the kernel ignores
    /// the rest, and so must the filter.
    U32,
    /// A C `long`, `unsigned long` or pointer-sized value.
    U64,
}

/// A system call argument, by position, with the name the man page gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arg {
    pub index: u8,
    pub name: &'static str,
    pub width: ArgWidth,
}

impl Arg {
    /// An `int`-typed argument.
    pub const fn int(index: u8, name: &'static str) -> Arg {
        Arg {
            index,
            name,
            width: ArgWidth::U32,
        }
    }

    /// A `long`-typed argument.
    pub const fn long(index: u8, name: &'static str) -> Arg {
        Arg {
            index,
            name,
            width: ArgWidth::U64,
        }
    }

    /// The argument equals `value`.
    pub fn eq(self, value: Constant) -> ArgCondition {
        ArgCondition {
            arg: self,
            op: ArgOp::Eq(value),
        }
    }

    /// The argument is the calling process's own id: a worker may signal its own threads
    /// (abort) but no other process, such as the VMM, which runs as the same user. The
    /// value is only known where the filter is compiled, inside the worker.
    pub fn is_own_pid(self) -> ArgCondition {
        ArgCondition {
            arg: self,
            op: ArgOp::EqOwnPid,
        }
    }

    /// None of the bits in `mask` is set.
    pub fn has_none_of(self, mask: Constant) -> ArgCondition {
        ArgCondition {
            arg: self,
            op: ArgOp::MaskedEq {
                mask,
                value: Constant::ZERO,
            },
        }
    }

    /// All of the bits in `mask` are set.
    pub fn has_all_of(self, mask: Constant) -> ArgCondition {
        ArgCondition {
            arg: self,
            op: ArgOp::MaskedEq { mask, value: mask },
        }
    }
}

/// A comparison of one argument with constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArgOp {
    /// `arg == value`
    Eq(Constant),
    /// `arg == getpid()` of the process the filter is compiled in.
    EqOwnPid,
    /// `arg & mask == value`
    MaskedEq { mask: Constant, value: Constant },
}

/// One test on one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArgCondition {
    pub arg: Arg,
    pub op: ArgOp,
}

/// Conditions that must all hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArgMatch(pub Vec<ArgCondition>);

/// What the filter does with a call that matches a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleAction {
    /// The call proceeds.
    Allow,
    /// The call fails with this errno without reaching the kernel proper. For calls the C
    /// library or std probes and then replaces with one the filter can inspect
    /// (`clone3` -> `clone`, `statx` -> `fstat`).
    Errno(Constant),
}

/// An allowlist entry: the call is permitted (or answered with an errno) when its
/// arguments satisfy any one of `matches`, or always when `matches` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SyscallRule {
    pub syscall: Syscall,
    pub matches: Vec<ArgMatch>,
    pub action: RuleAction,
    /// Why the worker needs it, for the auditor reading `bulkhead policy`.
    pub reason: &'static str,
}

impl SyscallRule {
    /// Allows `syscall` with any arguments (narrow it with [`when`](Self::when)).
    pub fn allow(syscall: Syscall) -> SyscallRule {
        SyscallRule {
            syscall,
            matches: Vec::new(),
            action: RuleAction::Allow,
            reason: "",
        }
    }

    /// Makes `syscall` fail with `errno` instead of killing the worker.
    pub fn fail_with(syscall: Syscall, errno: Constant) -> SyscallRule {
        SyscallRule {
            action: RuleAction::Errno(errno),
            ..SyscallRule::allow(syscall)
        }
    }

    /// Adds an alternative: the rule also applies when `condition` holds.
    pub fn when(self, condition: ArgCondition) -> SyscallRule {
        self.when_all([condition])
    }

    /// Adds an alternative: the rule also applies when all of `conditions` hold.
    pub fn when_all(mut self, conditions: impl IntoIterator<Item = ArgCondition>) -> SyscallRule {
        self.matches
            .push(ArgMatch(conditions.into_iter().collect()));
        self
    }

    /// Adds one alternative per value: the rule applies when `arg` equals any of them.
    pub fn when_one_of(mut self, arg: Arg, values: &[Constant]) -> SyscallRule {
        self.matches
            .extend(values.iter().map(|&value| ArgMatch(vec![arg.eq(value)])));
        self
    }

    pub fn because(mut self, reason: &'static str) -> SyscallRule {
        self.reason = reason;
        self
    }

    /// True when the rule lets any arguments through.
    pub fn is_unconditional(&self) -> bool {
        self.matches.is_empty()
    }
}
