//! `bulkhead-worker net` driven from userspace: a frontend and split-queue driver in this
//! process play the guest, the worker is a real process, and its TAP lives in a network
//! namespace made for each test with link-local addresses only. The host side of each test
//! is the namespace's kernel: sockets bound to the TAP's address send and receive what
//! the guest's frames carry.
//!
//! Needs root (network namespaces, /dev/net/tun), `ip` (iproute2) and the worker binary:
//! `cargo build -p bulkhead-workers` first (same profile as the tests).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_protocol::{DeviceConfig, NetConfig};
use bulkhead_tests::micro::ScratchDir;
use bulkhead_tests::net::{
    guest_tcp, guest_udp, parse_tcp, parse_udp, Netns, GUEST_IP, GUEST_MAC, HOST_IP, TAP_NAME,
};
use bulkhead_tests::vhost::{
    worker_bin, Buffer, Descriptor, DeviceSetup, SplitQueueDriver, UsedElement, UserspaceDevice,
    UserspaceFrontend, WorkerProcess, DESC_F_NEXT, DESC_F_WRITE,
};
use bulkhead_workers::net::{Tap, VnetHeader, VNET_HDR_LEN};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestAddress;

const TIMEOUT: Duration = Duration::from_secs(10);
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Where the worker finds the TAP the test created, as the VMM would pass it.
const TAP_FD: i32 = 5;
const TX_BUFFER: u64 = 128 << 10;

fn net_config() -> DeviceConfig {
    DeviceConfig::Net(NetConfig {
        tap_fds: vec![TAP_FD],
        mac: GUEST_MAC,
        mtu: Some(1500),
    })
}

/// The host side and a launched worker on its TAP.
struct Lab {
    netns: Netns,
    tap: Arc<Tap>,
    worker: WorkerProcess,
    guest: Guest,
}

impl Lab {
    fn new(features: u64) -> Result<Lab> {
        let netns =
            Netns::new().context("cannot create a network namespace (root and iproute2 needed)")?;
        let tap = netns.host_tap()?;
        let (worker, connection) = launch(&tap)?;
        let guest = Guest::start(connection, features)?;
        Ok(Lab {
            netns,
            tap,
            worker,
            guest,
        })
    }

    /// A UDP socket on the host's address in the namespace.
    fn host_socket(&self, port: u16) -> Result<UdpSocket> {
        let socket = self
            .netns
            .run(|| UdpSocket::bind(SocketAddrV4::new(HOST_IP.into(), port)))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        Ok(socket)
    }

    /// A new worker on the same TAP, given the guest's memory and queues the way the VMM's
    /// supervisor does after a crash: each queue resumes at the used index in guest memory.
    fn replacement(&mut self, features: u64) -> Result<WorkerProcess> {
        let (worker, connection) = launch(&self.tap)?;
        let guest = &self.guest.device;
        let resumed = || -> Result<UserspaceFrontend> {
            let mut frontend = UserspaceFrontend::new(connection, 2);
            frontend
                .negotiate(features, VhostUserProtocolFeatures::REPLY_ACK)
                .context("negotiating")?;
            frontend
                .set_mem_table(&guest.memory)
                .context("SET_MEM_TABLE")?;
            for index in [RX, TX] {
                let queue: &SplitQueueDriver = &guest.queues[index];
                let used_ring = queue.layout().used_ring;
                let bytes = guest.memory.read(GuestAddress(used_ring.0 + 2), 2)?;
                let base = u16::from_le_bytes([bytes[0], bytes[1]]);
                frontend
                    .resume_queue(index, queue, base)
                    .with_context(|| format!("resuming queue {index} at {base}"))?;
            }
            Ok(frontend)
        };
        match resumed() {
            Ok(frontend) => {
                self.guest.device.frontend = frontend;
                Ok(worker)
            }
            Err(e) => bail!(
                "the replacement did not take the queues: {e:#}\nits stderr:\n{}",
                worker.stderr()
            ),
        }
    }

    fn assert_alive(&self) -> Result<()> {
        ensure!(
            self.worker.is_running(),
            "the worker died:\n{}",
            self.worker.stderr()
        );
        ensure!(
            !self.worker.stderr().contains("panicked"),
            "the worker panicked:\n{}",
            self.worker.stderr()
        );
        Ok(())
    }
}

fn launch(tap: &Tap) -> Result<(WorkerProcess, UnixStream)> {
    Ok(WorkerProcess::launched_with(
        "net0",
        net_config(),
        &[(tap.as_raw_fd(), TAP_FD)],
        &[("BULKHEAD_LOG", "bulkhead_workers=debug")],
    )?)
}

/// The guest driver: a receive and a transmit queue over shared memory.
struct Guest {
    device: UserspaceDevice,
    tx_buffer: GuestAddress,
    rx_buffers: HashMap<u16, GuestAddress>,
    rx_used: VecDeque<UsedElement>,
    mergeable: bool,
}

impl Guest {
    fn start(connection: UnixStream, features: u64) -> Result<Guest> {
        let mut setup = DeviceSetup::new(&[QUEUE_SIZE, QUEUE_SIZE]).with_features(features);
        setup.memory_size = 32 << 20;
        setup.protocol_features =
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG;
        let device = UserspaceDevice::start(connection, &setup)?;
        let tx_buffer = device.memory.allocate(TX_BUFFER, 8)?;
        let mergeable = device.negotiated.has(VIRTIO_NET_F_MRG_RXBUF);
        Ok(Guest {
            device,
            tx_buffer,
            rx_buffers: HashMap::new(),
            rx_used: VecDeque::new(),
            mergeable,
        })
    }

    /// Posts `header` + `frame` as one readable buffer and waits for the device to take it.
    fn transmit(&mut self, header: VnetHeader, frame: &[u8]) -> Result<UsedElement> {
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(frame);
        self.transmit_raw(&bytes)
    }

    fn transmit_raw(&mut self, bytes: &[u8]) -> Result<UsedElement> {
        ensure!(bytes.len() as u64 <= TX_BUFFER);
        self.device.memory.write(self.tx_buffer, bytes)?;
        let queue = &mut self.device.queues[TX];
        queue.post(&[Buffer::readable(self.tx_buffer, bytes.len() as u32)])?;
        queue.kick()?;
        let used = queue.wait_used(1, TIMEOUT)?;
        Ok(used[0])
    }

    /// Posts `count` writable buffers of `len` bytes on the receive queue.
    fn post_rx(&mut self, count: usize, len: u32) -> Result<()> {
        for _ in 0..count {
            let addr = self.device.memory.allocate(u64::from(len), 8)?;
            let head = self.device.queues[RX].post(&[Buffer::writable(addr, len)])?;
            self.rx_buffers.insert(head, addr);
        }
        self.device.queues[RX].kick()?;
        Ok(())
    }

    /// Waits for the next received frame: its header and the frame, reassembled from
    /// `num_buffers` chains when buffers are mergeable.
    fn receive(&mut self) -> Result<(VnetHeader, Vec<u8>, usize)> {
        let first = self.next_rx_chain()?;
        ensure!(
            first.len() >= VNET_HDR_LEN,
            "a {}-byte receive chain",
            first.len()
        );
        let mut header_bytes = [0; VNET_HDR_LEN];
        header_bytes.copy_from_slice(&first[..VNET_HDR_LEN]);
        let header = VnetHeader::parse(&header_bytes);
        let mut frame = first[VNET_HDR_LEN..].to_vec();
        let buffers = if self.mergeable {
            usize::from(header.num_buffers)
        } else {
            1
        };
        for _ in 1..buffers {
            frame.extend(self.next_rx_chain()?);
        }
        Ok((header, frame, buffers))
    }

    fn next_rx_chain(&mut self) -> Result<Vec<u8>> {
        if self.rx_used.is_empty() {
            // wait_used may return more than asked for; the rest waits in `rx_used`.
            let used = self.device.queues[RX].wait_used(1, TIMEOUT)?;
            self.rx_used.extend(used);
        }
        let element = self.rx_used.pop_front().context("no used element")?;
        let addr = self
            .rx_buffers
            .remove(&(element.id as u16))
            .context("an unknown receive chain")?;
        Ok(self.device.memory.read(addr, element.len as usize)?)
    }

    /// Receives frames until a TCP segment from `port` arrives: seq, ack, flags, payload.
    fn receive_tcp(&mut self, port: u16) -> Result<(VnetHeader, u32, u32, u8, Vec<u8>)> {
        self.receive_tcp_with_header(port)
    }

    fn receive_tcp_with_header(
        &mut self,
        port: u16,
    ) -> Result<(VnetHeader, u32, u32, u8, Vec<u8>)> {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let (header, frame, _) = self.receive()?;
            self.post_rx(header.num_buffers.max(1).into(), 4096)?;
            if let Some((sport, seq, ack, flags, data)) = parse_tcp(&frame) {
                if sport == port {
                    return Ok((header, seq, ack, flags, data.to_vec()));
                }
            }
        }
        bail!("no TCP segment from port {port}")
    }

    /// Receives frames until a UDP datagram for `port` arrives; returns its payload, the
    /// header and how many buffers it took.
    fn receive_udp(&mut self, port: u16) -> Result<(Vec<u8>, VnetHeader, usize)> {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let (header, frame, buffers) = self.receive()?;
            ensure!(frame[..6] == GUEST_MAC, "a frame not for the guest's MAC");
            if let Some((dport, payload)) = parse_udp(&frame) {
                if dport == port {
                    return Ok((payload.to_vec(), header, buffers));
                }
            }
        }
        bail!("no datagram for port {port}")
    }
}

/// Reads one datagram; None on timeout.
fn recv_datagram(socket: &UdpSocket) -> Result<Option<Vec<u8>>> {
    let mut buf = vec![0; 65536];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(Some(buf[..n].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Ok(None),
            // A signal meant for another thread of the harness: the wait restarts whole,
            // which only ever makes it longer.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn send_to_guest(socket: &UdpSocket, port: u16, payload: &[u8]) -> Result<()> {
    socket.send_to(payload, SocketAddrV4::new(GUEST_IP.into(), port))?;
    Ok(())
}

#[test]
fn guest_udp_datagram_reaches_a_host_socket() -> Result<()> {
    let mut lab = Lab::new(0)?;
    let socket = lab.host_socket(5001)?;
    let used = lab.guest.transmit(
        VnetHeader::default(),
        &guest_udp(4000, 5001, b"hello from the guest", false),
    )?;
    ensure!(used.len == 0, "transmit chains complete with length 0");
    let got = recv_datagram(&socket)?.context("the host never got the datagram")?;
    ensure!(got == b"hello from the guest", "got {got:?}");
    lab.assert_alive()?;
    // The VMM hanging up ends a launched worker cleanly, with its counters in the log.
    let Lab { worker, guest, .. } = lab;
    drop(guest);
    let status = worker.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "{status}:\n{}", worker.stderr());
    wait_stderr(&worker, "sent 1 frames")?;
    Ok(())
}

/// The header and frame may be cut anywhere: here the header spans two descriptors and
/// the second also holds the frame's start.
#[test]
fn a_frame_split_over_descriptors_arrives_whole() -> Result<()> {
    let mut lab = Lab::new(0)?;
    let socket = lab.host_socket(5013)?;
    let mut bytes = VnetHeader::default().to_bytes().to_vec();
    bytes.extend(guest_udp(4000, 5013, &[0x5a; 300], false));
    let memory = lab.guest.device.memory.clone();
    let cuts = [0, 5, 22, bytes.len()];
    let mut buffers = Vec::new();
    for window in cuts.windows(2) {
        let part = &bytes[window[0]..window[1]];
        let addr = memory.allocate(part.len() as u64, 8)?;
        memory.write(addr, part)?;
        buffers.push(Buffer::readable(addr, part.len() as u32));
    }
    let queue = &mut lab.guest.device.queues[TX];
    queue.post(&buffers)?;
    queue.kick()?;
    queue.wait_used(1, TIMEOUT)?;
    let got = recv_datagram(&socket)?.context("nothing arrived")?;
    ensure!(got == [0x5a; 300], "the datagram came out different");
    lab.assert_alive()
}

#[test]
fn host_udp_datagram_arrives_on_the_receive_queue() -> Result<()> {
    let mut lab = Lab::new(0)?;
    let socket = lab.host_socket(5002)?;
    lab.guest.post_rx(8, 2048)?;
    send_to_guest(&socket, 6000, b"hello from the host")?;
    let (payload, header, buffers) = lab.guest.receive_udp(6000)?;
    ensure!(payload == b"hello from the host", "got {payload:?}");
    ensure!(buffers == 1 && header.num_buffers == 1, "{header:?}");
    lab.assert_alive()
}

#[test]
fn a_large_frame_fills_several_mergeable_buffers() -> Result<()> {
    let mut lab = Lab::new(1 << VIRTIO_NET_F_MRG_RXBUF)?;
    ensure!(lab.guest.mergeable, "MRG_RXBUF not offered");
    let socket = lab.host_socket(5003)?;
    // 1 KiB buffers for an 8 KiB datagram (the TAP's MTU is 9000): nine or so chains.
    lab.guest.post_rx(32, 1024)?;
    let payload: Vec<u8> = (0..8000u32).map(|i| (i * 7 % 251) as u8).collect();
    send_to_guest(&socket, 6001, &payload)?;
    let (got, header, buffers) = lab.guest.receive_udp(6001)?;
    ensure!(got == payload, "the datagram came back different");
    ensure!(buffers >= 8, "{buffers} buffers for 8 KiB ({header:?})");
    lab.assert_alive()
}

#[test]
fn a_partial_checksum_is_completed_by_the_host_kernel() -> Result<()> {
    let mut lab = Lab::new(1 << VIRTIO_NET_F_CSUM)?;
    ensure!(lab.guest.device.negotiated.has(VIRTIO_NET_F_CSUM));
    let socket = lab.host_socket(5004)?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let partial = guest_udp(4000, 5004, b"checksum offloaded", true);
    // Without NEEDS_CSUM the half-done checksum is just wrong: the kernel drops it.
    lab.guest.transmit(VnetHeader::default(), &partial)?;
    ensure!(
        recv_datagram(&socket)?.is_none(),
        "a datagram with a wrong checksum was delivered"
    );
    let offloaded = VnetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        csum_start: 34,
        csum_offset: 6,
        ..VnetHeader::default()
    };
    lab.guest.transmit(offloaded, &partial)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    let got = recv_datagram(&socket)?.context("the offloaded datagram never arrived")?;
    ensure!(got == b"checksum offloaded");
    lab.assert_alive()
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// Offloads both ways on a real TCP connection to a host socket: the guest's side is
/// hand-made segments. The guest sends one 20 000-byte TSO frame (a GSO header, a partial
/// checksum), which the host kernel takes apart and delivers whole to the socket; the
/// host's answer reaches the guest as GSO frames larger than one segment, because the
/// guest negotiated GUEST_TSO4 and the worker set the TAP's offloads to match.
#[test]
fn tso_frames_round_trip_through_a_host_tcp_socket() -> Result<()> {
    let features = (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_TSO4)
        | (1 << VIRTIO_NET_F_MRG_RXBUF);
    let mut lab = Lab::new(features)?;
    ensure!(lab.guest.device.negotiated.features & features == features);
    let listener = lab
        .netns
        .run(|| TcpListener::bind(SocketAddrV4::new(HOST_IP.into(), 7000)))?;
    lab.guest.post_rx(128, 4096)?;
    let (sport, dport) = (40000, 7000);
    let mss = [2, 4, 0x05, 0xb4]; // MSS 1460
    let isn = 1000u32;
    lab.guest.transmit(
        VnetHeader::default(),
        &guest_tcp(sport, dport, isn, 0, TCP_SYN, &mss, &[], false),
    )?;
    let (_, host_isn, ack, flags, _) = lab.guest.receive_tcp(dport)?;
    ensure!(flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK && ack == isn + 1);
    let mut host_next = host_isn.wrapping_add(1);
    lab.guest.transmit(
        VnetHeader::default(),
        &guest_tcp(sport, dport, isn + 1, host_next, TCP_ACK, &[], &[], false),
    )?;
    let (mut stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(TIMEOUT))?;

    let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 13 % 253) as u8).collect();
    let tso = VnetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let frame = guest_tcp(
        sport,
        dport,
        isn + 1,
        host_next,
        TCP_ACK | TCP_PSH,
        &[],
        &payload,
        true,
    );
    lab.guest.transmit(tso, &frame)?;
    let mut got = vec![0; payload.len()];
    stream.read_exact(&mut got)?;
    ensure!(got == payload, "the host read different bytes");

    let answer: Vec<u8> = (0..12_000u32).map(|i| (i * 29 % 251) as u8).collect();
    stream.write_all(&answer)?;
    let mut received = Vec::new();
    let mut largest_gso = 0;
    while received.len() < answer.len() {
        let (header, seq, _, flags, data) = lab.guest.receive_tcp_with_header(dport)?;
        if data.is_empty() || flags & TCP_FIN != 0 {
            continue;
        }
        ensure!(
            seq == host_next,
            "out of order: seq {seq}, expected {host_next}"
        );
        if header.gso_type == VIRTIO_NET_HDR_GSO_TCPV4 as u8 {
            largest_gso = largest_gso.max(data.len());
        }
        received.extend_from_slice(&data);
        host_next = host_next.wrapping_add(data.len() as u32);
        lab.guest.transmit(
            VnetHeader::default(),
            &guest_tcp(
                sport,
                dport,
                isn + 1 + payload.len() as u32,
                host_next,
                TCP_ACK,
                &[],
                &[],
                false,
            ),
        )?;
    }
    ensure!(received == answer, "the guest got different bytes");
    ensure!(
        largest_gso > 1460,
        "no GSO frame larger than one segment reached the guest"
    );
    lab.assert_alive()
}

/// Waits for the worker's stderr (read by a thread of this process, so a little behind)
/// to contain `needle`.
fn wait_stderr(worker: &WorkerProcess, needle: &str) -> Result<String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stderr = worker.stderr();
        if stderr.contains(needle) {
            return Ok(stderr);
        }
        if Instant::now() >= deadline {
            bail!("the worker never said {needle:?}:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_transmit_frames_are_dropped_and_counted() -> Result<()> {
    let features = (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4);
    let mut lab = Lab::new(features)?;
    let socket = lab.host_socket(5005)?;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    let frame = guest_udp(4000, 5005, &[0x55; 200], false);
    let tso = |gso_size| VnetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        hdr_len: 54,
        gso_size,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let bad_headers = [
        ("gso_size 0 with a GSO type", tso(0)),
        (
            "checksum beyond the frame",
            VnetHeader {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                // The 2-byte field would end 2 bytes past the 242-byte frame.
                csum_start: 230,
                csum_offset: 12,
                ..VnetHeader::default()
            },
        ),
        (
            "hdr_len beyond the frame",
            VnetHeader {
                hdr_len: 4000,
                ..VnetHeader::default()
            },
        ),
        (
            "unknown GSO type",
            VnetHeader {
                gso_type: 0x42,
                ..VnetHeader::default()
            },
        ),
    ];
    let mut expected = 0;
    for (what, header) in bad_headers {
        lab.guest.transmit(header, &frame).context(what)?;
        expected += 1;
    }
    // Oversized: a header and a 70 000-byte frame.
    lab.guest
        .transmit(VnetHeader::default(), &vec![0xaa; 70_000])
        .context("oversized")?;
    expected += 1;
    // Too short for the header.
    lab.guest.transmit_raw(&[0; 8]).context("short header")?;
    expected += 1;
    // A header and 6 bytes: no Ethernet header.
    lab.guest
        .transmit(VnetHeader::default(), &[0; 6])
        .context("runt frame")?;
    expected += 1;
    // A device-writable buffer in a transmit chain.
    {
        let memory = lab.guest.device.memory.clone();
        let header_at = lab.guest.tx_buffer;
        memory.write(header_at, &VnetHeader::default().to_bytes())?;
        let frame_at = memory.allocate(256, 8)?;
        memory.write(frame_at, &frame)?;
        let queue = &mut lab.guest.device.queues[TX];
        queue.post(&[
            Buffer::readable(header_at, VNET_HDR_LEN as u32),
            Buffer::writable(frame_at, frame.len() as u32),
        ])?;
        queue.kick()?;
        queue.wait_used(1, TIMEOUT).context("writable buffer")?;
        expected += 1;
    }
    ensure!(
        recv_datagram(&socket)?.is_none(),
        "a bad frame reached the host"
    );
    let stderr = wait_stderr(
        &lab.worker,
        &format!("({expected} tx frames dropped so far"),
    )?;
    let dropped = stderr.matches("tx frames dropped so far").count();
    ensure!(
        dropped == expected,
        "{dropped} drops reported, {expected} expected:\n{stderr}"
    );
    // And the device still works.
    socket.set_read_timeout(Some(TIMEOUT))?;
    lab.guest.transmit(VnetHeader::default(), &frame)?;
    ensure!(
        recv_datagram(&socket)?.is_some(),
        "a good frame after the bad ones was lost"
    );
    lab.assert_alive()
}

/// Transmit chains the guest got wrong in their structure rather than their contents: one
/// whose next index loops back onto itself, one whose buffers lie outside guest memory.
/// Each is given back, counted, and the queue carries on.
#[test]
fn malformed_transmit_chains_are_dropped_and_counted() -> Result<()> {
    let mut lab = Lab::new(0)?;
    let socket = lab.host_socket(5012)?;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    let frame = guest_udp(4000, 5012, &[0x66; 100], false);
    let memory = lab.guest.device.memory.clone();
    let addr = memory.allocate(64, 8)?;
    memory.write(addr, &VnetHeader::default().to_bytes())?;
    let queue = &mut lab.guest.device.queues[TX];
    let slots = queue.take_slots(1)?;
    queue.write_descriptor(
        slots[0],
        Descriptor {
            addr: addr.0,
            len: 16,
            flags: DESC_F_NEXT,
            next: slots[0],
        },
    )?;
    queue.offer(slots[0], slots)?;
    queue.post(&[Buffer::readable(GuestAddress(1 << 40), 256)])?;
    queue.kick()?;
    let used = queue.wait_used(2, TIMEOUT).context("the bad chains")?;
    ensure!(used.iter().all(|u| u.len == 0), "{used:?}");
    ensure!(
        recv_datagram(&socket)?.is_none(),
        "a bad chain reached the host"
    );
    let stderr = wait_stderr(&lab.worker, "(2 tx frames dropped so far")?;
    ensure!(
        stderr.contains("does not end") && stderr.contains("not in guest memory"),
        "{stderr}"
    );
    socket.set_read_timeout(Some(TIMEOUT))?;
    lab.guest.transmit(VnetHeader::default(), &frame)?;
    ensure!(
        recv_datagram(&socket)?.is_some(),
        "a good frame after the bad chains was lost"
    );
    lab.assert_alive()
}

#[test]
fn malformed_receive_chains_are_given_back_and_counted() -> Result<()> {
    let mut lab = Lab::new(0)?;
    let socket = lab.host_socket(5006)?;
    // A device-readable "receive" buffer, then a chain whose next index loops.
    let memory = lab.guest.device.memory.clone();
    let addr = memory.allocate(2048, 8)?;
    let queue = &mut lab.guest.device.queues[RX];
    queue.post(&[Buffer::readable(addr, 2048)])?;
    let slots = queue.take_slots(1)?;
    queue.write_descriptor(
        slots[0],
        Descriptor {
            addr: addr.0,
            len: 2048,
            flags: DESC_F_WRITE | DESC_F_NEXT,
            next: slots[0],
        },
    )?;
    queue.offer(slots[0], slots)?;
    queue.kick()?;
    // The host sends; the bad chains go back unused, and the frame waits for a good one.
    send_to_guest(&socket, 6002, b"after the bad chains")?;
    let used = lab.guest.device.queues[RX].wait_used(2, TIMEOUT)?;
    ensure!(used.iter().all(|u| u.len == 0), "{used:?}");
    lab.guest.post_rx(4, 2048)?;
    let (payload, _, _) = lab.guest.receive_udp(6002)?;
    ensure!(payload == b"after the bad chains");
    wait_stderr(&lab.worker, "given back unused")?;
    lab.assert_alive()
}

/// A bad chain in the middle of the buffers a mergeable frame is being spread over: the
/// buffers taken so far go back empty, the frame is dropped, and the next one arrives.
#[test]
fn a_bad_chain_inside_a_mergeable_frame_drops_only_that_frame() -> Result<()> {
    let mut lab = Lab::new(1 << VIRTIO_NET_F_MRG_RXBUF)?;
    let socket = lab.host_socket(5010)?;
    let memory = lab.guest.device.memory.clone();
    let good = memory.allocate(1024, 8)?;
    let bad = memory.allocate(1024, 8)?;
    let queue = &mut lab.guest.device.queues[RX];
    queue.post(&[Buffer::writable(good, 1024)])?;
    queue.post(&[Buffer::readable(bad, 1024)])?;
    queue.kick()?;
    send_to_guest(&socket, 6005, &[7; 3000])?;
    let used = lab.guest.device.queues[RX].wait_used(2, TIMEOUT)?;
    ensure!(used.iter().all(|u| u.len == 0), "{used:?}");
    lab.guest.post_rx(8, 1024)?;
    send_to_guest(&socket, 6005, &[8; 3000])?;
    let (payload, _, buffers) = lab.guest.receive_udp(6005)?;
    ensure!(
        payload == [8; 3000],
        "the frame after the bad chain is wrong"
    );
    ensure!(buffers >= 3, "{buffers} buffers");
    lab.assert_alive()
}

/// Without mergeable buffers a frame larger than the posted chain cannot be delivered:
/// the chain goes back empty, the frame is counted as dropped, and smaller frames go on.
#[test]
fn a_frame_too_large_for_a_single_chain_is_dropped() -> Result<()> {
    let mut lab = Lab::new(0)?;
    let socket = lab.host_socket(5011)?;
    lab.guest.post_rx(1, 1024)?;
    send_to_guest(&socket, 6006, &[1; 1400])?;
    let used = lab.guest.device.queues[RX].wait_used(1, TIMEOUT)?;
    ensure!(used[0].len == 0, "{used:?}");
    lab.guest.rx_buffers.clear();
    wait_stderr(&lab.worker, "rx frame of")?;
    lab.guest.post_rx(4, 1024)?;
    send_to_guest(&socket, 6006, &[2; 200])?;
    let (payload, _, _) = lab.guest.receive_udp(6006)?;
    ensure!(payload == [2; 200]);
    lab.assert_alive()
}

/// The value of `field` in /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|value| value.trim().to_owned())
        .context("no such field")
}

#[test]
fn a_serving_net_worker_is_sandboxed_and_holds_only_its_tap_and_socket() -> Result<()> {
    let mut lab = Lab::new(1 << VIRTIO_NET_F_CSUM)?;
    let socket = lab.host_socket(5012)?;
    lab.guest.transmit(
        VnetHeader::default(),
        &guest_udp(4000, 5012, b"sandboxed", false),
    )?;
    ensure!(recv_datagram(&socket)?.is_some());
    let pid = lab.worker.pid();
    ensure!(proc_status(pid, "Seccomp")? == "2", "no seccomp filter");
    ensure!(
        proc_status(pid, "NoNewPrivs")? == "1",
        "no_new_privs is not set"
    );
    let targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .collect();
    ensure!(
        targets.iter().filter(|t| *t == "/dev/net/tun").count() == 1,
        "the TAP is not held exactly once: {targets:?}"
    );
    ensure!(
        !targets.iter().any(|t| t.contains("bulkhead-worker-launch")),
        "the launch memfd is still open: {targets:?}"
    );
    lab.assert_alive()
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .context("odd /proc stat")?
        .1
        .split(' ')
        .collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// The CPU time `worker` uses over 700 ms in which it should only wait: a spinning thread
/// would burn ~70 ticks at 100 Hz, a waiting one next to none.
fn idle_ticks(worker: &WorkerProcess) -> Result<u64> {
    let before = cpu_ticks(worker.pid())?;
    std::thread::sleep(Duration::from_millis(700));
    Ok(cpu_ticks(worker.pid())? - before)
}

#[test]
fn without_receive_buffers_the_worker_waits_and_loses_nothing() -> Result<()> {
    let mut lab = Lab::new(0)?;
    let socket = lab.host_socket(5007)?;
    for i in 0..5u8 {
        send_to_guest(&socket, 6003, &[i; 100])?;
    }
    let spent = idle_ticks(&lab.worker)?;
    ensure!(
        spent <= 10,
        "the worker used {spent} ticks waiting for buffers"
    );
    lab.guest.post_rx(16, 2048)?;
    for i in 0..5u8 {
        let (payload, _, _) = lab.guest.receive_udp(6003)?;
        ensure!(payload == [i; 100], "datagram {i} missing or out of order");
    }
    lab.assert_alive()
}

/// Mergeable buffers, but fewer posted than the waiting frame needs: the worker asks for a
/// kick and waits, neither spinning on the ring nor holding the device from the frontend,
/// and delivers the frame whole once the guest posts enough.
#[test]
fn with_too_few_buffers_for_a_frame_the_worker_waits_for_more() -> Result<()> {
    for features in [
        1 << VIRTIO_NET_F_MRG_RXBUF,
        (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_RING_F_EVENT_IDX),
    ] {
        let mut lab = Lab::new(features)?;
        let socket = lab.host_socket(5010)?;
        // A 1000-byte datagram with its headers needs five of these.
        lab.guest.post_rx(2, 256)?;
        send_to_guest(&socket, 6006, &[7; 1000])?;
        let spent = idle_ticks(&lab.worker)?;
        ensure!(
            spent <= 10,
            "features {features:#x}: the worker used {spent} ticks waiting for buffers"
        );
        // The frontend still gets answers while the frame waits.
        lab.guest
            .device
            .frontend
            .inner()
            .get_config(0, 6, VhostUserConfigFlags::empty(), &[0; 6])
            .context("GET_CONFIG while a frame waits for buffers")?;
        lab.guest.post_rx(1, 256)?;
        std::thread::sleep(Duration::from_millis(200));
        lab.guest.post_rx(8, 256)?;
        let (payload, _, buffers) = lab.guest.receive_udp(6006)?;
        ensure!(
            payload == [7; 1000] && buffers == 5,
            "features {features:#x}: {} bytes in {buffers} buffers",
            payload.len()
        );
        lab.assert_alive()?;
    }
    Ok(())
}

/// Kill -9 mid-traffic, as a crash would; a replacement worker on the same TAP descriptor
/// resumes both rings at the used index the guest sees, and traffic goes on both ways.
#[test]
fn a_killed_worker_is_replaced_and_traffic_resumes() -> Result<()> {
    let features = 1 << VIRTIO_RING_F_EVENT_IDX;
    let mut lab = Lab::new(features)?;
    let socket = lab.host_socket(5008)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    lab.guest.post_rx(64, 2048)?;
    let mut host_got = 0;
    let mut replaced = None;
    for i in 0..40u32 {
        let payload = i.to_be_bytes();
        lab.guest.transmit(
            VnetHeader::default(),
            &guest_udp(4000, 5008, &payload, false),
        )?;
        if i == 20 {
            lab.worker.kill()?;
            replaced = Some(lab.replacement(features)?);
        }
        if let Some(datagram) = recv_datagram(&socket)? {
            ensure!(datagram.len() == 4);
            host_got += 1;
        }
    }
    let worker = replaced.context("never replaced")?;
    lab.worker = worker;
    // Frames lost in the crash are the guest's to retransmit; most must have arrived,
    // including ones sent after the restart.
    ensure!(
        host_got >= 35,
        "the host got only {host_got} of 40 datagrams"
    );
    send_to_guest(&socket, 6004, b"after the restart")?;
    let (payload, _, _) = lab.guest.receive_udp(6004)?;
    ensure!(payload == b"after the restart");
    lab.assert_alive()
}

/// Receive buffers followed by guard bytes, and guest memory the device must never write.
struct Canaries {
    /// (address, length) of each region that must still hold [`Canaries::BYTE`].
    regions: Vec<(GuestAddress, usize)>,
}

impl Canaries {
    const BYTE: u8 = 0xa5;
    const GUARD: u32 = 64;

    fn fill(&mut self, guest: &Guest, addr: GuestAddress, len: usize) -> Result<()> {
        guest.device.memory.write(addr, &vec![Self::BYTE; len])?;
        self.regions.push((addr, len));
        Ok(())
    }

    /// Posts `count` receive buffers of `len` bytes, each followed by a guard.
    fn post_rx(&mut self, guest: &mut Guest, count: usize, len: u32) -> Result<()> {
        for _ in 0..count {
            let addr = guest
                .device
                .memory
                .allocate(u64::from(len + Self::GUARD), 8)?;
            self.fill(
                guest,
                GuestAddress(addr.0 + u64::from(len)),
                Self::GUARD as usize,
            )?;
            let head = guest.device.queues[RX].post(&[Buffer::writable(addr, len)])?;
            guest.rx_buffers.insert(head, addr);
        }
        guest.device.queues[RX].kick()?;
        Ok(())
    }

    /// The regions some write reached, with the first changed offset in each.
    fn trampled(&self, guest: &Guest) -> Result<Vec<String>> {
        let mut trampled = Vec::new();
        for &(addr, len) in &self.regions {
            let bytes = guest.device.memory.read(addr, len)?;
            if let Some(at) = bytes.iter().position(|&b| b != Self::BYTE) {
                trampled.push(format!("{len} bytes at {:#x}: changed at +{at}", addr.0));
            }
        }
        Ok(trampled)
    }
}

/// A worker killed while frames pour in, and its replacement, write guest memory only
/// where the guest lets them: the receive buffers it still offers. Buffers the dead worker
/// had completed are the guest's again (it reuses them for its own data here), the bytes
/// after every buffer are guards, and a megabyte of memory is never offered at all; all
/// of it must keep its canary bytes. A device that wrote a buffer it had given back would
/// corrupt whatever the guest keeps there now - in a kernel, anything up to its page tables.
#[test]
fn across_a_kill_the_worker_writes_only_buffers_the_guest_still_offers() -> Result<()> {
    // A 1000-byte datagram fills two of these buffers (mergeable), so frames straddle them.
    const BUFFER: u32 = 512;
    let features = (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_RING_F_EVENT_IDX);
    let mut lab = Lab::new(features)?;
    let socket = lab.host_socket(5009)?;
    let mut canaries = Canaries {
        regions: Vec::new(),
    };
    let untouched = lab.guest.device.memory.allocate(1 << 20, 4096)?;
    canaries.fill(&lab.guest, untouched, 1 << 20)?;
    canaries.post_rx(&mut lab.guest, 200, BUFFER)?;

    let datagram = |tag: u8, i: u8| [vec![tag, i], vec![i; 998]].concat();
    // Some frames completed, then the kill in the middle of a burst.
    for i in 0..20 {
        send_to_guest(&socket, 6005, &datagram(0, i))?;
    }
    let used_idx = GuestAddress(lab.guest.device.queues[RX].layout().used_ring.0 + 2);
    let deadline = Instant::now() + TIMEOUT;
    while lab.guest.device.memory.read(used_idx, 2)? == [0, 0] {
        ensure!(Instant::now() < deadline, "the worker completed no frame");
        std::thread::sleep(Duration::from_millis(10));
    }
    for i in 20..150 {
        send_to_guest(&socket, 6005, &datagram(0, i))?;
        if i == 30 {
            lab.worker.kill()?;
        }
    }
    // What the dead worker completed: the guest takes those buffers back for itself.
    let completed = lab.guest.device.queues[RX].collect_used()?;
    for element in &completed {
        let addr = lab
            .guest
            .rx_buffers
            .remove(&(element.id as u16))
            .context("an unknown receive chain")?;
        canaries.fill(&lab.guest, addr, BUFFER as usize)?;
    }

    // and posts fresh ones, as a driver refills its ring.
    canaries.post_rx(&mut lab.guest, completed.len(), BUFFER)?;
    lab.worker = lab.replacement(features)?;
    for i in 0..20 {
        send_to_guest(&socket, 6005, &datagram(1, i))?;
    }
    // The replacement delivers what the TAP still held, then the new datagrams; the
    // guest keeps offering fresh (guarded) buffers as it takes frames - once it has read
    // every completion it collected, as the driver frees a chain's descriptors when it
    // collects it and a head posted again before it is read would be two buffers at once.
    let mut after = Vec::new();
    let mut owed = 0;
    let deadline = Instant::now() + TIMEOUT;
    while after.len() < 20 && Instant::now() < deadline {
        let (_, frame, buffers) = lab.guest.receive()?;
        owed += buffers;
        if lab.guest.rx_used.is_empty() {
            canaries.post_rx(&mut lab.guest, std::mem::take(&mut owed), BUFFER)?;
        }
        let Some((6005, payload)) = parse_udp(&frame) else {
            continue;
        };
        if payload.first() == Some(&1) {
            ensure!(
                payload.len() == 1000 && payload[2..].iter().all(|&b| b == payload[1]),
                "datagram {} arrived damaged",
                payload.get(1).copied().unwrap_or_default()
            );
            after.push(payload[1]);
        }
    }
    ensure!(
        after == (0..20).collect::<Vec<u8>>(),
        "after the restart the guest got {after:?}, not datagrams 0 to 19 in order"
    );
    let trampled = canaries.trampled(&lab.guest)?;
    ensure!(
        trampled.is_empty(),
        "the workers wrote guest memory the guest had not offered ({} of {} completed \
         buffers reclaimed):\n{}",
        trampled.len(),
        completed.len(),
        trampled.join("\n")
    );
    lab.assert_alive()
}

#[test]
fn standalone_worker_creates_its_tap_and_reports_its_mac() -> Result<()> {
    let netns = Netns::new()?;
    let scratch = ScratchDir::new("net")?;
    let socket_path = scratch.path().join("net.sock");
    let mut command = netns.command(&worker_bin());
    command.args(["net", "--socket"]).arg(&socket_path).args([
        "--tap",
        TAP_NAME,
        "--mac",
        "52:54:00:12:34:56",
    ]);
    let worker = WorkerProcess::listening_command(command, socket_path.clone())?;
    netns.configure_tap()?;
    let features = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);
    let mut guest = Guest::start(worker.connect()?, features)?;
    ensure!(guest.device.negotiated.has(VIRTIO_NET_F_MAC));
    let (_, config) =
        guest
            .device
            .frontend
            .inner()
            .get_config(0, 10, VhostUserConfigFlags::empty(), &[0; 10])?;
    ensure!(
        config[..6] == GUEST_MAC,
        "config space mac {:?}",
        &config[..6]
    );
    ensure!(
        config[6..8] == [1, 0],
        "link is not up: {:?}",
        &config[6..8]
    );
    ensure!(
        config[8..10] == [1, 0],
        "max_virtqueue_pairs {:?}",
        &config[8..10]
    );
    let socket = netns.run(|| UdpSocket::bind(SocketAddrV4::new(HOST_IP.into(), 5009)))?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    guest.transmit(
        VnetHeader::default(),
        &guest_udp(4000, 5009, b"standalone", false),
    )?;
    ensure!(recv_datagram(&socket)?.as_deref() == Some(&b"standalone"[..]));
    ensure!(worker.is_running(), "{}", worker.stderr());
    Ok(())
}

#[test]
fn a_busy_tap_is_a_clear_error() -> Result<()> {
    let netns = Netns::new()?;
    let _held = netns.host_tap()?;
    let output = netns
        .command(&worker_bin())
        .args([
            "net",
            "--socket",
            "/nonexistent/net.sock",
            "--tap",
            TAP_NAME,
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(1),
        "{}: {stderr}",
        output.status
    );
    ensure!(
        stderr.starts_with("error: ") && stderr.contains("busy"),
        "unexpected report: {stderr}"
    );
    Ok(())
}

#[test]
fn a_launch_descriptor_that_is_no_tap_is_refused() -> Result<()> {
    let file = std::fs::File::open("/dev/null")?;
    let (worker, _connection) =
        WorkerProcess::launched_with("net0", net_config(), &[(file.as_raw_fd(), TAP_FD)], &[])?;
    let status = worker.wait_exit(TIMEOUT)?;
    ensure!(status.code() == Some(1), "{status}");
    wait_stderr(&worker, "is not a TAP")?;
    Ok(())
}
