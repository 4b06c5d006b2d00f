//! `--disk PATH[,format=raw|qcow2][,ro][,cow]`: the VMM opens each image and its whole
//! backing chain, so that the blk worker needs no path at all; it gets the open files at
//! fixed descriptor numbers and the launch config says which is which.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use bulkhead_protocol::{BackingFile, BlkConfig, ImageFormat};
use bulkhead_workers::blk::MAX_QUEUES;
use bulkhead_workers::disk::{self, cow, Format, MAX_BACKING_DEPTH};
use thiserror::Error;

use crate::worker::launch::device_fds;

/// One `--disk` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// None: probed from the image.
    pub format: Option<ImageFormat>,
    pub read_only: bool,
    pub copy_on_write: bool,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    /// `PATH[,format=raw|qcow2][,ro][,cow]`. A path cannot contain a comma.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err("a disk needs a path: PATH[,format=raw|qcow2][,ro][,cow]".into());
        }
        let mut spec = DiskSpec {
            path: PathBuf::from(path),
            format: None,
            read_only: false,
            copy_on_write: false,
        };
        for option in parts {
            match option {
                "ro" => spec.read_only = true,
                "cow" => spec.copy_on_write = true,
                "format=raw" => spec.format = Some(ImageFormat::Raw),
                "format=qcow2" => spec.format = Some(ImageFormat::Qcow2),
                other if other.starts_with("format=") => {
                    return Err(format!("unknown disk format in {other:?}: raw or qcow2"))
                }
                other => {
                    return Err(format!(
                        "unknown disk option {other:?}: format=raw|qcow2, ro or cow"
                    ))
                }
            }
        }
        if spec.read_only && spec.copy_on_write {
            return Err("a disk is ro or cow, not both".into());
        }
        Ok(spec)
    }
}

#[derive(Debug, Error)]
pub enum DiskOpenError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("cannot read disk image {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: disk::DiskError,
    },
    #[error(
        "disk image {path}: backing file {name:?} ({resolved}) is already in the chain: a loop"
    )]
    BackingLoop {
        path: PathBuf,
        name: String,
        resolved: PathBuf,
    },
    #[error("disk image {path}: the backing chain is deeper than {MAX_BACKING_DEPTH}")]
    TooDeep { path: PathBuf },
    #[error("disk image {path}: cannot create its copy-on-write overlay store")]
    OverlayStore {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A disk ready to hand to a worker: its launch config and the files it names, in order.
#[derive(Debug)]
pub struct OpenedDisk {
    pub config: BlkConfig,
    pub files: Vec<File>,
}

/// Request queues for a disk of a guest with `cpus` vCPUs: one per vCPU, as QEMU gives a
/// virtio-blk disk by default, so that a multiqueue driver submits from each vCPU without
/// sharing a queue (and its lock) with the others; at most what the blk worker serves.
pub fn queues_for(cpus: u8) -> u16 {
    u16::from(cpus).clamp(1, MAX_QUEUES)
}

/// Opens `spec` as the `index`th disk, served on `num_queues` request queues: the image
/// read-write unless ro or cow, each backing file read-only, found relative to the
/// directory of the image that names it. Refuses loops and chains deeper than the engine
/// would follow.
pub fn open_disk(
    spec: &DiskSpec,
    index: usize,
    num_queues: u16,
) -> Result<OpenedDisk, DiskOpenError> {
    let writable = !(spec.read_only || spec.copy_on_write);
    let image = open_file(&spec.path, writable)?;
    let format = match spec.format {
        Some(format) => format,
        None => match disk::probe(&image).map_err(|source| DiskOpenError::Image {
            path: spec.path.clone(),
            source,
        })? {
            Format::Raw => ImageFormat::Raw,
            Format::Qcow2 => ImageFormat::Qcow2,
        },
    };
    let mut seen = HashSet::new();
    seen.insert(identity(&image, &spec.path)?);
    let mut files = vec![image];
    let mut names = Vec::new();
    // A raw image names no backing file (and must not be probed as one that does).
    let mut current_path = spec.path.clone();
    let mut walk = format == ImageFormat::Qcow2;
    while walk {
        let Some(current) = files.last() else {
            break;
        };
        let Some((name, recorded)) =
            disk::backing_of(current).map_err(|source| DiskOpenError::Image {
                path: current_path.clone(),
                source,
            })?
        else {
            break;
        };
        if names.len() >= MAX_BACKING_DEPTH {
            return Err(DiskOpenError::TooDeep {
                path: spec.path.clone(),
            });
        }
        let resolved = match Path::new(&name) {
            p if p.is_absolute() => p.to_path_buf(),
            p => current_path
                .parent()
                .map_or_else(|| p.to_path_buf(), |dir| dir.join(p)),
        };
        let file = open_file(&resolved, false)?;
        if !seen.insert(identity(&file, &resolved)?) {
            return Err(DiskOpenError::BackingLoop {
                path: spec.path.clone(),
                name,
                resolved,
            });
        }
        // A raw backing file ends the chain (as the image records it, or else as probed);
        // a QCOW2 one may go on.
        walk = match recorded {
            Some(format) => format == Format::Qcow2,
            None => {
                disk::probe(&file).map_err(|source| DiskOpenError::Image {
                    path: resolved.clone(),
                    source,
                })? == Format::Qcow2
            }
        };
        files.push(file);
        names.push(name);
        current_path = resolved;
    }
    let chain = files.len();
    // Made here, kept by the supervisor for the VM's life and handed to every worker the
    // disk gets: a restarted worker finds the guest's changes in it. Sparse and empty:
    // the worker lays it out, and only what the guest writes costs memory.
    if spec.copy_on_write {
        files.push(
            cow::new_store().map_err(|source| DiskOpenError::OverlayStore {
                path: spec.path.clone(),
                source,
            })?,
        );
    }
    let fds = device_fds(files.len());
    let config = BlkConfig {
        image_fd: fds[0],
        backing: names
            .into_iter()
            .zip(fds[1..chain].iter())
            .map(|(name, &fd)| BackingFile { name, fd })
            .collect(),
        format: Some(format),
        read_only: spec.read_only,
        copy_on_write: spec.copy_on_write,
        overlay_fd: fds.get(chain).copied(),
        num_queues,
        serial: format!("bulkhead-disk{index}"),
    };
    Ok(OpenedDisk { config, files })
}

fn open_file(path: &Path, writable: bool) -> Result<File, DiskOpenError> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|source| DiskOpenError::Open {
            path: path.to_owned(),
            source,
        })?;
    let kind = file
        .metadata()
        .map_err(|source| DiskOpenError::Open {
            path: path.to_owned(),
            source,
        })?
        .file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(DiskOpenError::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// What makes two paths the same file.
fn identity(file: &File, path: &Path) -> Result<(u64, u64), DiskOpenError> {
    let meta = file.metadata().map_err(|source| DiskOpenError::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse() {
        let spec: DiskSpec = "/d.qcow2,format=qcow2,cow".parse().unwrap();
        assert_eq!(spec.path, PathBuf::from("/d.qcow2"));
        assert_eq!(spec.format, Some(ImageFormat::Qcow2));
        assert!(spec.copy_on_write && !spec.read_only);
        let plain: DiskSpec = "disk.img".parse().unwrap();
        assert_eq!(plain.format, None);
        assert!("".parse::<DiskSpec>().is_err());
        assert!("/d,format=vmdk".parse::<DiskSpec>().is_err());
        assert!("/d,rw".parse::<DiskSpec>().is_err());
        assert!("/d,ro,cow".parse::<DiskSpec>().is_err());
    }

    /// A cow disk comes with an overlay store after its image (and chain), named in the
    /// launch config; other disks have none.
    #[test]
    fn a_cow_disk_gets_an_overlay_store() {
        let path = std::env::temp_dir().join(format!("bulkhead-cow-store-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
        let name = path.to_str().unwrap();
        let cow = open_disk(&format!("{name},format=raw,cow").parse().unwrap(), 0, 1).unwrap();
        let plain = open_disk(&format!("{name},format=raw").parse().unwrap(), 1, 1).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(cow.files.len(), 2);
        assert_eq!(cow.config.overlay_fd, Some(cow.config.image_fd + 1));
        assert_eq!(cow.config.descriptors().count(), 2);
        assert_eq!(cow.files[1].metadata().unwrap().len(), 0);
        assert_eq!((plain.files.len(), plain.config.overlay_fd), (1, None));
    }

    #[test]
    fn one_queue_per_vcpu_up_to_the_worker_maximum() {
        assert_eq!(queues_for(1), 1);
        assert_eq!(queues_for(2), 2);
        assert_eq!(queues_for(u8::try_from(MAX_QUEUES).unwrap()), MAX_QUEUES);
        assert_eq!(queues_for(254), MAX_QUEUES);
    }
}
