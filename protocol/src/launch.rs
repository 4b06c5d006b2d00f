//! A worker's launch configuration.
//!
//! The VMM opens every host resource a device needs (image files, TAP, shared directory)
//! and passes the worker file descriptors; this message says which descriptor is what.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// The device kinds a worker process can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerKind {
    Rng,
    P9,
    Blk,
    Net,
    Display,
    Input,
}

impl WorkerKind {
    pub const ALL: [WorkerKind; 6] = [
        WorkerKind::Rng,
        WorkerKind::P9,
        WorkerKind::Blk,
        WorkerKind::Net,
        WorkerKind::Display,
        WorkerKind::Input,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WorkerKind::Rng => "rng",
            WorkerKind::P9 => "p9",
            WorkerKind::Blk => "blk",
            WorkerKind::Net => "net",
            WorkerKind::Display => "display",
            WorkerKind::Input => "input",
        }
    }

    /// The virtio device id the worker implements.
    pub fn virtio_device_id(self) -> u32 {
        match self {
            WorkerKind::Rng => 4,
            WorkerKind::P9 => 9,
            WorkerKind::Blk => 2,
            WorkerKind::Net => 1,
            // virtio-gpu: the display worker's framebuffer device.
            WorkerKind::Display => 16,
            // virtio-input: the keyboard and tablet VNC viewers type and point with.
            WorkerKind::Input => 18,
        }
    }
}

impl std::fmt::Display for WorkerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WorkerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorkerKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| format!("unknown worker kind {s:?}"))
    }
}

/// At most `bytes` every `period_ms` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct RateLimit {
    pub bytes: u64,
    pub period_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct RngConfig {
    pub rate_limit: Option<RateLimit>,
}

/// A virtio-9p share. The VMM opens the shared directory (`O_PATH | O_DIRECTORY`) and
/// passes the descriptor: the worker never resolves a host path of its own.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct P9Config {
    /// Descriptor number of the shared directory, inherited like `vhost_user_fd`.
    pub root_fd: i32,
    /// The mount tag the guest names (`mount -t 9p TAG ...`), at most 65535 bytes.
    pub tag: String,
    /// Refuse every change with EROFS (and grant Landlock only read rights).
    pub read_only: bool,
    /// The session journal: a memfd the VMM made for this device and hands to every
    /// worker it starts for it, so that a replacement rebuilds the guest's fids (it
    /// vanishes with the VMM). None: fids do not survive the worker.
    pub journal_fd: Option<i32>,
}

impl P9Config {
    /// Every descriptor this config names: the shared directory, the journal.
    pub fn descriptors(&self) -> impl Iterator<Item = i32> + '_ {
        std::iter::once(self.root_fd).chain(self.journal_fd)
    }
}

/// How the bytes of a disk image are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

/// One file of a disk's backing chain: the name the image above it records (the worker
/// checks the image asks for exactly this name) and the descriptor it inherited.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct BackingFile {
    pub name: String,
    pub fd: i32,
}

/// A virtio-blk disk. The worker opens no path: the VMM opened the image and every file
/// of its backing chain, and these are the descriptor numbers the worker finds them at.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct BlkConfig {
    /// The image, open read-write unless `read_only` or `copy_on_write`.
    pub image_fd: i32,
    /// The backing chain in order: the image's backing file first.
    pub backing: Vec<BackingFile>,
    /// None: probed from the image's first bytes.
    pub format: Option<ImageFormat>,
    /// The guest sees a read-only disk (VIRTIO_BLK_F_RO); writes fail.
    pub read_only: bool,
    /// Guest writes go to an overlay in memory, never to the image.
    pub copy_on_write: bool,
    /// With `copy_on_write`: the overlay store, a memfd the VMM made for this disk and
    /// hands to every worker it starts for it, so that a replacement carries on with its
    /// predecessor's changes (they vanish with the VMM). None: the worker makes its own.
    pub overlay_fd: Option<i32>,
    /// Request queues (VIRTIO_BLK_F_MQ), at least 1.
    pub num_queues: u16,
    /// What GET_ID answers: up to 20 bytes.
    pub serial: String,
}

impl BlkConfig {
    /// Every descriptor this config names: the image, its backing chain, the overlay store.
    pub fn descriptors(&self) -> impl Iterator<Item = i32> + '_ {
        std::iter::once(self.image_fd)
            .chain(self.backing.iter().map(|b| b.fd))
            .chain(self.overlay_fd)
    }
}

/// A virtio-net device on a host TAP device the VMM opened.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct NetConfig {
    /// Descriptor numbers of the TAP's queues, one per receive/transmit queue pair (opened
    /// with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, and IFF_MULTI_QUEUE when there are several);
    /// the worker sets their vnet header size and offloads, nothing else.
    pub tap_fds: Vec<i32>,
    pub mac: [u8; 6],
    /// The MTU the guest is told (VIRTIO_NET_F_MTU), if any.
    pub mtu: Option<u16>,
}

/// The display worker: virtio-gpu 2D plus a VNC server on a listening socket the VMM
/// opened (TCP on 127.0.0.1 or a Unix socket), so the worker itself creates no socket.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct DisplayConfig {
    /// Descriptor number of the listening VNC socket the worker inherited.
    pub vnc_listen_fd: i32,
    /// The mode the device reports to the guest (GET_DISPLAY_INFO, EDID).
    pub width: u32,
    pub height: u32,
    /// When set, viewers must pass VNC authentication with this password (only its first
    /// 8 bytes count, as in every VNC implementation).
    pub vnc_password: Option<String>,
    /// Descriptor number of a `SOCK_SEQPACKET` socket (non-blocking) on which the worker
    /// sends what viewers type and point, one datagram of virtio-input events per report,
    /// to an input worker; None: viewers' input is only logged.
    pub input_events_fd: Option<i32>,
    /// The state store: a memfd the VMM made for this display and hands to every worker
    /// it starts for it, where the worker keeps the guest's resources, scanout and cursor
    /// so that a replacement shows the same screen. None: nothing outlives the worker.
    pub state_fd: Option<i32>,
}

impl DisplayConfig {
    /// The VNC listener, then the input events socket and the state store, if any.
    pub fn descriptors(&self) -> impl Iterator<Item = i32> + '_ {
        std::iter::once(self.vnc_listen_fd)
            .chain(self.input_events_fd)
            .chain(self.state_fd)
    }
}

/// A virtio-input keyboard and tablet fed by the display worker: the worker reads
/// datagrams of `virtio_input_event`s from `events_fd` and hands them to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct InputConfig {
    /// Descriptor number of the receiving end of the display worker's events socket
    /// (`SOCK_SEQPACKET`, non-blocking).
    pub events_fd: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum DeviceConfig {
    Rng(RngConfig),
    P9(P9Config),
    Blk(BlkConfig),
    Net(NetConfig),
    Display(DisplayConfig),
    Input(InputConfig),
}

impl DeviceConfig {
    pub fn kind(&self) -> WorkerKind {
        match self {
            DeviceConfig::Rng(_) => WorkerKind::Rng,
            DeviceConfig::P9(_) => WorkerKind::P9,
            DeviceConfig::Blk(_) => WorkerKind::Blk,
            DeviceConfig::Net(_) => WorkerKind::Net,
            DeviceConfig::Display(_) => WorkerKind::Display,
            DeviceConfig::Input(_) => WorkerKind::Input,
        }
    }

    /// The descriptors, besides the launch config and the vhost-user socket, that the
    /// worker inherits for this device.
    pub fn descriptors(&self) -> Vec<i32> {
        match self {
            DeviceConfig::Rng(_) => Vec::new(),
            DeviceConfig::P9(p9) => p9.descriptors().collect(),
            DeviceConfig::Blk(blk) => blk.descriptors().collect(),
            DeviceConfig::Net(net) => net.tap_fds.clone(),
            DeviceConfig::Display(display) => display.descriptors().collect(),
            DeviceConfig::Input(input) => vec![input.events_fd],
        }
    }
}

/// Everything a worker needs to start serving, besides its inherited descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct WorkerLaunch {
    /// The VMM's name for the device, e.g. "rng0"; used in logs.
    pub device_name: String,
    pub device: DeviceConfig,
    /// Descriptor number of the connected vhost-user socket (the worker is the backend).
    pub vhost_user_fd: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, encode, WireError};

    #[test]
    fn launch_config_round_trips() {
        let launch = WorkerLaunch {
            device_name: "rng0".into(),
            device: DeviceConfig::Rng(RngConfig {
                rate_limit: Some(RateLimit {
                    bytes: 4096,
                    period_ms: 1000,
                }),
            }),
            vhost_user_fd: 4,
        };
        let bytes = encode(&launch).unwrap();
        assert_eq!(decode::<WorkerLaunch>(&bytes).unwrap(), launch);
        assert_eq!(launch.device.kind(), WorkerKind::Rng);
        let net = WorkerLaunch {
            device_name: "net0".into(),
            device: DeviceConfig::Net(NetConfig {
                tap_fds: vec![5, 6],
                mac: [0x52, 0x54, 0, 1, 2, 3],
                mtu: Some(1500),
            }),
            vhost_user_fd: 4,
        };
        let bytes = encode(&net).unwrap();
        assert_eq!(decode::<WorkerLaunch>(&bytes).unwrap(), net);
        assert_eq!(net.device.kind(), WorkerKind::Net);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let launch = WorkerLaunch {
            device_name: "rng0".into(),
            device: DeviceConfig::Rng(RngConfig::default()),
            vhost_user_fd: 4,
        };
        let bytes = encode(&launch).unwrap();
        assert!(decode::<WorkerLaunch>(&bytes[..bytes.len() - 1]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode::<WorkerLaunch>(&trailing),
            Err(WireError::TrailingBytes(1))
        ));
        // A string length of 2^62 must be refused, not allocated.
        let huge = [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
        assert!(decode::<WorkerLaunch>(&huge).is_err());
        for seed in 0..=255u8 {
            let noise: Vec<u8> = (0..64)
                .map(|i| seed.wrapping_mul(31).wrapping_add(i))
                .collect();
            let _ = decode::<WorkerLaunch>(&noise);
        }
    }

    #[test]
    fn kinds_parse_by_name() {
        assert_eq!("rng".parse::<WorkerKind>().unwrap(), WorkerKind::Rng);
        assert_eq!("blk".parse::<WorkerKind>().unwrap(), WorkerKind::Blk);
        assert!("disk".parse::<WorkerKind>().is_err());
        assert_eq!(WorkerKind::Rng.virtio_device_id(), 4);
        assert_eq!("p9".parse::<WorkerKind>().unwrap(), WorkerKind::P9);
        assert_eq!(WorkerKind::P9.virtio_device_id(), 9);
        assert_eq!(WorkerKind::Blk.virtio_device_id(), 2);
        assert_eq!("net".parse::<WorkerKind>().unwrap(), WorkerKind::Net);
        assert_eq!(WorkerKind::Net.virtio_device_id(), 1);
        assert_eq!(
            "display".parse::<WorkerKind>().unwrap(),
            WorkerKind::Display
        );
        assert_eq!(WorkerKind::Display.virtio_device_id(), 16);
        for kind in WorkerKind::ALL {
            assert_eq!(kind.name().parse::<WorkerKind>().unwrap(), kind);
        }
    }

    #[test]
    fn blk_config_round_trips() {
        let launch = WorkerLaunch {
            device_name: "blk0".into(),
            device: DeviceConfig::Blk(BlkConfig {
                image_fd: 5,
                backing: vec![BackingFile {
                    name: "base.qcow2".into(),
                    fd: 6,
                }],
                format: Some(ImageFormat::Qcow2),
                read_only: false,
                copy_on_write: true,
                overlay_fd: Some(7),
                num_queues: 2,
                serial: "disk0".into(),
            }),
            vhost_user_fd: 4,
        };
        let bytes = encode(&launch).unwrap();
        assert_eq!(decode::<WorkerLaunch>(&bytes).unwrap(), launch);
        assert_eq!(launch.device.kind(), WorkerKind::Blk);
        let DeviceConfig::Blk(blk) = &launch.device else {
            unreachable!()
        };
        assert_eq!(blk.descriptors().collect::<Vec<_>>(), [5, 6, 7]);
    }

    #[test]
    fn p9_launch_config_round_trips() {
        let launch = WorkerLaunch {
            device_name: "p9-0".into(),
            device: DeviceConfig::P9(P9Config {
                root_fd: 5,
                tag: "share".into(),
                read_only: true,
                journal_fd: Some(6),
            }),
            vhost_user_fd: 4,
        };
        let bytes = encode(&launch).unwrap();
        assert_eq!(decode::<WorkerLaunch>(&bytes).unwrap(), launch);
        assert_eq!(launch.device.kind(), WorkerKind::P9);
        assert_eq!(launch.device.descriptors(), [5, 6]);
    }

    #[test]
    fn display_config_round_trips() {
        let launch = WorkerLaunch {
            device_name: "display0".into(),
            device: DeviceConfig::Display(DisplayConfig {
                vnc_listen_fd: 5,
                width: 1024,
                height: 768,
                vnc_password: Some("secret".into()),
                input_events_fd: Some(6),
                state_fd: Some(7),
            }),
            vhost_user_fd: 4,
        };
        let bytes = encode(&launch).unwrap();
        assert_eq!(decode::<WorkerLaunch>(&bytes).unwrap(), launch);
        assert_eq!(launch.device.kind(), WorkerKind::Display);
        assert_eq!(launch.device.descriptors(), [5, 6, 7]);
        let input = WorkerLaunch {
            device_name: "input0".into(),
            device: DeviceConfig::Input(InputConfig { events_fd: 5 }),
            vhost_user_fd: 4,
        };
        let bytes = encode(&input).unwrap();
        assert_eq!(decode::<WorkerLaunch>(&bytes).unwrap(), input);
        assert_eq!(input.device.kind(), WorkerKind::Input);
        assert_eq!(WorkerKind::Input.virtio_device_id(), 18);
    }
}
