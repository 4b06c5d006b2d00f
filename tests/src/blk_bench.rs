//! The block benchmark's workloads, shared by `blk-bench` (through a vhost-user-blk
//! backend) and `file-bench` (straight on the raw file, the limit), so that both measure
//! the same thing: one line per workload, `<name> <IOPS> <MiB/s>`.

/// One row of the benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub name: &'static str,
    pub write: bool,
    /// Random block-aligned offsets; otherwise sequential, wrapping at the end.
    pub random: bool,
    pub len: u64,
    /// Requests in flight.
    pub depth: usize,
}

const fn w(name: &'static str, write: bool, random: bool, len: u64, depth: usize) -> Workload {
    Workload {
        name,
        write,
        random,
        len,
        depth,
    }
}

/// In order: the first allocates on a fresh QCOW2 image.
pub const WORKLOADS: [Workload; 8] = [
    w("randwrite-4k-qd1", true, true, 4096, 1),
    w("randwrite-4k-qd32", true, true, 4096, 32),
    w("randread-4k-qd1", false, true, 4096, 1),
    w("randread-4k-qd32", false, true, 4096, 32),
    w("seqwrite-64k-qd4", true, false, 64 << 10, 4),
    w("seqread-64k-qd4", false, false, 64 << 10, 4),
    w("seqwrite-1m-qd4", true, false, 1 << 20, 4),
    w("seqread-1m-qd4", false, false, 1 << 20, 4),
];

/// Block-aligned offsets for a workload: xorshift for random ones, a wrapping counter
/// for sequential ones.
#[derive(Debug, Clone)]
pub struct Offsets {
    workload: Workload,
    blocks: u64,
    state: u64,
}

impl Offsets {
    /// Over a disk of `size` bytes; `seed` tells apart several streams of one workload.
    pub fn new(workload: Workload, size: u64, seed: u64) -> Offsets {
        Offsets {
            workload,
            blocks: (size / workload.len).max(1),
            state: 0x2545_f491_4f6c_dd1d ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        }
    }

    /// Where the next request goes.
    pub fn next_offset(&mut self) -> u64 {
        let block = if self.workload.random {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            self.state % self.blocks
        } else {
            self.state = (self.state + 1) % self.blocks;
            self.state
        };
        block * self.workload.len
    }
}

/// The value after `name` in a benchmark's command line (`--size BYTES`), if given.
pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}
