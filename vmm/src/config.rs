//! What the user asked for, validated: the single source of truth a [`crate::vm::Vm`] is
//! built from. Parsing from the command line lives in `cli.rs`; this module owns the
//! rules (limits, units), and the config file (`bulkhead run --config vm.toml`) goes
//! through the same [`RawConfig::validate`] as the flags, so the two cannot disagree.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
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
    #[error("invalid --disk: {0}")]
    Disk(String),
    #[error("invalid --9p: {0}")]
    Share(String),
    #[error("two --9p shares have the tag {0:?}: give one of them another with tag=TAG")]
    DuplicateTag(String),
    #[error("invalid --display: {0}")]
    Display(String),
    #[error("invalid --net: {0}")]
    Net(String),
    #[error("no kernel to boot: give --kernel, or `kernel` in the config file")]
    NoKernel,
    #[error("cannot read config file {path}: {detail}")]
    ReadFile { path: PathBuf, detail: String },
    #[error("config file {path}, line {line}: {detail}")]
    FileSyntax {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("invalid VM name {0:?}: use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.', not starting with '-' or '.'")]
    Name(String),
}

/// Longest VM name: it becomes a socket file name, and socket paths are short (108 bytes).
pub const MAX_NAME_LEN: usize = 32;

/// A VM's name: the file name of its control socket, so no '/', no leading '.' or '-'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmName(String);

impl VmName {
    /// The name a VM gets when none is given: unique among running VMs, since no two
    /// live processes share a pid.
    pub fn generated() -> Self {
        Self(format!("vm-{}", std::process::id()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VmName {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        let ok = (1..=MAX_NAME_LEN).contains(&s.len())
            && s.chars().all(allowed)
            && !s.starts_with(['-', '.']);
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ConfigError::Name(s.to_owned()))
        }
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
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
    /// Names the control socket (`bulkhead stop NAME`).
    pub name: VmName,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: CpuCount,
    pub memory: MemorySize,
    /// A virtio-rng device, served by a worker process.
    pub rng: Option<bulkhead_protocol::RngConfig>,
    /// virtio-blk disks, one worker each, in `--disk` order.
    pub disks: Vec<crate::disk::DiskSpec>,
    /// Host directories shared over virtio-9p, one worker each, in `--9p` order; no two
    /// with the same tag.
    pub shares: Vec<crate::share::ShareSpec>,
    /// A virtio-gpu screen served over VNC, with a virtio-input keyboard and tablet.
    pub display: Option<crate::display::DisplaySpec>,
    /// virtio-net devices on TAPs, one worker each, in `--net` order.
    pub nets: Vec<crate::net::NetSpec>,
    /// Where worker lifecycle events go, as JSON lines.
    pub audit_log: Option<PathBuf>,
}

/// `memory` in a config file: a size string like the flag's ("512M"), or a bare
/// number of MiB.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum MemorySetting {
    Text(String),
    Mebibytes(u64),
}

impl From<String> for MemorySetting {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

/// The VM's settings as given, by flags or by a TOML file (same names, `audit_log` with
/// an underscore): unvalidated, every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub name: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub cpus: Option<u64>,
    pub memory: Option<MemorySetting>,
    pub rng: Option<bool>,
    /// `--disk` values, `PATH[,format=raw|qcow2][,ro][,cow]` each (`disk = [...]` in a file).
    pub disk: Option<Vec<String>>,
    /// `--9p` values, `HOSTDIR[,tag=TAG][,ro]` each (`9p = [...]` in a file).
    #[serde(rename = "9p")]
    pub p9: Option<Vec<String>>,
    /// `--display vnc[=ADDR:PORT|unix:PATH][,...]` or `sdl[,size=WxH]`.
    pub display: Option<String>,
    /// `--net` values, `tap[,ifname=NAME][,mac=MAC][,queues=N]` each (`net = [...]`).
    pub net: Option<Vec<String>>,
    pub audit_log: Option<PathBuf>,
}

impl RawConfig {
    /// Reads a TOML config file. Relative paths in it are relative to the current
    /// directory, as on the command line.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::ReadFile {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        Self::from_toml(&text).map_err(|(line, detail)| ConfigError::FileSyntax {
            path: path.to_owned(),
            line,
            detail,
        })
    }

    /// Parses TOML text; an error is the (1-based) line and what is wrong there.
    pub fn from_toml(text: &str) -> Result<Self, (usize, String)> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let offset = e.span().map_or(0, |span| span.start);
            let line = text
                .get(..offset)
                .map_or(1, |before| before.matches('\n').count() + 1);
            (line, e.message().trim().to_owned())
        })
    }

    /// `self` with every setting `over` gives replaced by it.
    pub fn overridden_by(self, over: RawConfig) -> Self {
        Self {
            name: over.name.or(self.name),
            kernel: over.kernel.or(self.kernel),
            initrd: over.initrd.or(self.initrd),
            cmdline: over.cmdline.or(self.cmdline),
            cpus: over.cpus.or(self.cpus),
            memory: over.memory.or(self.memory),
            rng: over.rng.or(self.rng),
            disk: over.disk.or(self.disk),
            p9: over.p9.or(self.p9),
            display: over.display.or(self.display),
            net: over.net.or(self.net),
            audit_log: over.audit_log.or(self.audit_log),
        }
    }

    /// Applies the defaults and the rules: the one place a [`VmConfig`] comes from.
    pub fn validate(self) -> Result<VmConfig, ConfigError> {
        let memory = match self.memory {
            None => MemorySize(DEFAULT_MEMORY),
            Some(MemorySetting::Text(text)) => text.parse()?,
            Some(MemorySetting::Mebibytes(mib)) => mib.to_string().parse()?,
        };
        let shares: Vec<crate::share::ShareSpec> = self
            .p9
            .unwrap_or_default()
            .iter()
            .map(|share| share.parse().map_err(ConfigError::Share))
            .collect::<Result<_, _>>()?;
        if let Some(tag) = crate::share::duplicate_tag(&shares) {
            return Err(ConfigError::DuplicateTag(tag.to_owned()));
        }
        Ok(VmConfig {
            name: match self.name {
                Some(name) => name.parse()?,
                None => VmName::generated(),
            },
            kernel: self.kernel.ok_or(ConfigError::NoKernel)?,
            initrd: self.initrd,
            cmdline: self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
            cpus: CpuCount::new(self.cpus.unwrap_or(1))?,
            memory,
            rng: self
                .rng
                .unwrap_or(false)
                .then(bulkhead_protocol::RngConfig::default),
            disks: self
                .disk
                .unwrap_or_default()
                .iter()
                .map(|disk| disk.parse().map_err(ConfigError::Disk))
                .collect::<Result<_, _>>()?,
            shares,
            display: self
                .display
                .map(|display| display.parse().map_err(ConfigError::Display))
                .transpose()?,
            nets: self
                .net
                .unwrap_or_default()
                .iter()
                .map(|net| net.parse().map_err(ConfigError::Net))
                .collect::<Result<_, _>>()?,
            audit_log: self.audit_log,
        })
    }
}

/// Guest RAM when none is asked for: 256 MiB.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

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
    fn vm_names_are_safe_file_names() {
        for good in ["web", "vm-1", "a.b_c", "X", &"n".repeat(MAX_NAME_LEN)] {
            assert_eq!(good.parse::<VmName>().unwrap().as_str(), good);
        }
        for bad in [
            "",
            "a/b",
            "..",
            ".hidden",
            "-x",
            "a b",
            "é",
            &"n".repeat(MAX_NAME_LEN + 1),
        ] {
            assert_eq!(
                bad.parse::<VmName>(),
                Err(ConfigError::Name(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert!(VmName::generated().as_str().parse::<VmName>().is_ok());
    }

    #[test]
    fn config_files_use_the_flags_rules() {
        let raw = RawConfig::from_toml(
            "name = \"web\"\nkernel = \"/k\"\ncpus = 2\nmemory = \"1G\"\nrng = true\n",
        )
        .unwrap();
        let config = raw.validate().unwrap();
        assert_eq!(config.name.as_str(), "web");
        assert_eq!(config.cpus.get(), 2);
        assert_eq!(config.memory.bytes(), 1 << 30);
        assert!(config.rng.is_some());
        let mib = RawConfig::from_toml("kernel = \"/k\"\nmemory = 64").unwrap();
        assert_eq!(mib.validate().unwrap().memory.bytes(), 64 << 20);
        let zero = RawConfig::from_toml("kernel = \"/k\"\ncpus = 0").unwrap();
        assert_eq!(zero.validate().unwrap_err(), ConfigError::CpuCount(0));
        let disks = RawConfig::from_toml("kernel = \"/k\"\ndisk = [\"/a\", \"/b,ro\"]").unwrap();
        let disks = disks.validate().unwrap().disks;
        assert_eq!(disks.len(), 2);
        assert!(disks[1].read_only);
        let nets = RawConfig::from_toml("kernel = \"/k\"\nnet = [\"tap\", \"tap,ifname=bh1\"]")
            .unwrap()
            .validate()
            .unwrap()
            .nets;
        assert_eq!(nets.len(), 2);
        assert_eq!(nets[1].ifname.as_deref(), Some("bh1"));
        let bad_net = RawConfig::from_toml("kernel = \"/k\"\nnet = [\"tap,queues=0\"]").unwrap();
        let error = bad_net.validate().unwrap_err();
        assert!(error.to_string().starts_with("invalid --net: "), "{error}");
        let bad = RawConfig::from_toml("kernel = \"/k\"\ndisk = [\"/a,rw\"]").unwrap();
        let error = bad.validate().unwrap_err();
        assert!(matches!(&error, ConfigError::Disk(_)));
        assert!(error.to_string().starts_with("invalid --disk: "), "{error}");
        assert!(error.to_string().contains("rw"), "{error}");
        let shares = RawConfig::from_toml("kernel = \"/k\"\n9p = [\"/srv/a\", \"/b,tag=b2,ro\"]")
            .unwrap()
            .validate()
            .unwrap()
            .shares;
        assert_eq!(shares.len(), 2);
        assert_eq!((shares[0].tag.as_str(), shares[0].read_only), ("a", false));
        assert_eq!((shares[1].tag.as_str(), shares[1].read_only), ("b2", true));
        let dup = RawConfig::from_toml("kernel = \"/k\"\n9p = [\"/x/a\", \"/y/a\"]").unwrap();
        assert_eq!(
            dup.validate().unwrap_err(),
            ConfigError::DuplicateTag("a".into())
        );
        let bad = RawConfig::from_toml("kernel = \"/k\"\n9p = [\"/a,tag=\"]").unwrap();
        let error = bad.validate().unwrap_err();
        assert!(error.to_string().starts_with("invalid --9p: "), "{error}");
        assert_eq!(
            RawConfig::default().validate().unwrap_err(),
            ConfigError::NoKernel
        );
        let (line, detail) = RawConfig::from_toml("kernel = \"/k\"\nbogus = 1\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(detail.contains("unknown field `bogus`"), "{detail}");
        let (line, detail) = RawConfig::from_toml("\n\ncpus = \"two\"").unwrap_err();
        assert_eq!(line, 3);
        assert!(detail.contains("invalid type"), "{detail}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = RawConfig::from_toml("kernel = \"/k\"\ncpus = 2\nname = \"a\"").unwrap();
        let flags = RawConfig {
            cpus: Some(3),
            ..RawConfig::default()
        };
        let config = file.overridden_by(flags).validate().unwrap();
        assert_eq!(config.cpus.get(), 3);
        assert_eq!(config.name.as_str(), "a");
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
