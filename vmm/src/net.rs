//! `--net tap[,ifname=NAME][,mac=MAC][,queues=N]`: the VMM creates (or attaches to) the
//! TAP device, so that the net worker needs no network reach at all: it gets the open TAP
//! queues (one per queue pair) at fixed descriptor numbers and never opens /dev/net/tun
//! itself.

use std::fs::File;
use std::os::fd::OwnedFd;

use bulkhead_protocol::NetConfig;
use bulkhead_workers::net::{mac_from_name, parse_mac, Tap, TapError};
use thiserror::Error;

use crate::config::VmName;
use crate::worker::launch::device_fds;

/// The name the kernel numbers when no `ifname` is given: tap0, tap1, ...
pub const DEFAULT_TAP_NAME: &str = "tap%d";

/// Queue pairs a net device may have: what the worker serves.
pub const MAX_QUEUE_PAIRS: u16 = bulkhead_workers::net::MAX_QUEUE_PAIRS as u16;

/// One `--net` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// None: a new TAP the kernel names.
    pub ifname: Option<String>,
    /// None: derived from the VM's name, the same on every run.
    pub mac: Option<[u8; 6]>,
    /// Receive/transmit queue pairs, one TAP queue each; 1 unless `queues=N` says more.
    pub queue_pairs: u16,
}

const SYNTAX: &str = "tap[,ifname=NAME][,mac=MAC][,queues=N]";

impl std::str::FromStr for NetSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',');
        match parts.next() {
            Some("tap") => {}
            Some(other) => {
                return Err(format!(
                    "unknown network backend {other:?}: only tap is supported ({SYNTAX})"
                ))
            }
            None => return Err(format!("expected {SYNTAX}")),
        }
        let mut spec = NetSpec {
            ifname: None,
            mac: None,
            queue_pairs: 1,
        };
        for option in parts {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            match key {
                "ifname" => {
                    // The kernel's limit (IFNAMSIZ less the NUL), checked here so that a
                    // typo costs a usage error rather than a failed ioctl.
                    let valid = !value.is_empty()
                        && value.len() < libc::IFNAMSIZ
                        && !value.contains(['/', '\0', ' ', ':']);
                    if !valid {
                        return Err(format!(
                            "invalid TAP name {value:?}: 1 to {} bytes, no '/', ':' or spaces",
                            libc::IFNAMSIZ - 1
                        ));
                    }
                    spec.ifname = Some(value.to_owned());
                }
                "mac" => spec.mac = Some(parse_mac(value)?),
                "queues" => {
                    let pairs: u16 = value.parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
                        format!("invalid queues={value:?}: a number of queue pairs, at least 1")
                    })?;
                    if pairs > MAX_QUEUE_PAIRS {
                        return Err(format!(
                            "queues={pairs}: at most {MAX_QUEUE_PAIRS} queue pairs"
                        ));
                    }
                    spec.queue_pairs = pairs;
                }
                _ => {
                    return Err(format!(
                        "unknown net option {option:?}: ifname=NAME, mac=MAC or queues=N"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

#[derive(Debug, Error)]
pub enum NetOpenError {
    #[error("cannot attach net{index} to {}", describe(name))]
    Tap {
        index: usize,
        name: String,
        #[source]
        source: TapError,
    },
}

fn describe(name: &str) -> String {
    if name == DEFAULT_TAP_NAME {
        "a new TAP".to_owned()
    } else {
        format!("TAP {name:?}")
    }
}

/// A network device ready to hand to a worker: its launch config and its TAP queues.
#[derive(Debug)]
pub struct OpenedNet {
    pub config: NetConfig,
    pub files: Vec<File>,
    /// The TAP's name, as the kernel reports it (a generated name is known only now).
    pub ifname: String,
}

/// The MAC address the `index`th device of VM `vm` gets when none is given.
pub fn default_mac(vm: &VmName, index: usize) -> [u8; 6] {
    if index == 0 {
        mac_from_name(vm.as_str())
    } else {
        mac_from_name(&format!("{vm}/net{index}"))
    }
}

/// Creates or attaches to the TAP of `spec`, the `index`th network device of VM `vm`:
/// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR with the vnet header size the worker expects, and
/// one queue per pair (IFF_MULTI_QUEUE with several: the first open creates or attaches,
/// the others attach more queues to the same device).
/// A busy TAP, a name that is some other kind of device (or a single-queue TAP when
/// several queues are asked for), or missing privileges are errors here, before any
/// guest code runs.
pub fn open_net(spec: &NetSpec, vm: &VmName, index: usize) -> Result<OpenedNet, NetOpenError> {
    let name = spec.ifname.as_deref().unwrap_or(DEFAULT_TAP_NAME);
    let pairs = usize::from(spec.queue_pairs.max(1));
    let multi_queue = pairs > 1;
    let error = |name: &str, source| NetOpenError::Tap {
        index,
        name: name.to_owned(),
        source,
    };
    let first = Tap::open(name, multi_queue).map_err(|source| error(name, source))?;
    // A generated name is known only now; the other queues attach to that device.
    let ifname = first.name().to_owned();
    let mut files = vec![File::from(OwnedFd::from(first))];
    for _ in 1..pairs {
        let tap = Tap::open(&ifname, true).map_err(|source| error(&ifname, source))?;
        files.push(File::from(OwnedFd::from(tap)));
    }
    let mac = spec.mac.unwrap_or_else(|| default_mac(vm, index));
    let config = NetConfig {
        tap_fds: device_fds(pairs),
        mac,
        mtu: None,
    };
    tracing::info!(
        "net{index}: TAP {ifname}, MAC {}, {pairs} queue pair(s)",
        mac.map(|b| format!("{b:02x}")).join(":")
    );
    Ok(OpenedNet {
        config,
        files,
        ifname,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse() {
        let spec: NetSpec = "tap,ifname=bh0,mac=52:54:00:12:34:56,queues=4"
            .parse()
            .unwrap();
        assert_eq!(spec.ifname.as_deref(), Some("bh0"));
        assert_eq!(spec.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(spec.queue_pairs, 4);
        let plain: NetSpec = "tap".parse().unwrap();
        assert_eq!(plain.ifname, None);
        assert_eq!(plain.mac, None);
        assert_eq!(plain.queue_pairs, 1);
        for bad in [
            "",
            "user",
            "tap,bogus",
            "tap,ifname=",
            "tap,ifname=0123456789abcdef",
            "tap,ifname=a/b",
            "tap,mac=01:00:5e:00:00:01",
            "tap,mac=nonsense",
            "tap,queues=0",
            "tap,queues=x",
            "tap,queues=17",
            "tap,queues=-1",
        ] {
            assert!(bad.parse::<NetSpec>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_macs_are_stable_and_distinct() {
        let vm: VmName = "web".parse().unwrap();
        assert_eq!(default_mac(&vm, 0), default_mac(&vm, 0));
        assert_ne!(default_mac(&vm, 0), default_mac(&vm, 1));
        assert_eq!(default_mac(&vm, 0)[0] & 0b11, 0b10);
    }
}
