//! The nested lab: boots real Linux guests under bulkhead on a host without VMX/SVM.
//!
//! This machine's /dev/kvm cannot run a stock kernel at usable speed (see
//! shared/docs/environment.md), so the lab nests: QEMU TCG runs an L1 Debian kernel with
//! emulated AMD SVM; L1 loads kvm-amd and runs `bulkhead`, which boots the L2 Debian kernel.
//!
//! ```text
//!  host ── qemu-system-x86_64 -accel tcg -cpu max ── L1: Linux, kvm-amd, /init = l1-init.sh
//!                                                    └─ bulkhead run --kernel /vmlinux ── L2
//! ```
//!
//! A [`Scenario`] says which L2 guests L1 carries and which bulkhead runs it performs;
//! [`Lab::run`] builds both initramfs levels in Rust ([`cpio`], [`initramfs`], [`images`]),
//! boots L1 with a hard timeout ([`qemu`]), keeps the console in `target/lab/logs/<name>.log`
//! and returns it parsed ([`LabReport`]).
//!
//! Setup (what .ci/run does): `tests/lab/install-packages.sh` installs QEMU and the tools,
//! `tests/lab/fetch-assets.sh` fetches the kernel, its modules and busybox.

pub mod assets;
pub mod audit;
pub mod cpio;
pub mod demo;
mod error;
pub mod images;
pub mod initramfs;
pub mod qemu;
pub mod report;
pub mod scenario;
pub mod shared_libs;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

pub use assets::Assets;
pub use audit::AuditRecords;
pub use error::{LabError, FETCH_ASSETS, INSTALL_PACKAGES};
pub use report::{LabReport, RunReport};
pub use scenario::{Guest, Run, Scenario, GUEST_MARKER};

use qemu::QemuMachine;

/// Time for L1 itself: QEMU start, unpacking ~100 MiB of initramfs under TCG, kvm-amd, and
/// powering off. L1 reaches `kvm ready` in 6-10 s; the rest of the budget is the runs'.
const L1_BUDGET: Duration = Duration::from_secs(90);

/// L1 boots per scenario. QEMU's emulated SVM is not flawless: now and then L1 itself
/// dies mid-scenario (QEMU exits with no panic on the console, the output cut mid-line)
/// or freezes (not even L1's own run timeout fires), or its watchdog finds a vCPU thread
/// stuck inside KVM_RUN for tens of seconds (see [`LabReport::l1_died`]). Such a boot says
/// nothing about bulkhead, so it is retried, and so is one whose L2 guest died before it
/// reached userspace ([`LabReport::l2_died_in_kernel_boot`]), and one in which an L2 vCPU
/// stopped answering even NMIs while L1's KVM held it ([`LabReport::l2_cpu_lost_in_kvm`]);
/// any other bulkhead run that hangs (killed by L1 at its timeout) or fails after its guest
/// started is not, and fails the test.
const L1_ATTEMPTS: u32 = 3;

/// Time for a guest booted directly under QEMU TCG (about 5 s).
const DIRECT_BOOT_BUDGET: Duration = Duration::from_secs(90);

/// Everything a lab boot needs from the host, located and checked.
pub struct Lab {
    pub assets: Assets,
    qemu: PathBuf,
    /// `target/lab`: assets/, logs/, work/.
    root: PathBuf,
    /// Copy the console to stdout as it arrives.
    echo: bool,
}

impl Lab {
    /// Finds QEMU and the assets, or says how to get whichever is missing.
    ///
    /// `BULKHEAD_LAB_DIR` moves the lab directory (default `<workspace>/target/lab`), and
    /// `BULKHEAD_LAB_QEMU` names another QEMU binary.
    pub fn new() -> Result<Self, LabError> {
        let root = lab_dir();
        let qemu_name =
            std::env::var("BULKHEAD_LAB_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_owned());
        let qemu = find_in_path(&qemu_name).ok_or(LabError::QemuMissing { program: qemu_name })?;
        let assets = Assets::locate(&root.join("assets"))?;
        Ok(Self {
            assets,
            qemu,
            root,
            echo: false,
        })
    }

    /// Also copy every console line to stdout as it arrives (the log gets them regardless).
    pub fn echo_console(mut self) -> Self {
        self.echo = true;
        self
    }

    /// Boots L1 once for `scenario`, running `bulkhead` (a host binary, copied into L1 with
    /// its libraries). An `Err` means the lab could not boot at all; what the guests did,
    /// good or bad, is in the report.
    pub fn run(&self, scenario: &Scenario, bulkhead: &Path) -> Result<LabReport, LabError> {
        let machine = self.prepare_l1(scenario, bulkhead)?;
        let runs_budget: Duration = scenario.runs.iter().map(|run| run.timeout).sum();
        let mut attempt = 1;
        loop {
            let report = self.boot_captured(&scenario.name, &machine, L1_BUDGET + runs_budget)?;
            let noise = if report.l1_died() {
                "l1-died"
            } else if report.l2_died_in_kernel_boot() {
                "l2-died-in-boot"
            } else if report.l2_cpu_lost_in_kvm() {
                "l2-cpu-lost-in-kvm"
            } else {
                return Ok(report);
            };
            if attempt == L1_ATTEMPTS {
                return Ok(report);
            }
            let kept = report
                .log_path
                .with_extension(format!("{noise}-{attempt}.log"));
            let _ = fs::rename(&report.log_path, &kept);
            eprintln!(
                "lab: {noise} during scenario {:?} (console kept in {}); booting it again",
                scenario.name,
                kept.display()
            );
            attempt += 1;
        }
    }

    /// Boots L1 once for `scenario` with the console on this terminal (for the demo).
    pub fn run_interactive(
        &self,
        scenario: &Scenario,
        bulkhead: &Path,
    ) -> Result<ExitStatus, LabError> {
        self.prepare_l1(scenario, bulkhead)?.run_interactive()
    }

    /// Boots `guest` directly under QEMU TCG, without L1 or bulkhead, its `GUEST:` values in
    /// [`LabReport::guest_values`]. A check of the harness itself: if a guest works here but
    /// not in the lab, look at bulkhead.
    pub fn boot_guest_in_qemu(
        &self,
        name: &str,
        guest: &Guest,
        cmdline: &str,
    ) -> Result<LabReport, LabError> {
        let work_dir = self.work_dir(name)?;
        let initrd = work_dir.join("guest.cpio");
        images::build_guest(&self.assets, guest, &initrd)?;
        let machine = QemuMachine {
            qemu: self.qemu.clone(),
            kernel: self.assets.vmlinux.clone(),
            initrd,
            cmdline: cmdline.to_owned(),
            memory: "512M".to_owned(),
            cpus: 2,
            silence_limit: None,
        };
        self.boot_captured(name, &machine, DIRECT_BOOT_BUDGET)
    }

    fn prepare_l1(&self, scenario: &Scenario, bulkhead: &Path) -> Result<QemuMachine, LabError> {
        let work_dir = self.work_dir(&scenario.name)?;
        let initrd = images::build_l1(&self.assets, bulkhead, scenario, &work_dir)?;
        Ok(QemuMachine::l1(&self.qemu, &self.assets.vmlinux, &initrd))
    }

    fn boot_captured(
        &self,
        name: &str,
        machine: &QemuMachine,
        timeout: Duration,
    ) -> Result<LabReport, LabError> {
        let logs = self.root.join("logs");
        fs::create_dir_all(&logs)
            .map_err(|e| LabError::io(format!("creating {}", logs.display()), e))?;
        let log = logs.join(format!("{name}.log"));
        let console = machine.run_captured(&log, timeout, self.echo)?;
        Ok(LabReport::parse(name, log, console))
    }

    fn work_dir(&self, name: &str) -> Result<PathBuf, LabError> {
        let dir = self.root.join("work").join(name);
        fs::create_dir_all(&dir)
            .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
        Ok(dir)
    }
}

/// For a test: boots `scenario` in the lab with this build's bulkhead, prints how long each
/// part took, and returns the report. Panics (failing the test) only when the lab cannot
/// start or boot at all; what the guests did is the test's to judge.
pub fn boot_scenario(scenario: &Scenario) -> LabReport {
    let lab = Lab::new().unwrap_or_else(|e| panic!("cannot start the nested lab: {e}"));
    let report = lab
        .run(scenario, &crate::bulkhead_bin())
        .unwrap_or_else(|e| panic!("nested lab boot failed: {e}"));
    eprintln!("{}", report.timings());
    report
}

/// A fresh random token in hex, for a guest to echo back from its command line (proving the
/// output came from this boot, with this command line).
pub fn random_token() -> Result<String, LabError> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| LabError::io("reading /dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The lab's directory: `BULKHEAD_LAB_DIR`, or `<workspace>/target/lab`.
pub fn lab_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BULKHEAD_LAB_DIR") {
        return PathBuf::from(dir);
    }
    // This crate lives in <workspace>/tests.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent");
    workspace.join("target").join("lab")
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.is_file());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
