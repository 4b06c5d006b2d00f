//! The virtio-mmio transport (virtio 1.2, section 4.2, version 2 register layout).
//!
//! Queue notifications never reach this code: the VMM registers an ioeventfd on
//! QueueNotify for each queue, and the worker waits on those. Interrupts come from the
//! worker through an irqfd, so InterruptStatus reports a used-buffer interrupt whenever
//! the device is running; the guest driver then looks at its rings, which is what it
//! does for every interrupt anyway.

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{ActivateError, QueueConfig, VirtioDevice};
use super::status;
use crate::devices::BusDevice;
use crate::memory::GuestMemory;

/// Bytes of MMIO space each device's registers and config space occupy.
pub const MMIO_WINDOW_SIZE: u64 = 0x200;
/// Offset of QueueNotify, where the VMM registers one ioeventfd per queue.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// PCI-SIG vendor id of Red Hat, which virtio devices commonly report; "QEMU" style
/// vendor ids carry no meaning for drivers.
const VENDOR_ID: u32 = 0x1af4;
const INTERRUPT_USED_BUFFER: u32 = 1;
const INTERRUPT_CONFIG_CHANGE: u32 = 2;
/// Offset of the `idx` field in a split ring's driver and device areas (after `flags`).
const RING_INDEX_OFFSET: u64 = 2;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

#[derive(Debug, Default, Clone, Copy)]
struct QueueState {
    size: u16,
    ready: bool,
    descriptors: u64,
    driver_area: u64,
    device_area: u64,
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & !0xffff_ffff) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

pub struct VirtioMmio {
    device: Box<dyn VirtioDevice>,
    name: String,
    queues: Vec<QueueState>,
    kicks: Vec<EventFd>,
    interrupt: EventFd,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    status: u32,
    active: bool,
    config_generation: u32,
}

impl VirtioMmio {
    /// `kicks` has one eventfd per queue (registered by the caller as ioeventfds on
    /// QueueNotify); `interrupt` is registered as an irqfd on the device's GSI.
    pub fn new(
        name: String,
        device: Box<dyn VirtioDevice>,
        kicks: Vec<EventFd>,
        interrupt: EventFd,
    ) -> Self {
        let queues = vec![QueueState::default(); device.queue_max_sizes().len()];
        Self {
            device,
            name,
            queues,
            kicks,
            interrupt,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            status: 0,
            active: false,
            config_generation: 0,
        }
    }

    fn selected_queue(&mut self) -> Option<(&mut QueueState, u16)> {
        let index = self.queue_select as usize;
        let max = *self.device.queue_max_sizes().get(index)?;
        self.queues.get_mut(index).map(|q| (q, max))
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |(_, max)| u32::from(max)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |(q, _)| u32::from(q.ready)),
            reg::INTERRUPT_STATUS if self.active => INTERRUPT_USED_BUFFER,
            reg::INTERRUPT_STATUS if self.status & status::DEVICE_NEEDS_RESET != 0 => {
                INTERRUPT_CONFIG_CHANGE
            }
            reg::STATUS => self.status,
            // No shared memory regions: length all ones means "does not exist".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        // Queue layout may only change before the driver says DRIVER_OK.
        let configurable = self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                // A driver may only accept what the device offered.
                let accepted = (u64::from(value) << shift) & self.device.features();
                self.acked_features = (self.acked_features & !mask) | accepted;
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM if configurable => {
                if let Some((queue, max)) = self.selected_queue() {
                    // Split queues need a power-of-two size no larger than the maximum.
                    if value.is_power_of_two() && value <= u32::from(max) {
                        queue.size = value as u16;
                    }
                }
            }
            reg::QUEUE_READY if configurable => {
                if let Some((queue, _)) = self.selected_queue() {
                    queue.ready = value == 1;
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if configurable =>
            {
                if let Some((queue, _)) = self.selected_queue() {
                    match offset {
                        reg::QUEUE_DESC_LOW => set_low(&mut queue.descriptors, value),
                        reg::QUEUE_DESC_HIGH => set_high(&mut queue.descriptors, value),
                        reg::QUEUE_DRIVER_LOW => set_low(&mut queue.driver_area, value),
                        reg::QUEUE_DRIVER_HIGH => set_high(&mut queue.driver_area, value),
                        reg::QUEUE_DEVICE_LOW => set_low(&mut queue.device_area, value),
                        _ => set_high(&mut queue.device_area, value),
                    }
                }
            }
            // Reaches us only if KVM's ioeventfd did not match, e.g. an unknown queue.
            reg::QUEUE_NOTIFY => {
                if let Some(kick) = self.kicks.get(value as usize) {
                    let _ = kick.write(1);
                }
            }
            reg::INTERRUPT_ACK => {}
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => tracing::debug!(
                device = %self.name,
                offset = format_args!("{offset:#x}"),
                value,
                "ignored virtio-mmio write"
            ),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly_set = value & !self.status;
        self.status = value;
        if newly_set & status::FEATURES_OK != 0
            && self.acked_features & super::VIRTIO_F_VERSION_1 == 0
        {
            // Only modern drivers are supported: refuse FEATURES_OK so the driver fails
            // cleanly instead of speaking the legacy layout to a modern device.
            self.status &= !status::FEATURES_OK;
        }
        if newly_set & status::DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn ready_queues(&self, next_avail: impl Fn(&QueueState) -> u16) -> Vec<QueueConfig> {
        self.queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready)
            .map(|(index, q)| QueueConfig {
                index: index as u16,
                size: q.size,
                next_avail: next_avail(q),
                descriptors: q.descriptors,
                driver_area: q.driver_area,
                device_area: q.device_area,
            })
            .collect()
    }

    fn activate(&mut self) {
        let queues = self.ready_queues(|_| 0);
        match self
            .device
            .activate(self.acked_features, &queues, &self.kicks, &self.interrupt)
        {
            Ok(()) => {
                self.active = true;
                tracing::info!(device = %self.name, queues = queues.len(), "virtio device activated");
            }
            Err(e) => {
                tracing::error!(device = %self.name, "cannot activate virtio device: {e}");
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    /// Hands the device to a new backend, e.g. a restarted worker. A running device keeps
    /// running: the new backend resumes each queue at the guest's used index (requests
    /// the old one took but never completed are served again, which is safe for devices
    /// that complete in order), then gets a kick to look at the rings and the guest gets
    /// an interrupt in case a completion's notification was lost with the old backend.
    /// A device that completes out of order also inherits the old backend's inflight
    /// region, from which the new one learns exactly which requests are still owed.
    pub fn replace_device(
        &mut self,
        mut device: Box<dyn VirtioDevice>,
        memory: &GuestMemory,
    ) -> Result<(), ActivateError> {
        if self.active {
            // The used index is where an in-order device resumes; an out-of-order one gets
            // the inflight region too and resumes after what is still in flight (see
            // `QueueConfig::next_avail`).
            let queues = self.ready_queues(|q| ring_index(memory, q.device_area));
            for queue in &queues {
                tracing::info!(
                    device = %self.name,
                    queue = queue.index,
                    used_idx = queue.next_avail,
                    avail_idx = ring_index(memory, queue.driver_area),
                    "resuming queue on the new backend"
                );
            }
            // A clone: if this replacement fails to start, the next one needs it too.
            if let Some(region) = self.device.inflight_region() {
                device.adopt_inflight_region(region);
            }
            device.activate(self.acked_features, &queues, &self.kicks, &self.interrupt)?;
            for queue in &queues {
                if let Some(kick) = self.kicks.get(usize::from(queue.index)) {
                    let _ = kick.write(1);
                }
            }
            let _ = self.interrupt.write(1);
        }
        self.device = device;
        Ok(())
    }

    /// The backend is gone for good: tell the driver the device needs a reset.
    pub fn mark_failed(&mut self) {
        self.active = false;
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        let _ = self.interrupt.write(1);
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.queues
            .iter_mut()
            .for_each(|q| *q = QueueState::default());
    }
}

/// The `idx` field of a split ring's available or used ring, which both follow a 16-bit
/// `flags` field; 0 when the guest's address is not in RAM (the backend then refuses the
/// ring anyway).
fn ring_index(memory: &GuestMemory, ring: u64) -> u16 {
    memory
        .read_obj::<u16>(GuestAddress(ring.wrapping_add(RING_INDEX_OFFSET)))
        .unwrap_or(0)
}

impl BusDevice for VirtioMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            // The spec allows only aligned 32-bit access to the registers.
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, InflightRegion, VIRTIO_F_VERSION_1};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Recorded {
        activations: Vec<(u64, Vec<QueueConfig>)>,
        resets: usize,
        /// Inflight regions adopted before activation.
        adopted: Vec<u64>,
    }

    struct FakeDevice {
        log: Arc<Mutex<Recorded>>,
        fail: bool,
    }

    /// A FakeDevice whose backend tracks in-flight requests in a region of `size` bytes.
    struct TrackingDevice {
        inner: FakeDevice,
        region: Option<InflightRegion>,
    }

    impl VirtioDevice for TrackingDevice {
        fn device_type(&self) -> u32 {
            self.inner.device_type()
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256]
        }
        fn features(&self) -> u64 {
            self.inner.features()
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            self.inner.read_config(offset, data)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.inner.write_config(offset, data)
        }
        fn activate(
            &mut self,
            acked_features: u64,
            queues: &[QueueConfig],
            kicks: &[EventFd],
            interrupt: &EventFd,
        ) -> Result<(), ActivateError> {
            self.inner
                .activate(acked_features, queues, kicks, interrupt)
        }
        fn reset(&mut self) {
            self.region = None;
            self.inner.reset()
        }
        fn inflight_region(&self) -> Option<InflightRegion> {
            self.region.clone()
        }
        fn adopt_inflight_region(&mut self, region: InflightRegion) {
            self.inner
                .log
                .lock()
                .unwrap()
                .adopted
                .push(region.mmap_size);
            self.region = Some(region);
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            acked_features: u64,
            queues: &[QueueConfig],
            _kicks: &[EventFd],
            _interrupt: &EventFd,
        ) -> Result<(), ActivateError> {
            if self.fail {
                return Err(ActivateError::Backend("no".into()));
            }
            self.log
                .lock()
                .unwrap()
                .activations
                .push((acked_features, queues.to_vec()));
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
    }

    fn transport(fail: bool) -> (VirtioMmio, Arc<Mutex<Recorded>>) {
        let log = Arc::new(Mutex::new(Recorded::default()));
        let device = FakeDevice {
            log: log.clone(),
            fail,
        };
        let kicks = vec![EventFd::new(0).unwrap()];
        let mmio = VirtioMmio::new(
            "rng0".into(),
            Box::new(device),
            kicks,
            EventFd::new(0).unwrap(),
        );
        (mmio, log)
    }

    fn read(mmio: &mut VirtioMmio, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        mmio.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(mmio: &mut VirtioMmio, offset: u64, value: u32) {
        mmio.write(offset, &value.to_le_bytes());
    }

    /// What Linux's virtio_mmio driver does to bring a one-queue device up.
    fn bring_up(mmio: &mut VirtioMmio) {
        write(mmio, reg::STATUS, status::ACKNOWLEDGE);
        write(mmio, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for select in 0..2 {
            write(mmio, reg::DEVICE_FEATURES_SEL, select);
            let offered = read(mmio, reg::DEVICE_FEATURES);
            write(mmio, reg::DRIVER_FEATURES_SEL, select);
            write(mmio, reg::DRIVER_FEATURES, offered);
        }
        write(
            mmio,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        write(mmio, reg::QUEUE_SEL, 0);
        assert_eq!(read(mmio, reg::QUEUE_NUM_MAX), 256);
        write(mmio, reg::QUEUE_NUM, 128);
        write(mmio, reg::QUEUE_DESC_LOW, 0x1000);
        write(mmio, reg::QUEUE_DESC_HIGH, 0x1);
        write(mmio, reg::QUEUE_DRIVER_LOW, 0x2000);
        write(mmio, reg::QUEUE_DEVICE_LOW, 0x3000);
        write(mmio, reg::QUEUE_READY, 1);
        write(
            mmio,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn identifies_as_a_modern_virtio_mmio_device() {
        let (mut mmio, _) = transport(false);
        assert_eq!(read(&mut mmio, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(read(&mut mmio, reg::VERSION), 2);
        assert_eq!(read(&mut mmio, reg::DEVICE_ID), 4);
        write(&mut mmio, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut mmio, reg::DEVICE_FEATURES), 1);
        let mut config = [0u8; 2];
        mmio.read(reg::CONFIG + 3, &mut config);
        assert_eq!(config, [3, 3]);
    }

    #[test]
    fn driver_ok_activates_with_the_configured_queue() {
        let (mut mmio, log) = transport(false);
        bring_up(&mut mmio);
        let log = log.lock().unwrap();
        let (features, queues) = &log.activations[0];
        assert_eq!(*features, VIRTIO_F_VERSION_1 | 1);
        assert_eq!(
            queues[0],
            QueueConfig {
                index: 0,
                size: 128,
                next_avail: 0,
                descriptors: 0x1_0000_1000,
                driver_area: 0x2000,
                device_area: 0x3000,
            }
        );
        drop(log);
        assert_eq!(
            read(&mut mmio, reg::INTERRUPT_STATUS),
            INTERRUPT_USED_BUFFER
        );
    }

    #[test]
    fn reset_stops_the_device_and_clears_state() {
        let (mut mmio, log) = transport(false);
        bring_up(&mut mmio);
        write(&mut mmio, reg::STATUS, 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        assert_eq!(read(&mut mmio, reg::STATUS), 0);
        assert_eq!(read(&mut mmio, reg::QUEUE_READY), 0);
        assert_eq!(read(&mut mmio, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn bad_driver_input_is_contained() {
        let (mut mmio, log) = transport(false);
        // Non-power-of-two and oversized queue sizes are ignored.
        write(&mut mmio, reg::QUEUE_NUM, 100);
        write(&mut mmio, reg::QUEUE_NUM, 4096);
        // A queue that does not exist reads as absent.
        write(&mut mmio, reg::QUEUE_SEL, 7);
        assert_eq!(read(&mut mmio, reg::QUEUE_NUM_MAX), 0);
        write(&mut mmio, reg::QUEUE_READY, 1);
        write(&mut mmio, reg::QUEUE_NOTIFY, 9);
        // Unaligned or narrow register accesses are ignored.
        mmio.write(reg::STATUS, &[1]);
        assert_eq!(read(&mut mmio, reg::STATUS), 0);
        // Features the device never offered cannot be acked; without VERSION_1 the
        // device refuses FEATURES_OK.
        write(&mut mmio, reg::DRIVER_FEATURES, 0xffff_fffe);
        write(&mut mmio, reg::STATUS, status::FEATURES_OK);
        assert_eq!(read(&mut mmio, reg::STATUS) & status::FEATURES_OK, 0);
        assert!(log.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn a_replacement_backend_resumes_at_the_used_index() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        // Used ring at 0x3000: flags, then idx = 7.
        memory.write_obj(7u16, GuestAddress(0x3002)).unwrap();
        let (mut mmio, _) = transport(false);
        bring_up(&mut mmio);
        // bring_up put the descriptor table above this small memory; only the used
        // ring matters here.
        let log = Arc::new(Mutex::new(Recorded::default()));
        let replacement = FakeDevice {
            log: log.clone(),
            fail: false,
        };
        mmio.replace_device(Box::new(replacement), &memory).unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.activations.len(), 1);
        assert_eq!(log.activations[0].1[0].next_avail, 7);
        assert_eq!(
            mmio.kicks[0].read().unwrap(),
            1,
            "the new backend gets a kick"
        );
        assert_eq!(
            mmio.interrupt.read().unwrap(),
            1,
            "the guest gets an interrupt"
        );
    }

    #[test]
    fn a_replacement_backend_inherits_the_inflight_region() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let log = Arc::new(Mutex::new(Recorded::default()));
        let region = InflightRegion {
            file: Arc::new(std::fs::File::open("/dev/null").unwrap()),
            mmap_size: 4160,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 256,
        };
        let first = TrackingDevice {
            inner: FakeDevice {
                log: log.clone(),
                fail: false,
            },
            region: Some(region),
        };
        let mut mmio = VirtioMmio::new(
            "blk0".into(),
            Box::new(first),
            vec![EventFd::new(0).unwrap()],
            EventFd::new(0).unwrap(),
        );
        bring_up(&mut mmio);
        let replacement = |fail| {
            Box::new(TrackingDevice {
                inner: FakeDevice {
                    log: log.clone(),
                    fail,
                },
                region: None,
            })
        };
        // A replacement that fails to start does not take the region with it.
        assert!(mmio.replace_device(replacement(true), &memory).is_err());
        mmio.replace_device(replacement(false), &memory).unwrap();
        assert_eq!(log.lock().unwrap().adopted, vec![4160, 4160]);
        assert!(mmio.device.inflight_region().is_some());

        // After a driver reset the queues start afresh: nothing to inherit.
        write(&mut mmio, reg::STATUS, 0);
        assert!(mmio.device.inflight_region().is_none());
    }

    #[test]
    fn a_failed_device_reports_needs_reset() {
        let (mut mmio, _) = transport(false);
        bring_up(&mut mmio);
        mmio.mark_failed();
        assert_ne!(read(&mut mmio, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            read(&mut mmio, reg::INTERRUPT_STATUS),
            INTERRUPT_CONFIG_CHANGE
        );
    }

    #[test]
    fn failed_activation_asks_for_a_reset() {
        let (mut mmio, _) = transport(true);
        bring_up(&mut mmio);
        assert_ne!(read(&mut mmio, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            read(&mut mmio, reg::INTERRUPT_STATUS),
            INTERRUPT_CONFIG_CHANGE
        );
    }
}
