//! A writer for the "newc" cpio format, the one the Linux kernel unpacks as an initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated path, padding to a 4-byte boundary, the data, and padding again. The
//! archive ends with an entry named `TRAILER!!!`. See the kernel's
//! Documentation/driver-api/early-userspace/buffer-format.rst.
//!
//! Only what an initramfs needs is here: directories, regular files, symlinks and character
//! devices, all owned by root, with mtime 0 so that the same inputs give the same bytes.

use std::io::{self, Read, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams a newc archive into `out`. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far, to compute the padding after each header and body.
    offset: u64,
    /// Every entry gets its own inode number: the kernel treats entries that share one (with
    /// nlink > 1) as hard links.
    next_ino: u32,
}

/// The header fields that vary between entries.
struct Header<'a> {
    path: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// A directory with permission bits `perm` (e.g. 0o755).
    pub fn directory(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.header(&Header {
            path,
            mode: S_IFDIR | perm,
            nlink: 2,
            size: 0,
            rdev: (0, 0),
        })
    }

    /// A regular file whose `size` bytes are read from `data`.
    pub fn file(&mut self, path: &str, perm: u32, size: u64, data: impl Read) -> io::Result<()> {
        let size32 = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: newc cannot hold {size} bytes"),
            )
        })?;
        self.header(&Header {
            path,
            mode: S_IFREG | perm,
            nlink: 1,
            size: size32,
            rdev: (0, 0),
        })?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: expected {size} bytes, got {copied}"),
            ));
        }
        self.offset += size;
        self.pad()
    }

    /// A symbolic link to `target`; the target is stored as the entry's data.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.file_like(path, S_IFLNK | 0o777, target.as_bytes())
    }

    /// A character device node, such as /dev/console (5, 1).
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(&Header {
            path,
            mode: S_IFCHR | perm,
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Writes the trailer and pads the archive to a 512-byte multiple, as cpio(1) does.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(&Header {
            path: TRAILER,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        })?;
        let tail = (512 - self.offset % 512) % 512;
        self.write_zeros(tail)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn file_like(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let size = data.len() as u32;
        self.header(&Header {
            path,
            mode,
            nlink: 1,
            size,
            rdev: (0, 0),
        })?;
        self.out.write_all(data)?;
        self.offset += u64::from(size);
        self.pad()
    }

    fn header(&mut self, h: &Header) -> io::Result<()> {
        // The kernel unpacks names relative to the root; cpio(1) archives have no leading '/'.
        let name = h.path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio path {:?}", h.path),
            ));
        }
        let ino = if h.path == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            0, // mtime
            h.size,
            0, // devmajor
            0, // devminor
            h.rdev.0,
            h.rdev.1,
            name.len() as u32 + 1, // namesize, counting the NUL
            0,                     // check (only used by the "070702" crc variant)
        ];
        let mut header = String::with_capacity(110 + name.len() + 1);
        header.push_str(MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        header.push_str(name);
        header.push('\0');
        self.out.write_all(header.as_bytes())?;
        self.offset += header.len() as u64;
        self.pad()
    }

    /// Pads to the 4-byte alignment that newc requires after headers and bodies.
    fn pad(&mut self) -> io::Result<()> {
        self.write_zeros((4 - self.offset % 4) % 4)
    }

    fn write_zeros(&mut self, count: u64) -> io::Result<()> {
        io::copy(&mut io::repeat(0).take(count), &mut self.out)?;
        self.offset += count;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry: (name, mode, rdev, data).
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// A minimal reader, enough to check that what we write follows the format.
    fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let total = bytes.len();
        let mut entries = Vec::new();
        loop {
            let at = total - bytes.len();
            assert_eq!(at % 4, 0, "header at unaligned offset {at}");
            assert_eq!(&bytes[..6], MAGIC.as_bytes());
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(text, 16).unwrap()
            };
            let (mode, size, rdev, namesize) = (
                field(1),
                field(6) as usize,
                (field(9), field(10)),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&bytes[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(bytes[110 + namesize - 1], 0, "name not NUL-terminated");
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            bytes = &bytes[(data_at + size).next_multiple_of(4)..];
            if name == TRAILER {
                assert!(
                    bytes.iter().all(|&b| b == 0),
                    "only padding after the trailer"
                );
                return entries;
            }
            entries.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn writes_entries_the_kernel_can_unpack() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.directory("/bin", 0o755).unwrap();
        cpio.file("/bin/hello", 0o755, 5, &b"hello"[..]).unwrap();
        cpio.symlink("/bin/sh", "hello").unwrap();
        cpio.char_device("/dev/console", 0o600, 5, 1).unwrap();
        let bytes = cpio.finish().unwrap();

        assert_eq!(bytes.len() % 512, 0);
        let entries = parse(&bytes);
        assert_eq!(
            entries,
            vec![
                ("bin".into(), S_IFDIR | 0o755, (0, 0), vec![]),
                (
                    "bin/hello".into(),
                    S_IFREG | 0o755,
                    (0, 0),
                    b"hello".to_vec()
                ),
                ("bin/sh".into(), S_IFLNK | 0o777, (0, 0), b"hello".to_vec()),
                ("dev/console".into(), S_IFCHR | 0o600, (5, 1), vec![]),
            ]
        );
    }

    #[test]
    fn short_file_data_is_an_error() {
        let mut cpio = CpioWriter::new(Vec::new());
        let err = cpio.file("/f", 0o644, 10, &b"short"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
