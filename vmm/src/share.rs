//! `--9p HOSTDIR[,tag=TAG][,ro]`: a host directory shared with the guest over virtio-9p.
//! The VMM opens the directory itself (an `O_PATH` descriptor, before any worker starts)
//! and the p9 worker gets only that descriptor: its Landlock rule and every lookup it
//! makes are beneath it, so the worker never resolves a host path.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bulkhead_protocol::P9Config;
use thiserror::Error;

use crate::worker::launch::device_fds;

/// Longest mount tag: the config space's `tag_len` is a le16.
pub const MAX_TAG_LEN: usize = u16::MAX as usize;

/// The tag of a share whose directory has no name of its own (`/`).
const FALLBACK_TAG: &str = "share";

/// One `--9p` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    pub dir: PathBuf,
    /// What the guest mounts (`mount -t 9p TAG /mnt`).
    pub tag: String,
    pub read_only: bool,
}

impl std::str::FromStr for ShareSpec {
    type Err = String;

    /// `HOSTDIR[,tag=TAG][,ro]`. A path cannot contain a comma, nor a tag.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',');
        let dir = parts.next().unwrap_or_default();
        if dir.is_empty() {
            return Err("a share needs a directory: HOSTDIR[,tag=TAG][,ro]".into());
        }
        let mut tag = None;
        let mut read_only = false;
        for option in parts {
            match option.split_once('=') {
                None if option == "ro" => read_only = true,
                Some(("tag", value)) => {
                    check_tag(value)?;
                    tag = Some(value.to_owned());
                }
                _ => return Err(format!("unknown 9p option {option:?}: tag=TAG or ro")),
            }
        }
        let dir = PathBuf::from(dir);
        let tag = match tag {
            Some(tag) => tag,
            None => default_tag(&dir),
        };
        Ok(Self {
            dir,
            tag,
            read_only,
        })
    }
}

fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("an empty 9p tag (tag=): the guest could not name the share".into());
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!(
            "a 9p tag of {} bytes: at most {MAX_TAG_LEN}",
            tag.len()
        ));
    }
    // The guest reads the tag as a C string; a NUL would cut it short.
    if tag.contains('\0') {
        return Err("a 9p tag with a NUL byte".into());
    }
    Ok(())
}

/// The directory's own name, as `bulkhead-worker p9 --dir` derives it; for `.` or `..`
/// the name of the directory they stand for; "share" for `/` (or a path that cannot be
/// resolved yet, which opening it will report).
fn default_tag(dir: &Path) -> String {
    let named = |path: &Path| {
        path.file_name()
            .map(|name| name.to_string_lossy().into_owned())
    };
    named(dir)
        .or_else(|| {
            std::fs::canonicalize(dir)
                .ok()
                .and_then(|full| named(&full))
        })
        .unwrap_or_else(|| FALLBACK_TAG.to_owned())
}

/// The tag two shares of `shares` both use, if any: the guest could mount only one.
pub fn duplicate_tag(shares: &[ShareSpec]) -> Option<&str> {
    let mut seen = HashSet::new();
    shares
        .iter()
        .map(|share| share.tag.as_str())
        .find(|tag| !seen.insert(*tag))
}

#[derive(Debug, Error)]
pub enum ShareOpenError {
    #[error("cannot open shared directory {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shared directory {path}: cannot create its session journal")]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A share ready to hand to a worker: its launch config and the files it names.
#[derive(Debug)]
pub struct OpenedShare {
    pub config: P9Config,
    /// `O_PATH`: it grants no reading or writing by itself; the worker opens what it
    /// serves beneath it.
    pub dir: File,
    /// The session journal, kept for the VM's life and handed to every worker the share
    /// gets: a restarted worker rebuilds the guest's fids from it.
    pub journal: File,
}

impl OpenedShare {
    /// The files in the order the config's descriptors name them.
    pub fn files(self) -> (P9Config, Vec<File>) {
        (self.config, vec![self.dir, self.journal])
    }
}

/// Opens the shared directory of `spec` (following symbolic links in the path the user
/// gave): `O_PATH | O_DIRECTORY | O_CLOEXEC`.
pub fn open_share(spec: &ShareSpec) -> Result<OpenedShare, ShareOpenError> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(&spec.dir)
        .map_err(|source| ShareOpenError::Open {
            path: spec.dir.clone(),
            source,
        })?;
    let journal =
        bulkhead_workers::p9::journal::new_journal().map_err(|source| ShareOpenError::Journal {
            path: spec.dir.clone(),
            source,
        })?;
    let fds = device_fds(2);
    let config = P9Config {
        root_fd: fds[0],
        tag: spec.tag.clone(),
        read_only: spec.read_only,
        journal_fd: Some(fds[1]),
    };
    Ok(OpenedShare {
        config,
        dir,
        journal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<ShareSpec, String> {
        text.parse()
    }

    #[test]
    fn share_options_parse() {
        let share = spec("/srv/data,tag=data9,ro").unwrap();
        assert_eq!(share.dir, PathBuf::from("/srv/data"));
        assert_eq!(share.tag, "data9");
        assert!(share.read_only);
        let plain = spec("/srv/data/").unwrap();
        assert_eq!(plain.tag, "data");
        assert!(!plain.read_only);
        assert_eq!(spec("/").unwrap().tag, "share");
        assert_eq!(spec("/tmp/..").unwrap().tag, FALLBACK_TAG);
        let here = std::env::current_dir().unwrap();
        let name = here
            .file_name()
            .map_or(FALLBACK_TAG.into(), |n| n.to_string_lossy().into_owned());
        assert_eq!(spec(".").unwrap().tag, name);
        assert_eq!(spec("/a,ro,tag=x").unwrap().tag, "x");
    }

    #[test]
    fn bad_share_options_are_refused() {
        for bad in [
            "",
            ",tag=x",
            "/d,rw",
            "/d,tag=",
            "/d,tag",
            "/d,ro=1",
            "/d,bogus=1",
            "/d,tag=a\0b",
        ] {
            assert!(spec(bad).is_err(), "{bad:?} should be refused");
        }
        let long = format!("/d,tag={}", "t".repeat(MAX_TAG_LEN + 1));
        assert!(spec(&long).unwrap_err().contains("65535"));
        let longest = format!("/d,tag={}", "t".repeat(MAX_TAG_LEN));
        assert_eq!(spec(&longest).unwrap().tag.len(), MAX_TAG_LEN);
    }

    #[test]
    fn duplicate_tags_are_found() {
        let shares: Vec<ShareSpec> = ["/a/x", "/b/y", "/c,tag=x"]
            .iter()
            .map(|s| spec(s).unwrap())
            .collect();
        assert_eq!(duplicate_tag(&shares), Some("x"));
        assert_eq!(duplicate_tag(&shares[..2]), None);
    }

    #[test]
    fn opening_needs_a_directory() {
        let share = spec("/,tag=root").unwrap();
        let opened = open_share(&share).unwrap();
        assert_eq!(opened.config.root_fd, 5);
        assert_eq!(opened.config.journal_fd, Some(6));
        assert_eq!(opened.journal.metadata().unwrap().len(), 0);
        assert_eq!(opened.config.tag, "root");
        let flags = nix::fcntl::fcntl(&opened.dir, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(flags & libc::O_PATH, 0);
        let file = spec("/proc/self/exe").unwrap();
        assert!(matches!(
            open_share(&file),
            Err(ShareOpenError::Open { .. })
        ));
        let missing = spec("/no/such/dir").unwrap();
        let error = open_share(&missing).unwrap_err().to_string();
        assert!(error.contains("/no/such/dir"), "{error}");
    }
}
