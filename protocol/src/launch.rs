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
    Display,
}

impl WorkerKind {
    pub const ALL: [WorkerKind; 2] = [WorkerKind::Rng, WorkerKind::Display];

    pub fn name(self) -> &'static str {
        match self {
            WorkerKind::Rng => "rng",
            WorkerKind::Display => "display",
        }
    }

    /// The virtio device id the worker implements.
    pub fn virtio_device_id(self) -> u32 {
        match self {
            WorkerKind::Rng => 4,
            // virtio-gpu: the display worker's framebuffer device.
            WorkerKind::Display => 16,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum DeviceConfig {
    Rng(RngConfig),
    Display(DisplayConfig),
}

impl DeviceConfig {
    pub fn kind(&self) -> WorkerKind {
        match self {
            DeviceConfig::Rng(_) => WorkerKind::Rng,
            DeviceConfig::Display(_) => WorkerKind::Display,
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
        assert!("disk".parse::<WorkerKind>().is_err());
        assert_eq!(WorkerKind::Rng.virtio_device_id(), 4);
        assert_eq!(
            "display".parse::<WorkerKind>().unwrap(),
            WorkerKind::Display
        );
        assert_eq!(WorkerKind::Display.virtio_device_id(), 16);
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
            }),
            vhost_user_fd: 4,
        };
        let bytes = encode(&launch).unwrap();
        assert_eq!(decode::<WorkerLaunch>(&bytes).unwrap(), launch);
        assert_eq!(launch.device.kind(), WorkerKind::Display);
    }
}
