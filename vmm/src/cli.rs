//! The command line, kvmtool-style: `bulkhead run --kernel bzImage --cpus 2 --memory 1G`,
//! and the commands that manage running VMs (`bulkhead list`, `stop NAME`, ...).

use std::path::PathBuf;

use bulkhead_protocol::WorkerKind;
use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, RawConfig, VmConfig, VmName};
use crate::share::ShareSpec;

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
    // Boxed: the run options dwarf every other command's.
    Run(Box<RunArgs>),
    /// Print the sandbox policy a device worker kind runs under: its seccomp allowlist
    /// with argument filters, its Landlock rules, and the digest the audit log records.
    Policy {
        /// Worker kind, e.g. rng.
        kind: WorkerKind,
    },
    /// List this user's running VMs.
    List {
        /// One JSON array of status objects instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's state, resources, uptime and device workers.
    Status {
        name: VmName,
        /// The status as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Press the VM's ACPI power button and wait for it to power off; end it after the
    /// timeout if the guest does not.
    Stop {
        name: VmName,
        /// Seconds the guest gets to power off.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        timeout: u64,
    },
    /// End a VM now, without asking the guest.
    Kill { name: VmName },
    /// Stop a VM's vCPUs; its device workers keep running.
    Pause { name: VmName },
    /// Restart a paused VM's vCPUs.
    Resume { name: VmName },
    /// Dump every vCPU's registers.
    Debug {
        name: VmName,
        /// The registers as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace a device's worker process, as the supervisor does after a crash.
    RestartWorker {
        name: VmName,
        /// The device, e.g. rng0 (see `bulkhead status`).
        device: String,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Read the VM's settings from a TOML file (same keys as these flags: name, kernel,
    /// initrd, cmdline, cpus, memory, rng, disk, 9p, net, display, audit_log); flags given
    /// too override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The VM's name, for `bulkhead stop NAME` and friends [default: vm-<pid>].
    #[arg(short, long, value_name = "NAME")]
    pub name: Option<String>,
    /// Kernel to boot: a bzImage or an uncompressed ELF vmlinux.
    #[arg(short, long, value_name = "PATH", required_unless_present = "config")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (initramfs) to hand to the kernel.
    #[arg(short, long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 earlyprintk=ttyS0 reboot=acpi panic=-1"].
    #[arg(short = 'p', long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1-254) [default: 1].
    #[arg(short, long, value_name = "N")]
    pub cpus: Option<u64>,
    /// Guest RAM, e.g. 512M or 2G (a bare number means MiB) [default: 256M].
    #[arg(short, long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Add a virtio-rng device fed from the host's getrandom, served by a sandboxed worker.
    #[arg(long)]
    pub rng: bool,
    /// Add a virtio-blk disk served by a sandboxed worker (repeatable):
    /// PATH[,format=raw|qcow2][,ro][,cow]. The format is probed when not given; ro makes
    /// the disk read-only; cow keeps the guest's writes in memory, leaving the file as it
    /// was.
    #[arg(long, value_name = "PATH[,OPTIONS]")]
    pub disk: Vec<String>,
    /// Share a host directory with the guest over virtio-9p, served by a sandboxed
    /// worker confined to it (repeatable): HOSTDIR[,tag=TAG][,ro]. The tag, which the
    /// guest mounts (`mount -t 9p -o trans=virtio TAG /mnt`), defaults to the
    /// directory's name; ro refuses every change.
    #[arg(long = "9p", value_name = "HOSTDIR[,OPTIONS]", value_parser = share_arg)]
    pub p9: Vec<String>,
    /// Show the guest's screen (a virtio-gpu device) to VNC viewers, and pass their keys
    /// and pointer to the guest (a virtio-input keyboard and tablet):
    /// vnc[=ADDR:PORT|unix:PATH][,password=PW|,password-file=PATH][,size=WIDTHxHEIGHT].
    /// The default address is 127.0.0.1:5900; any other than loopback needs a password.
    /// sdl[,size=WIDTHxHEIGHT] opens a window instead (bulkhead-viewer, an SDL2 VNC
    /// client on a connection private to it).
    #[arg(long, value_name = "vnc[=ADDR:PORT][,OPTIONS]|sdl")]
    pub display: Option<String>,
    /// Add a virtio-net device on a host TAP, served by a sandboxed worker (repeatable):
    /// tap[,ifname=NAME][,mac=MAC][,queues=N]. The TAP is created, or attached to when
    /// NAME exists (the kernel picks tapN when no name is given); the MAC defaults to one
    /// derived from the VM's name.
    #[arg(long, value_name = "tap[,OPTIONS]")]
    pub net: Vec<String>,
    /// Append device worker lifecycle events (spawn, exit, crash, restart) to PATH as
    /// JSON lines.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
}

/// A malformed `--9p` is a usage error, like an unknown flag: checked while parsing, so
/// that it ends with clap's message and status 2. The config file's values go through
/// [`RawConfig::validate`], which parses them the same way.
fn share_arg(text: &str) -> Result<String, String> {
    text.parse::<ShareSpec>().map(|_| text.to_owned())
}

impl RunArgs {
    /// The settings the flags give, before validation.
    pub fn raw(&self) -> RawConfig {
        RawConfig {
            name: self.name.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory.clone().map(Into::into),
            rng: self.rng.then_some(true),
            disk: (!self.disk.is_empty()).then(|| self.disk.clone()),
            p9: (!self.p9.is_empty()).then(|| self.p9.clone()),
            display: self.display.clone(),
            net: (!self.net.is_empty()).then(|| self.net.clone()),
            audit_log: self.audit_log.clone(),
        }
    }

    /// The validated config: the file's settings (if any) with the flags on top, checked
    /// by the one validation path both share.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        file.overridden_by(self.raw()).validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bulkhead").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).expect("valid command line").command {
            Command::Run(run) => *run,
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
        assert!(config.name.as_str().starts_with("vm-"));
    }

    #[test]
    fn all_options() {
        let args = [
            "run", "-k", "/k", "-i", "/i", "-p", "quiet", "-c", "4", "-m", "2G", "-n", "web",
        ];
        let config = run_args(&args).to_config().unwrap();
        assert_eq!(config.cpus.get(), 4);
        assert_eq!(config.memory.bytes(), 2 << 30);
        assert_eq!(config.cmdline, "quiet");
        assert_eq!(config.initrd.as_deref(), Some(std::path::Path::new("/i")));
        assert_eq!(config.name.as_str(), "web");
        let disks = run_args(&["run", "-k", "/k", "--disk", "/a", "--disk", "/b,ro"])
            .to_config()
            .unwrap()
            .disks;
        assert_eq!(disks.len(), 2);
        assert!(disks[1].read_only);
        let shares = run_args(&["run", "-k", "/k", "--9p", "/srv/a", "--9p", "/b,tag=t,ro"])
            .to_config()
            .unwrap()
            .shares;
        assert_eq!(shares.len(), 2);
        assert_eq!(shares[0].tag, "a");
        assert!(shares[1].read_only && shares[1].tag == "t");
        let display = run_args(&["run", "-k", "/k", "--display", "vnc=127.0.0.1:5901"])
            .to_config()
            .unwrap()
            .display
            .unwrap();
        assert_eq!(
            display.address,
            crate::display::VncAddress::Tcp("127.0.0.1:5901".parse().unwrap())
        );
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse(&["run"]).is_err(), "kernel is required");
        assert!(parse(&["run", "--kernel", "/k", "--cpus", "abc"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--bogus"]).is_err());
        let bogus = run_args(&["run", "--kernel", "/k", "--disk", "/d,bogus"]);
        assert!(matches!(bogus.to_config(), Err(ConfigError::Disk(_))));
        for bad in ["/d,bogus", "/d,tag=", ""] {
            let err = parse(&["run", "--kernel", "/k", "--9p", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
        let dup = run_args(&["run", "-k", "/k", "--9p", "/a/x", "--9p", "/b,tag=x"]);
        assert_eq!(
            dup.to_config().unwrap_err(),
            ConfigError::DuplicateTag("x".into())
        );
        let zero = run_args(&["run", "--kernel", "/k", "--cpus", "0"]);
        assert_eq!(zero.to_config().unwrap_err(), ConfigError::CpuCount(0));
        let tiny = run_args(&["run", "--kernel", "/k", "--memory", "1K"]);
        assert!(matches!(
            tiny.to_config(),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        let open = run_args(&["run", "-k", "/k", "--display", "vnc=0.0.0.0:5900"]);
        let error = open.to_config().unwrap_err();
        assert!(matches!(error, ConfigError::Display(_)), "{error}");
        assert!(error.to_string().contains("loopback"), "{error}");
        let slash = run_args(&["run", "--kernel", "/k", "--name", "a/b"]);
        assert_eq!(
            slash.to_config().unwrap_err(),
            ConfigError::Name("a/b".into())
        );
    }

    #[test]
    fn management_commands_take_a_valid_name() {
        assert!(matches!(
            parse(&["stop", "web"]).unwrap().command,
            Command::Stop { timeout: 30, .. }
        ));
        assert!(matches!(
            parse(&["restart-worker", "web", "rng0"]).unwrap().command,
            Command::RestartWorker { .. }
        ));
        let err = parse(&["kill", "../etc"]).unwrap_err().to_string();
        assert!(err.contains("invalid VM name"), "{err}");
        assert!(parse(&["status"]).is_err());
    }
}
