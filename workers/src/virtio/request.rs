//! Building a request from a descriptor head index, by walking the split ring's chain here.
//!
//! `virtio-queue` builds chains only while popping the available ring
//! (`DescriptorChain::new` is crate-private), but a restarted worker must rebuild the
//! requests that were in flight from nothing but their head indices. This walk serves both
//! cases, and unlike the crate's iterator it says *why* a chain is unusable instead of just
//! ending it early.
//!
//! What comes out is neutral: the guest buffers the device reads and the ones it writes,
//! each checked to lie entirely in guest memory. Their *contents* are not read here; the
//! guest may rewrite them at any time, so a device reads each buffer once, when it needs it.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// One descriptor table entry: addr, len, flags, next (virtio 1.2, 2.7.5).
const DESCRIPTOR_SIZE: u64 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A guest buffer, known to lie in guest memory when it was walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSegment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One request: the chain starting at `head`, split into what the device reads (the
/// driver's header and data out) and what it writes (data in, status).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub head: u16,
    pub readable: Vec<GuestSegment>,
    pub writable: Vec<GuestSegment>,
}

impl Request {
    /// Total bytes of the device-readable buffers (fits: the walk caps the chain at 4 GiB).
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Why a chain cannot be served. Every variant is the guest's doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WalkError {
    #[error("head index {head} is outside the queue of {queue_size} descriptors")]
    HeadOutOfRange { head: u16, queue_size: u16 },
    #[error("descriptor at {addr:#x} cannot be read from guest memory")]
    UnreadableDescriptor { addr: u64 },
    #[error("descriptor {index} links to {next}, outside its table of {table_len}")]
    NextOutOfRange {
        index: u16,
        next: u16,
        table_len: u16,
    },
    #[error("the chain has more than {limit} descriptors: a loop")]
    Loop { limit: u16 },
    #[error("descriptor {position} of the chain is device-readable after a writable one")]
    ReadableAfterWritable { position: u32 },
    #[error("the chain's buffers add up to more than 4 GiB")]
    TooLong,
    #[error("buffer at {addr:#x}, {len} bytes, is not entirely in guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("indirect table length {len} is not a non-zero multiple of 16 up to {max}")]
    IndirectLength { len: u32, max: u64 },
    #[error("an indirect table refers to another indirect table")]
    NestedIndirect,
    #[error("an indirect descriptor is not alone in its chain (it has NEXT, or follows others)")]
    IndirectInChain,
}

/// The split ring's descriptor table as the driver configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorTable {
    pub addr: GuestAddress,
    /// The queue size: entries in the table.
    pub size: u16,
}

#[derive(Debug, Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_descriptor(
    memory: &GuestMemoryMmap,
    table: GuestAddress,
    index: u16,
) -> Result<Descriptor, WalkError> {
    let unreadable = WalkError::UnreadableDescriptor {
        addr: table.0.wrapping_add(u64::from(index) * DESCRIPTOR_SIZE),
    };
    let addr = table
        .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
        .ok_or(unreadable)?;
    // virtio-queue's descriptor type does the little-endian decoding.
    let raw: SplitDescriptor = memory.read_obj(addr).map_err(|_| unreadable)?;
    Ok(Descriptor {
        addr: raw.addr().0,
        len: raw.len(),
        flags: raw.flags(),
        next: raw.next(),
    })
}

/// Accumulates a chain's buffers with the checks every buffer needs.
struct Builder<'m> {
    memory: &'m GuestMemoryMmap,
    request: Request,
    position: u32,
    total: u64,
}

impl Builder<'_> {
    fn push(&mut self, descriptor: &Descriptor) -> Result<(), WalkError> {
        self.total += u64::from(descriptor.len);
        if self.total > u64::from(u32::MAX) {
            return Err(WalkError::TooLong);
        }
        let outside = WalkError::OutsideMemory {
            addr: descriptor.addr,
            len: descriptor.len,
        };
        let addr = GuestAddress(descriptor.addr);
        // A zero-length buffer touches nothing, but its address is still the guest's
        // claim about its memory: hold it to the same rule.
        let check_len = (descriptor.len as usize).max(1);
        if addr.checked_add(u64::from(descriptor.len)).is_none()
            || !self.memory.check_range(addr, check_len)
        {
            return Err(outside);
        }
        let segment = GuestSegment {
            addr,
            len: descriptor.len,
        };
        if descriptor.flags & F_WRITE != 0 {
            self.request.writable.push(segment);
        } else if !self.request.writable.is_empty() {
            return Err(WalkError::ReadableAfterWritable {
                position: self.position,
            });
        } else {
            self.request.readable.push(segment);
        }
        self.position += 1;
        Ok(())
    }
}

/// Walks the chain that starts at `head` in `table`.
///
/// Bounded by construction: at most `table.size` descriptors in the ring's table, at most
/// `table.size` in an indirect table, one level of indirection.
pub fn walk_request(
    memory: &GuestMemoryMmap,
    table: DescriptorTable,
    head: u16,
) -> Result<Request, WalkError> {
    if head >= table.size {
        return Err(WalkError::HeadOutOfRange {
            head,
            queue_size: table.size,
        });
    }
    let mut builder = Builder {
        memory,
        request: Request {
            head,
            ..Request::default()
        },
        position: 0,
        total: 0,
    };
    let first = read_descriptor(memory, table.addr, head)?;
    if first.flags & F_INDIRECT != 0 {
        if first.flags & F_NEXT != 0 {
            return Err(WalkError::IndirectInChain);
        }
        walk_indirect(&mut builder, &first, table.size)?;
        return Ok(builder.request);
    }
    walk_table(&mut builder, table.addr, table.size, head, first, false)?;
    Ok(builder.request)
}

/// Follows NEXT links through one table (the ring's or an indirect one) of `table_len`
/// entries, starting with `first` at `index`.
fn walk_table(
    builder: &mut Builder<'_>,
    table: GuestAddress,
    table_len: u16,
    mut index: u16,
    first: Descriptor,
    indirect: bool,
) -> Result<(), WalkError> {
    let mut descriptor = first;
    let mut count: u16 = 0;
    loop {
        if descriptor.flags & F_INDIRECT != 0 {
            return Err(if indirect {
                WalkError::NestedIndirect
            } else {
                WalkError::IndirectInChain
            });
        }
        // A chain visiting more descriptors than its table has must visit one twice.
        count += 1;
        if count > table_len {
            return Err(WalkError::Loop { limit: table_len });
        }
        builder.push(&descriptor)?;
        if descriptor.flags & F_NEXT == 0 {
            return Ok(());
        }
        if descriptor.next >= table_len {
            return Err(WalkError::NextOutOfRange {
                index,
                next: descriptor.next,
                table_len,
            });
        }
        index = descriptor.next;
        descriptor = read_descriptor(builder.memory, table, index)?;
    }
}

fn walk_indirect(
    builder: &mut Builder<'_>,
    descriptor: &Descriptor,
    queue_size: u16,
) -> Result<(), WalkError> {
    // The spec caps a whole chain, indirect tables included, at the queue size.
    let max = u64::from(queue_size) * DESCRIPTOR_SIZE;
    let len = u64::from(descriptor.len);
    if len == 0 || len % DESCRIPTOR_SIZE != 0 || len > max {
        return Err(WalkError::IndirectLength {
            len: descriptor.len,
            max,
        });
    }
    let table = GuestAddress(descriptor.addr);
    // `len <= queue_size * 16` so the entry count fits in u16.
    let entries = (len / DESCRIPTOR_SIZE) as u16;
    if table.checked_add(len).is_none() || !builder.memory.check_range(table, len as usize) {
        return Err(WalkError::OutsideMemory {
            addr: descriptor.addr,
            len: descriptor.len,
        });
    }
    let first = read_descriptor(builder.memory, table, 0)?;
    walk_table(builder, table, entries, 0, first, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: GuestAddress = GuestAddress(0x1000);
    const SIZE: u16 = 8;
    const MEMORY_END: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_END as usize)]).unwrap()
    }

    fn put(memory: &GuestMemoryMmap, table: GuestAddress, index: u16, d: (u64, u32, u16, u16)) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.0.to_le_bytes());
        raw[8..12].copy_from_slice(&d.1.to_le_bytes());
        raw[12..14].copy_from_slice(&d.2.to_le_bytes());
        raw[14..16].copy_from_slice(&d.3.to_le_bytes());
        memory
            .write_obj(raw, table.unchecked_add(u64::from(index) * 16))
            .unwrap();
    }

    fn walk(descriptors: &[(u64, u32, u16, u16)]) -> Result<Request, WalkError> {
        let memory = memory();
        for (i, d) in descriptors.iter().enumerate() {
            put(&memory, TABLE, i as u16, *d);
        }
        walk_request(
            &memory,
            DescriptorTable {
                addr: TABLE,
                size: SIZE,
            },
            0,
        )
    }

    fn seg(addr: u64, len: u32) -> GuestSegment {
        GuestSegment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn splits_a_chain_into_readable_and_writable() {
        let request = walk(&[
            (0x8000, 16, F_NEXT, 2),
            (0, 0, 0, 0),
            (0x9000, 512, F_NEXT | F_WRITE, 3),
            (0xa000, 1, F_WRITE, 0),
        ])
        .unwrap();
        assert_eq!(request.head, 0);
        assert_eq!(request.readable, vec![seg(0x8000, 16)]);
        assert_eq!(request.writable, vec![seg(0x9000, 512), seg(0xa000, 1)]);
        assert_eq!((request.readable_len(), request.writable_len()), (16, 513));
    }

    #[test]
    fn follows_one_indirect_table() {
        let memory = memory();
        let indirect = GuestAddress(0x4000);
        put(&memory, indirect, 0, (0x8000, 16, F_NEXT, 1));
        put(&memory, indirect, 1, (0x9000, 32, F_WRITE, 0));
        put(&memory, TABLE, 3, (indirect.0, 32, F_INDIRECT, 0));
        let table = DescriptorTable {
            addr: TABLE,
            size: SIZE,
        };
        let request = walk_request(&memory, table, 3).unwrap();
        assert_eq!(request.head, 3);
        assert_eq!(request.readable, vec![seg(0x8000, 16)]);
        assert_eq!(request.writable, vec![seg(0x9000, 32)]);
    }

    #[test]
    fn refuses_a_head_outside_the_queue() {
        let memory = memory();
        let table = DescriptorTable {
            addr: TABLE,
            size: SIZE,
        };
        assert_eq!(
            walk_request(&memory, table, SIZE),
            Err(WalkError::HeadOutOfRange {
                head: SIZE,
                queue_size: SIZE
            })
        );
    }

    #[test]
    fn refuses_a_table_outside_memory() {
        let memory = memory();
        let table = DescriptorTable {
            addr: GuestAddress(MEMORY_END - 8),
            size: SIZE,
        };
        assert!(matches!(
            walk_request(&memory, table, 0),
            Err(WalkError::UnreadableDescriptor { .. })
        ));
    }

    #[test]
    fn refuses_loops() {
        assert_eq!(
            walk(&[(0x8000, 1, F_NEXT, 1), (0x8000, 1, F_NEXT, 0)]),
            Err(WalkError::Loop { limit: SIZE })
        );
        // A descriptor pointing at itself.
        assert_eq!(
            walk(&[(0x8000, 1, F_NEXT | F_WRITE, 0)]),
            Err(WalkError::Loop { limit: SIZE })
        );
    }

    #[test]
    fn accepts_a_chain_using_the_whole_table() {
        let chain: Vec<_> = (0..SIZE)
            .map(|i| (0x8000, 1, if i + 1 < SIZE { F_NEXT } else { 0 }, i + 1))
            .collect();
        assert_eq!(walk(&chain).unwrap().readable.len(), usize::from(SIZE));
    }

    #[test]
    fn refuses_a_next_index_outside_the_table() {
        assert_eq!(
            walk(&[(0x8000, 1, F_NEXT, SIZE + 5)]),
            Err(WalkError::NextOutOfRange {
                index: 0,
                next: SIZE + 5,
                table_len: SIZE
            })
        );
    }

    #[test]
    fn refuses_readable_after_writable() {
        assert_eq!(
            walk(&[(0x8000, 1, F_NEXT | F_WRITE, 1), (0x9000, 1, 0, 0)]),
            Err(WalkError::ReadableAfterWritable { position: 1 })
        );
    }

    #[test]
    fn refuses_chains_past_4_gib() {
        // Two 2 GiB buffers, each in (lazily mapped) memory, 4 GiB together.
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 3 << 30)]).unwrap();
        put(&memory, TABLE, 0, (0x1_0000, 1 << 31, F_NEXT, 1));
        put(&memory, TABLE, 1, (0x2_0000, 1 << 31, 0, 0));
        let table = DescriptorTable {
            addr: TABLE,
            size: SIZE,
        };
        assert_eq!(walk_request(&memory, table, 0), Err(WalkError::TooLong));
    }

    #[test]
    fn refuses_buffers_outside_memory() {
        assert_eq!(
            walk(&[(MEMORY_END - 4, 8, 0, 0)]),
            Err(WalkError::OutsideMemory {
                addr: MEMORY_END - 4,
                len: 8
            })
        );
        assert_eq!(
            walk(&[(u64::MAX - 2, 8, F_WRITE, 0)]),
            Err(WalkError::OutsideMemory {
                addr: u64::MAX - 2,
                len: 8
            })
        );
        assert_eq!(
            walk(&[(MEMORY_END, 0, F_WRITE, 0)]),
            Err(WalkError::OutsideMemory {
                addr: MEMORY_END,
                len: 0
            })
        );
    }

    #[test]
    fn refuses_bad_indirect_lengths() {
        let max = u64::from(SIZE) * 16;
        for len in [0, 15, 24, (u64::from(SIZE) + 1) as u32 * 16] {
            assert_eq!(
                walk(&[(0x4000, len, F_INDIRECT, 0)]),
                Err(WalkError::IndirectLength { len, max }),
                "length {len}"
            );
        }
    }

    #[test]
    fn refuses_an_indirect_table_outside_memory() {
        assert_eq!(
            walk(&[(MEMORY_END - 16, 32, F_INDIRECT, 0)]),
            Err(WalkError::OutsideMemory {
                addr: MEMORY_END - 16,
                len: 32
            })
        );
    }

    #[test]
    fn refuses_nested_and_chained_indirect_descriptors() {
        let memory = memory();
        let indirect = GuestAddress(0x4000);
        put(&memory, indirect, 0, (0x5000, 16, F_INDIRECT, 0));
        put(&memory, TABLE, 0, (indirect.0, 16, F_INDIRECT, 0));
        let table = DescriptorTable {
            addr: TABLE,
            size: SIZE,
        };
        assert_eq!(
            walk_request(&memory, table, 0),
            Err(WalkError::NestedIndirect)
        );
        assert_eq!(
            walk(&[(0x4000, 16, F_INDIRECT | F_NEXT, 1)]),
            Err(WalkError::IndirectInChain)
        );
        assert_eq!(
            walk(&[(0x8000, 1, F_NEXT, 1), (0x4000, 16, F_INDIRECT, 0)]),
            Err(WalkError::IndirectInChain)
        );
    }

    #[test]
    fn refuses_loops_inside_an_indirect_table() {
        let memory = memory();
        let indirect = GuestAddress(0x4000);
        put(&memory, indirect, 0, (0x8000, 1, F_NEXT, 1));
        put(&memory, indirect, 1, (0x8000, 1, F_NEXT, 0));
        put(&memory, TABLE, 0, (indirect.0, 32, F_INDIRECT, 0));
        let table = DescriptorTable {
            addr: TABLE,
            size: SIZE,
        };
        assert_eq!(
            walk_request(&memory, table, 0),
            Err(WalkError::Loop { limit: 2 })
        );
    }
}
