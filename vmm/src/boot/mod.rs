//! Loading a Linux guest with the 64-bit boot protocol: kernel, initrd, command line,
//! zero page (boot_params) with the e820 map and the ACPI RSDP address.

pub mod kernel_image;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::{e820, layout};
use crate::memory::GuestRam;
pub use kernel_image::{KernelImage, KernelImageError};

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: KernelImageError,
    },
    #[error("loading kernel {path} into guest memory: {detail}")]
    Load { path: PathBuf, detail: String },
    #[error("cannot open initrd {path}")]
    OpenInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} is {size} bytes and does not fit in guest memory between the kernel (ends at {kernel_end:#x}) and {limit:#x}; give the guest more --memory")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("reading initrd {path} into guest memory")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {limit}")]
    CmdlineTooLong { len: usize, limit: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("too many memory map entries ({0})")]
    TooManyE820Entries(usize),
    #[error("writing boot data to guest memory")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// What the boot vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub entry: u64,
    pub zero_page: u64,
}

/// The kernel, initrd and command line to boot, before anything is loaded.
pub struct BootSource<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub acpi_rsdp: u64,
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Loads everything into `ram` and writes the zero page.
pub fn load(ram: &GuestRam, source: &BootSource) -> Result<BootEntry, BootError> {
    let path = source.kernel;
    let kernel_err = |source| BootError::Kernel {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    let image = KernelImage::probe(&mut file).map_err(kernel_err)?;
    image.check_fits(ram.low_end()).map_err(kernel_err)?;

    let limit = (image.cmdline_limit() as usize).min(layout::CMDLINE_MAX_SIZE);
    if source.cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    // The limit includes the terminating NUL.
    if source.cmdline.len() + 1 > limit {
        return Err(BootError::CmdlineTooLong {
            len: source.cmdline.len(),
            limit: limit - 1,
        });
    }

    let mem = ram.memory();
    let load_err = |detail: String| BootError::Load {
        path: path.to_owned(),
        detail,
    };
    file.seek(SeekFrom::Start(0))
        .map_err(|e| load_err(e.to_string()))?;
    let highmem = Some(GuestAddress(layout::HIGH_MEMORY_START));
    let mut params = boot_params::default();
    let entry = match &image {
        KernelImage::Elf { entry, .. } => {
            Elf::load(mem, None, &mut file, highmem).map_err(|e| load_err(e.to_string()))?;
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
            *entry
        }
        KernelImage::BzImage { .. } => {
            let loaded = BzImage::load(
                mem,
                Some(GuestAddress(kernel_image::BZIMAGE_LOAD_ADDRESS)),
                &mut file,
                highmem,
            )
            .map_err(|e| load_err(e.to_string()))?;
            if let Some(header) = loaded.setup_header {
                params.hdr = header;
            }
            kernel_image::BZIMAGE_LOAD_ADDRESS + kernel_image::BZIMAGE_64BIT_ENTRY_OFFSET
        }
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;

    let mut cmdline = source.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE_START))?;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;

    if let Some(initrd) = source.initrd {
        let (address, size) = load_initrd(ram, &image, initrd)?;
        params.hdr.ramdisk_image = address as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let map = e820::memory_map(ram.ranges());
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = source.acpi_rsdp;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))?;

    Ok(BootEntry {
        entry,
        zero_page: layout::ZERO_PAGE_START,
    })
}

/// Puts the initrd as high as the kernel allows below the 32-bit gap, as bootloaders do,
/// so that it stays clear of the kernel while it decompresses.
fn load_initrd(ram: &GuestRam, image: &KernelImage, path: &Path) -> Result<(u64, u64), BootError> {
    let open_err = |source| BootError::OpenInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let metadata = file.metadata().map_err(open_err)?;
    if metadata.is_dir() {
        return Err(open_err(std::io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let size = metadata.len();
    let limit = ram.low_end().min(image.initrd_addr_max().saturating_add(1));
    let kernel_end = align_up(image.memory_end(), PAGE_SIZE).unwrap_or(u64::MAX);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        kernel_end,
        limit,
    };
    let address = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if address < kernel_end || size > u64::from(u32::MAX) {
        return Err(too_large());
    }
    ram.memory()
        .read_exact_volatile_from(GuestAddress(address), &mut file, size as usize)
        .map_err(|e| BootError::ReadInitrd {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((address, size))
}

#[cfg(test)]
mod tests {
    use super::kernel_image::tests::{bzimage, elf};
    use super::*;
    use std::io::Write;

    /// A kernel and an initrd in a scratch directory removed on drop.
    struct Files {
        dir: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
    }

    fn write_files(name: &str, kernel: &[u8], initrd_len: usize) -> Files {
        let unique = format!("bulkhead-boot-{name}-{}", std::process::id());
        let dir = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel_path = dir.join("kernel");
        std::fs::File::create(&kernel_path)
            .unwrap()
            .write_all(kernel)
            .unwrap();
        let initrd_path = dir.join("initrd");
        std::fs::File::create(&initrd_path)
            .unwrap()
            .write_all(&vec![0xa5; initrd_len])
            .unwrap();
        Files {
            dir,
            kernel: kernel_path,
            initrd: initrd_path,
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn boot(ram: &GuestRam, files: &Files, cmdline: &str) -> Result<BootEntry, BootError> {
        load(
            ram,
            &BootSource {
                kernel: &files.kernel,
                initrd: Some(&files.initrd),
                cmdline,
                acpi_rsdp: layout::ACPI_TABLES_START,
            },
        )
    }

    fn zero_page(ram: &GuestRam) -> boot_params {
        ram.memory()
            .read_obj(GuestAddress(layout::ZERO_PAGE_START))
            .unwrap()
    }

    #[test]
    fn bzimage_boot_fills_the_zero_page() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let files = write_files("bz", &bzimage(8192), 3 << 20);
        let entry = boot(&ram, &files, "console=ttyS0").unwrap();
        assert_eq!(entry.entry, 0x10_0200);
        let params = zero_page(&ram);
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!(hdr.type_of_loader, LOADER_TYPE_UNDEFINED);
        assert_eq!({ hdr.cmd_line_ptr } as u64, layout::CMDLINE_START);
        assert_eq!({ hdr.ramdisk_size }, 3 << 20);
        let initrd = u64::from(hdr.ramdisk_image);
        assert_eq!(initrd % PAGE_SIZE, 0);
        assert!(initrd + (3 << 20) <= 64 << 20);
        assert!(
            initrd >= 0x180_0000,
            "initrd overlaps the decompressing kernel"
        );
        let first: u8 = ram.memory().read_obj(GuestAddress(initrd)).unwrap();
        assert_eq!(first, 0xa5);
        assert_eq!(params.e820_entries, 3);
        assert_eq!({ params.acpi_rsdp_addr }, layout::ACPI_TABLES_START);
        let mut cmdline = [0u8; 14];
        ram.memory()
            .read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0\0");
    }

    #[test]
    fn elf_boot_enters_at_e_entry() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let files = write_files("elf", &elf(0x20_0000, &[0xf4; 16]), 4096);
        let entry = boot(&ram, &files, "").unwrap();
        assert_eq!(entry.entry, 0x20_0000);
        let code: u8 = ram.memory().read_obj(GuestAddress(0x20_0000)).unwrap();
        assert_eq!(code, 0xf4);
        assert_eq!({ zero_page(&ram).hdr.boot_flag }, BOOT_FLAG_MAGIC);
    }

    #[test]
    fn oversized_inputs_are_refused() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let files = write_files("big", &bzimage(4096), 40 << 20);
        let err = boot(&ram, &files, "").unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("more --memory"));

        let files = write_files("cmdline", &bzimage(4096), 16);
        let err = boot(&ram, &files, &"x".repeat(2048)).unwrap_err();
        assert!(err.to_string().contains("at most 2047"), "{err}");
        assert!(matches!(
            boot(&ram, &files, "a\0b"),
            Err(BootError::CmdlineNul)
        ));

        let small = GuestRam::new(16 << 20).unwrap();
        let err = boot(&small, &files, "").unwrap_err();
        assert!(
            matches!(
                err,
                BootError::Kernel {
                    source: KernelImageError::DoesNotFit { .. },
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
