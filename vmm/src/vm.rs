//! Assembling a VM from a [`VmConfig`]: KVM, guest RAM, the boot image, legacy devices
//! and vCPU threads; then waiting for it to end.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::VirtioMmioDevice;
use crate::arch::x86_64::layout::{self, irqs, ports};
use crate::arch::x86_64::{acpi, cpuid, msrs, regs};
use crate::boot::{self, BootSource};
use crate::config::VmConfig;
use crate::console::{self, RawTerminal};
use crate::control::ControlContext;
use crate::device_plan::{plan_devices, PlannedDevice};
use crate::devices::acpi_pm::{self, AcpiPm};
use crate::devices::acpi_pm_timer::{self, AcpiPmTimer};
use crate::devices::i8042::I8042;
use crate::devices::reset_control::ResetControl;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{ConsoleOutput, SerialPort};
use crate::devices::{bus::BusError, Bus};
use crate::exit::{ExitSignal, VmExit};
use crate::memory::{GuestRam, MemoryError};
use crate::pause::{self, PauseError, VcpuGate};
use crate::vcpu::Vcpu;
use crate::vhost_user::{attach_worker_device, AttachError};
use crate::worker::audit_log::AuditLogError;
use crate::worker::{worker_binary, AuditLog, RestartPolicy, WorkerSupervisor};

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (is the kvm module loaded, and may this user open /dev/kvm?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm does not speak the KVM API version 12 bulkhead needs (got {0})")]
    ApiVersion(String),
    #[error("this host's KVM lacks {0:?}, which bulkhead needs")]
    MissingCapability(Cap),
    #[error("{what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("writing ACPI tables to guest memory")]
    AcpiWrite(#[source] vm_memory::GuestMemoryError),
    #[error("device setup")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    AuditLog(#[from] AuditLogError),
    #[error("watching a device worker")]
    Supervisor(#[source] std::io::Error),
    #[error("KVM accepted only {set} of {wanted} boot MSRs on vCPU {cpu}")]
    Msrs { cpu: u8, set: usize, wanted: usize },
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("starting a thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskOpenError),
    #[error(transparent)]
    Share(#[from] crate::share::ShareOpenError),
    #[error(transparent)]
    Display(#[from] crate::display::DisplayOpenError),
    #[error(transparent)]
    Viewer(#[from] crate::viewer::ViewerError),
    #[error(transparent)]
    Net(#[from] crate::net::NetOpenError),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The only KVM API version there has ever been; anything else is not KVM.
const KVM_API_VERSION: i32 = 12;

const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
    Cap::Irqfd,
    Cap::ExtCpuid,
];

/// A VM ready to run: every resource set up, no vCPU started yet.
pub struct Vm {
    // Field order matters for drop: vCPUs and the VM fd go before the RAM they map.
    vcpus: Vec<Vcpu>,
    _vm: VmFd,
    serial: Arc<Mutex<SerialPort>>,
    exit: Arc<ExitSignal>,
    /// Watches the device workers once the VM runs; they die with the VMM
    /// (PR_SET_PDEATHSIG).
    supervisor: Option<WorkerSupervisor>,
    gate: Arc<VcpuGate>,
    pm: Arc<Mutex<AcpiPm>>,
    board: Arc<crate::worker::DeviceBoard>,
    audit: Arc<AuditLog>,
    cpus: u8,
    memory_bytes: u64,
    started: std::time::Instant,
    _ram: GuestRam,
}

impl Vm {
    /// Builds the VM; guest serial output goes to `console`.
    pub fn new(config: &VmConfig, console: ConsoleOutput) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        let vm = create_vm(&kvm)?;
        let ram = GuestRam::new(config.memory.bytes())?;
        ram.register(&vm)?;

        // The kernel is checked and loaded before any worker starts, so that a bad image
        // costs nothing but an error message.
        let entry = boot::load(
            &ram,
            &BootSource {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
                acpi_rsdp: acpi::RSDP_ADDRESS,
            },
        )?;
        let cr3 = regs::write_boot_tables(ram.memory())?;

        let audit = Arc::new(match &config.audit_log {
            Some(path) => AuditLog::open(path)?,
            None => AuditLog::default(),
        });
        let worker = worker_binary();
        let mut supervisor = WorkerSupervisor::new(
            worker.clone(),
            ram.memory().clone(),
            audit.clone(),
            RestartPolicy::default(),
        );
        let board = supervisor.board();
        let mut mmio = Bus::default();
        let virtio = attach_worker_devices(config, &worker, &vm, &ram, &mut mmio, &mut supervisor)?;

        let cpus = config.cpus.get();
        let tables = acpi::build(cpus, &virtio)?;
        ram.memory()
            .write_slice(&tables.bytes, GuestAddress(tables.base))
            .map_err(VmError::AcpiWrite)?;

        let exit = Arc::new(ExitSignal::default());
        let LegacyDevices { pio, serial, pm } = legacy_devices(&vm, &exit, console)?;
        let buses = Buses {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
        };
        let boot_vcpu = BootVcpu {
            cr3,
            entry: entry.entry,
            zero_page: entry.zero_page,
        };
        let gate = Arc::new(VcpuGate::default());
        let vcpus = create_vcpus(&kvm, &vm, cpus, boot_vcpu, &buses, &exit, &gate)?;
        tracing::info!(
            cpus,
            memory = %config.memory,
            kernel = %config.kernel.display(),
            "VM created"
        );
        Ok(Self {
            vcpus,
            _vm: vm,
            serial,
            exit,
            supervisor: Some(supervisor),
            gate,
            pm,
            board,
            audit,
            cpus,
            memory_bytes: config.memory.bytes(),
            started: std::time::Instant::now(),
            _ram: ram,
        })
    }

    /// What the control socket of this VM, called `name`, serves from.
    pub fn control_context(&self, name: &str) -> Arc<ControlContext> {
        Arc::new(ControlContext {
            name: name.to_owned(),
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
            started: self.started,
            exit: self.exit.clone(),
            gate: self.gate.clone(),
            board: self.board.clone(),
            audit: self.audit.clone(),
            pm: self.pm.clone(),
        })
    }

    /// Lets another thread end the VM (e.g. on SIGTERM).
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// Starts the vCPUs and the console, and blocks until the VM ends.
    pub fn run(&mut self, terminal: &RawTerminal) -> Result<VmExit, VmError> {
        if let Some(supervisor) = self.supervisor.take() {
            supervisor.spawn().map_err(VmError::Thread)?;
        }
        console::spawn_input_pump(self.serial.clone(), self.exit.clone(), terminal.is_raw())
            .map_err(VmError::Thread)?;
        pause::install_kick_handler()?;
        for vcpu in self.vcpus.drain(..) {
            // The threads are never joined: when the VM ends the process exits, and a
            // vCPU blocked in KVM_RUN (e.g. an AP never started) ends with it. The gate
            // keeps their handles to kick them for pause and debug.
            let thread = vcpu.spawn().map_err(VmError::Thread)?;
            self.gate.add_thread(thread);
        }
        Ok(self.exit.wait())
    }
}

/// Opens /dev/kvm and checks it is a KVM that can run bulkhead's VMs.
fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    match kvm.get_api_version() {
        KVM_API_VERSION => {}
        version if version < 0 => {
            let errno = std::io::Error::last_os_error();
            return Err(VmError::ApiVersion(format!("an error: {errno}")));
        }
        version => return Err(VmError::ApiVersion(version.to_string())),
    }
    if let Some(cap) = REQUIRED_CAPS.into_iter().find(|&c| !kvm.check_extension(c)) {
        return Err(VmError::MissingCapability(cap));
    }
    Ok(kvm)
}

/// A VM with KVM's in-kernel interrupt controllers and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    if kvm.check_extension(Cap::SetIdentityMapAddr) {
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
    }
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        // Let KVM answer port 0x61 (PC speaker / PIT gate) too: Linux polls it while
        // calibrating the TSC against the PIT.
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Starts a worker for each device the config asks for, attaches it to the MMIO bus, and
/// hands it to the supervisor; returns what the ACPI tables must describe.
fn attach_worker_devices(
    config: &VmConfig,
    worker: &Path,
    vm: &VmFd,
    ram: &GuestRam,
    mmio: &mut Bus,
    supervisor: &mut WorkerSupervisor,
) -> Result<Vec<VirtioMmioDevice>, VmError> {
    let planned = plan_devices(config)?;
    let mut devices = Vec::with_capacity(planned.len());
    for PlannedDevice {
        launch,
        files,
        shape,
        viewer,
    } in planned
    {
        let attached = attach_worker_device(
            worker,
            vm,
            mmio,
            ram.memory(),
            devices.len(),
            &launch,
            &files,
            shape.clone(),
            &supervisor.audit(),
        )?;
        devices.push(attached.acpi);
        let name = launch.device_name.clone();
        supervisor
            .watch(launch, files, shape, attached.transport, attached.worker)
            .map_err(VmError::Supervisor)?;
        if let Some(connection) = viewer {
            let title = format!("bulkhead {}", config.name);
            crate::viewer::start_viewer(connection, &title)?;
            // The window goes with the worker it shows; a new one comes with its
            // replacement.
            supervisor.before_restart(
                &name,
                Box::new(move |files| {
                    let connection = crate::display::reopen_sdl_listener(files)?;
                    crate::viewer::start_viewer(connection, &title)?;
                    Ok(())
                }),
            );
        }
    }
    Ok(devices)
}

/// The port I/O bus and the devices on it that others need a handle to.
struct LegacyDevices {
    pio: Bus,
    /// Fed by the console.
    serial: Arc<Mutex<SerialPort>>,
    /// Its power button is pressed by `bulkhead stop`.
    pm: Arc<Mutex<AcpiPm>>,
}

/// The small platform devices every PC has, on the port I/O bus.
fn legacy_devices(
    vm: &VmFd,
    exit: &Arc<ExitSignal>,
    console: ConsoleOutput,
) -> Result<LegacyDevices, VmError> {
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VmError::EventFd)?;
    vm.register_irqfd(&serial_irq, irqs::COM1)
        .map_err(ioctl("KVM_IRQFD"))?;
    let serial = Arc::new(Mutex::new(SerialPort::new(serial_irq, console)));
    let mut pio = Bus::default();
    pio.insert(u64::from(ports::COM1), 8, serial.clone())?;
    pio.insert(
        u64::from(ports::I8042_DATA),
        u64::from(ports::I8042_COMMAND - ports::I8042_DATA) + 1,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    pio.insert(
        u64::from(ports::RTC_INDEX),
        2,
        Arc::new(Mutex::new(Rtc::default())),
    )?;
    let sci = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VmError::EventFd)?;
    vm.register_irqfd(&sci, u32::from(irqs::ACPI_SCI))
        .map_err(ioctl("KVM_IRQFD"))?;
    let pm = Arc::new(Mutex::new(AcpiPm::new(exit.clone(), Some(sci))));
    pio.insert(
        u64::from(ports::PM1A_EVENT),
        acpi_pm::REGISTER_BLOCK_LEN,
        pm.clone(),
    )?;
    pio.insert(
        u64::from(ports::PM_TIMER),
        acpi_pm_timer::REGISTER_LEN,
        Arc::new(Mutex::new(AcpiPmTimer::default())),
    )?;
    pio.insert(
        u64::from(ports::RESET_CONTROL),
        1,
        Arc::new(Mutex::new(ResetControl::new(exit.clone()))),
    )?;
    Ok(LegacyDevices { pio, serial, pm })
}

/// The shared, immutable device buses every vCPU dispatches its exits to.
struct Buses {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy)]
struct BootVcpu {
    cr3: u64,
    entry: u64,
    zero_page: u64,
}

/// Creates and configures `cpus` vCPUs: CPUID, MSRs and LAPIC for all; registers for the
/// boot vCPU (the others wait for INIT/SIPI from the guest, in KVM).
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    cpus: u8,
    boot: BootVcpu,
    buses: &Buses,
    exit: &Arc<ExitSignal>,
    gate: &Arc<VcpuGate>,
) -> Result<Vec<Vcpu>, VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    let host = cpuid::HostFeatures {
        tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let boot_msrs = msrs::boot_msrs();
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for id in 0..cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::patch_for_vcpu(cpuid.as_mut_slice(), id, cpus, host);
        fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let msrs = Msrs::from_entries(&boot_msrs).map_err(|_| VmError::Msrs {
            cpu: id,
            set: 0,
            wanted: boot_msrs.len(),
        })?;
        let set = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if set != boot_msrs.len() {
            return Err(VmError::Msrs {
                cpu: id,
                set,
                wanted: boot_msrs.len(),
            });
        }
        regs::configure_lapic_lints(&fd)?;
        if id == 0 {
            regs::configure_boot_vcpu(&fd, boot.cr3, boot.entry, boot.zero_page)?;
        }
        vcpus.push(Vcpu {
            id,
            fd,
            pio: buses.pio.clone(),
            mmio: buses.mmio.clone(),
            exit: exit.clone(),
            gate: gate.clone(),
        });
    }
    Ok(vcpus)
}
