//! Format detection: an image is QCOW2 when it starts with the QCOW2 magic, raw otherwise.
//! Probing raw for a guest-written disk is how a guest could turn its disk into a QCOW2
//! image naming a host file, which is why the VMM should pass `format=` for writable raw
//! disks and why the engine never opens a backing path itself.

use std::fs::File;

use super::{io, DiskError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl std::str::FromStr for Format {
    type Err = DiskError;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(DiskError::Unsupported(format!("format {other:?}"))),
        }
    }
}

pub fn probe(file: &File) -> Result<Format> {
    let mut magic = [0u8; 4];
    io::read_zero_fill(file, &mut magic, 0).map_err(DiskError::io("probe image format"))?;
    Ok(if magic == super::qcow2::header::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}
