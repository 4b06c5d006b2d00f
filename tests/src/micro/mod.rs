//! Micro-guests: tiny ELF kernels for fast VMM integration tests.
//!
//! Under PVM (see docs/environment.md) guest code runs in KVM's instruction emulator at about
//! a million instructions per second, so a hand-written guest of a few thousand instructions
//! boots, talks to bulkhead's devices and powers off in milliseconds.
//!
//! - [`elf`]: the ELF64 writer that packages a guest as a vmlinux-like kernel.
//! - [`guest`]: [`MicroGuest`], the iced-x86 based builder for 64-bit guest code.
//! - [`runner`]: runs `bulkhead` with captured stdio and a timeout.
//! - [`hw`]: the ports, MMIO addresses and boot_params offsets bulkhead promises.
//! - [`bzimage`]: bzImage-shaped files for the loader's error paths.
//! - [`scratch`]: temporary directories for the files handed to `bulkhead`.

pub mod bzimage;
pub mod elf;
pub mod guest;
pub mod hw;
pub mod runner;
pub mod scratch;

pub use elf::{build_elf, Segment};
pub use guest::{real_mode_segment, MicroGuest};
pub use runner::{BulkheadCommand, RunOutcome};
pub use scratch::ScratchDir;
