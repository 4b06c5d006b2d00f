//! The command line, kvmtool-style: `bulkhead run --kernel bzImage --cpus 2 --memory 1G`.

use std::path::PathBuf;

use bulkhead_protocol::{RngConfig, WorkerKind};
use clap::{Args, Parser, Subcommand};

use crate::config::{self, ConfigError, CpuCount, MemorySize, VmConfig};
use crate::disk::DiskSpec;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "A privilege-separated KVM virtual machine monitor"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux guest with its serial console on this terminal.
    Run(RunArgs),
    /// Print the sandbox policy a device worker kind runs under: its seccomp allowlist
    /// with argument filters, its Landlock rules, and the digest the audit log records.
    Policy {
        /// Worker kind, e.g. rng.
        kind: WorkerKind,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: a bzImage or an uncompressed ELF vmlinux.
    #[arg(short, long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk (initramfs) to hand to the kernel.
    #[arg(short, long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 earlyprintk=ttyS0 reboot=acpi panic=-1"].
    #[arg(short = 'p', long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1-254).
    #[arg(short, long, default_value_t = 1, value_name = "N")]
    pub cpus: u64,
    /// Guest RAM, e.g. 512M or 2G (a bare number means MiB).
    #[arg(short, long, default_value = "256M", value_name = "SIZE")]
    pub memory: String,
    /// Add a virtio-rng device fed from the host's getrandom, served by a sandboxed worker.
    #[arg(long)]
    pub rng: bool,
    /// Add a virtio-blk disk served by a sandboxed worker (repeatable):
    /// PATH[,format=raw|qcow2][,ro][,cow]. The format is probed when not given; ro makes
    /// the disk read-only; cow keeps the guest's writes in memory, leaving the file as it
    /// was.
    #[arg(long, value_name = "PATH[,OPTIONS]")]
    pub disk: Vec<DiskSpec>,
    /// Append device worker lifecycle events (spawn, exit, crash, restart) to PATH as
    /// JSON lines.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
}

impl RunArgs {
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self
                .cmdline
                .clone()
                .unwrap_or_else(|| config::DEFAULT_CMDLINE.to_owned()),
            cpus: CpuCount::new(self.cpus)?,
            memory: self.memory.parse::<MemorySize>()?,
            rng: self.rng.then(RngConfig::default),
            disks: self.disk.clone(),
            audit_log: self.audit_log.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bulkhead").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).expect("valid command line").command {
            Command::Run(run) => run,
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn policy_takes_a_known_kind() {
        assert!(matches!(
            parse(&["policy", "rng"]).unwrap().command,
            Command::Policy {
                kind: WorkerKind::Rng
            }
        ));
        let err = parse(&["policy", "floppy"]).unwrap_err().to_string();
        assert!(err.contains("unknown worker kind"), "{err}");
    }

    #[test]
    fn defaults() {
        let config = run_args(&["run", "--kernel", "/k"]).to_config().unwrap();
        assert_eq!(config.cpus.get(), 1);
        assert_eq!(config.memory.bytes(), 256 << 20);
        assert_eq!(config.cmdline, config::DEFAULT_CMDLINE);
        assert!(config.cmdline.contains("console=ttyS0"));
        assert!(config.initrd.is_none());
    }

    #[test]
    fn all_options() {
        let args = [
            "run", "-k", "/k", "-i", "/i", "-p", "quiet", "-c", "4", "-m", "2G",
        ];
        let config = run_args(&args).to_config().unwrap();
        assert_eq!(config.cpus.get(), 4);
        assert_eq!(config.memory.bytes(), 2 << 30);
        assert_eq!(config.cmdline, "quiet");
        assert_eq!(config.initrd.as_deref(), Some(std::path::Path::new("/i")));
        let disks = run_args(&["run", "-k", "/k", "--disk", "/a", "--disk", "/b,ro"])
            .to_config()
            .unwrap()
            .disks;
        assert_eq!(disks.len(), 2);
        assert!(disks[1].read_only);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse(&["run"]).is_err(), "kernel is required");
        assert!(parse(&["run", "--kernel", "/k", "--cpus", "abc"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--bogus"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--disk", "/d,bogus"]).is_err());
        let zero = run_args(&["run", "--kernel", "/k", "--cpus", "0"]);
        assert_eq!(zero.to_config().unwrap_err(), ConfigError::CpuCount(0));
        let tiny = run_args(&["run", "--kernel", "/k", "--memory", "1K"]);
        assert!(matches!(
            tiny.to_config(),
            Err(ConfigError::MemoryTooSmall(_))
        ));
    }
}
