//! The files `tests/lab/fetch-assets.sh` puts in the assets directory: kernels, busybox and
//! kernel modules with their dependencies.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use super::LabError;

/// A complete assets directory (checked when located, so the paths exist).
#[derive(Debug)]
pub struct Assets {
    pub dir: PathBuf,
    /// e.g. `6.1.0-56-amd64`, from DIR/VERSION.
    pub kernel_release: String,
    /// bzImage, booted by QEMU as L1.
    pub vmlinuz: PathBuf,
    /// The uncompressed ELF kernel, booted by bulkhead as L2.
    pub vmlinux: PathBuf,
    /// Static busybox: the userland of both levels.
    pub busybox: PathBuf,
    modules: ModuleIndex,
}

/// A kernel module ready to insmod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// File name, e.g. `kvm-amd.ko`.
    pub file: String,
    pub path: PathBuf,
}

impl Assets {
    pub fn locate(dir: &Path) -> Result<Self, LabError> {
        let missing = |what: &str| LabError::AssetsMissing {
            dir: dir.to_owned(),
            missing: what.to_owned(),
        };
        // fetch-assets.sh writes VERSION last: without it the directory is incomplete.
        let kernel_release =
            fs::read_to_string(dir.join("VERSION")).map_err(|_| missing("no VERSION"))?;
        let assets = Self {
            dir: dir.to_owned(),
            kernel_release: kernel_release.trim().to_owned(),
            vmlinuz: dir.join("vmlinuz"),
            vmlinux: dir.join("vmlinux"),
            busybox: dir.join("busybox"),
            modules: ModuleIndex::load(&dir.join("modules")).map_err(|e| missing(&e))?,
        };
        for file in [&assets.vmlinuz, &assets.vmlinux, &assets.busybox] {
            if !file.is_file() {
                return Err(missing(&format!("no {}", file.display())));
            }
        }
        Ok(assets)
    }

    /// The modules to insmod, in order, so that each of `wanted` (and every module it
    /// depends on) gets loaded. Names may use '-' or '_', as modprobe allows.
    pub fn modules_to_load(&self, wanted: &[&str]) -> Result<Vec<Module>, LabError> {
        self.modules.load_order(wanted).map_err(LabError::Invalid)
    }
}

/// modules/modules.dep: `file.ko: dep.ko dep.ko` per line, direct dependencies only.
#[derive(Debug)]
struct ModuleIndex {
    dir: PathBuf,
    /// Normalized module name (underscores) -> (file name, file names of direct deps).
    by_name: BTreeMap<String, (String, Vec<String>)>,
}

/// Module names treat '-' and '_' alike (`kvm-amd.ko` is the module `kvm_amd`).
fn module_name(file_or_name: &str) -> String {
    file_or_name.trim_end_matches(".ko").replace('-', "_")
}

impl ModuleIndex {
    fn load(dir: &Path) -> Result<Self, String> {
        let dep_file = dir.join("modules.dep");
        let text =
            fs::read_to_string(&dep_file).map_err(|e| format!("{}: {e}", dep_file.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            by_name: Self::parse(&text)?,
        })
    }

    fn parse(text: &str) -> Result<BTreeMap<String, (String, Vec<String>)>, String> {
        let mut by_name = BTreeMap::new();
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let (file, deps) = line
                .split_once(':')
                .ok_or_else(|| format!("bad modules.dep line {line:?}"))?;
            let deps = deps.split_whitespace().map(str::to_owned).collect();
            by_name.insert(module_name(file.trim()), (file.trim().to_owned(), deps));
        }
        Ok(by_name)
    }

    /// Dependencies first (depth-first post-order), each module once.
    fn load_order(&self, wanted: &[&str]) -> Result<Vec<Module>, String> {
        let mut order = Vec::new();
        let mut placed = HashSet::new();
        for name in wanted {
            self.visit(&module_name(name), &mut placed, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        placed: &mut HashSet<String>,
        path: &mut Vec<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), String> {
        if placed.contains(name) {
            return Ok(());
        }
        if path.iter().any(|n| n == name) {
            return Err(format!(
                "module dependency cycle: {} -> {name}",
                path.join(" -> ")
            ));
        }
        let (file, deps) = self.by_name.get(name).ok_or_else(|| {
            format!(
                "module {name} is not in {}/modules.dep; add it to wanted_modules in \
                 tests/lab/fetch-assets.sh and delete the assets' VERSION file to refetch",
                self.dir.display()
            )
        })?;
        path.push(name.to_owned());
        for dep in deps {
            self.visit(&module_name(dep), placed, path, order)?;
        }
        path.pop();
        placed.insert(name.to_owned());
        order.push(Module {
            file: file.clone(),
            path: self.dir.join(file),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(text: &str) -> ModuleIndex {
        ModuleIndex {
            dir: PathBuf::from("/m"),
            by_name: ModuleIndex::parse(text).unwrap(),
        }
    }

    fn files(modules: Vec<Module>) -> Vec<String> {
        modules.into_iter().map(|m| m.file).collect()
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let index = index(
            "irqbypass.ko: \nkvm.ko: irqbypass.ko\nccp.ko:\nkvm-amd.ko: kvm.ko ccp.ko\n\
             virtio_ring.ko:\nvirtio.ko: virtio_ring.ko\nvirtio_blk.ko: virtio.ko virtio_ring.ko\n",
        );
        assert_eq!(
            files(index.load_order(&["kvm-amd", "virtio_blk", "kvm"]).unwrap()),
            [
                "irqbypass.ko",
                "kvm.ko",
                "ccp.ko",
                "kvm-amd.ko",
                "virtio_ring.ko",
                "virtio.ko",
                "virtio_blk.ko"
            ]
        );
    }

    #[test]
    fn unknown_modules_and_cycles_are_errors() {
        let index = index("a.ko: b.ko\nb.ko: a.ko\n");
        assert!(index
            .load_order(&["nope"])
            .unwrap_err()
            .contains("fetch-assets.sh"));
        assert!(index.load_order(&["a"]).unwrap_err().contains("cycle"));
    }
}
