//! Backing chains across the process boundary: the VMM walks an image's chain with
//! [`backing_of`] and opens each file under its own policy; the worker gets the files in
//! chain order and hands them out with [`PreopenedBacking`], never opening a path.

use std::fs::File;
use std::io::{Error, ErrorKind};
use std::sync::Mutex;

use super::qcow2::header::{self, Header};
use super::{io, probe, BackingResolver, DiskError, Format, Result};

/// The backing file `file` names, and its format when the image records it. Reads only the
/// header, with the same checks as opening the image.
pub fn backing_of(file: &File) -> Result<Option<(String, Option<Format>)>> {
    if probe(file)? != Format::Qcow2 {
        return Ok(None);
    }
    let file_len = io::file_len(file).map_err(DiskError::io("size of qcow2 image"))?;
    let mut start = [0u8; 24];
    io::read_zero_fill(file, &mut start, 0).map_err(DiskError::io("read qcow2 header"))?;
    let bits = u32::from_be_bytes([start[20], start[21], start[22], start[23]]);
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
        return Err(DiskError::Corrupt(format!(
            "cluster_bits {bits} is out of range"
        )));
    }
    let mut first = vec![0u8; 1 << bits];
    io::read_zero_fill(file, &mut first, 0).map_err(DiskError::io("read qcow2 header"))?;
    let h = Header::parse(&first, file_len)?;
    let format = match h.backing_format.as_deref() {
        Some("raw") => Some(Format::Raw),
        Some("qcow2") => Some(Format::Qcow2),
        _ => None,
    };
    Ok(h.backing_file.map(|name| (name, format)))
}

/// Backing files opened by someone else, handed out in chain order: the first request
/// gets the first file, and so on, each only under the name it was opened for.
pub struct PreopenedBacking {
    files: Vec<(String, File)>,
    next: Mutex<usize>,
}

impl PreopenedBacking {
    pub fn new(files: Vec<(String, File)>) -> PreopenedBacking {
        PreopenedBacking {
            files,
            next: Mutex::new(0),
        }
    }
}

impl BackingResolver for PreopenedBacking {
    fn open_backing(&self, name: &str) -> std::io::Result<File> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let Some((want, file)) = self.files.get(*next) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no backing file was passed for {name:?}"),
            ));
        };
        if want != name {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("image asks for {name:?} where {want:?} was passed"),
            ));
        }
        *next += 1;
        file.try_clone()
    }
}
