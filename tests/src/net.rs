//! Network test machinery: a network namespace per test, a TAP inside it configured with
//! link-local addresses only, and the frames tests send and parse.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bulkhead_workers::net::Tap;

/// The guest's end: MAC and link-local address.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const GUEST_IP: [u8; 4] = [169, 254, 77, 2];
/// The host's end of the TAP.
pub const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const HOST_IP: [u8; 4] = [169, 254, 77, 1];
pub const TAP_NAME: &str = "bhtap0";
/// Large enough for the mergeable-buffer tests' single big frames.
pub const TAP_MTU: u16 = 9000;

/// A network namespace made for one test, deleted when dropped.
pub struct Netns {
    name: String,
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip_text(ip: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
}

fn run(command: &mut Command) -> io::Result<()> {
    let output = command.output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{command:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

impl Netns {
    /// `ip netns add bh-test-<pid>-<n>`: unique per process and test, so tests run in
    /// parallel and a crashed run's leftovers do not collide with the next run's.
    pub fn new() -> io::Result<Netns> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "bh-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Netns { name };
        // No IPv6: its router solicitations and MLD reports would be unasked-for frames.
        netns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        netns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip netns exec NAME ARGS...`
    pub fn exec(&self, args: &[&str]) -> io::Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// The command `args` run inside the namespace (`ip netns exec`, which execs it: the
    /// child's pid is the program's own).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `f` on a thread that has joined the namespace: sockets and TAPs it creates
    /// belong there, and stay there when used from other threads.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> io::Result<R> + Send) -> io::Result<R> {
        let handle = File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a namespace descriptor we hold; it changes only this
                    // thread's network namespace, and the thread ends after `f`.
                    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    f()
                })
                .join()
                .map_err(|_| io::Error::other("the namespace thread panicked"))?
        })
    }

    /// Creates TAP [`TAP_NAME`] in the namespace (this process holds it, as the VMM
    /// would), up, with [`HOST_IP`]/16 and a permanent neighbour entry for the guest.
    pub fn host_tap(&self) -> io::Result<Arc<Tap>> {
        let tap = self.run(|| Tap::open(TAP_NAME, false).map_err(io::Error::other))?;
        self.configure_tap()?;
        Ok(Arc::new(tap))
    }

    /// [`host_tap`](Self::host_tap) with `queues` queues (IFF_MULTI_QUEUE), one
    /// descriptor each, as the VMM opens them for `queues=N`.
    pub fn host_tap_queues(&self, queues: usize) -> io::Result<Vec<Arc<Tap>>> {
        let taps = self.run(|| {
            (0..queues)
                .map(|_| Tap::open(TAP_NAME, true).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()
                .map_err(io::Error::other)
        })?;
        self.configure_tap()?;
        Ok(taps)
    }

    /// Addresses the TAP a standalone worker created in the namespace.
    pub fn configure_tap(&self) -> io::Result<()> {
        let mtu = TAP_MTU.to_string();
        self.ip(&[
            "link",
            "set",
            TAP_NAME,
            "address",
            &mac_text(HOST_MAC),
            "mtu",
            &mtu,
            "up",
        ])?;
        self.ip(&[
            "addr",
            "add",
            &format!("{}/16", ip_text(HOST_IP)),
            "dev",
            TAP_NAME,
        ])?;
        self.ip(&[
            "neigh",
            "add",
            &ip_text(GUEST_IP),
            "lladdr",
            &mac_text(GUEST_MAC),
            "dev",
            TAP_NAME,
            "nud",
            "permanent",
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The Internet checksum of `data`, starting from `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The unfolded sum of the IPv4 pseudo-header.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for pair in src.chunks(2).chain(dst.chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum + u32::from(protocol) + len as u32
}

/// Ethernet + IPv4 header (no options) for an `l4_len`-byte payload of `protocol`.
pub fn eth_ipv4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    l4_len: usize,
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(34 + l4_len);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4_len) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let sum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame
}

/// A UDP datagram from the guest to the host, checksummed unless `partial`, which leaves
/// only the pseudo-header sum in the checksum field, as a driver offloading it does.
pub fn guest_udp(sport: u16, dport: u16, payload: &[u8], partial: bool) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut frame = eth_ipv4(GUEST_MAC, HOST_MAC, GUEST_IP, HOST_IP, 17, udp_len);
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = pseudo_header_sum(GUEST_IP, HOST_IP, 17, udp_len);
    let sum = if partial {
        // The folded, uncomplemented pseudo-header sum.
        !checksum(&[], pseudo)
    } else {
        match checksum(&udp, pseudo) {
            0 => 0xffff,
            sum => sum,
        }
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&udp);
    frame
}

/// The destination port and payload of a UDP/IPv4 frame to the guest.
pub fn parse_udp(frame: &[u8]) -> Option<(u16, &[u8])> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = frame.get(14 + ihl..)?;
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    Some((dport, udp.get(8..len)?))
}

/// A TCP segment from the guest to the host (header without options unless `options`),
/// checksummed, or with only the pseudo-header sum when `partial`.
#[allow(clippy::too_many_arguments)]
pub fn guest_tcp(
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
    payload: &[u8],
    partial: bool,
) -> Vec<u8> {
    let header_len = 20 + options.len();
    let tcp_len = header_len + payload.len();
    let mut frame = eth_ipv4(GUEST_MAC, HOST_MAC, GUEST_IP, HOST_IP, 6, tcp_len);
    let mut tcp = Vec::with_capacity(tcp_len);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(((header_len / 4) as u8) << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&0xffffu16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(options);
    tcp.extend_from_slice(payload);
    let pseudo = pseudo_header_sum(GUEST_IP, HOST_IP, 6, tcp_len);
    let sum = if partial {
        !checksum(&[], pseudo)
    } else {
        checksum(&tcp, pseudo)
    };
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&tcp);
    frame
}

/// A TCP segment to the guest: (source port, seq, ack, flags, payload).
pub fn parse_tcp(frame: &[u8]) -> Option<(u16, u32, u32, u8, &[u8])> {
    if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let tcp = frame.get(14 + ihl..14 + total)?;
    let be32 = |i: usize| u32::from_be_bytes([tcp[i], tcp[i + 1], tcp[i + 2], tcp[i + 3]]);
    let data = usize::from(tcp[12] >> 4) * 4;
    Some((
        u16::from_be_bytes([tcp[0], tcp[1]]),
        be32(4),
        be32(8),
        tcp[13],
        tcp.get(data..)?,
    ))
}
