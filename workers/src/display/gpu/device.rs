//! The virtio-gpu device: two queues (control, cursor), the config space, and the dispatch
//! of each command to resources and scanout. A bad command gets an error response and a
//! debug log line; nothing a guest sends ends the worker.

use std::io::{self, Read, Write};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::edid::edid_for_mode;
use super::protocol::{
    parse_command, response_header, Command, CtrlHeader, Fields, ParseError, CTRL_HDR_SIZE,
    DISPLAY_INFO_SIZE, EDID_RESPONSE_SIZE, MEM_ENTRY_SIZE, RESP_ERR_INVALID_PARAMETER,
    RESP_ERR_UNSPEC, RESP_OK_DISPLAY_INFO, RESP_OK_EDID, RESP_OK_NODATA, VIRTIO_GPU_F_EDID,
};
use super::resources::{CommandError, Resources};
use super::scanout::{Cursor, Scanout};
use super::store::{Record, SavedResource, StateStore};
use crate::display::framebuffer::{Framebuffer, Rect};
use crate::vhost_user::{DeviceBackend, GuestRam};
use crate::virtio::drain::{notify, settle};
use crate::virtio::{drain, Drained, Next, QueueFault};

pub const NUM_QUEUES: usize = 2;
pub const CONTROL_QUEUE: u16 = 0;
pub const CURSOR_QUEUE: u16 = 1;
pub const MAX_QUEUE_SIZE: usize = 256;
/// events_read, events_clear, num_scanouts, num_capsets.
pub const CONFIG_SIZE: usize = 16;

/// What the guest may make the worker allocate.
#[derive(Debug, Clone, Copy)]
pub struct GpuLimits {
    /// Total bytes of all resources' host copies.
    pub memory_budget: u64,
    /// Largest width or height of one resource.
    pub max_dimension: u32,
    /// Most backing entries in one RESOURCE_ATTACH_BACKING.
    pub max_backing_entries: u32,
}

impl Default for GpuLimits {
    fn default() -> Self {
        GpuLimits {
            memory_budget: 256 << 20,
            max_dimension: 16384,
            max_backing_entries: 16384,
        }
    }
}

pub struct GpuDevice {
    memory: Option<GuestRam>,
    event_idx: bool,
    width: u32,
    height: u32,
    limits: GpuLimits,
    resources: Resources,
    scanout: Scanout,
    events_read: u32,
    ring_fault_reported: bool,
    /// Where what the guest set up is kept for a replacement worker; None standalone.
    store: Option<StateStore>,
    /// A predecessor's record, rebuilt once guest memory is mapped.
    pending: Option<Record>,
    /// After a rebuild, the control commands the predecessor may have run but not
    /// answered: the VMM resumes the ring at the used index, so they come again. None
    /// until the first pass over the ring counts them.
    replay: Replay,
    store_fault_reported: bool,
}

impl GpuDevice {
    /// A device reporting a `width` x `height` display whose scanout lands in `framebuffer`.
    pub fn new(framebuffer: Arc<Framebuffer>, width: u32, height: u32, limits: GpuLimits) -> Self {
        GpuDevice {
            memory: None,
            event_idx: false,
            width,
            height,
            limits,
            resources: Resources::new(limits.memory_budget, limits.max_dimension),
            scanout: Scanout::new(framebuffer),
            events_read: 0,
            ring_fault_reported: false,
            store: None,
            pending: None,
            replay: Replay::Done,
            store_fault_reported: false,
        }
    }

    /// Keeps the device's state in `store` from now on; `record` is what a predecessor left
    /// there, to be rebuilt when guest memory arrives.
    pub fn with_store(mut self, store: StateStore, record: Option<Record>) -> Self {
        self.store = Some(store);
        self.pending = record.filter(|r| !r.is_empty());
        self
    }

    /// The state a replacement would need, as it is now.
    fn record(&self) -> Record {
        Record {
            resources: self
                .resources
                .iter()
                .map(|(id, r)| SavedResource {
                    id,
                    format: r.format,
                    width: r.width,
                    height: r.height,
                    backing: r.backing().to_vec(),
                })
                .collect(),
            scanout: (self.scanout.resource_id(), self.scanout.rect()),
            // The guest may unref the cursor's resource while it is still the cursor's:
            // recorded as no cursor image, since a record naming a missing resource is bad.
            cursor: match self.scanout.cursor {
                c if c.resource_id != 0 && self.resources.get(c.resource_id).is_err() => Cursor {
                    resource_id: 0,
                    ..c
                },
                c => c,
            },
        }
    }

    /// Writes the current state to the store, if there is one. A failure costs only what a
    /// replacement could rebuild, so the device carries on; it is logged once.
    fn persist(&mut self) {
        let record = self.record();
        let Some(store) = self.store.as_mut() else {
            return;
        };
        match store.save(&record) {
            Ok(()) => self.store_fault_reported = false,
            Err(e) if !self.store_fault_reported => {
                self.store_fault_reported = true;
                tracing::warn!("virtio-gpu: a replacement worker would start empty: {e}");
            }
            Err(_) => {}
        }
    }

    /// Rebuilds a predecessor's resources, their backing and pixels (read again from the
    /// guest's pages), the scanout and the cursor. Anything wrong - a store a compromised
    /// worker wrote, a budget, memory that moved - leaves the device empty, as after a
    /// reset, and the store saying so.
    fn restore(&mut self, record: &Record, memory: &GuestMemoryMmap) {
        match self.rebuild(record, memory) {
            Ok(()) => {
                self.replay = Replay::Uncounted;
                tracing::info!(
                    resources = record.resources.len(),
                    scanout = record.scanout.0,
                    "virtio-gpu: the previous worker's screen is restored"
                )
            }
            Err(e) => {
                tracing::error!(
                    "virtio-gpu: the state store is refused ({e}); the device starts empty"
                );
                self.resources.clear();
                self.scanout.forget(self.scanout.resource_id());
                self.scanout.cursor = Cursor::default();
                self.persist();
            }
        }
    }

    fn rebuild(&mut self, record: &Record, memory: &GuestMemoryMmap) -> Result<(), CommandError> {
        for saved in &record.resources {
            self.resources
                .create(saved.id, saved.format, saved.width, saved.height)?;
            if saved.backing.len() > self.limits.max_backing_entries as usize {
                return Err(CommandError::TooMany);
            }
            if saved.backing.is_empty() {
                continue;
            }
            self.resources
                .attach_backing(saved.id, saved.backing.clone(), memory)?;
            // The whole resource, or as many whole rows as the backing holds: the guest
            // may have attached less and transferred only part.
            let have: u64 = saved.backing.iter().map(|e| u64::from(e.length)).sum();
            let stride = u64::from(saved.width) * 4;
            let rows = (have / stride).min(u64::from(saved.height)) as u32;
            self.resources.transfer_to_host(
                saved.id,
                Rect::new(0, 0, saved.width, rows),
                0,
                memory,
            )?;
        }
        let (id, rect) = record.scanout;
        self.scanout.set(&self.resources, id, rect)?;
        self.scanout.cursor = record.cursor;
        Ok(())
    }

    pub fn into_backend(self) -> DeviceBackend<Arc<RwLock<GpuDevice>>> {
        DeviceBackend {
            backend: Arc::new(RwLock::new(self)),
            event_sources: Vec::new(),
            // Commands complete in order, at once.
            inflight: None,
        }
    }

    fn serve_queue(&mut self, vring: &VringRwLock, index: u16) -> io::Result<()> {
        let Some(memory) = self.memory.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        if !(state.is_enabled() && state.get_queue().ready()) {
            return Ok(());
        }
        if index == CONTROL_QUEUE && self.replay == Replay::Uncounted {
            let queue = state.get_queue();
            let left = queue
                .avail_idx(&*memory, std::sync::atomic::Ordering::Acquire)
                .map_or(0, |avail| avail.0.wrapping_sub(queue.next_avail()));
            // At most a ring's worth were in flight; more is a guest's bad index.
            self.replay = Replay::Left(left.min(MAX_QUEUE_SIZE as u16));
        }
        let mut drained = Drained::default();
        let result = drain(&mut state, &memory, self.event_idx, &mut drained, |chain| {
            let replayed = index == CONTROL_QUEUE && self.replay.take_one();
            Ok::<_, QueueFault>(Next::Used(self.process_chain(chain, &memory, replayed)))
        });
        let notified = notify(&mut state, drained.completed, false);
        settle(
            result.and(notified),
            "virtio-gpu queue",
            &mut self.ring_fault_reported,
        )
    }

    /// Runs one command; returns how many bytes of response were written.
    fn process_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
        replayed: bool,
    ) -> u32 {
        let (mut reader, mut writer) = match (
            Reader::new(memory, chain.clone()),
            Writer::new(memory, chain),
        ) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                tracing::debug!("virtio-gpu: a chain outside guest memory, dropped");
                return 0;
            }
        };
        // A header and the largest command: ATTACH_BACKING with its most entries.
        let max = CTRL_HDR_SIZE + 8 + self.limits.max_backing_entries as usize * MEM_ENTRY_SIZE;
        let len = reader.available_bytes().min(max);
        let mut bytes = vec![0u8; len];
        if reader.read_exact(&mut bytes).is_err() {
            return 0;
        }
        let mut fields = Fields::new(&bytes);
        let Ok(header) = fields.header() else {
            tracing::debug!("virtio-gpu: a command shorter than its header");
            let response = response_header(&CtrlHeader::default(), RESP_ERR_UNSPEC);
            return write_response(&mut writer, &response);
        };
        let response = self.execute(&header, &bytes[CTRL_HDR_SIZE..], memory, replayed);
        write_response(&mut writer, &response)
    }

    fn execute(
        &mut self,
        header: &CtrlHeader,
        body: &[u8],
        memory: &GuestMemoryMmap,
        replayed: bool,
    ) -> Vec<u8> {
        let command = match parse_command(header, body, self.limits.max_backing_entries) {
            Ok(command) => command,
            Err(e) => {
                tracing::debug!("virtio-gpu: command {:#x} refused: {e:?}", header.kind);
                let code = match e {
                    ParseError::Unknown(_) => RESP_ERR_UNSPEC,
                    ParseError::Truncated | ParseError::TooManyEntries(_) => {
                        RESP_ERR_INVALID_PARAMETER
                    }
                };
                return response_header(header, code).to_vec();
            }
        };
        match self.run(&command, header, memory) {
            Ok(response) => {
                if changes_state(&command) {
                    self.persist();
                }
                response
            }
            Err(e) if replayed && self.already_applied(&command, &e) => {
                tracing::debug!("virtio-gpu: {command:?} was run before the restart");
                response_header(header, RESP_OK_NODATA).to_vec()
            }
            Err(e) => {
                tracing::debug!("virtio-gpu: {command:?} failed: {e}");
                response_header(header, e.response()).to_vec()
            }
        }
    }

    /// Whether a replayed command failed only because the predecessor had run it (and
    /// recorded it) before it died: the guest gets the OK it was owed. Every other state
    /// change is idempotent (attach, scanout, cursor) or was not recorded, so runs again.
    fn already_applied(&self, command: &Command, error: &CommandError) -> bool {
        match (command, error) {
            (
                &Command::ResourceCreate2d {
                    resource_id,
                    format,
                    width,
                    height,
                },
                CommandError::ResourceIdTaken(_),
            ) => self
                .resources
                .get(resource_id)
                .is_ok_and(|r| (r.format, r.width, r.height) == (format, width, height)),
            (Command::ResourceUnref { .. }, CommandError::NoSuchResource(_)) => true,
            (Command::DetachBacking { .. }, CommandError::NoBacking(_)) => true,
            _ => false,
        }
    }

    fn run(
        &mut self,
        command: &Command,
        header: &CtrlHeader,
        memory: &GuestMemoryMmap,
    ) -> Result<Vec<u8>, CommandError> {
        let ok = || Ok(response_header(header, RESP_OK_NODATA).to_vec());
        match *command {
            Command::GetDisplayInfo => {
                let mut out = vec![0u8; DISPLAY_INFO_SIZE];
                out[..CTRL_HDR_SIZE]
                    .copy_from_slice(&response_header(header, RESP_OK_DISPLAY_INFO));
                let pmode = &mut out[CTRL_HDR_SIZE..CTRL_HDR_SIZE + 24];
                pmode[8..12].copy_from_slice(&self.width.to_le_bytes());
                pmode[12..16].copy_from_slice(&self.height.to_le_bytes());
                pmode[16..20].copy_from_slice(&1u32.to_le_bytes()); // enabled
                Ok(out)
            }
            Command::GetEdid { scanout } => {
                if scanout != 0 {
                    return Err(CommandError::NoSuchScanout(scanout));
                }
                let mut out = vec![0u8; EDID_RESPONSE_SIZE];
                out[..CTRL_HDR_SIZE].copy_from_slice(&response_header(header, RESP_OK_EDID));
                out[CTRL_HDR_SIZE..CTRL_HDR_SIZE + 4].copy_from_slice(&128u32.to_le_bytes());
                out[CTRL_HDR_SIZE + 8..CTRL_HDR_SIZE + 8 + 128]
                    .copy_from_slice(&edid_for_mode(self.width, self.height));
                Ok(out)
            }
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => {
                self.resources.create(resource_id, format, width, height)?;
                ok()
            }
            Command::ResourceUnref { resource_id } => {
                self.resources.unref(resource_id)?;
                self.scanout.forget(resource_id);
                ok()
            }
            Command::SetScanout {
                rect,
                scanout_id,
                resource_id,
            } => {
                if scanout_id != 0 {
                    return Err(CommandError::NoSuchScanout(scanout_id));
                }
                self.scanout.set(&self.resources, resource_id, rect)?;
                ok()
            }
            Command::ResourceFlush { rect, resource_id } => {
                self.scanout.flush(&self.resources, resource_id, rect)?;
                ok()
            }
            Command::TransferToHost2d {
                rect,
                offset,
                resource_id,
            } => {
                self.resources
                    .transfer_to_host(resource_id, rect, offset, memory)?;
                ok()
            }
            Command::AttachBacking {
                resource_id,
                ref entries,
            } => {
                self.resources
                    .attach_backing(resource_id, entries.clone(), memory)?;
                ok()
            }
            Command::DetachBacking { resource_id } => {
                self.resources.detach_backing(resource_id)?;
                ok()
            }
            Command::UpdateCursor {
                scanout_id,
                x,
                y,
                resource_id,
                hot_x,
                hot_y,
            } => {
                if scanout_id != 0 {
                    return Err(CommandError::NoSuchScanout(scanout_id));
                }
                if resource_id != 0 {
                    self.resources.get(resource_id)?;
                }
                self.scanout.cursor = super::scanout::Cursor {
                    resource_id,
                    x,
                    y,
                    hot_x,
                    hot_y,
                };
                ok()
            }
            Command::MoveCursor { scanout_id, x, y } => {
                if scanout_id != 0 {
                    return Err(CommandError::NoSuchScanout(scanout_id));
                }
                self.scanout.cursor.x = x;
                self.scanout.cursor.y = y;
                ok()
            }
        }
    }
}

/// Where a rebuilt device stands with the commands its predecessor left unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// Not counted yet: the first pass over the control ring does.
    Uncounted,
    /// This many commands from where the ring resumed may have run already.
    Left(u16),
    Done,
}

impl Replay {
    /// Whether the next command is one of those; counts it.
    fn take_one(&mut self) -> bool {
        match *self {
            Replay::Left(n) if n > 0 => {
                *self = if n == 1 {
                    Replay::Done
                } else {
                    Replay::Left(n - 1)
                };
                true
            }
            Replay::Left(_) => {
                *self = Replay::Done;
                false
            }
            _ => false,
        }
    }
}

/// Whether a command that succeeded changed what the state store records. Transfers and
/// flushes (the busy path) and cursor moves do not.
fn changes_state(command: &Command) -> bool {
    matches!(
        command,
        Command::ResourceCreate2d { .. }
            | Command::ResourceUnref { .. }
            | Command::SetScanout { .. }
            | Command::AttachBacking { .. }
            | Command::DetachBacking { .. }
            | Command::UpdateCursor { .. }
    )
}

fn write_response(writer: &mut Writer<'_>, response: &[u8]) -> u32 {
    let n = writer.available_bytes().min(response.len());
    match writer.write_all(&response[..n]) {
        // At most the size of a response.
        Ok(()) => n as u32,
        Err(_) => 0,
    }
}

impl VhostUserBackendMut for GpuDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_GPU_F_EDID)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&mut self) {
        self.event_idx = false;
        self.ring_fault_reported = false;
        self.resources.clear();
        self.scanout.forget(self.scanout.resource_id());
        self.scanout.cursor = Cursor::default();
        self.pending = None;
        self.replay = Replay::Done;
        self.persist();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn update_memory(&mut self, memory: GuestRam) -> io::Result<()> {
        if let Some(record) = self.pending.take() {
            let mapped = memory.memory();
            self.restore(&record, &mapped);
        }
        self.memory = Some(memory);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..4].copy_from_slice(&self.events_read.to_le_bytes());
        config[8..12].copy_from_slice(&1u32.to_le_bytes()); // num_scanouts
        let start = (offset as usize).min(CONFIG_SIZE);
        let end = start.saturating_add(size as usize).min(CONFIG_SIZE);
        config[start..end].to_vec()
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only events_clear (offset 4) is writable: it clears the bits it names.
        if offset == 4 && buf.len() == 4 {
            let mut clear = [0u8; 4];
            clear.copy_from_slice(buf);
            self.events_read &= !u32::from_le_bytes(clear);
        }
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            CONTROL_QUEUE | CURSOR_QUEUE => match vrings.get(usize::from(device_event)) {
                Some(vring) => self.serve_queue(vring, device_event),
                None => Ok(()),
            },
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown device event {other}"),
            )),
        }
    }
}
