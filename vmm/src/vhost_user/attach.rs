//! Attaching a worker-served device to the VM: spawn the worker, connect to it as the
//! vhost-user frontend, and put a virtio-mmio transport for it on the MMIO bus with an
//! ioeventfd per queue and an irqfd for its interrupt.

use std::fs::File;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};

use bulkhead_protocol::audit::AuditEvent;
use bulkhead_protocol::WorkerLaunch;
use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::device::{VhostUserDevice, VhostUserDeviceError};
use super::reply_watchdog::{ReplyWatchdog, REPLY_LIMIT};
use crate::arch::x86_64::acpi::VirtioMmioDevice;
use crate::arch::x86_64::layout;
use crate::devices::bus::{Bus, BusError};
use crate::memory::GuestMemory;
use crate::virtio::mmio::{MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::virtio::VirtioMmio;
use crate::worker::audit_log::AuditLog;
use crate::worker::pidfd::PidFd;
use crate::worker::{discard_worker, spawn_worker, LaunchError};

#[derive(Debug, Error)]
pub enum AttachError {
    #[error("too many virtio devices: at most {max}")]
    TooManyDevices { max: usize },
    #[error("device {device}: cannot start its worker")]
    Launch {
        device: String,
        #[source]
        source: LaunchError,
    },
    #[error("device {device}: worker did not complete the vhost-user handshake")]
    Handshake {
        device: String,
        #[source]
        source: VhostUserDeviceError,
    },
    #[error("device {device}: {what}")]
    Kvm {
        device: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("device {device}: cannot watch its worker")]
    Watch {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device {device}: placing it on the MMIO bus")]
    Bus {
        device: String,
        #[source]
        source: BusError,
    },
}

/// What the rest of the VM needs to know about an attached device.
pub struct AttachedDevice {
    pub acpi: VirtioMmioDevice,
    pub worker: Child,
    pub transport: Arc<Mutex<VirtioMmio>>,
}

/// The shape of a device type, as the transport must present it.
#[derive(Debug, Clone)]
pub struct DeviceShape {
    pub device_type: u32,
    pub queue_sizes: Vec<u16>,
    pub config_size: usize,
}

fn new_eventfd() -> std::io::Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// Attaches the `index`th virtio-mmio device, served by a `worker` process started with
/// `launch` and the device's own `files`.
// Each argument is a distinct resource of the VM the device is wired into; a struct for
// them would only be built at the one call site and taken apart here.
#[allow(clippy::too_many_arguments)]
pub fn attach_worker_device(
    worker: &Path,
    vm: &VmFd,
    mmio: &mut Bus,
    memory: &GuestMemory,
    index: usize,
    launch: &WorkerLaunch,
    files: &[File],
    shape: DeviceShape,
    audit: &Arc<AuditLog>,
) -> Result<AttachedDevice, AttachError> {
    let device = launch.device_name.clone();
    let (base, gsi) = layout::virtio_mmio_slot(index).ok_or(AttachError::TooManyDevices {
        max: layout::VIRTIO_MMIO_GSIS.len(),
    })?;
    let kvm_err = |what: &'static str| {
        let device = device.clone();
        move |source: std::io::Error| AttachError::Kvm {
            device,
            what,
            source,
        }
    };

    let queue_count = shape.queue_sizes.len();
    let (worker, backend) = start_backend(worker, launch, files, &shape, memory, audit)?;

    let notify = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
    let mut kicks = Vec::with_capacity(queue_count);
    for queue in 0..queue_count as u32 {
        let kick = new_eventfd().map_err(kvm_err("creating a queue eventfd"))?;
        vm.register_ioevent(&kick, &notify, queue)
            .map_err(|e| kvm_err("KVM_IOEVENTFD")(e.into()))?;
        kicks.push(kick);
    }
    let interrupt = new_eventfd().map_err(kvm_err("creating the interrupt eventfd"))?;
    vm.register_irqfd(&interrupt, gsi)
        .map_err(|e| kvm_err("KVM_IRQFD")(e.into()))?;

    let transport = Arc::new(Mutex::new(VirtioMmio::new(
        device.clone(),
        Box::new(backend),
        kicks,
        interrupt,
    )));
    mmio.insert(base, MMIO_WINDOW_SIZE, transport.clone())
        .map_err(|source| AttachError::Bus {
            device: device.clone(),
            source,
        })?;
    tracing::info!(%device, base = format_args!("{base:#x}"), gsi, pid = worker.id(), "worker device attached");
    Ok(AttachedDevice {
        acpi: VirtioMmioDevice {
            base,
            size: MMIO_WINDOW_SIZE,
            gsi,
        },
        worker,
        transport,
    })
}

/// Starts a worker for `launch` and completes the vhost-user handshake with it. Used
/// for the first worker of a device and for every replacement after a crash. `audit`
/// hears of it if the worker is ever killed for not answering.
pub fn start_backend(
    binary: &Path,
    launch: &WorkerLaunch,
    files: &[File],
    shape: &DeviceShape,
    memory: &GuestMemory,
    audit: &Arc<AuditLog>,
) -> Result<(Child, VhostUserDevice), AttachError> {
    let device = &launch.device_name;
    let worker = spawn_worker(binary, launch, files).map_err(|source| AttachError::Launch {
        device: device.clone(),
        source,
    })?;
    let mut child = worker.child;
    // The pidfd names this child even once it is reaped; opened before anyone can reap it.
    let pid = child.id();
    let on_kill = {
        let (audit, device) = (audit.clone(), device.clone());
        Box::new(move |call: &'static str| {
            audit.record(AuditEvent::Unresponsive {
                device: device.clone(),
                pid,
                call: call.to_owned(),
            });
        })
    };
    let watchdog = PidFd::open(pid)
        .and_then(|pidfd| ReplyWatchdog::new(device.clone(), pidfd, REPLY_LIMIT, on_kill));
    let watchdog = match watchdog {
        Ok(watchdog) => watchdog,
        Err(source) => {
            discard_worker(&mut child);
            return Err(AttachError::Watch {
                device: device.clone(),
                source,
            });
        }
    };
    match VhostUserDevice::connect(
        worker.socket,
        shape.device_type,
        shape.queue_sizes.clone(),
        shape.config_size,
        memory.clone(),
        Some(watchdog),
    ) {
        Ok(backend) => Ok((child, backend)),
        Err(source) => {
            // A worker that cannot talk is of no use.
            discard_worker(&mut child);
            Err(AttachError::Handshake {
                device: device.clone(),
                source,
            })
        }
    }
}
