//! Host I/O that a caller does itself, outside the engine: the answer of
//! [`DiskImage::map_direct`](super::DiskImage::map_direct), which the blk worker turns into
//! io_uring READV/WRITEV submissions straight into guest buffers.
//!
//! A mapping is only valid while the clusters it names keep belonging to the disk. QCOW2
//! hands out an [`IoHold`] with it: while any hold lives, clusters freed by a discard are
//! not made reusable (the frees wait for a later flush), so an I/O still in flight can
//! never land in a cluster that was handed out again.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A run of the request's bytes that is contiguous in one host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectRun {
    /// The file; the disk owns it and keeps it open while the disk lives.
    pub fd: RawFd,
    /// Offset in the file.
    pub host: u64,
    /// Offset of the run in the request's bytes.
    pub at: u64,
    pub len: u64,
}

/// The runs covering a request, in order, and what keeps them valid.
#[derive(Debug)]
pub struct DirectIo {
    pub runs: Vec<DirectRun>,
    /// Dropped when the I/O has ended; `None` where nothing can move under it (raw).
    pub hold: Option<IoHold>,
}

/// Counts data I/O in flight outside an image's metadata lock.
#[derive(Debug, Default, Clone)]
pub struct IoGate {
    holders: Arc<AtomicUsize>,
}

impl IoGate {
    /// Take it while the mapping cannot change (under the metadata lock).
    pub fn enter(&self) -> IoHold {
        self.holders.fetch_add(1, Ordering::SeqCst);
        IoHold {
            holders: Arc::clone(&self.holders),
        }
    }

    /// Nobody holds the gate. Only meaningful under the lock holders enter under: no new
    /// hold can begin meanwhile.
    pub fn is_idle(&self) -> bool {
        self.holders.load(Ordering::SeqCst) == 0
    }
}

/// One I/O's share of an [`IoGate`]; released on drop.
#[derive(Debug)]
pub struct IoHold {
    holders: Arc<AtomicUsize>,
}

impl Drop for IoHold {
    fn drop(&mut self) {
        self.holders.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_count_until_dropped() {
        let gate = IoGate::default();
        assert!(gate.is_idle());
        let a = gate.enter();
        let b = gate.enter();
        drop(a);
        assert!(!gate.is_idle());
        drop(b);
        assert!(gate.is_idle());
    }
}
