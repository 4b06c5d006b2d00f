//! `bulkhead-worker input` driven from userspace: the virtio-input config space and event
//! queue through a vhost-user frontend, fed with reports on a real socket pair, and with
//! keys typed in vncdotool (a real VNC client) into a launched display worker that holds
//! the other end of the pair, as `bulkhead run --display vnc` wires them.
//!
//! Needs the worker binary: `cargo build --workspace` first (same profile as the tests).

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_protocol::{DeviceConfig, DisplayConfig, InputConfig};
use bulkhead_tests::vhost::{Buffer, DeviceSetup, UserspaceDevice, WorkerProcess};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend as _;
use vm_memory::GuestAddress;

const TIMEOUT: Duration = Duration::from_secs(20);
const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const EV_ABS: u16 = 3;
const KEY_A: u16 = 30;
const KEY_LEFTSHIFT: u16 = 42;
const KEY_DOT: u16 = 52;
const BTN_LEFT: u16 = 0x110;

type Event = (u16, u16, u32);

fn event_bytes(events: &[Event]) -> Vec<u8> {
    events
        .iter()
        .flat_map(|&(kind, code, value)| {
            let mut bytes = kind.to_le_bytes().to_vec();
            bytes.extend(code.to_le_bytes());
            bytes.extend(value.to_le_bytes());
            bytes
        })
        .collect()
}

/// A non-blocking SOCK_SEQPACKET pair, as the VMM makes it.
fn events_pair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid for the two descriptors socketpair writes.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    ensure!(ret == 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn send(socket: &OwnedFd, bytes: &[u8]) -> Result<()> {
    // SAFETY: `bytes` is valid for reads of its length.
    let n = unsafe { libc::write(socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    ensure!(
        n == bytes.len() as isize,
        "write: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

struct Input {
    worker: WorkerProcess,
    device: UserspaceDevice,
    buffers: HashMap<u16, GuestAddress>,
}

impl Input {
    /// An input worker launched with `events` as its events socket.
    fn launch(events: &OwnedFd) -> Result<Input> {
        let config = DeviceConfig::Input(InputConfig { events_fd: 5 });
        let (worker, connection) =
            WorkerProcess::launched_with_fds("input0", config, &[(events.as_raw_fd(), 5)])?;
        Ok(Input {
            worker,
            device: input_device(connection)?,
            buffers: HashMap::new(),
        })
    }

    /// Posts `count` event buffers of `len` bytes and kicks.
    fn post(&mut self, count: usize, len: u32) -> Result<()> {
        for _ in 0..count {
            let addr = self.device.memory.allocate(u64::from(len), 8)?;
            let head = self.device.queues[0].post(&[Buffer::writable(addr, len)])?;
            self.buffers.insert(head, addr);
        }
        self.device.queues[0].kick()?;
        Ok(())
    }

    /// The next `count` events the device writes; a buffer given back empty is `None`.
    fn events(&mut self, count: usize) -> Result<Vec<Option<Event>>> {
        let used = self.device.queues[0].wait_used(count, TIMEOUT)?;
        used.iter()
            .map(|element| {
                if element.len == 0 {
                    return Ok(None);
                }
                ensure!(element.len == 8, "event of {} bytes", element.len);
                let addr = self.buffers[&(element.id as u16)];
                let b = self.device.memory.read(addr, 8)?;
                Ok(Some((
                    u16::from_le_bytes([b[0], b[1]]),
                    u16::from_le_bytes([b[2], b[3]]),
                    u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                )))
            })
            .collect()
    }

    /// Selects `select`/`subsel` and reads the answer.
    fn config(&mut self, select: u8, subsel: u8) -> Result<Vec<u8>> {
        let frontend = self.device.frontend.inner();
        frontend.set_config(0, VhostUserConfigFlags::WRITABLE, &[select, subsel])?;
        let (_, config) = frontend.get_config(0, 136, VhostUserConfigFlags::empty(), &[0; 136])?;
        ensure!(
            config[..2] == [select, subsel],
            "selection {:?}",
            &config[..2]
        );
        let size = usize::from(config[2]);
        Ok(config[8..8 + size].to_vec())
    }

    fn assert_alive(&self) -> Result<()> {
        ensure!(
            self.worker.is_running(),
            "the worker died:\n{}",
            self.worker.stderr()
        );
        ensure!(
            !self.worker.stderr().contains("panicked"),
            "{}",
            self.worker.stderr()
        );
        Ok(())
    }
}

/// Runs `vncdo` against the display worker's VNC port with `args`; its failure carries the
/// worker's log.
fn vncdo(port: u16, args: &[&str], display: &WorkerProcess) -> Result<()> {
    bulkhead_tests::vncdo::vncdo(port, args)
        .with_context(|| format!("display worker:\n{}", display.stderr()))
}

fn input_device(connection: UnixStream) -> Result<UserspaceDevice> {
    let mut setup = DeviceSetup::new(&[64, 16]);
    setup.protocol_features |= VhostUserProtocolFeatures::CONFIG;
    Ok(UserspaceDevice::start(connection, &setup)?)
}

fn bit(bitmap: &[u8], code: u16) -> bool {
    bitmap
        .get(usize::from(code / 8))
        .is_some_and(|byte| byte & (1 << (code % 8)) != 0)
}

#[test]
fn config_space_describes_a_keyboard_and_tablet() -> Result<()> {
    let (_display_end, input_end) = events_pair()?;
    let mut input = Input::launch(&input_end)?;
    let name = String::from_utf8(input.config(0x01, 0)?)?;
    ensure!(name.contains("keyboard and tablet"), "{name:?}");
    let ev_key = input.config(0x11, EV_KEY as u8)?;
    for code in [KEY_A, KEY_LEFTSHIFT, KEY_DOT, 28, 57, BTN_LEFT] {
        ensure!(bit(&ev_key, code), "key {code} not advertised");
    }
    ensure!(
        input.config(0x11, EV_ABS as u8)? == [0b11],
        "ABS_X and ABS_Y"
    );
    let abs_x = input.config(0x12, 0)?;
    ensure!(abs_x.len() == 20, "absinfo {abs_x:?}");
    ensure!(
        abs_x[4..8] == 0x7fffu32.to_le_bytes(),
        "max {:?}",
        &abs_x[4..8]
    );
    ensure!(input.config(0x11, 0x11)?.is_empty(), "no LEDs");
    ensure!(input.config(0x99, 7)?.is_empty());
    input.assert_alive()
}

#[test]
fn reports_reach_the_event_queue_and_garbage_does_not() -> Result<()> {
    let (display_end, input_end) = events_pair()?;
    let mut input = Input::launch(&input_end)?;
    drop(input_end);
    // Sent before the guest posts buffers: kept until it does.
    send(
        &display_end,
        &event_bytes(&[(EV_KEY, KEY_A, 1), (EV_SYN, 0, 0)]),
    )?;
    std::thread::sleep(Duration::from_millis(200));
    input.post(2, 8)?;
    ensure!(
        input.events(2)? == [Some((EV_KEY, KEY_A, 1)), Some((EV_SYN, 0, 0))],
        "the early report"
    );
    // What a broken or hostile display worker might send: each refused whole.
    for garbage in [
        vec![1u8; 7],
        vec![],
        event_bytes(&[(EV_KEY, KEY_A, 0)]),
        event_bytes(&[(EV_KEY, 0x2ff, 1), (EV_SYN, 0, 0)]),
        event_bytes(&[(EV_ABS, 0, 0x8000), (EV_SYN, 0, 0)]),
        event_bytes(&[(0x15, 0, 0), (EV_SYN, 0, 0)]),
        event_bytes(&[(EV_KEY, KEY_A, 1); 17]),
    ] {
        send(&display_end, &garbage)?;
    }
    let good = [(EV_ABS, 0, 0x7fff), (EV_KEY, BTN_LEFT, 1), (EV_SYN, 0, 0)];
    send(&display_end, &event_bytes(&good))?;
    // A buffer too small for an event comes back empty; the event waits for the next.
    input.post(1, 4)?;
    ensure!(input.events(1)? == [None], "a 4-byte buffer");
    input.post(3, 8)?;
    let got = input.events(3)?;
    ensure!(
        got == good.map(Some),
        "expected only the good report, got {got:?}"
    );
    ensure!(
        input.device.queues[0]
            .used_during(Duration::from_millis(300))?
            .is_empty(),
        "more events than sent"
    );
    // The status queue (LEDs) is given back untouched.
    let led = input.device.memory.allocate(8, 8)?;
    input
        .device
        .memory
        .write(led, &event_bytes(&[(0x11, 0, 1)]))?;
    input.device.queues[1].post(&[Buffer::readable(led, 8)])?;
    input.device.queues[1].kick()?;
    ensure!(input.device.queues[1].wait_used(1, TIMEOUT)?.len() == 1);
    input.assert_alive()
}

#[test]
fn keys_typed_in_vncdo_arrive_as_virtio_input_events() -> Result<()> {
    let (display_end, input_end) = events_pair()?;
    let mut input = Input::launch(&input_end)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let config = DeviceConfig::Display(DisplayConfig {
        vnc_listen_fd: 5,
        width: 640,
        height: 480,
        vnc_password: None,
        input_events_fd: Some(6),
        state_fd: None,
    });
    let (display, _gpu_connection) = WorkerProcess::launched_with_fds(
        "display0",
        config,
        &[(listener.as_raw_fd(), 5), (display_end.as_raw_fd(), 6)],
    )?;
    drop((listener, display_end, input_end));
    vncdo(
        port,
        &["type", "a>", "move", "639", "0", "click", "1"],
        &display,
    )?;
    // 'a' down, up; '>' as Shift+'.' down, up; the move; the click's press and release.
    let expected = [
        (EV_KEY, KEY_A, 1),
        (EV_SYN, 0, 0),
        (EV_KEY, KEY_A, 0),
        (EV_SYN, 0, 0),
        (EV_KEY, KEY_LEFTSHIFT, 1),
        (EV_KEY, KEY_DOT, 1),
        (EV_KEY, KEY_LEFTSHIFT, 0),
        (EV_SYN, 0, 0),
        (EV_KEY, KEY_DOT, 0),
        (EV_SYN, 0, 0),
        (EV_ABS, 0, 0x7fff),
        (EV_ABS, 1, 0),
        (EV_SYN, 0, 0),
        (EV_KEY, BTN_LEFT, 1),
        (EV_SYN, 0, 0),
        (EV_KEY, BTN_LEFT, 0),
        (EV_SYN, 0, 0),
    ];
    input.post(expected.len(), 8)?;
    let got: Vec<Event> = input
        .events(expected.len())?
        .into_iter()
        .flatten()
        .collect();
    ensure!(
        got == expected,
        "expected {expected:?}\n     got {got:?}\ndisplay worker:\n{}",
        display.stderr()
    );
    ensure!(display.is_running(), "display died: {}", display.stderr());
    input.assert_alive()
}

/// The VMM keeps its copy of the display worker's end of the events socket and hands it
/// to every display worker it starts: when one is killed, the input worker sees no
/// end-of-file (another copy of that end is open) and keys typed through the replacement
/// arrive like those typed before.
#[test]
fn keys_typed_after_a_display_worker_kill_still_arrive() -> Result<()> {
    let (display_end, input_end) = events_pair()?;
    let mut input = Input::launch(&input_end)?;
    drop(input_end);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let launch_display = || {
        let config = DeviceConfig::Display(DisplayConfig {
            vnc_listen_fd: 5,
            width: 640,
            height: 480,
            vnc_password: None,
            input_events_fd: Some(6),
            state_fd: None,
        });
        WorkerProcess::launched_with_fds(
            "display0",
            config,
            &[(listener.as_raw_fd(), 5), (display_end.as_raw_fd(), 6)],
        )
    };
    let expected = [
        (EV_KEY, KEY_A, 1),
        (EV_SYN, 0, 0),
        (EV_KEY, KEY_A, 0),
        (EV_SYN, 0, 0),
    ];
    for round in ["before the kill", "through the replacement"] {
        let (display, gpu_connection) = launch_display()?;
        vncdo(port, &["type", "a"], &display)?;
        input.post(expected.len(), 8)?;
        let got: Vec<Event> = input
            .events(expected.len())?
            .into_iter()
            .flatten()
            .collect();
        ensure!(
            got == expected,
            "{round}: expected {expected:?}\n     got {got:?}\ndisplay worker:\n{}",
            display.stderr()
        );
        display.kill()?;
        drop(gpu_connection);
        // The input worker serves on: its events socket did not end.
        std::thread::sleep(Duration::from_millis(100));
        input.assert_alive()?;
    }
    Ok(())
}
