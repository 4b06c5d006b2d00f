//! A private temporary directory for the files a test hands to `bulkhead` (kernels, initrds),
//! removed when dropped. Small enough not to need the `tempfile` crate in the library.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A directory under the system temp dir, unique to this process and call.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `$TMPDIR/bulkhead-<tag>-<pid>-<n>`; `tag` only helps a human find it.
    pub fn new(tag: &str) -> io::Result<Self> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("bulkhead-{tag}-{}-{id}", std::process::id());
        let path = std::env::temp_dir().join(name);
        // create_dir (not create_dir_all) fails on a leftover, so two tests never share one.
        std::fs::create_dir(&path)?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` to a file called `name` in this directory and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
        let path = self.path.join(name);
        std::fs::write(&path, bytes)?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
