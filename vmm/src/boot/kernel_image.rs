//! Recognising and validating a kernel image before any of it touches guest memory.
//!
//! Every field read here comes from an untrusted file, so every offset and size is
//! checked against the file length and for overflow (Xen's CVE-2011-1583 was a loader
//! trusting such fields). Loading itself is linux-loader's job; this module makes sure
//! linux-loader is only handed images that fit, and turns problems into messages that
//! tell the user what is wrong with their file.

use std::io::{Read, Seek, SeekFrom};

use thiserror::Error;

use crate::arch::x86_64::layout;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;

/// Offset of the real-mode setup header in a bzImage (boot protocol, "THE REAL-MODE KERNEL HEADER").
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// 2.12 introduced `xloadflags`, which says whether the 64-bit entry point exists.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
const LOADED_HIGH: u8 = 1;
/// Bytes of a bzImage we need to see to read its whole setup header.
const BZIMAGE_HEADER_LEN: usize = 0x268;

/// Where linux-loader puts a bzImage's protected-mode code (boot protocol `code32_start`).
pub const BZIMAGE_LOAD_ADDRESS: u64 = 0x10_0000;
/// The 64-bit entry point is 0x200 bytes into the protected-mode code.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Command line limit for kernels that do not state theirs (x86 COMMAND_LINE_SIZE).
pub const DEFAULT_CMDLINE_SIZE: u32 = 2048;
/// Highest initrd address for kernels that do not state theirs.
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KernelImageError {
    #[error("kernel image is empty")]
    Empty,
    #[error("not a kernel: neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" boot header)")]
    NotAKernel,
    #[error("truncated {format}: {what} needs {needed} bytes but the file has {actual}")]
    Truncated {
        format: &'static str,
        what: String,
        needed: u64,
        actual: u64,
    },
    #[error(
        "bzImage boot protocol {major}.{minor:02} is too old: 64-bit boot needs 2.12 or newer"
    )]
    ProtocolTooOld { major: u8, minor: u8 },
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set)")]
    No64BitEntry,
    #[error("bzImage must be loadable high (LOADED_HIGH is not set in loadflags)")]
    NotLoadedHigh,
    #[error("unsupported ELF kernel: {0}")]
    UnsupportedElf(&'static str),
    #[error("ELF kernel has no loadable segments")]
    NoLoadableSegments,
    #[error("ELF segment {index}: {problem}")]
    BadSegment { index: usize, problem: String },
    #[error("kernel does not fit: it needs guest memory up to {needed:#x} but RAM below 4 GiB ends at {available:#x}; give the guest more --memory")]
    DoesNotFit { needed: u64, available: u64 },
    #[error("reading kernel image: {0}")]
    Io(String),
}

impl From<std::io::Error> for KernelImageError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

/// A loadable ELF segment, already checked against the file and for overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfSegment {
    pub file_offset: u64,
    pub file_size: u64,
    pub guest_address: u64,
    pub memory_size: u64,
}

impl ElfSegment {
    /// One past the last guest byte (cannot overflow: checked at parse time).
    pub fn end(&self) -> u64 {
        self.guest_address + self.memory_size
    }
}

/// What the boot protocol needs to know about a kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    Elf {
        entry: u64,
        segments: Vec<ElfSegment>,
    },
    BzImage {
        /// Size of the real-mode part that precedes the protected-mode code.
        setup_size: u64,
        /// Memory the kernel needs from its load address while it decompresses.
        init_size: u64,
        /// Where a non-relocated kernel decompresses to.
        pref_address: u64,
        cmdline_size: u32,
        initrd_addr_max: u64,
    },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// Reads as much of `buf` as the file holds; returns how much that was.
fn read_up_to<R: Read>(file: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

impl KernelImage {
    /// Recognises and validates the kernel in `file`.
    pub fn probe<R: Read + Seek>(file: &mut R) -> Result<Self, KernelImageError> {
        let file_len = file.seek(SeekFrom::End(0))?;
        if file_len == 0 {
            return Err(KernelImageError::Empty);
        }
        file.seek(SeekFrom::Start(0))?;
        let mut head = vec![0u8; BZIMAGE_HEADER_LEN];
        let got = read_up_to(file, &mut head)?;
        head.truncate(got);
        if head.starts_with(&ELF_MAGIC) {
            return Self::probe_elf(file, &head, file_len);
        }
        if head.len() >= 0x206 && u32_at(&head, 0x202) == HDRS_MAGIC {
            return Self::probe_bzimage(&head, file_len);
        }
        Err(KernelImageError::NotAKernel)
    }

    fn probe_bzimage(head: &[u8], file_len: u64) -> Result<Self, KernelImageError> {
        let truncated = |what: &str, needed: u64| KernelImageError::Truncated {
            format: "bzImage",
            what: what.to_owned(),
            needed,
            actual: file_len,
        };
        if head.len() < BZIMAGE_HEADER_LEN {
            return Err(truncated("the setup header", BZIMAGE_HEADER_LEN as u64));
        }
        let version = u16_at(head, 0x206);
        if version < MIN_BOOT_PROTOCOL {
            return Err(KernelImageError::ProtocolTooOld {
                major: (version >> 8) as u8,
                minor: version as u8,
            });
        }
        if head[0x211] & LOADED_HIGH == 0 {
            return Err(KernelImageError::NotLoadedHigh);
        }
        if u16_at(head, 0x236) & XLF_KERNEL_64 == 0 {
            return Err(KernelImageError::No64BitEntry);
        }
        let setup_sects = match head[SETUP_HEADER_OFFSET] {
            0 => 4, // boot protocol: "if this field is 0, the real value is 4"
            n => u64::from(n),
        };
        let setup_size = (setup_sects + 1) * 512;
        // syssize counts 16-byte paragraphs of protected-mode code.
        let payload = u64::from(u32_at(head, 0x1f4)) * 16;
        let needed = setup_size + payload;
        if file_len < needed {
            return Err(truncated("setup plus protected-mode code", needed));
        }
        Ok(Self::BzImage {
            setup_size,
            init_size: u64::from(u32_at(head, 0x260)),
            pref_address: u64_at(head, 0x258),
            cmdline_size: u32_at(head, 0x238),
            initrd_addr_max: u64::from(u32_at(head, 0x22c)),
        })
    }

    fn probe_elf<R: Read + Seek>(
        file: &mut R,
        head: &[u8],
        file_len: u64,
    ) -> Result<Self, KernelImageError> {
        let truncated = |what: String, needed: u64| KernelImageError::Truncated {
            format: "ELF",
            what,
            needed,
            actual: file_len,
        };
        if head.len() < ELF64_EHDR_SIZE {
            return Err(truncated("the ELF header".into(), ELF64_EHDR_SIZE as u64));
        }
        if head[4] != ELFCLASS64 || head[5] != ELFDATA2LSB {
            return Err(KernelImageError::UnsupportedElf(
                "not a little-endian ELF64 file",
            ));
        }
        if u16_at(head, 18) != EM_X86_64 {
            return Err(KernelImageError::UnsupportedElf("not an x86-64 ELF file"));
        }
        if u16_at(head, 16) != ET_EXEC {
            return Err(KernelImageError::UnsupportedElf(
                "not an executable (ET_EXEC) ELF file",
            ));
        }
        let entry = u64_at(head, 24);
        let phoff = u64_at(head, 32);
        let phentsize = u16_at(head, 54);
        let phnum = u16_at(head, 56);
        if usize::from(phentsize) != ELF64_PHDR_SIZE {
            return Err(KernelImageError::UnsupportedElf(
                "program header size is not 56",
            ));
        }
        let table_len = u64::from(phnum) * ELF64_PHDR_SIZE as u64;
        let table_end = phoff
            .checked_add(table_len)
            .ok_or(KernelImageError::UnsupportedElf(
                "program header offset overflows",
            ))?;
        if table_end > file_len {
            return Err(truncated("the program header table".into(), table_end));
        }
        let mut table = vec![0u8; table_len as usize];
        file.seek(SeekFrom::Start(phoff))?;
        file.read_exact(&mut table)?;

        let mut segments = Vec::new();
        for (index, phdr) in table.chunks_exact(ELF64_PHDR_SIZE).enumerate() {
            if u32_at(phdr, 0) != PT_LOAD {
                continue;
            }
            let bad = |problem: String| KernelImageError::BadSegment { index, problem };
            let segment = ElfSegment {
                file_offset: u64_at(phdr, 8),
                guest_address: u64_at(phdr, 24),
                file_size: u64_at(phdr, 32),
                memory_size: u64_at(phdr, 40),
            };
            if segment.file_size > segment.memory_size {
                return Err(bad(format!(
                    "file size {:#x} exceeds memory size {:#x}",
                    segment.file_size, segment.memory_size
                )));
            }
            let file_end = segment
                .file_offset
                .checked_add(segment.file_size)
                .ok_or_else(|| bad("file offset plus size overflows".into()))?;
            if file_end > file_len {
                return Err(truncated(format!("segment {index}"), file_end));
            }
            segment
                .guest_address
                .checked_add(segment.memory_size)
                .ok_or_else(|| {
                    bad(format!(
                        "address {:#x} plus size {:#x} overflows",
                        segment.guest_address, segment.memory_size
                    ))
                })?;
            if segment.memory_size > 0 {
                segments.push(segment);
            }
        }
        if segments.iter().all(|s| s.file_size == 0) {
            return Err(KernelImageError::NoLoadableSegments);
        }
        Ok(Self::Elf { entry, segments })
    }

    /// Highest guest-physical address (exclusive) the kernel occupies while booting.
    pub fn memory_end(&self) -> u64 {
        match self {
            Self::Elf { segments, .. } => segments.iter().map(ElfSegment::end).max().unwrap_or(0),
            Self::BzImage {
                init_size,
                pref_address,
                ..
            } => {
                // The decompressor runs in place at the load address and writes the
                // kernel at pref_address (or relocates it); it needs init_size at both.
                let at_load = BZIMAGE_LOAD_ADDRESS.saturating_add(*init_size);
                let at_pref = pref_address.saturating_add(*init_size);
                at_load.max(at_pref)
            }
        }
    }

    /// Checks the kernel fits in RAM below `low_end` and stays clear of the ranges the
    /// VMM writes at boot.
    pub fn check_fits(&self, low_end: u64) -> Result<(), KernelImageError> {
        if let Self::Elf { segments, .. } = self {
            for (index, segment) in segments.iter().enumerate() {
                let clash = layout::VMM_RESERVED_LOW
                    .iter()
                    .find(|(start, end)| segment.guest_address < *end && *start < segment.end());
                if let Some((start, end)) = clash {
                    return Err(KernelImageError::BadSegment {
                        index,
                        problem: format!(
                            "{:#x}..{:#x} overlaps {start:#x}..{end:#x}, where the VMM keeps boot data",
                            segment.guest_address,
                            segment.end()
                        ),
                    });
                }
            }
        }
        let needed = self.memory_end();
        if needed > low_end {
            return Err(KernelImageError::DoesNotFit {
                needed,
                available: low_end,
            });
        }
        Ok(())
    }

    pub fn cmdline_limit(&self) -> u32 {
        match self {
            Self::BzImage { cmdline_size, .. } if *cmdline_size > 0 => *cmdline_size,
            _ => DEFAULT_CMDLINE_SIZE,
        }
    }

    pub fn initrd_addr_max(&self) -> u64 {
        match self {
            Self::BzImage {
                initrd_addr_max, ..
            } if *initrd_addr_max > 0 => *initrd_addr_max,
            _ => DEFAULT_INITRD_ADDR_MAX,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// A minimal bzImage: valid setup header, `setup_sects` sectors, `payload` bytes.
    pub(crate) fn bzimage(payload: usize) -> Vec<u8> {
        let setup_sects = 4u8;
        let setup_size = (usize::from(setup_sects) + 1) * 512;
        let mut image = vec![0u8; setup_size + payload];
        image[SETUP_HEADER_OFFSET] = setup_sects;
        image[0x1f4..0x1f8].copy_from_slice(&((payload / 16) as u32).to_le_bytes());
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = LOADED_HIGH;
        image[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes());
        image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        image[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        image[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
        image[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        image[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes());
        image
    }

    /// A minimal ELF64 x86-64 executable with one PT_LOAD segment of `code` at `paddr`.
    pub(crate) fn elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; ELF64_EHDR_SIZE + ELF64_PHDR_SIZE];
        image[..4].copy_from_slice(&ELF_MAGIC);
        image[4] = ELFCLASS64;
        image[5] = ELFDATA2LSB;
        image[6] = 1;
        image[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        image[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        image[20..24].copy_from_slice(&1u32.to_le_bytes());
        image[24..32].copy_from_slice(&paddr.to_le_bytes());
        image[32..40].copy_from_slice(&(ELF64_EHDR_SIZE as u64).to_le_bytes());
        image[52..54].copy_from_slice(&(ELF64_EHDR_SIZE as u16).to_le_bytes());
        image[54..56].copy_from_slice(&(ELF64_PHDR_SIZE as u16).to_le_bytes());
        image[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = ELF64_EHDR_SIZE;
        let offset = image.len() as u64;
        image[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        image[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes());
        image[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        image[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        image[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        image[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        image[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        image.extend_from_slice(code);
        image
    }

    fn probe(bytes: &[u8]) -> Result<KernelImage, KernelImageError> {
        KernelImage::probe(&mut Cursor::new(bytes))
    }

    fn set_phdr_u64(image: &mut [u8], field: usize, value: u64) {
        let o = ELF64_EHDR_SIZE + field;
        image[o..o + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn recognises_a_bzimage() {
        let image = probe(&bzimage(4096)).unwrap();
        assert!(matches!(
            image,
            KernelImage::BzImage {
                setup_size: 2560,
                ..
            }
        ));
        assert_eq!(image.cmdline_limit(), 2048);
        assert_eq!(image.memory_end(), 0x100_0000 + 0x80_0000);
        assert!(image.check_fits(64 << 20).is_ok());
        assert!(matches!(
            image.check_fits(16 << 20),
            Err(KernelImageError::DoesNotFit { .. })
        ));
    }

    #[test]
    fn rejects_bad_bzimages() {
        assert_eq!(probe(&[]), Err(KernelImageError::Empty));
        assert_eq!(probe(&[0x55; 8192]), Err(KernelImageError::NotAKernel));

        let whole = bzimage(4096);
        let err = probe(&whole[..whole.len() - 1]).unwrap_err();
        assert!(matches!(
            err,
            KernelImageError::Truncated {
                format: "bzImage",
                ..
            }
        ));
        assert!(err.to_string().starts_with("truncated bzImage"));
        let err = probe(&whole[..0x210]).unwrap_err();
        assert!(err.to_string().contains("setup header"), "{err}");

        let mut old = bzimage(16);
        old[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        assert_eq!(
            probe(&old),
            Err(KernelImageError::ProtocolTooOld { major: 2, minor: 4 })
        );
        let mut no64 = bzimage(16);
        no64[0x236] = 0;
        assert_eq!(probe(&no64), Err(KernelImageError::No64BitEntry));

        // A gigantic syssize must not overflow or allocate.
        let mut huge = bzimage(16);
        huge[0x1f4..0x1f8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            probe(&huge),
            Err(KernelImageError::Truncated { .. })
        ));

        // init_size and pref_address near u64::MAX must not wrap around.
        let mut wrap = bzimage(16);
        wrap[0x258..0x260].copy_from_slice(&u64::MAX.to_le_bytes());
        wrap[0x260..0x264].copy_from_slice(&u32::MAX.to_le_bytes());
        let image = probe(&wrap).unwrap();
        assert!(matches!(
            image.check_fits(1 << 30),
            Err(KernelImageError::DoesNotFit { .. })
        ));
    }

    #[test]
    fn recognises_an_elf_kernel() {
        let image = probe(&elf(0x100_0000, &[0x90; 100])).unwrap();
        match &image {
            KernelImage::Elf { entry, segments } => {
                assert_eq!(*entry, 0x100_0000);
                assert_eq!(segments.len(), 1);
                assert_eq!(segments[0].end(), 0x100_0000 + 100);
            }
            other => panic!("expected ELF, got {other:?}"),
        }
        assert!(image.check_fits(32 << 20).is_ok());
    }

    #[test]
    fn rejects_bad_elf_kernels() {
        let good = elf(0x10_0000, &[0x90; 64]);
        let err = probe(&good[..good.len() - 1]).unwrap_err();
        assert!(
            err.to_string().starts_with("truncated ELF: segment 0"),
            "{err}"
        );
        assert!(probe(&good[..40])
            .unwrap_err()
            .to_string()
            .contains("ELF header"));

        let mut past_eof = good.clone();
        set_phdr_u64(&mut past_eof, 8, u64::MAX - 4); // p_offset
        assert!(matches!(
            probe(&past_eof),
            Err(KernelImageError::BadSegment { index: 0, .. })
        ));

        let mut wraps = good.clone();
        set_phdr_u64(&mut wraps, 16 + 8, u64::MAX - 8); // p_paddr
        let err = probe(&wraps).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");

        let mut huge = good.clone();
        set_phdr_u64(&mut huge, 40, 1 << 40); // p_memsz
        let image = probe(&huge).unwrap();
        assert!(matches!(
            image.check_fits(64 << 20),
            Err(KernelImageError::DoesNotFit { .. })
        ));

        let trampoline = probe(&elf(0x8000, &[0x90; 4])).unwrap();
        assert!(trampoline.check_fits(64 << 20).is_ok());
        for clash in [0x500, 0x7ff0, 0x9000, 0x2_0000, 0xe_0000] {
            let low = probe(&elf(clash, &[0x90; 32])).unwrap();
            let err = low.check_fits(64 << 20).unwrap_err();
            assert!(
                err.to_string().contains("where the VMM keeps boot data"),
                "{err}"
            );
        }

        let mut thirty_two = good.clone();
        thirty_two[4] = 1;
        assert!(matches!(
            probe(&thirty_two),
            Err(KernelImageError::UnsupportedElf(_))
        ));

        let mut many = good.clone();
        many[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            probe(&many),
            Err(KernelImageError::Truncated { .. })
        ));
    }
}
