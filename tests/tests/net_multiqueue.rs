//! `bulkhead-worker net` with two queue pairs on a multiqueue TAP, driven from userspace
//! as in net_worker.rs: a control queue, VQ_PAIRS_SET, frames on both transmit queues,
//! and the host's flows spread over the receive queues the guest enabled - and only those.
//!
//! Needs root (network namespaces, /dev/net/tun), `ip` (iproute2) and the worker binary.

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_protocol::{DeviceConfig, NetConfig};
use bulkhead_tests::net::{guest_udp, parse_udp, Netns, GUEST_IP, GUEST_MAC, HOST_IP};
use bulkhead_tests::vhost::{
    Buffer, DeviceSetup, SplitQueueDriver, UserspaceDevice, UserspaceFrontend, WorkerProcess,
};
use bulkhead_workers::net::{Tap, VnetHeader, VNET_HDR_LEN};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_ERR, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ,
    VIRTIO_NET_OK,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestAddress;

const TIMEOUT: Duration = Duration::from_secs(10);
const QUEUE_SIZE: u16 = 256;
const PAIRS: usize = 2;
/// rx0, tx0, rx1, tx1, control.
const CONTROL: usize = 2 * PAIRS;
/// Where the worker finds the TAP's queues, as the VMM would pass them.
const TAP_FDS: [i32; PAIRS] = [5, 6];
/// Distinct flows the host sends: enough that a TAP hashing them over two queues puts
/// some on each (all on one: 2 * 2^-FLOWS).
const FLOWS: u16 = 32;
const HOST_PORT: u16 = 5100;
const FIRST_GUEST_PORT: u16 = 7000;

struct Lab {
    netns: Netns,
    taps: Vec<Arc<Tap>>,
    worker: WorkerProcess,
    device: UserspaceDevice,
    /// Receive buffers in flight, by (queue, head).
    rx_buffers: HashMap<(usize, u16), GuestAddress>,
    scratch: GuestAddress,
}

fn launch(taps: &[Arc<Tap>]) -> Result<(WorkerProcess, std::os::unix::net::UnixStream)> {
    let inherit: Vec<_> = taps
        .iter()
        .zip(TAP_FDS)
        .map(|(tap, fd)| (tap.as_raw_fd(), fd))
        .collect();
    Ok(WorkerProcess::launched_with(
        "net0",
        DeviceConfig::Net(NetConfig {
            tap_fds: TAP_FDS.to_vec(),
            mac: GUEST_MAC,
            mtu: Some(1500),
        }),
        &inherit,
        &[("BULKHEAD_LOG", "bulkhead_workers=debug")],
    )?)
}

impl Lab {
    fn new(features: u64) -> Result<Lab> {
        let netns =
            Netns::new().context("cannot create a network namespace (root and iproute2 needed)")?;
        let taps = netns.host_tap_queues(PAIRS)?;
        let (worker, connection) = launch(&taps)?;
        let mut setup = DeviceSetup::new(&[QUEUE_SIZE; 2 * PAIRS + 1]).with_features(features);
        setup.memory_size = 32 << 20;
        setup.protocol_features =
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG;
        let device = UserspaceDevice::start(connection, &setup)?;
        let scratch = device.memory.allocate(64 << 10, 8)?;
        Ok(Lab {
            netns,
            taps,
            worker,
            device,
            rx_buffers: HashMap::new(),
            scratch,
        })
    }

    fn assert_alive(&self) -> Result<()> {
        ensure!(
            self.worker.is_running() && !self.worker.stderr().contains("panicked"),
            "the worker died or panicked:\n{}",
            self.worker.stderr()
        );
        Ok(())
    }

    fn host_socket(&self) -> Result<UdpSocket> {
        let socket = self
            .netns
            .run(|| UdpSocket::bind(SocketAddrV4::new(HOST_IP.into(), HOST_PORT)))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        Ok(socket)
    }

    /// Sends one UDP frame on transmit queue `queue`.
    fn transmit(&mut self, queue: usize, sport: u16, payload: &[u8]) -> Result<()> {
        let mut bytes = VnetHeader::default().to_bytes().to_vec();
        bytes.extend(guest_udp(sport, HOST_PORT, payload, false));
        let addr = self.device.memory.allocate(bytes.len() as u64, 8)?;
        self.device.memory.write(addr, &bytes)?;
        let ring = &mut self.device.queues[queue];
        ring.post(&[Buffer::readable(addr, bytes.len() as u32)])?;
        ring.kick()?;
        ring.wait_used(1, TIMEOUT)?;
        Ok(())
    }

    fn post_rx(&mut self, queue: usize, count: usize) -> Result<()> {
        for _ in 0..count {
            let addr = self.device.memory.allocate(2048, 8)?;
            let head = self.device.queues[queue].post(&[Buffer::writable(addr, 2048)])?;
            self.rx_buffers.insert((queue, head), addr);
        }
        self.device.queues[queue].kick()?;
        Ok(())
    }

    /// The guest ports of the datagrams from the host that receive queue `queue` got
    /// within `wait`; its buffers are posted again.
    fn received_ports(&mut self, queue: usize, wait: Duration) -> Result<BTreeSet<u16>> {
        let used = self.device.queues[queue].used_during(wait)?;
        let mut ports = BTreeSet::new();
        for element in &used {
            let addr = self
                .rx_buffers
                .remove(&(queue, element.id as u16))
                .context("an unknown receive chain")?;
            let bytes = self.device.memory.read(addr, element.len as usize)?;
            ensure!(bytes.len() > VNET_HDR_LEN, "a {}-byte chain", bytes.len());
            if let Some((dport, payload)) = parse_udp(&bytes[VNET_HDR_LEN..]) {
                if payload == b"flow" {
                    ensure!(ports.insert(dport), "port {dport} arrived twice");
                }
            }
        }
        self.post_rx(queue, used.len())?;
        Ok(ports)
    }

    /// Sends one datagram to each of the guest's FLOWS ports and returns which receive
    /// queue (0 or 1) got which ports; every datagram must arrive, once.
    fn spread(&mut self, socket: &UdpSocket) -> Result<[BTreeSet<u16>; PAIRS]> {
        for port in FIRST_GUEST_PORT..FIRST_GUEST_PORT + FLOWS {
            socket.send_to(b"flow", SocketAddrV4::new(GUEST_IP.into(), port))?;
        }
        let mut got: [BTreeSet<u16>; PAIRS] = Default::default();
        let deadline = Instant::now() + TIMEOUT;
        while got.iter().map(BTreeSet::len).sum::<usize>() < usize::from(FLOWS) {
            if Instant::now() > deadline {
                bail!("not every flow arrived: {got:?}");
            }
            for (pair, ports) in got.iter_mut().enumerate() {
                let more = self.received_ports(2 * pair, Duration::from_millis(50))?;
                ensure!(
                    ports.is_disjoint(&more),
                    "a datagram arrived twice: {more:?}"
                );
                ports.extend(more);
            }
        }
        Ok(got)
    }

    /// Sends a control command of `readable` parts (class, command, data) with a status
    /// byte after it unless `status` is false; returns the used length and the status.
    fn control(&mut self, parts: &[&[u8]], status: bool) -> Result<(u32, u8)> {
        let memory = self.device.memory.clone();
        let mut buffers = Vec::new();
        let mut at = self.scratch;
        for part in parts {
            memory.write(at, part)?;
            buffers.push(Buffer::readable(at, part.len() as u32));
            at = GuestAddress(at.0 + 64);
        }
        let status_addr = at;
        memory.write(status_addr, &[0xee])?;
        if status {
            buffers.push(Buffer::writable(status_addr, 1));
        }
        let ring = &mut self.device.queues[CONTROL];
        ring.post(&buffers)?;
        ring.kick()?;
        let used = ring.wait_used(1, TIMEOUT)?;
        Ok((used[0].len, memory.read(status_addr, 1)?[0]))
    }

    fn set_pairs(&mut self, pairs: u16) -> Result<u8> {
        let (len, status) = self.control(
            &[
                &[
                    VIRTIO_NET_CTRL_MQ as u8,
                    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                ],
                &pairs.to_le_bytes(),
            ],
            true,
        )?;
        ensure!(len == 1, "VQ_PAIRS_SET completed with length {len}");
        Ok(status)
    }
}

/// One worker, checked end to end: what it offers, both transmit queues, the receive
/// spread before and after VQ_PAIRS_SET (and back), and every bad control message.
#[test]
fn two_queue_pairs_spread_flows_over_the_enabled_receive_queues() -> Result<()> {
    let mut lab = Lab::new((1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ))?;
    ensure!(
        lab.device.negotiated.has(VIRTIO_NET_F_MQ)
            && lab.device.negotiated.has(VIRTIO_NET_F_CTRL_VQ),
        "MQ and CTRL_VQ are not both offered: {:#x}",
        lab.device.negotiated.features
    );
    let (_, config) =
        lab.device
            .frontend
            .inner()
            .get_config(0, 10, VhostUserConfigFlags::empty(), &[0; 10])?;
    ensure!(
        config[8..10] == [PAIRS as u8, 0],
        "max_virtqueue_pairs {:?}",
        &config[8..10]
    );

    // Both transmit queues reach the TAP, whatever pairs are enabled.
    let socket = lab.host_socket()?;
    lab.transmit(1, 4001, b"on tx0")?;
    lab.transmit(3, 4003, b"on tx1")?;
    let mut got = BTreeSet::new();
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        let (n, from) = socket.recv_from(&mut buf)?;
        got.insert((from.port(), buf[..n].to_vec()));
    }
    ensure!(
        got == BTreeSet::from([(4001, b"on tx0".to_vec()), (4003, b"on tx1".to_vec())]),
        "{got:?}"
    );

    lab.post_rx(0, 64)?;
    lab.post_rx(2, 64)?;
    // One pair until the guest says otherwise: the TAP's second queue feeds receive
    // queue 0 too, so no flow is stuck there.
    let [first, second] = lab.spread(&socket)?;
    ensure!(
        second.is_empty(),
        "receive queue 1 got {second:?} before VQ_PAIRS_SET"
    );
    ensure!(first.len() == usize::from(FLOWS));

    ensure!(
        lab.set_pairs(2)? == VIRTIO_NET_OK as u8,
        "VQ_PAIRS_SET 2 refused"
    );
    let [first, second] = lab.spread(&socket)?;
    ensure!(
        !first.is_empty() && !second.is_empty(),
        "two pairs enabled, yet flows arrived only on one: {first:?} / {second:?}"
    );

    // Bad commands are answered VIRTIO_NET_ERR.
    for pairs in [0, 3, u16::MAX] {
        ensure!(
            lab.set_pairs(pairs)? == VIRTIO_NET_ERR as u8,
            "VQ_PAIRS_SET {pairs} accepted"
        );
    }
    let promisc = [VIRTIO_NET_CTRL_RX as u8, VIRTIO_NET_CTRL_RX_PROMISC as u8];
    let mq = [
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
    ];
    for (what, parts) in [
        ("an unsupported class", vec![&promisc[..], &[1][..]]),
        ("VQ_PAIRS_SET with 1 byte of data", vec![&mq[..], &[1][..]]),
        (
            "VQ_PAIRS_SET in one buffer",
            vec![&[mq[0], mq[1], 9, 9][..]],
        ),
    ] {
        let (len, status) = lab.control(&parts, true)?;
        ensure!(
            len == 1 && status == VIRTIO_NET_ERR as u8,
            "{what}: length {len}, status {status}"
        );
    }
    // Malformed chains come back unanswered.
    for (what, parts, status) in [
        ("no status byte", vec![&mq[..], &[1, 0][..]], false),
        ("no command", vec![], true),
        ("half a command", vec![&mq[..1]], true),
    ] {
        let (len, byte) = lab.control(&parts, status)?;
        ensure!(
            len == 0 && byte == 0xee,
            "{what}: length {len}, status byte {byte:#x}"
        );
    }
    // A readable buffer after the status.
    let memory = lab.device.memory.clone();
    memory.write(lab.scratch, &mq)?;
    let ring = &mut lab.device.queues[CONTROL];
    ring.post(&[
        Buffer::readable(lab.scratch, 2),
        Buffer::writable(GuestAddress(lab.scratch.0 + 64), 1),
        Buffer::readable(GuestAddress(lab.scratch.0 + 128), 2),
    ])?;
    ring.kick()?;
    let used = ring.wait_used(1, TIMEOUT)?;
    ensure!(used[0].len == 0, "readable after the status: {used:?}");
    lab.assert_alive()?;

    // The refused VQ_PAIRS_SETs changed nothing; back to one pair, one queue gets all.
    let [_, second] = lab.spread(&socket)?;
    ensure!(!second.is_empty(), "still two pairs: queue 1 must get some");
    ensure!(
        lab.set_pairs(1)? == VIRTIO_NET_OK as u8,
        "VQ_PAIRS_SET 1 refused"
    );
    let [_, second] = lab.spread(&socket)?;
    ensure!(second.is_empty(), "one pair, yet queue 1 got {second:?}");

    let Lab { worker, device, .. } = lab;
    drop(device);
    let status = worker.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "{status}:\n{}", worker.stderr());
    let stderr = worker.stderr();
    ensure!(
        stderr.contains("(2 queues)")
            && stderr.contains("6 control commands refused, 4 bad control chains"),
        "counters:\n{stderr}"
    );
    Ok(())
}

/// A guest that does not take VIRTIO_NET_F_MQ drives one pair, and gets every flow on
/// it: both TAP queues feed its receive queue.
#[test]
fn without_mq_every_flow_arrives_on_the_first_pair() -> Result<()> {
    let mut lab = Lab::new(0)?;
    ensure!(!lab.device.negotiated.has(VIRTIO_NET_F_MQ));
    let socket = lab.host_socket()?;
    lab.post_rx(0, 64)?;
    lab.post_rx(2, 64)?;
    let [first, second] = lab.spread(&socket)?;
    ensure!(second.is_empty() && first.len() == usize::from(FLOWS));
    lab.transmit(1, 4001, b"tx0")?;
    let mut buf = [0u8; 16];
    let n = socket.recv(&mut buf)?;
    ensure!(&buf[..n] == b"tx0");
    lab.assert_alive()
}

/// A killed worker is replaced as the VMM does it (rings resumed at the used index, every
/// queue kicked); the new one starts from one pair, and every flow still arrives.
#[test]
fn a_replaced_worker_serves_both_pairs_again() -> Result<()> {
    let features =
        (1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_RING_F_EVENT_IDX);
    let mut lab = Lab::new(features)?;
    let socket = lab.host_socket()?;
    lab.post_rx(0, 64)?;
    lab.post_rx(2, 64)?;
    ensure!(lab.set_pairs(2)? == VIRTIO_NET_OK as u8);
    lab.spread(&socket)?;
    lab.worker.kill()?;
    let (worker, connection) = launch(&lab.taps)?;
    lab.worker = worker;
    let mut frontend = UserspaceFrontend::new(connection, 2 * PAIRS + 1);
    frontend.negotiate(features, VhostUserProtocolFeatures::REPLY_ACK)?;
    frontend.set_mem_table(&lab.device.memory)?;
    for index in 0..=CONTROL {
        let queue: &SplitQueueDriver = &lab.device.queues[index];
        let used_ring = queue.layout().used_ring;
        let bytes = lab.device.memory.read(GuestAddress(used_ring.0 + 2), 2)?;
        frontend.resume_queue(index, queue, u16::from_le_bytes([bytes[0], bytes[1]]))?;
    }
    lab.device.frontend = frontend;
    for queue in &lab.device.queues {
        queue.kick()?;
    }
    for round in 0..3 {
        let [first, second] = lab.spread(&socket)?;
        ensure!(
            second.is_empty() && first.len() == usize::from(FLOWS),
            "round {round}: {first:?} / {second:?}"
        );
        lab.transmit(1, 4001, b"tx0")?;
        lab.transmit(3, 4003, b"tx1")?;
        let mut buf = [0u8; 16];
        for _ in 0..2 {
            socket.recv(&mut buf)?;
        }
    }
    ensure!(lab.set_pairs(2)? == VIRTIO_NET_OK as u8);
    let [first, second] = lab.spread(&socket)?;
    ensure!(!first.is_empty() && !second.is_empty());
    lab.assert_alive()
}
