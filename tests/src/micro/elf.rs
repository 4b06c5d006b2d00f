//! A minimal ELF64 writer: just enough of the format for `bulkhead run --kernel` to load a
//! micro-guest the way it loads a vmlinux (ET_EXEC, x86-64, PT_LOAD segments copied to their
//! physical addresses, no sections).
//!
//! The layout constants are public so that tests can build a valid image and then corrupt one
//! field precisely (a segment running past the end of the file, an overflowing address, ...).

/// Size of the ELF64 file header; the program headers follow it directly.
pub const ELF_HEADER_SIZE: usize = 64;
/// Size of one ELF64 program header.
pub const PROGRAM_HEADER_SIZE: usize = 56;

const PT_LOAD: u32 = 1;
const PF_RWX: u32 = 0b111;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PAGE_SIZE: u64 = 0x1000;

/// A 64-bit field of a program header, by its byte offset inside the header.
#[derive(Clone, Copy, Debug)]
pub enum ProgramHeaderField {
    /// `p_offset`: where the segment's bytes start in the file.
    Offset = 8,
    /// `p_vaddr`: the virtual address (a vmlinux has its high-half address here).
    VirtAddr = 16,
    /// `p_paddr`: the guest-physical address the VMM must copy the segment to.
    PhysAddr = 24,
    /// `p_filesz`: how many bytes the file holds for the segment.
    FileSize = 32,
    /// `p_memsz`: the segment's size in memory; the part past `p_filesz` is zero-filled.
    MemSize = 40,
}

/// One PT_LOAD segment.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Guest-physical load address (`p_paddr`).
    pub phys_addr: u64,
    /// `p_vaddr`; equal to `phys_addr` unless a test wants them to differ.
    pub virt_addr: u64,
    /// The bytes stored in the file (`p_filesz` = their length).
    pub data: Vec<u8>,
    /// `p_memsz`, at least `data.len()`.
    pub mem_size: u64,
}

impl Segment {
    /// A segment whose memory image is exactly `data`, loaded (and linked) at `phys_addr`.
    pub fn new(phys_addr: u64, data: Vec<u8>) -> Self {
        let mem_size = data.len() as u64;
        Segment {
            phys_addr,
            virt_addr: phys_addr,
            data,
            mem_size,
        }
    }

    /// Grows the in-memory size past the file bytes (a zero-filled ".bss" tail).
    pub fn with_mem_size(mut self, mem_size: u64) -> Self {
        assert!(mem_size >= self.data.len() as u64, "p_memsz below p_filesz");
        self.mem_size = mem_size;
        self
    }

    /// Records a different virtual address, as vmlinux does (0xffffffff81000000 etc).
    pub fn with_virt_addr(mut self, virt_addr: u64) -> Self {
        self.virt_addr = virt_addr;
        self
    }
}

/// Serializes an executable ELF64 image with one PT_LOAD program header per segment.
///
/// Each segment's file offset is congruent to its virtual address modulo the page size, as
/// `p_align` = 4 KiB promises, so standard tools (readelf, objdump) accept the file.
pub fn build_elf(entry: u64, segments: &[Segment]) -> Vec<u8> {
    let headers_end = (ELF_HEADER_SIZE + PROGRAM_HEADER_SIZE * segments.len()) as u64;

    // Lay out the segment bytes after the headers, each starting on a fresh page.
    let mut offsets = Vec::with_capacity(segments.len());
    let mut cursor = headers_end;
    for segment in segments {
        let offset = cursor.next_multiple_of(PAGE_SIZE) + segment.virt_addr % PAGE_SIZE;
        offsets.push(offset);
        cursor = offset + segment.data.len() as u64;
    }

    let mut image = Vec::with_capacity(cursor as usize);
    write_file_header(&mut image, entry, segments.len());
    for (segment, &offset) in segments.iter().zip(&offsets) {
        write_program_header(&mut image, segment, offset);
    }
    for (segment, &offset) in segments.iter().zip(&offsets) {
        image.resize(offset as usize, 0);
        image.extend_from_slice(&segment.data);
    }
    image
}

/// Overwrites one 64-bit field of program header `index` in a serialized image.
pub fn patch_program_header(image: &mut [u8], index: usize, field: ProgramHeaderField, value: u64) {
    let at = ELF_HEADER_SIZE + index * PROGRAM_HEADER_SIZE + field as usize;
    image[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn write_file_header(out: &mut Vec<u8>, entry: u64, program_headers: usize) {
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI, padding.
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&ET_EXEC.to_le_bytes());
    out.extend_from_slice(&EM_X86_64.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&(ELF_HEADER_SIZE as u64).to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no section headers
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(ELF_HEADER_SIZE as u16).to_le_bytes()); // e_ehsize
    out.extend_from_slice(&(PROGRAM_HEADER_SIZE as u16).to_le_bytes()); // e_phentsize
    let phnum = u16::try_from(program_headers).expect("fewer than 65535 segments");
    out.extend_from_slice(&phnum.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize (unused: e_shnum = 0)
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    debug_assert_eq!(out.len(), ELF_HEADER_SIZE);
}

fn write_program_header(out: &mut Vec<u8>, segment: &Segment, file_offset: u64) {
    let start = out.len();
    out.extend_from_slice(&PT_LOAD.to_le_bytes());
    out.extend_from_slice(&PF_RWX.to_le_bytes());
    out.extend_from_slice(&file_offset.to_le_bytes());
    out.extend_from_slice(&segment.virt_addr.to_le_bytes());
    out.extend_from_slice(&segment.phys_addr.to_le_bytes());
    out.extend_from_slice(&(segment.data.len() as u64).to_le_bytes());
    out.extend_from_slice(&segment.mem_size.to_le_bytes());
    out.extend_from_slice(&PAGE_SIZE.to_le_bytes()); // p_align
    debug_assert_eq!(out.len() - start, PROGRAM_HEADER_SIZE);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u64_at(image: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(image[at..at + 8].try_into().unwrap())
    }

    fn field(image: &[u8], index: usize, field: ProgramHeaderField) -> u64 {
        u64_at(
            image,
            ELF_HEADER_SIZE + index * PROGRAM_HEADER_SIZE + field as usize,
        )
    }

    fn two_segment_image() -> Vec<u8> {
        build_elf(
            0x10_0000,
            &[
                Segment::new(0x10_0000, vec![0x90; 100]).with_mem_size(0x1_0000),
                Segment::new(0x1_0000, vec![0xf4; 10]).with_virt_addr(0xffff_ffff_8001_0000),
            ],
        )
    }

    #[test]
    fn header_fields_round_trip() {
        let image = two_segment_image();
        assert_eq!(&image[..4], b"\x7fELF");
        assert_eq!(u64_at(&image, 24), 0x10_0000, "e_entry");
        assert_eq!(u16::from_le_bytes([image[56], image[57]]), 2, "e_phnum");

        assert_eq!(field(&image, 0, ProgramHeaderField::PhysAddr), 0x10_0000);
        assert_eq!(field(&image, 0, ProgramHeaderField::FileSize), 100);
        assert_eq!(field(&image, 0, ProgramHeaderField::MemSize), 0x1_0000);
        assert_eq!(field(&image, 1, ProgramHeaderField::PhysAddr), 0x1_0000);
        assert_eq!(
            field(&image, 1, ProgramHeaderField::VirtAddr),
            0xffff_ffff_8001_0000
        );

        // Each segment's bytes sit where its p_offset says.
        let second = field(&image, 1, ProgramHeaderField::Offset) as usize;
        assert_eq!(&image[second..], &[0xf4; 10]);
        let first = field(&image, 0, ProgramHeaderField::Offset) as usize;
        assert_eq!(&image[first..first + 100], &[0x90; 100][..]);
    }

    #[test]
    fn patching_changes_only_the_named_field() {
        let mut image = two_segment_image();
        let before = image.clone();
        patch_program_header(&mut image, 1, ProgramHeaderField::FileSize, 0xdead);
        assert_eq!(field(&image, 1, ProgramHeaderField::FileSize), 0xdead);
        let changed = image.iter().zip(&before).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 2, "0xdead replaces 10 in two bytes");
    }

    /// binutils' readelf is the independent judge of well-formedness, when installed.
    #[test]
    fn readelf_accepts_the_image() {
        let dir = crate::micro::scratch::ScratchDir::new("elf-readelf").unwrap();
        let path = dir.write("guest.elf", &two_segment_image()).unwrap();
        let output = match std::process::Command::new("readelf")
            .arg("-lhW")
            .arg(&path)
            .output()
        {
            Ok(output) => output,
            Err(_) => return eprintln!("readelf not installed; skipping"),
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stderr.is_empty(),
            "readelf:\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains("EXEC (Executable file)"), "{stdout}");
        assert!(stdout.contains("Advanced Micro Devices X86-64"), "{stdout}");
        assert!(
            stdout.contains("Entry point address:               0x100000"),
            "{stdout}"
        );
        assert_eq!(stdout.matches("  LOAD ").count(), 2, "{stdout}");
        assert!(
            stdout.contains("0xffffffff80010000 0x0000000000010000"),
            "{stdout}"
        );
    }
}
