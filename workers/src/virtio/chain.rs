//! Checks on a descriptor chain before a device trusts it.
//!
//! `virtio-queue`'s chain iterator keeps every access in bounds - it reads descriptors with
//! checked guest accesses, stops after as many descriptors as the table holds, and stops when
//! lengths pass 4 GiB - but it stops *silently*: a looping chain just looks shorter. A device
//! must tell such a chain from a well-formed one, so the walk here insists that the chain
//! actually ends.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ChainError {
    #[error("the chain has no descriptor (head index outside the table?)")]
    Empty,
    #[error(
        "descriptor {position} of the chain is device-readable; only writable buffers are accepted"
    )]
    ReadOnly { position: u32 },
    #[error(
        "the chain does not end: a loop, a next index outside the table, an unreadable \
         descriptor or lengths past 4 GiB"
    )]
    Unterminated,
    #[error("the chain has more descriptors than the queue size {queue_size}")]
    TooLong { queue_size: u16 },
}

/// The total length of a chain made only of device-writable buffers.
///
/// The buffers' addresses are not checked here; building a `virtio_queue::Writer` on the
/// chain does that.
pub fn writable_len<M>(chain: DescriptorChain<M>, queue_size: u16) -> Result<u32, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut count: u32 = 0;
    let mut total: u32 = 0;
    let mut ended = false;
    for descriptor in chain {
        if count == u32::from(queue_size) {
            // Only an indirect table can be longer than the queue.
            return Err(ChainError::TooLong { queue_size });
        }
        if !descriptor.is_write_only() {
            return Err(ChainError::ReadOnly { position: count });
        }
        count += 1;
        // The iterator itself stops before the sum can pass u32::MAX.
        total = total
            .checked_add(descriptor.len())
            .ok_or(ChainError::Unterminated)?;
        ended = !descriptor.has_next();
    }
    match (count, ended) {
        (0, _) => Err(ChainError::Empty),
        (_, false) => Err(ChainError::Unterminated),
        (_, true) => Ok(total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    const QUEUE_SIZE: u16 = 16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn offer_descriptor_zero(queue: &MockSplitQueue<GuestMemoryMmap>) {
        queue.avail().ring().ref_at(0).unwrap().store(0);
        queue.avail().idx().store(1);
    }

    /// Puts `descriptors` in the table from index 0, offers index 0 as a chain head, and
    /// returns what the device would see.
    fn check(descriptors: &[(u64, u32, u16, u16)]) -> Result<u32, ChainError> {
        let memory = memory();
        let queue = MockSplitQueue::new(&memory, QUEUE_SIZE);
        for (index, &(addr, len, flags, next)) in descriptors.iter().enumerate() {
            let descriptor = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            queue.desc_table().store(index as u16, descriptor).unwrap();
        }
        offer_descriptor_zero(&queue);
        let mut q: Queue = queue.create_queue().unwrap();
        let chain = q.iter(&memory).unwrap().next().unwrap();
        writable_len(chain, QUEUE_SIZE)
    }

    #[test]
    fn accepts_writable_chains() {
        assert_eq!(check(&[(0x8000, 4096, WRITE, 0)]), Ok(4096));
        assert_eq!(
            check(&[(0x8000, 100, WRITE | NEXT, 1), (0x9000, 28, WRITE, 0)]),
            Ok(128)
        );
        // A chain using every descriptor of the table is still well formed.
        let full: Vec<_> = (0..QUEUE_SIZE)
            .map(|i| {
                (
                    0x8000,
                    1,
                    WRITE | if i + 1 < QUEUE_SIZE { NEXT } else { 0 },
                    i + 1,
                )
            })
            .collect();
        assert_eq!(check(&full), Ok(u32::from(QUEUE_SIZE)));
    }

    #[test]
    fn refuses_readable_buffers() {
        assert_eq!(
            check(&[(0x8000, 64, 0, 0)]),
            Err(ChainError::ReadOnly { position: 0 })
        );
        assert_eq!(
            check(&[(0x8000, 64, WRITE | NEXT, 1), (0x9000, 64, 0, 0)]),
            Err(ChainError::ReadOnly { position: 1 })
        );
    }

    #[test]
    fn refuses_chains_that_do_not_end() {
        // 0 -> 1 -> 0 -> ...
        assert_eq!(
            check(&[(0x8000, 8, WRITE | NEXT, 1), (0x9000, 8, WRITE | NEXT, 0)]),
            Err(ChainError::Unterminated)
        );
        // Next index outside the table.
        assert_eq!(
            check(&[(0x8000, 8, WRITE | NEXT, QUEUE_SIZE + 3)]),
            Err(ChainError::Unterminated)
        );
        // Lengths whose sum passes 4 GiB.
        assert_eq!(
            check(&[
                (0x8000, 0xffff_f000, WRITE | NEXT, 1),
                (0x9000, 0x2000, WRITE, 0)
            ]),
            Err(ChainError::Unterminated)
        );
    }

    #[test]
    fn refuses_indirect_tables_longer_than_the_queue() {
        let memory = memory();
        let table = GuestAddress(0x4_0000);
        let entries = u32::from(QUEUE_SIZE) * 2;
        for i in 0..entries {
            let flags = WRITE | if i + 1 < entries { NEXT } else { 0 };
            let raw = RawDescriptor::from(Descriptor::new(0x8000, 1, flags, (i + 1) as u16));
            memory
                .write_obj(raw, table.unchecked_add(u64::from(i) * 16))
                .unwrap();
        }
        let queue = MockSplitQueue::new(&memory, QUEUE_SIZE);
        let head = Descriptor::new(table.0, entries * 16, VRING_DESC_F_INDIRECT as u16, 0);
        queue
            .desc_table()
            .store(0, RawDescriptor::from(head))
            .unwrap();
        offer_descriptor_zero(&queue);
        let mut q: Queue = queue.create_queue().unwrap();
        let chain = q.iter(&memory).unwrap().next().unwrap();
        assert_eq!(
            writable_len(chain, QUEUE_SIZE),
            Err(ChainError::TooLong {
                queue_size: QUEUE_SIZE
            })
        );
    }
}
