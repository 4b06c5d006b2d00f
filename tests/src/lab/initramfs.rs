//! An initramfs described as a tree of paths, written out as a newc cpio archive.
//!
//! Adding `/a/b/c` adds `/a` and `/a/b` too, and entries are written in path order, so a
//! directory always precedes what it holds, as the kernel's unpacker requires.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::cpio::CpioWriter;
use super::LabError;

/// What one path in the initramfs is.
enum Node {
    Directory,
    /// A file copied from the host at write time (so a 60 MiB kernel is never held in memory).
    HostFile {
        source: PathBuf,
        perm: u32,
    },
    Bytes {
        data: Vec<u8>,
        perm: u32,
    },
    Symlink {
        target: String,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
}

#[derive(Default)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

impl Initramfs {
    /// The skeleton every lab level starts from: busybox with all its applets linked into
    /// /bin, /sbin, /usr/bin and /usr/sbin, the mount points init uses, and /dev/console,
    /// which the kernel opens as init's stdin/stdout before devtmpfs is mounted.
    pub fn with_busybox(busybox: &Path) -> Result<Self, LabError> {
        let mut fs = Self::default();
        for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/mnt"] {
            fs.directory(dir);
        }
        fs.char_device("/dev/console", 5, 1);
        fs.host_file("/bin/busybox", busybox, 0o755);
        for applet in busybox_applets(busybox)? {
            if applet != "/bin/busybox" {
                fs.symlink(&applet, "/bin/busybox");
            }
        }
        Ok(fs)
    }

    pub fn directory(&mut self, path: &str) {
        self.insert(path, Node::Directory);
    }

    pub fn host_file(&mut self, path: &str, source: &Path, perm: u32) {
        self.insert(
            path,
            Node::HostFile {
                source: source.to_owned(),
                perm,
            },
        );
    }

    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, perm: u32) {
        self.insert(
            path,
            Node::Bytes {
                data: data.into(),
                perm,
            },
        );
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_owned(),
            },
        );
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.insert(path, Node::CharDevice { major, minor });
    }

    /// Writes the archive to `out` (uncompressed: decompressing under TCG costs seconds).
    pub fn write(&self, out: &Path) -> Result<(), LabError> {
        let write_err =
            |e: io::Error| LabError::io(format!("writing initramfs {}", out.display()), e);
        let file = File::create(out).map_err(write_err)?;
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        for (path, node) in &self.nodes {
            match node {
                Node::Directory => cpio.directory(path, 0o755),
                Node::HostFile { source, perm } => {
                    let read_err = |e| LabError::io(format!("reading {}", source.display()), e);
                    let file = File::open(source).map_err(read_err)?;
                    let size = file.metadata().map_err(read_err)?.len();
                    cpio.file(path, *perm, size, file)
                }
                Node::Bytes { data, perm } => cpio.file(path, *perm, data.len() as u64, &data[..]),
                Node::Symlink { target } => cpio.symlink(path, target),
                Node::CharDevice { major, minor } => cpio.char_device(path, 0o600, *major, *minor),
            }
            .map_err(write_err)?;
        }
        cpio.finish().map_err(write_err)?;
        Ok(())
    }

    fn insert(&mut self, path: &str, node: Node) {
        assert!(
            path.starts_with('/'),
            "initramfs paths are absolute, got {path:?}"
        );
        for ancestor in Path::new(path).ancestors().skip(1) {
            if ancestor == Path::new("/") {
                break;
            }
            let dir = ancestor
                .to_str()
                .expect("an ancestor of a str path is a str");
            self.nodes.entry(dir.to_owned()).or_insert(Node::Directory);
        }
        self.nodes.insert(path.to_owned(), node);
    }
}

/// The absolute paths busybox installs its applets at (`busybox --list-full`). The lab's
/// busybox is static, so it runs on the host as well as in the guests.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, LabError> {
    let what = format!("{} --list-full", busybox.display());
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| LabError::io(what.clone(), e))?;
    if !out.status.success() {
        return Err(LabError::Tool {
            what,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| format!("/{}", line.trim_start_matches('/')))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_added_and_ordered_before_children() {
        let mut fs = Initramfs::default();
        fs.bytes("/lib/x86_64-linux-gnu/libc.so.6", "elf", 0o755);
        fs.bytes("/init", "#!/bin/sh", 0o755);
        let paths: Vec<&str> = fs.nodes.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "/init",
                "/lib",
                "/lib/x86_64-linux-gnu",
                "/lib/x86_64-linux-gnu/libc.so.6"
            ]
        );
    }
}
