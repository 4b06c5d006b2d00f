//! What can go wrong before or around a lab boot. What goes wrong *inside* the guests is not
//! an error here: it is in the [`LabReport`](super::LabReport), for the test to judge.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Installs QEMU and the tools fetch-assets.sh uses (as root).
pub const INSTALL_PACKAGES: &str = "bash tests/lab/install-packages.sh";

/// Fills the assets directory (given as its argument).
pub const FETCH_ASSETS: &str = "bash tests/lab/fetch-assets.sh";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("lab assets missing from {dir} ({missing}); fetch them with `{FETCH_ASSETS} {dir}`")]
    AssetsMissing { dir: PathBuf, missing: String },

    #[error("{program} not found in PATH; install QEMU with `{INSTALL_PACKAGES}` (as root)")]
    QemuMissing { program: String },

    #[error(
        "the bulkhead binary {0} does not exist; build it with `cargo build --release --workspace`"
    )]
    BulkheadMissing(PathBuf),

    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },

    #[error("{what} failed ({status}): {stderr}")]
    Tool {
        what: String,
        status: ExitStatus,
        stderr: String,
    },

    /// Inputs that cannot make a lab boot: an unknown module, a library ldd cannot find, ...
    #[error("{0}")]
    Invalid(String),
}

impl LabError {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
