//! `net-bench`: packets/s and Gbit/s through `bulkhead-worker net`, driven by the harness
//! (a userspace frontend and split-queue driver in this process playing the guest), side
//! by side with the limit of plain TAP reads and writes from one process on the same TAP.
//! Run by bench/net.sh, which builds it and the worker in release mode. Each cell is the
//! median of NET_BENCH_RUNS (default 3) alternating runs of NET_BENCH_SECONDS (default 1).
//!
//! - TX: frames the guest posts go out of the TAP into the host stack, addressed to a MAC
//!   that is not the host's so the stack drops them at once; the limit is `write(2)` of the
//!   same frames (vnet header first) in a loop.
//! - RX: an AF_PACKET socket in the namespace sends frames out of the TAP's host side as
//!   fast as it can (with a vnet header, so 64 KiB frames go as one GSO frame); the limit
//!   is `read(2)` of the TAP in a loop, the worker's number is frames the guest receives.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bulkhead_protocol::{DeviceConfig, NetConfig};
use bulkhead_tests::net::{eth_ipv4, Netns, GUEST_IP, GUEST_MAC, HOST_IP, TAP_NAME};
use bulkhead_tests::vhost::{Buffer, DeviceSetup, UserspaceDevice, WorkerProcess};
use bulkhead_workers::net::{Tap, VnetHeader, VNET_HDR_LEN};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestAddress;

const QUEUE_SIZE: u16 = 1024;
const TAP_FD: i32 = 5;
const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const RX_BUFFER: u32 = 4096;

#[derive(Clone, Copy)]
enum Size {
    Small,
    Mtu,
    Tso,
}

impl Size {
    fn name(self) -> &'static str {
        match self {
            Size::Small => "64 B",
            Size::Mtu => "1500 B",
            Size::Tso => "64 KiB TSO",
        }
    }

    /// The vnet header and the frame.
    fn frame(self, dst_mac: [u8; 6]) -> (VnetHeader, Vec<u8>) {
        let (l4, header) = match self {
            // 60 bytes on the wire before the FCS: a minimum Ethernet frame.
            Size::Small => (26, VnetHeader::default()),
            Size::Mtu => (1480, VnetHeader::default()),
            Size::Tso => (
                65_000,
                VnetHeader {
                    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                    gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
                    hdr_len: 54,
                    gso_size: 1448,
                    csum_start: 34,
                    csum_offset: 16,
                    num_buffers: 0,
                },
            ),
        };
        let protocol = if matches!(self, Size::Tso) { 6 } else { 17 };
        let mut frame = eth_ipv4(GUEST_MAC, dst_mac, GUEST_IP, HOST_IP, protocol, l4);
        let mut l4_bytes = vec![0u8; l4];
        if protocol == 6 {
            l4_bytes[12] = 5 << 4;
            l4_bytes[13] = 0x10;
        } else {
            l4_bytes[4..6].copy_from_slice(&(l4 as u16).to_be_bytes());
        }
        frame.extend_from_slice(&l4_bytes);
        (header, frame)
    }
}

struct Rate {
    frames: u64,
    bytes: u64,
    seconds: f64,
}

impl Rate {
    fn pps(&self) -> f64 {
        self.frames as f64 / self.seconds
    }
    fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }
}

fn main() -> Result<()> {
    let seconds: f64 = std::env::var("NET_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let duration = Duration::from_secs_f64(seconds);
    let runs: usize = std::env::var("NET_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let netns = Netns::new().context("network namespace (needs root and iproute2)")?;
    let tap = netns.host_tap()?;
    // As the worker sets them for a guest with GUEST_CSUM and GUEST_TSO4, so that the
    // plain reader gets the same GSO frames.
    tap.set_offload(0x01 | 0x02)?;

    println!(
        "{:<6} {:<11} {:>13} {:>10} {:>13} {:>10} {:>7}",
        "dir", "frames", "worker pps", "Gbit/s", "plain pps", "Gbit/s", "ratio"
    );
    for dir in ["TX", "RX"] {
        for size in [Size::Small, Size::Mtu, Size::Tso] {
            // Alternating runs, the median of each side: on a shared machine one run can
            // lose half its CPU to a neighbour.
            let (mut plains, mut workers) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                plains.push(match dir {
                    "TX" => plain_tx(&tap, size, duration)?,
                    _ => plain_rx(&netns, &tap, size, duration)?,
                });
                workers.push(match dir {
                    "TX" => worker_tx(&tap, size, duration)?,
                    _ => worker_rx(&netns, &tap, size, duration)?,
                });
            }
            let (plain, worker) = (median(plains), median(workers));
            println!(
                "{:<6} {:<11} {:>13.0} {:>10.2} {:>13.0} {:>10.2} {:>7.2}",
                dir,
                size.name(),
                worker.pps(),
                worker.gbps(),
                plain.pps(),
                plain.gbps(),
                worker.pps() / plain.pps()
            );
        }
    }
    Ok(())
}

fn median(mut rates: Vec<Rate>) -> Rate {
    rates.sort_by(|a, b| a.pps().total_cmp(&b.pps()));
    let middle = rates.len() / 2;
    rates.swap_remove(middle)
}

fn plain_tx(tap: &Tap, size: Size, duration: Duration) -> Result<Rate> {
    let (header, frame) = size.frame(OTHER_MAC);
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(&frame);
    let start = Instant::now();
    let mut frames = 0u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            tap.write(&bytes)?;
        }
        frames += 64;
    }
    Ok(Rate {
        frames,
        bytes: frames * frame.len() as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn start_worker(tap: &Tap, features: u64) -> Result<(WorkerProcess, UserspaceDevice)> {
    let (worker, connection) = WorkerProcess::launched_with(
        "net0",
        DeviceConfig::Net(NetConfig {
            tap_fds: vec![TAP_FD],
            mac: GUEST_MAC,
            mtu: None,
        }),
        &[(tap.as_raw_fd(), TAP_FD)],
        &[],
    )?;
    let mut setup = DeviceSetup::new(&[QUEUE_SIZE, QUEUE_SIZE]).with_features(features);
    setup.memory_size = 64 << 20;
    setup.protocol_features = VhostUserProtocolFeatures::REPLY_ACK;
    let device = UserspaceDevice::start(connection, &setup)?;
    Ok((worker, device))
}

fn worker_tx(tap: &Tap, size: Size, duration: Duration) -> Result<Rate> {
    let features =
        (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4);
    let (_worker, mut device) = start_worker(tap, features)?;
    let (header, frame) = size.frame(OTHER_MAC);
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(&frame);
    // Every chain points at the same buffer: the device only reads it.
    let buffer = device.memory.allocate(bytes.len() as u64, 8)?;
    device.memory.write(buffer, &bytes)?;
    let queue = &mut device.queues[1];
    let chain = [Buffer::readable(buffer, bytes.len() as u32)];
    let start = Instant::now();
    let mut frames = 0u64;
    let mut in_flight = 0usize;
    while start.elapsed() < duration {
        while in_flight < usize::from(QUEUE_SIZE) {
            queue.post(&chain)?;
            in_flight += 1;
        }
        queue.kick()?;
        let used = queue.wait_used(1, Duration::from_secs(10))?;
        in_flight -= used.len();
        frames += used.len() as u64;
    }
    Ok(Rate {
        frames,
        bytes: frames * frame.len() as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Sends `size` frames out of the TAP's host side from a thread in the namespace until
/// `stop`; AF_PACKET with a vnet header, so a 64 KiB frame is one GSO frame.
fn start_sender(
    netns: &Netns,
    size: Size,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<io::Result<()>>> {
    let socket = netns.run(|| {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(TAP_NAME).map_err(io::Error::other)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one int; PACKET_VNET_HDR is 15.
        if unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                15,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an all-zero sockaddr_ll is valid; the fields bind() needs are set below.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        address.sll_ifindex = index as i32;
        // SAFETY: bind reads `address`, a sockaddr_ll of the size given.
        if unsafe {
            libc::bind(
                fd,
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    })?;
    let (header, frame) = size.frame(GUEST_MAC);
    // PACKET_VNET_HDR takes the 10-byte virtio_net_hdr, without num_buffers.
    let mut bytes = header.to_bytes()[..10].to_vec();
    bytes.extend_from_slice(&frame);
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: send reads `bytes`, valid for its length.
            let n =
                unsafe { libc::send(socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }))
}

fn plain_rx(netns: &Netns, tap: &Tap, size: Size, duration: Duration) -> Result<Rate> {
    let stop = Arc::new(AtomicBool::new(false));
    let sender = start_sender(netns, size, stop.clone())?;
    let mut buf = vec![0u8; VNET_HDR_LEN + 70_000];
    let start = Instant::now();
    let (mut frames, mut bytes) = (0u64, 0u64);
    while start.elapsed() < duration {
        match tap.read(&mut buf) {
            Ok(n) => {
                frames += 1;
                bytes += (n - VNET_HDR_LEN) as u64;
            }
            // Sleep as the worker does, leaving the CPU to the sender.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(tap),
            Err(e) => return Err(e.into()),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    drain(tap);
    Ok(Rate {
        frames,
        bytes,
        seconds,
    })
}

fn wait_readable(tap: &Tap) {
    let mut poll = libc::pollfd {
        fd: tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd we own.
    unsafe { libc::poll(&mut poll, 1, 100) };
}

fn drain(tap: &Tap) {
    let mut buf = vec![0u8; VNET_HDR_LEN + 70_000];
    while tap.read(&mut buf).is_ok() {}
}

fn worker_rx(netns: &Netns, tap: &Tap, size: Size, duration: Duration) -> Result<Rate> {
    let features = (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_TSO4);
    let (_worker, mut device) = start_worker(tap, features)?;
    let buffers: Vec<GuestAddress> = (0..QUEUE_SIZE)
        .map(|_| device.memory.allocate(u64::from(RX_BUFFER), 8))
        .collect::<Result<_, _>>()?;
    let queue = &mut device.queues[0];
    // Which buffer each head (descriptor slot) holds.
    let mut at_head = vec![GuestAddress(0); usize::from(QUEUE_SIZE)];
    for &addr in &buffers {
        let head = queue.post(&[Buffer::writable(addr, RX_BUFFER)])?;
        at_head[usize::from(head)] = addr;
    }
    queue.kick()?;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = start_sender(netns, size, stop.clone())?;
    let start = Instant::now();
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut chains_left_in_frame = 0u16;
    while start.elapsed() < duration {
        let used = match queue.wait_used(1, Duration::from_millis(200)) {
            Ok(used) => used,
            Err(bulkhead_tests::vhost::DriverError::Timeout { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        for element in &used {
            let addr = *at_head
                .get(element.id as usize)
                .context("the device returned an unknown head")?;
            if chains_left_in_frame == 0 {
                let header = device.memory.read(addr, VNET_HDR_LEN)?;
                chains_left_in_frame = u16::from_le_bytes([header[10], header[11]]).max(1);
                frames += 1;
                bytes += u64::from(element.len).saturating_sub(VNET_HDR_LEN as u64);
            } else {
                bytes += u64::from(element.len);
            }
            chains_left_in_frame -= 1;
        }
        // Only after the whole batch is read: a new post may take the slot of an element
        // of this batch not read yet.
        let returned: Vec<GuestAddress> = used.iter().map(|e| at_head[e.id as usize]).collect();
        for addr in returned {
            let head = queue.post(&[Buffer::writable(addr, RX_BUFFER)])?;
            at_head[usize::from(head)] = addr;
        }
        queue.kick()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    drop(device);
    drain(tap);
    Ok(Rate {
        frames,
        bytes,
        seconds,
    })
}
