//! The worker-served devices a [`VmConfig`] asks for, each planned before any worker
//! starts: what its worker is told, the host files the VMM opened for it, and the virtio
//! shape its transport presents. Opening every host resource first means a bad image or
//! directory costs only a message, never a half-started VM.

use std::fs::File;
use std::os::unix::net::UnixStream;

use bulkhead_protocol::{DeviceConfig, WorkerKind, WorkerLaunch};

use crate::config::VmConfig;
use crate::disk::{open_disk, queues_for, OpenedDisk};
use crate::net::{open_net, OpenedNet};
use crate::share::open_share;
use crate::vhost_user::DeviceShape;
use crate::vm::VmError;

/// Descriptors per virtio-rng queue: requests are small and few.
const RNG_QUEUE_SIZE: u16 = 256;
/// Descriptors per virtio-blk queue: the blk worker's largest.
const BLK_QUEUE_SIZE: u16 = 256;
/// virtio_blk_config up to the write-zeroes fields, as the blk worker serves it.
const BLK_CONFIG_SIZE: usize = 60;
/// Descriptors per virtio-gpu queue (control, cursor): the display worker's largest.
const GPU_QUEUE_SIZE: u16 = 256;
/// virtio_gpu_config: events_read, events_clear, num_scanouts, num_capsets.
const GPU_CONFIG_SIZE: usize = 16;
/// Descriptors per virtio-input queue (events, status); Linux posts 64 event buffers.
const INPUT_QUEUE_SIZE: u16 = 64;
/// virtio_input_config: select, subsel, size, reserved, the 128-byte answer.
const INPUT_CONFIG_SIZE: usize = 136;

/// Descriptors per virtio-9p queue: what Linux's 9pnet_virtio sizes its requests for
/// (the worker takes up to 1024).
const P9_QUEUE_SIZE: u16 = 128;
/// virtio_9p_config: `tag_len` (le16), then the tag.
const P9_CONFIG_HEADER: usize = 2;
/// Descriptors per virtio-net queue: deep enough for a burst of TSO frames.
const NET_QUEUE_SIZE: u16 = 256;
/// virtio_net_config up to the mtu field (mac, status, max_virtqueue_pairs, mtu), as the
/// net worker serves it; with several pairs a control queue follows them.
const NET_CONFIG_SIZE: usize = 12;

/// One device to attach: handed to the worker launcher and then to the supervisor, which
/// keeps `files` open so that a replacement worker gets the same ones.
#[derive(Debug)]
pub struct PlannedDevice {
    pub launch: WorkerLaunch,
    pub files: Vec<File>,
    pub shape: DeviceShape,
    /// `--display sdl`: the connection for the viewer the VMM starts once the display
    /// worker serves it.
    pub viewer: Option<UnixStream>,
}

impl PlannedDevice {
    fn new(
        device_name: String,
        device: DeviceConfig,
        files: Vec<File>,
        shape: DeviceShape,
    ) -> Self {
        Self {
            launch: WorkerLaunch {
                device_name,
                device,
                vhost_user_fd: -1,
            },
            files,
            shape,
            viewer: None,
        }
    }
}

/// Every worker device of `config`, in the order the guest will find them.
pub fn plan_devices(config: &VmConfig) -> Result<Vec<PlannedDevice>, VmError> {
    let mut planned = Vec::new();
    if let Some(rng) = &config.rng {
        planned.push(PlannedDevice::new(
            "rng0".into(),
            DeviceConfig::Rng(rng.clone()),
            Vec::new(),
            DeviceShape {
                device_type: WorkerKind::Rng.virtio_device_id(),
                queue_sizes: vec![RNG_QUEUE_SIZE],
                config_size: 0,
            },
        ));
    }
    let disk_queues = queues_for(config.cpus.get());
    for (index, spec) in config.disks.iter().enumerate() {
        let OpenedDisk { config, files } = open_disk(spec, index, disk_queues)?;
        let queues = usize::from(config.num_queues);
        planned.push(PlannedDevice::new(
            format!("blk{index}"),
            DeviceConfig::Blk(config),
            files,
            DeviceShape {
                device_type: WorkerKind::Blk.virtio_device_id(),
                queue_sizes: vec![BLK_QUEUE_SIZE; queues],
                config_size: BLK_CONFIG_SIZE,
            },
        ));
    }
    for (index, spec) in config.shares.iter().enumerate() {
        // The journal travels with the directory: the supervisor keeps both for every
        // worker the share gets.
        let (config, files) = open_share(spec)?.files();
        let config_size = P9_CONFIG_HEADER + config.tag.len();
        planned.push(PlannedDevice::new(
            format!("9p{index}"),
            DeviceConfig::P9(config),
            files,
            DeviceShape {
                device_type: WorkerKind::P9.virtio_device_id(),
                queue_sizes: vec![P9_QUEUE_SIZE],
                config_size,
            },
        ));
    }
    if let Some(spec) = &config.display {
        // Two workers: the screen and VNC server in one, the keyboard and tablet the
        // viewers drive in the other, joined by a socket pair both are handed.
        let crate::display::OpenedDisplay {
            display,
            display_files,
            input,
            input_files,
            viewer,
        } = crate::display::open_display(spec)?;
        let mut display = PlannedDevice::new(
            "display0".into(),
            DeviceConfig::Display(display),
            display_files,
            DeviceShape {
                device_type: WorkerKind::Display.virtio_device_id(),
                queue_sizes: vec![GPU_QUEUE_SIZE; 2],
                config_size: GPU_CONFIG_SIZE,
            },
        );
        display.viewer = viewer;
        planned.push(display);
        planned.push(PlannedDevice::new(
            "input0".into(),
            DeviceConfig::Input(input),
            input_files,
            DeviceShape {
                device_type: WorkerKind::Input.virtio_device_id(),
                queue_sizes: vec![INPUT_QUEUE_SIZE; 2],
                config_size: INPUT_CONFIG_SIZE,
            },
        ));
    }
    for (index, spec) in config.nets.iter().enumerate() {
        let OpenedNet { config, files, .. } = open_net(spec, &config.name, index)?;
        let queues = bulkhead_workers::net::queues_for(config.tap_fds.len());
        planned.push(PlannedDevice::new(
            format!("net{index}"),
            DeviceConfig::Net(config),
            files,
            DeviceShape {
                device_type: WorkerKind::Net.virtio_device_id(),
                queue_sizes: vec![NET_QUEUE_SIZE; queues],
                config_size: NET_CONFIG_SIZE,
            },
        ));
    }
    Ok(planned)
}
