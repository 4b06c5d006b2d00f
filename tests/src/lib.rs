//! Test machinery shared by bulkhead's integration tests.
//!
//! - [`micro`]: tiny hand-assembled guests ("micro-guests") packaged as ELF kernels, run by
//!   the real `bulkhead` binary on this machine's /dev/kvm in milliseconds.
//! - [`lab`]: the nested lab, which runs `bulkhead` inside QEMU TCG (with kvm-amd in the L1
//!   guest) to boot a real Debian Linux kernel as the L2 guest.
//! - [`net`]: network namespaces, a TAP in them, frames for the net worker tests.
//! - [`p9`]: a small 9P2000.L client and a `bulkhead-worker p9` debug server to point it at.
//! - [`screenshot`]: a screen as a PNG, and the PNG as base64 lines a console can carry.
//! - [`blk_bench`]: the block benchmark's workloads (`blk-bench`, `file-bench`).

pub mod blk_bench;
pub mod lab;
pub mod micro;
pub mod net;
pub mod p9;
pub mod p9_virtio;
pub mod screenshot;
pub mod vhost;
pub mod vncdo;

use std::path::PathBuf;

/// Path of the `bulkhead` binary under test: `BULKHEAD_BIN` when set, otherwise the one
/// cargo built next to the test executable.
pub fn bulkhead_bin() -> PathBuf {
    built_binary("bulkhead", "BULKHEAD_BIN")
}

/// Path of the binary `name` under test: the environment variable `override_var` wins
/// when set; otherwise the binary cargo built into the same profile directory as the
/// running test executable (`target/<profile>/<name>`).
pub fn built_binary(name: &str, override_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_var) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-exe> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build --workspace` (same profile as the tests)",
        bin.display()
    );
    bin
}
