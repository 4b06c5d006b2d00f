//! Moving a request's bytes between the disk and the guest's own buffers.
//!
//! The buffers are guest memory, which the guest may change at any moment: they travel as
//! [`VolatileSlice`]s and are only ever handed to the kernel (preadv/pwritev) or copied
//! with volatile accesses, never borrowed as Rust slices. Formats that can move bytes
//! straight between a file and the buffers do (raw images: one preadv per request, no
//! copy, in `io`); the others go through [`with_scratch`], a per-thread buffer reused
//! between requests so that the queue threads allocate nothing per request.

use std::cell::RefCell;

use vm_memory::VolatileSlice;

/// The total length of `bufs`.
pub fn total_len(bufs: &[VolatileSlice<'_>]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// The part of `bufs` that holds bytes `at..at + len` of them, in order. Asking for more
/// than `bufs` hold gives what they do hold.
pub fn sub_slices<'m>(bufs: &[VolatileSlice<'m>], at: usize, len: usize) -> Vec<VolatileSlice<'m>> {
    let mut out = Vec::new();
    let (mut start, end) = (0usize, at.saturating_add(len));
    for buf in bufs {
        let buf_end = start + buf.len();
        if buf_end > at && start < end {
            let from = at.saturating_sub(start);
            let to = end.min(buf_end) - start;
            // In bounds: from < to <= buf.len().
            if let Ok(piece) = buf.subslice(from, to - from) {
                out.push(piece);
            }
        }
        start = buf_end;
        if start >= end {
            break;
        }
    }
    out
}

/// Runs `f` with a scratch buffer of `len` bytes, this thread's, reused between calls.
/// Callers keep `len` bounded (the blk worker moves at most 1 MiB per call).
pub fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            if scratch.len() < len {
                scratch.resize(len, 0);
            }
            f(&mut scratch[..len])
        }
        // Re-entered (a format reading through another with the default path): a fresh one.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// Copies `data` into `bufs`, in order, as far as both go.
pub fn scatter(data: &[u8], bufs: &[VolatileSlice<'_>]) {
    let mut done = 0;
    for buf in bufs {
        if done >= data.len() {
            break;
        }
        let n = buf.len().min(data.len() - done);
        buf.copy_from(&data[done..done + n]);
        done += n;
    }
}

/// Copies `bufs`, in order, into `data`, as far as both go.
pub fn gather(bufs: &[VolatileSlice<'_>], data: &mut [u8]) {
    let mut done = 0;
    for buf in bufs {
        if done >= data.len() {
            break;
        }
        done += buf.copy_to(&mut data[done..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_and_gather_cross_buffers() {
        let mut a = *b"hello ";
        let mut b = *b"world";
        let bufs = [
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
        ];
        assert_eq!(total_len(&bufs), 11);
        with_scratch(11, |scratch| {
            gather(&bufs, scratch);
            assert_eq!(scratch, b"hello world");
            scratch.reverse();
            scatter(scratch, &bufs);
        });
        let middle = sub_slices(&bufs, 4, 4);
        let mut seen = [0u8; 4];
        gather(&middle, &mut seen);
        assert_eq!(&seen, b"w ol");
        assert_eq!(total_len(&sub_slices(&bufs, 9, 100)), 2);
        assert!(sub_slices(&bufs, 11, 1).is_empty());
        assert_eq!(&a, b"dlrow ");
        assert_eq!(&b, b"olleh");
    }
}
