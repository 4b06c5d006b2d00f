//! Builds the two initramfs levels of a lab boot.
//!
//! ```text
//! L1, booted by QEMU:
//!   /init               tests/lab/l1-init.sh
//!   /lab/scenario.sh    the bulkhead runs (`Scenario::l1_script`)
//!   /lab/modules/*.ko   kvm-amd and its dependencies, load order in /lab/modules.order
//!   /bin/bulkhead       with its libraries and ELF interpreter, at their host paths
//!   /bin/bulkhead-worker  the device worker built beside it, when there is one
//!   /vmlinux            the L2 kernel
//!   <guest.path>        each L2 initramfs
//!   /bin/<program>      each of the scenario's L1 programs, with its libraries
//!   <l1 file path>      each of the scenario's L1 files, and its modules after kvm-amd
//! L2, booted by bulkhead inside L1:
//!   /init               `Guest::init_script`
//!   /lib/modules/*.ko   the guest's modules and their dependencies
//! Both: busybox with its applet links, /dev/console, and mount points.
//! ```

use std::path::{Path, PathBuf};

use super::assets::Assets;
use super::initramfs::Initramfs;
use super::scenario::{Guest, Scenario};
use super::shared_libs;
use super::LabError;

/// The modules that give L1 its /dev/kvm (fetch-assets.sh resolves kvm-amd's dependencies:
/// irqbypass, kvm, ccp).
const L1_MODULES: &[&str] = &["kvm_amd"];

const L1_INIT: &str = include_str!("../../lab/l1-init.sh");

/// Writes `guest`'s initramfs to `out`.
pub fn build_guest(assets: &Assets, guest: &Guest, out: &Path) -> Result<(), LabError> {
    let wanted: Vec<&str> = guest.modules.iter().map(String::as_str).collect();
    let modules = assets.modules_to_load(&wanted)?;
    let mut fs = Initramfs::with_busybox(&assets.busybox)?;
    for module in &modules {
        fs.host_file(
            &format!("/lib/modules/{}", module.file),
            &module.path,
            0o644,
        );
    }
    let files: Vec<String> = modules.into_iter().map(|m| m.file).collect();
    fs.bytes("/init", guest.init_script(&files), 0o755);
    fs.write(out)
}

/// Writes the L1 initramfs for `scenario` into `work_dir` (with the L2 images it embeds) and
/// returns its path.
pub fn build_l1(
    assets: &Assets,
    bulkhead: &Path,
    scenario: &Scenario,
    work_dir: &Path,
) -> Result<PathBuf, LabError> {
    let mut fs = Initramfs::with_busybox(&assets.busybox)?;
    fs.bytes("/init", L1_INIT, 0o755);
    fs.bytes("/lab/scenario.sh", scenario.l1_script(), 0o644);

    let mut wanted: Vec<&str> = L1_MODULES.to_vec();
    wanted.extend(scenario.l1_modules.iter().map(String::as_str));
    let mut order = String::new();
    for module in assets.modules_to_load(&wanted)? {
        fs.host_file(
            &format!("/lab/modules/{}", module.file),
            &module.path,
            0o644,
        );
        order.push_str(&module.file);
        order.push('\n');
    }
    fs.bytes("/lab/modules.order", order, 0o644);

    if !bulkhead.is_file() {
        return Err(LabError::BulkheadMissing(bulkhead.to_owned()));
    }
    fs.host_file("/bin/bulkhead", bulkhead, 0o755);
    let mut binaries = vec![bulkhead.to_owned()];
    // bulkhead starts its device workers from its own directory.
    let worker = bulkhead.with_file_name("bulkhead-worker");
    if worker.is_file() {
        fs.host_file("/bin/bulkhead-worker", &worker, 0o755);
        binaries.push(worker);
    }
    for program in &scenario.l1_programs {
        let name = program
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| LabError::Invalid(format!("odd program path {program:?}")))?;
        if !program.is_file() {
            return Err(LabError::Invalid(format!(
                "{} is not installed (tests/lab/install-packages.sh installs what the lab uses)",
                program.display()
            )));
        }
        fs.host_file(&format!("/bin/{name}"), program, 0o755);
        binaries.push(program.clone());
    }
    for binary in &binaries {
        for file in shared_libs::runtime_files(binary)? {
            let path = file
                .to_str()
                .ok_or_else(|| LabError::Invalid(format!("non-UTF-8 library path {file:?}")))?;
            fs.host_file(path, &file, 0o755);
        }
    }

    fs.host_file("/vmlinux", &assets.vmlinux, 0o644);
    for (index, guest) in scenario.guests.iter().enumerate() {
        let image = work_dir.join(format!("l2-{index}.cpio"));
        build_guest(assets, guest, &image)?;
        fs.host_file(&guest.path, &image, 0o644);
    }

    for (path, source) in &scenario.l1_files {
        fs.host_file(path, source, 0o644);
    }

    let l1 = work_dir.join("l1.cpio");
    fs.write(&l1)?;
    Ok(l1)
}
