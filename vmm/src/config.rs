//! What the user asked for, validated: the single source of truth a [`crate::vm::Vm`] is
//! built from. Parsing from the command line lives in `cli.rs`; this module owns the
//! rules (limits, units) so that a config file can share them later.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

/// Most vCPUs a guest may have. The MADT and the in-kernel LAPIC use 8-bit APIC ids, and
/// 0xff is the broadcast id, so 254 is the x2APIC-free ceiling.
pub const MAX_VCPUS: u8 = 254;

/// Smallest guest RAM we accept: enough for the boot structures below 1 MiB plus a
/// tiny kernel. Real Linux guests need far more, but micro-guests do not.
pub const MIN_MEMORY: u64 = 2 << 20;

/// Largest guest RAM we accept: 1 TiB keeps every guest-physical address well inside the
/// 40-bit range every x86-64 host supports.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Default kernel command line when the user gives none: a serial console that also
/// carries early boot messages, and a reboot that ends in a reset the VMM sees.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=acpi panic=-1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid memory size {0:?}: expected a number with an optional K, M, G or T suffix, e.g. 512M")]
    MemorySyntax(String),
    #[error("memory size {0:?} is too small: the minimum is {min} MiB", min = MIN_MEMORY >> 20)]
    MemoryTooSmall(String),
    #[error("memory size {0:?} is too large: the maximum is {max} GiB", max = MAX_MEMORY >> 30)]
    MemoryTooLarge(String),
    #[error("invalid cpu count {0}: must be between 1 and {MAX_VCPUS}")]
    CpuCount(u64),
}

/// A guest RAM size in bytes, parsed from strings like `512M` or `2G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySize(u64);

impl MemorySize {
    pub fn from_bytes(bytes: u64) -> Result<Self, ConfigError> {
        let shown = format!("{bytes}");
        Self::check(bytes, &shown)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    fn check(bytes: u64, shown: &str) -> Result<Self, ConfigError> {
        if bytes < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(shown.to_owned()));
        }
        if bytes > MAX_MEMORY {
            return Err(ConfigError::MemoryTooLarge(shown.to_owned()));
        }
        // Guest RAM is mapped in whole pages; round odd sizes down rather than surprise
        // the user with more memory than asked for.
        Ok(Self(bytes & !0xfff))
    }
}

impl FromStr for MemorySize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let syntax = || ConfigError::MemorySyntax(s.to_owned());
        let (digits, shift) = match text.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(syntax()),
                };
                (&text[..i], shift)
            }
            // A bare number means MiB, as in kvmtool's `--mem`.
            Some(_) => (text, 20),
            None => return Err(syntax()),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let too_large = || ConfigError::MemoryTooLarge(s.to_owned());
        let value: u64 = digits.parse().map_err(|_| too_large())?;
        let bytes = value.checked_mul(1u64 << shift).ok_or_else(too_large)?;
        Self::check(bytes, s)
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b.is_multiple_of(1 << 30) {
            write!(f, "{}G", b >> 30)
        } else if b.is_multiple_of(1 << 20) {
            write!(f, "{}M", b >> 20)
        } else {
            write!(f, "{}K", b >> 10)
        }
    }
}

/// Number of vCPUs, 1..=[`MAX_VCPUS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuCount(u8);

impl CpuCount {
    pub fn new(n: u64) -> Result<Self, ConfigError> {
        match u8::try_from(n) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(Self(n)),
            _ => Err(ConfigError::CpuCount(n)),
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: CpuCount,
    pub memory: MemorySize,
    /// A virtio-rng device, served by a worker process.
    pub rng: Option<bulkhead_protocol::RngConfig>,
    /// virtio-blk disks, one worker each, in `--disk` order.
    pub disks: Vec<crate::disk::DiskSpec>,
    /// Where worker lifecycle events go, as JSON lines.
    pub audit_log: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_with_units() {
        assert_eq!("512M".parse::<MemorySize>().unwrap().bytes(), 512 << 20);
        assert_eq!("2G".parse::<MemorySize>().unwrap().bytes(), 2 << 30);
        assert_eq!("2g".parse::<MemorySize>().unwrap().bytes(), 2 << 30);
        assert_eq!("4096K".parse::<MemorySize>().unwrap().bytes(), 4 << 20);
        assert_eq!("64".parse::<MemorySize>().unwrap().bytes(), 64 << 20);
        assert_eq!("1T".parse::<MemorySize>().unwrap().bytes(), 1 << 40);
        assert_eq!("512M".parse::<MemorySize>().unwrap().to_string(), "512M");
    }

    #[test]
    fn memory_sizes_reject_nonsense() {
        for bad in ["", "M", "12Q", "-1G", "1.5G", "0x10M", "1 G"] {
            assert!(
                matches!(bad.parse::<MemorySize>(), Err(ConfigError::MemorySyntax(_))),
                "{bad:?} should be a syntax error"
            );
        }
        assert!(matches!(
            "0".parse::<MemorySize>(),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            "1K".parse::<MemorySize>(),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            "2T".parse::<MemorySize>(),
            Err(ConfigError::MemoryTooLarge(_))
        ));
        assert!(matches!(
            "99999999999999999999G".parse::<MemorySize>(),
            Err(ConfigError::MemoryTooLarge(_))
        ));
        assert!(matches!(
            "99999999999T".parse::<MemorySize>(),
            Err(ConfigError::MemoryTooLarge(_))
        ));
    }

    #[test]
    fn cpu_counts_are_bounded() {
        assert_eq!(CpuCount::new(1).unwrap().get(), 1);
        assert_eq!(CpuCount::new(254).unwrap().get(), 254);
        assert_eq!(CpuCount::new(0), Err(ConfigError::CpuCount(0)));
        assert_eq!(CpuCount::new(255), Err(ConfigError::CpuCount(255)));
        assert_eq!(CpuCount::new(100_000), Err(ConfigError::CpuCount(100_000)));
        assert!(ConfigError::CpuCount(0)
            .to_string()
            .contains("between 1 and 254"));
    }
}
