//! `blk-bench --socket PATH --size BYTES [--seconds S]`: drives any vhost-user-blk backend
//! (bulkhead-worker blk, qemu-storage-daemon) through the test harness's userspace
//! frontend and split-queue driver, and prints one line per workload:
//! `<workload> <IOPS> <MiB/s>`. Used by bench/blk.sh; not a test.
//!
//! Workloads, in this order (the first one allocates on a fresh QCOW2 image):
//! 4 KiB random write at queue depth 1 and 32, 4 KiB random read at 1 and 32, 64 KiB and
//! 1 MiB sequential write and read at depth 4.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::blk_bench::{arg, Offsets, Workload, WORKLOADS};
use bulkhead_tests::vhost::{Buffer, DeviceSetup, UserspaceDevice};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestAddress;

const QUEUE_SIZE: u16 = 256;
const MAX_DEPTH: usize = 32;
const MAX_LEN: u64 = 1 << 20;

struct Slot {
    header: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let socket = arg(&args, "--socket").context("--socket PATH")?;
    let size: u64 = arg(&args, "--size").context("--size BYTES")?.parse()?;
    let seconds: f64 = arg(&args, "--seconds").map_or(Ok(3.0), |s| s.parse())?;
    let only = arg(&args, "--only");

    let mut setup = DeviceSetup::new(&[QUEUE_SIZE]).with_features(1 << VIRTIO_RING_F_EVENT_IDX);
    setup.memory_size = 64 << 20;
    setup.protocol_features =
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG;
    let connection = UnixStream::connect(&socket).with_context(|| format!("connect {socket}"))?;
    let mut device = UserspaceDevice::start(connection, &setup)?;
    let slots = (0..MAX_DEPTH)
        .map(|_| {
            Ok(Slot {
                header: device.memory.allocate(16, 16)?,
                data: device.memory.allocate(MAX_LEN, 4096)?,
                status: device.memory.allocate(1, 1)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Something other than zeros to write.
    for slot in &slots {
        let bytes: Vec<u8> = (0..MAX_LEN).map(|i| (i * 7 + 3) as u8).collect();
        device.memory.write(slot.data, &bytes)?;
    }

    for workload in WORKLOADS {
        if only.as_deref().is_some_and(|o| !workload.name.contains(o)) {
            continue;
        }
        let (iops, mibs) = run(&mut device, &slots, size, workload, seconds)?;
        println!("{} {iops:.0} {mibs:.1}", workload.name);
    }
    Ok(())
}

fn run(
    device: &mut UserspaceDevice,
    slots: &[Slot],
    size: u64,
    w: Workload,
    seconds: f64,
) -> Result<(f64, f64)> {
    ensure!(size >= w.len, "the disk is smaller than one request");
    let mut offsets = Offsets::new(w, size, 0);
    let mut offset = || offsets.next_offset();
    let kind = if w.write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let mut by_head: HashMap<u16, usize> = HashMap::new();
    let post = |device: &mut UserspaceDevice, slot: usize, at: u64| -> Result<u16> {
        let s = &slots[slot];
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&(at / 512).to_le_bytes());
        device.memory.write(s.header, &header)?;
        let data = if w.write {
            Buffer::readable(s.data, w.len as u32)
        } else {
            Buffer::writable(s.data, w.len as u32)
        };
        Ok(device.queues[0].post(&[
            Buffer::readable(s.header, 16),
            data,
            Buffer::writable(s.status, 1),
        ])?)
    };
    for slot in 0..w.depth {
        let head = post(device, slot, offset())?;
        by_head.insert(head, slot);
    }
    device.queues[0].kick()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut done = 0u64;
    loop {
        let used = device.queues[0].wait_used(1, Duration::from_secs(30))?;
        let now = Instant::now();
        // Every completed head first: their descriptors are free again, and a new request
        // may get one of these head numbers.
        let mut free = Vec::with_capacity(used.len());
        for element in used {
            let head = u16::try_from(element.id)?;
            let Some(slot) = by_head.remove(&head) else {
                bail!("unknown head {head}");
            };
            let status = device.memory.read(slots[slot].status, 1)?[0];
            ensure!(
                status == 0,
                "{}: request failed with status {status}",
                w.name
            );
            done += 1;
            free.push(slot);
        }
        if now < deadline {
            for slot in free {
                let head = post(device, slot, offset())?;
                by_head.insert(head, slot);
            }
        }
        if by_head.is_empty() {
            break;
        }
        device.queues[0].kick()?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let iops = done as f64 / elapsed;
    Ok((iops, iops * w.len as f64 / f64::from(1 << 20)))
}
