//! bzImage-shaped files for the loader's error paths: a boot sector with a Linux setup
//! header (boot protocol 2.15, 64-bit capable), setup sectors, and a payload. Not bootable:
//! the payload is whatever the test passes.
//!
//! Offsets are from Documentation/arch/x86/boot.rst.

const SECTOR: usize = 512;

/// A bzImage whose header promises `setup_sects` setup sectors and a protected-mode payload
/// of `payload.len()` bytes (`syssize`), followed by exactly that payload.
pub fn bzimage(setup_sects: u8, payload: &[u8]) -> Vec<u8> {
    let setup_size = (usize::from(setup_sects) + 1) * SECTOR;
    let mut image = vec![0u8; setup_size];
    let mut put =
        |offset: usize, bytes: &[u8]| image[offset..offset + bytes.len()].copy_from_slice(bytes);

    put(0x1f1, &[setup_sects]);
    let syssize = u32::try_from(payload.len().div_ceil(16)).expect("payload below 64 GiB");
    put(0x1f4, &syssize.to_le_bytes());
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x200, &[0xeb, 0x66]); // jmp short past the header, as real kernels have
    put(0x202, b"HdrS");
    put(0x206, &0x020fu16.to_le_bytes()); // protocol version 2.15
    put(0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(0x234, &[1, 21]); // relocatable_kernel, min_alignment (2 MiB)
    put(0x236, &0x0003u16.to_le_bytes()); // xloadflags: KERNEL_64 | CAN_BE_LOADED_ABOVE_4G
    put(0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(0x258, &0x100_0000u64.to_le_bytes()); // pref_address
    let init_size = u32::try_from(payload.len().next_multiple_of(4096) + (1 << 20)).unwrap();
    put(0x260, &init_size.to_le_bytes());

    image.extend_from_slice(payload);
    image
}

/// Size of the boot sector plus setup sectors for `setup_sects`.
pub fn setup_size(setup_sects: u8) -> usize {
    (usize::from(setup_sects) + 1) * SECTOR
}
