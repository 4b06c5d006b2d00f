//! `bulkhead-worker display` driven from userspace: virtio-gpu commands through a
//! vhost-user frontend and split queues over memfd guest memory, and the screen read back
//! by real VNC clients - vncdotool's `vncdo` (PyPI; `.ci/run` installs it) and a small RFB
//! client here that checks what vncdotool cannot show (ZRLE bytes, DesktopSize, pixel
//! formats, misbehaving viewers). `bulkhead-viewer`, the `--display sdl` window, is
//! driven on SDL's offscreen video driver against the same worker.
//!
//! Needs the worker binary: `cargo build --workspace` first (same profile as the tests).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_protocol::{DeviceConfig, DisplayConfig};
use bulkhead_tests::micro::ScratchDir;
use bulkhead_tests::vhost::{worker_bin, Buffer, DeviceSetup, UserspaceDevice, WorkerProcess};
use bulkhead_tests::vncdo::vncdo;
use bulkhead_vmm::display::{open_display, DisplaySpec, OpenedDisplay};
use bulkhead_vmm::viewer::viewer_command;
use bulkhead_workers::display::vnc::des::vnc_response;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend as _;
use vm_memory::GuestAddress;

const TIMEOUT: Duration = Duration::from_secs(20);

// virtio-gpu wire constants (virtio 1.2, 5.7.6).
const GET_DISPLAY_INFO: u32 = 0x100;
const RESOURCE_CREATE_2D: u32 = 0x101;
const RESOURCE_UNREF: u32 = 0x102;
const SET_SCANOUT: u32 = 0x103;
const RESOURCE_FLUSH: u32 = 0x104;
const TRANSFER_TO_HOST_2D: u32 = 0x105;
const ATTACH_BACKING: u32 = 0x106;
const DETACH_BACKING: u32 = 0x107;
const GET_EDID: u32 = 0x10a;
const UPDATE_CURSOR: u32 = 0x300;
const MOVE_CURSOR: u32 = 0x301;
const OK_NODATA: u32 = 0x1100;
const OK_DISPLAY_INFO: u32 = 0x1101;
const OK_EDID: u32 = 0x1104;
const ERR_UNSPEC: u32 = 0x1200;
const ERR_OUT_OF_MEMORY: u32 = 0x1201;
const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
const ERR_INVALID_PARAMETER: u32 = 0x1205;
const FORMAT_B8G8R8X8: u32 = 2;
const FORMAT_R8G8B8X8: u32 = 134;
const F_EDID: u64 = 1 << 1;

/// The test pattern: a colour for every pixel that differs between neighbours.
fn pattern(x: u32, y: u32) -> [u8; 3] {
    [(x * 3) as u8, (y * 5) as u8, ((x + y) * 7) as u8]
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A standalone display worker with a device attached to it.
struct Display {
    _scratch: ScratchDir,
    worker: WorkerProcess,
    device: UserspaceDevice,
    port: u16,
}

impl Display {
    fn start() -> Result<Display> {
        Self::start_with(&[])
    }

    fn start_with(args: &[&std::ffi::OsStr]) -> Result<Display> {
        let port = free_port()?;
        let scratch = ScratchDir::new("display")?;
        let socket = scratch.path().join("gpu.sock");
        let mut command = Command::new(worker_bin());
        command
            .arg("display")
            .arg("--socket")
            .arg(&socket)
            .arg("--vnc-listen")
            .arg(format!("127.0.0.1:{port}"))
            // The input sink logs keys at debug level: the test hook for typed keys.
            .args(args)
            .env("BULKHEAD_LOG", "debug");
        let worker = WorkerProcess::listening_command(command, socket)?;
        let device = gpu_device(worker.connect()?)?;
        Ok(Display {
            _scratch: scratch,
            worker,
            device,
            port,
        })
    }

    /// Sends one command on the control queue and returns the response bytes.
    fn command(&mut self, bytes: &[u8], response_len: u32) -> Result<Vec<u8>> {
        send_command(&mut self.device, 0, bytes, response_len)
    }

    fn expect(&mut self, bytes: &[u8], expected: u32) -> Result<()> {
        expect_response(&mut self.device, bytes, expected)
    }

    fn assert_alive(&self) -> Result<()> {
        ensure!(
            self.worker.is_running(),
            "the worker died:\n{}",
            self.worker.stderr()
        );
        ensure!(
            !self.worker.stderr().contains("panicked"),
            "the worker panicked:\n{}",
            self.worker.stderr()
        );
        Ok(())
    }

    fn draw_pattern(&mut self, id: u32, width: u32, height: u32) -> Result<()> {
        draw_pattern(&mut self.device, id, width, height)
    }
}

fn expect_response(device: &mut UserspaceDevice, bytes: &[u8], expected: u32) -> Result<()> {
    let response = send_command(device, 0, bytes, 24)?;
    let got = response_type(&response);
    ensure!(
        got == expected,
        "command {:#x}: expected response {expected:#x}, got {got:#x}",
        u32::from_le_bytes(bytes[0..4].try_into()?)
    );
    Ok(())
}

/// Draws the pattern into a `width` x `height` resource backed by guest memory in two
/// pieces, transfers it, shows it and flushes it.
fn draw_pattern(device: &mut UserspaceDevice, id: u32, width: u32, height: u32) -> Result<()> {
    draw_pattern_backed(device, id, width, height).map(drop)
}

/// [`draw_pattern`], returning the backing: where the guest keeps the resource's pixels.
fn draw_pattern_backed(
    device: &mut UserspaceDevice,
    id: u32,
    width: u32,
    height: u32,
) -> Result<[(GuestAddress, u32); 2]> {
    expect_response(
        device,
        &create_2d(id, FORMAT_B8G8R8X8, width, height),
        OK_NODATA,
    )?;
    let len = width * height * 4;
    let mut pixels = Vec::with_capacity(len as usize);
    for y in 0..height {
        for x in 0..width {
            let [r, g, b] = pattern(x, y);
            pixels.extend_from_slice(&[b, g, r, 0xff]);
        }
    }
    // Two entries, split mid-row, as a scattered guest allocation would be.
    let first = len / 2 + 12;
    let a = device.memory.allocate(u64::from(first), 4096)?;
    let b = device.memory.allocate(u64::from(len - first), 4096)?;
    device.memory.write(a, &pixels[..first as usize])?;
    device.memory.write(b, &pixels[first as usize..])?;
    expect_response(
        device,
        &attach_backing(id, &[(a.0, first), (b.0, len - first)]),
        OK_NODATA,
    )?;
    expect_response(device, &transfer(id, (0, 0, width, height), 0), OK_NODATA)?;
    expect_response(
        device,
        &set_scanout(0, id, (0, 0, width, height)),
        OK_NODATA,
    )?;
    expect_response(device, &flush(id, (0, 0, width, height)), OK_NODATA)?;
    Ok([(a, first), (b, len - first)])
}

fn gpu_device(connection: std::os::unix::net::UnixStream) -> Result<UserspaceDevice> {
    let mut setup = DeviceSetup::new(&[64, 16]).with_features(F_EDID);
    setup.protocol_features |= VhostUserProtocolFeatures::CONFIG;
    Ok(UserspaceDevice::start(connection, &setup)?)
}

fn send_command(
    device: &mut UserspaceDevice,
    queue: usize,
    bytes: &[u8],
    response_len: u32,
) -> Result<Vec<u8>> {
    let request = device.memory.allocate(bytes.len() as u64, 8)?;
    let response = device.memory.allocate(u64::from(response_len), 8)?;
    device.memory.write(request, bytes)?;
    let q = &mut device.queues[queue];
    q.post(&[
        Buffer::readable(request, bytes.len() as u32),
        Buffer::writable(response, response_len),
    ])?;
    q.kick()?;
    let used = q.wait_used(1, TIMEOUT)?;
    ensure!(used.len() == 1, "expected one used element, got {used:?}");
    Ok(device.memory.read(response, used[0].len as usize)?)
}

fn response_type(response: &[u8]) -> u32 {
    response
        .get(0..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn header(kind: u32) -> Vec<u8> {
    let mut h = vec![0u8; 24];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h
}

fn with(kind: u32, fields: &[u32]) -> Vec<u8> {
    let mut c = header(kind);
    for f in fields {
        c.extend_from_slice(&f.to_le_bytes());
    }
    c
}

fn create_2d(id: u32, format: u32, width: u32, height: u32) -> Vec<u8> {
    with(RESOURCE_CREATE_2D, &[id, format, width, height])
}

fn attach_backing(id: u32, entries: &[(u64, u32)]) -> Vec<u8> {
    let mut c = with(ATTACH_BACKING, &[id, entries.len() as u32]);
    for &(addr, len) in entries {
        c.extend_from_slice(&addr.to_le_bytes());
        c.extend_from_slice(&len.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
    }
    c
}

fn transfer(id: u32, (x, y, w, h): (u32, u32, u32, u32), offset: u64) -> Vec<u8> {
    let mut c = with(TRANSFER_TO_HOST_2D, &[x, y, w, h]);
    c.extend_from_slice(&offset.to_le_bytes());
    c.extend_from_slice(&id.to_le_bytes());
    c.extend_from_slice(&0u32.to_le_bytes());
    c
}

fn set_scanout(scanout: u32, id: u32, (x, y, w, h): (u32, u32, u32, u32)) -> Vec<u8> {
    with(SET_SCANOUT, &[x, y, w, h, scanout, id])
}

fn flush(id: u32, (x, y, w, h): (u32, u32, u32, u32)) -> Vec<u8> {
    with(RESOURCE_FLUSH, &[x, y, w, h, id, 0])
}

/// Pixels of a PNG at `points`, read by Pillow (vncdotool's own dependency).
/// An image's size and some of its pixels.
type Samples = ((u32, u32), Vec<[u8; 3]>);

fn png_pixels(path: &Path, points: &[(u32, u32)]) -> Result<Samples> {
    let list: Vec<String> = points.iter().map(|(x, y)| format!("({x},{y})")).collect();
    let script = format!(
        "from PIL import Image\nim = Image.open({:?}).convert('RGB')\nprint(*im.size)\nfor p in [{}]:\n    print(*im.getpixel(p))\n",
        path.display().to_string(),
        list.join(",")
    );
    let out = Command::new("python3").arg("-c").arg(&script).output()?;
    ensure!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines().map(|l| {
        l.split_whitespace()
            .map(|v| v.parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
    });
    let size = lines.next().context("no size")??;
    let pixels = lines
        .map(|l| {
            let l = l?;
            Ok([l[0] as u8, l[1] as u8, l[2] as u8])
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(((size[0], size[1]), pixels))
}

const PROBES: [(u32, u32); 6] = [(0, 0), (1, 0), (0, 1), (100, 50), (319, 239), (257, 131)];

fn check_capture(path: &Path, width: u32, height: u32) -> Result<()> {
    let (size, pixels) = png_pixels(path, &PROBES)?;
    ensure!(
        size == (width, height),
        "captured {size:?}, expected {width}x{height}"
    );
    for (&(x, y), got) in PROBES.iter().zip(&pixels) {
        ensure!(
            *got == pattern(x, y),
            "pixel ({x},{y}) is {got:?}, drew {:?}",
            pattern(x, y)
        );
    }
    Ok(())
}

#[test]
fn display_info_edid_and_config_describe_the_mode() -> Result<()> {
    let mut d = Display::start()?;
    let info = d.command(&header(GET_DISPLAY_INFO), 408)?;
    ensure!(response_type(&info) == OK_DISPLAY_INFO);
    let field = |i: usize| u32::from_le_bytes(info[24 + i * 4..28 + i * 4].try_into().unwrap());
    ensure!(
        (field(2), field(3), field(4)) == (1024, 768, 1),
        "pmode 0: {:?}",
        &info[24..48]
    );
    ensure!(d.device.negotiated.has(1), "EDID not negotiated");
    let edid = d.command(&with(GET_EDID, &[0, 0]), 1056)?;
    ensure!(response_type(&edid) == OK_EDID);
    ensure!(u32::from_le_bytes(edid[24..28].try_into()?) == 128);
    let block = &edid[32..160];
    ensure!(block[0..8] == [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    ensure!(
        block.iter().fold(0u8, |s, &b| s.wrapping_add(b)) == 0,
        "EDID checksum"
    );
    d.expect(&with(GET_EDID, &[3, 0]), ERR_INVALID_SCANOUT_ID)?;
    let (_, config) =
        d.device
            .frontend
            .inner()
            .get_config(0, 16, VhostUserConfigFlags::empty(), &[0u8; 16])?;
    ensure!(
        config[8..12] == 1u32.to_le_bytes(),
        "num_scanouts: {config:?}"
    );
    d.assert_alive()
}

#[test]
fn vncdo_captures_the_pattern_drawn_through_virtio_gpu() -> Result<()> {
    let mut d = Display::start()?;
    d.draw_pattern(1, 320, 240)?;
    let dir = ScratchDir::new("display-capture")?;
    let png = dir.path().join("raw.png");
    vncdo(d.port, &["capture", png.to_str().context("path")?])?;
    check_capture(&png, 320, 240)?;
    d.assert_alive()
}

#[test]
fn keys_typed_in_vncdo_reach_the_input_sink() -> Result<()> {
    let d = Display::start()?;
    vncdo(d.port, &["key", "a", "move", "10", "20"])?;
    let deadline = Instant::now() + TIMEOUT;
    while !d.worker.stderr().contains("key up keysym 0x61") {
        ensure!(
            Instant::now() < deadline,
            "no key event logged:\n{}",
            d.worker.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = d.worker.stderr();
    ensure!(log.contains("key down keysym 0x61"), "{log}");
    ensure!(log.contains("pointer buttons 0x0 at 10,20"), "{log}");
    d.assert_alive()
}

#[test]
fn vncdotool_with_zrle_sees_the_same_pattern() -> Result<()> {
    let mut d = Display::start()?;
    d.draw_pattern(1, 320, 240)?;
    let dir = ScratchDir::new("display-zrle")?;
    let png = dir.path().join("zrle.png");
    let script = format!(
        "from vncdotool import api, client, rfb\n\
         client.VNCDoToolClient.encoding = rfb.Encoding.ZRLE\n\
         c = api.connect('127.0.0.1::{}')\n\
         c.captureScreen({:?})\n\
         c.disconnect()\n\
         api.shutdown()\n",
        d.port,
        png.display().to_string()
    );
    let out = Command::new("python3").arg("-c").arg(&script).output()?;
    ensure!(
        out.status.success(),
        "vncdotool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_capture(&png, 320, 240)?;
    ensure!(
        d.worker.stderr().contains("encoding ZRLE"),
        "{}",
        d.worker.stderr()
    );
    d.assert_alive()
}

#[test]
fn every_bad_command_gets_an_error_and_the_device_keeps_working() -> Result<()> {
    let mut d = Display::start()?;
    let page = d.device.memory.allocate(4096 * 4, 4096)?;
    let end = d.device.memory.end().0;
    // Creation: ids, formats, sizes.
    d.expect(
        &create_2d(0, FORMAT_B8G8R8X8, 64, 64),
        ERR_INVALID_RESOURCE_ID,
    )?;
    d.expect(&create_2d(1, 999, 64, 64), ERR_INVALID_PARAMETER)?;
    d.expect(&create_2d(1, FORMAT_B8G8R8X8, 0, 64), ERR_INVALID_PARAMETER)?;
    // width x height x 4 overflows 64 bits.
    d.expect(
        &create_2d(1, FORMAT_B8G8R8X8, u32::MAX, u32::MAX),
        ERR_INVALID_PARAMETER,
    )?;
    d.expect(
        &create_2d(1, FORMAT_B8G8R8X8, 16384, 16384),
        ERR_OUT_OF_MEMORY,
    )?;
    d.expect(
        &create_2d(1, FORMAT_B8G8R8X8, 100_000, 1),
        ERR_OUT_OF_MEMORY,
    )?;
    d.expect(&create_2d(1, FORMAT_R8G8B8X8, 32, 32), OK_NODATA)?;
    d.expect(
        &create_2d(1, FORMAT_B8G8R8X8, 32, 32),
        ERR_INVALID_RESOURCE_ID,
    )?;
    // Resources that do not exist.
    d.expect(&with(RESOURCE_UNREF, &[7, 0]), ERR_INVALID_RESOURCE_ID)?;
    d.expect(
        &attach_backing(7, &[(page.0, 4096)]),
        ERR_INVALID_RESOURCE_ID,
    )?;
    d.expect(&with(DETACH_BACKING, &[7, 0]), ERR_INVALID_RESOURCE_ID)?;
    d.expect(&transfer(7, (0, 0, 1, 1), 0), ERR_INVALID_RESOURCE_ID)?;
    d.expect(&set_scanout(0, 7, (0, 0, 1, 1)), ERR_INVALID_RESOURCE_ID)?;
    d.expect(&flush(7, (0, 0, 1, 1)), ERR_INVALID_RESOURCE_ID)?;
    d.expect(
        &with(UPDATE_CURSOR, &[0, 0, 0, 0, 7, 0, 0, 0]),
        ERR_INVALID_RESOURCE_ID,
    )?;
    // Backing outside guest memory, or wrapping around the address space.
    d.expect(
        &attach_backing(1, &[(end - 100, 4096)]),
        ERR_INVALID_PARAMETER,
    )?;
    d.expect(
        &attach_backing(1, &[(u64::MAX - 10, 4096)]),
        ERR_INVALID_PARAMETER,
    )?;
    d.expect(&attach_backing(1, &[(0, 4096)]), ERR_INVALID_PARAMETER)?;
    // An entry count far beyond what the command holds.
    d.expect(&with(ATTACH_BACKING, &[1, u32::MAX]), ERR_INVALID_PARAMETER)?;
    d.expect(&with(ATTACH_BACKING, &[1, 3]), ERR_INVALID_PARAMETER)?;
    // No backing yet.
    d.expect(&transfer(1, (0, 0, 32, 32), 0), ERR_UNSPEC)?;
    d.expect(&with(DETACH_BACKING, &[1, 0]), ERR_UNSPEC)?;
    // Backing too small for the transfer, then rectangles outside the resource.
    d.expect(&attach_backing(1, &[(page.0, 1024)]), OK_NODATA)?;
    d.expect(&transfer(1, (0, 0, 32, 32), 0), ERR_INVALID_PARAMETER)?;
    d.expect(&attach_backing(1, &[(page.0, 4096)]), OK_NODATA)?;
    d.expect(&transfer(1, (0, 0, 32, 32), 1), ERR_INVALID_PARAMETER)?;
    d.expect(
        &transfer(1, (0, 0, 32, 32), u64::MAX),
        ERR_INVALID_PARAMETER,
    )?;
    d.expect(&transfer(1, (16, 16, 17, 1), 0), ERR_INVALID_PARAMETER)?;
    d.expect(&transfer(1, (u32::MAX, 0, 2, 1), 0), ERR_INVALID_PARAMETER)?;
    d.expect(&set_scanout(0, 1, (0, 0, 33, 32)), ERR_INVALID_PARAMETER)?;
    d.expect(
        &set_scanout(0, 1, (u32::MAX, u32::MAX, 2, 2)),
        ERR_INVALID_PARAMETER,
    )?;
    d.expect(&set_scanout(5, 1, (0, 0, 32, 32)), ERR_INVALID_SCANOUT_ID)?;
    // A scanout wider than the device shows (every viewer copies whole scanouts).
    d.expect(&create_2d(2, FORMAT_B8G8R8X8, 5000, 8), OK_NODATA)?;
    d.expect(&set_scanout(0, 2, (0, 0, 5000, 8)), ERR_INVALID_PARAMETER)?;
    d.expect(&with(RESOURCE_UNREF, &[2, 0]), OK_NODATA)?;
    d.expect(&flush(1, (0, 0, 32, 33)), ERR_INVALID_PARAMETER)?;
    d.expect(&with(MOVE_CURSOR, &[9, 0, 0, 0]), ERR_INVALID_SCANOUT_ID)?;
    // Commands that are short or unknown.
    d.expect(&header(RESOURCE_CREATE_2D), ERR_INVALID_PARAMETER)?;
    d.expect(&header(0x9999), ERR_UNSPEC)?;
    d.expect(&[0u8; 8], ERR_UNSPEC)?;
    // The cursor queue answers too.
    let moved = send_command(&mut d.device, 1, &with(MOVE_CURSOR, &[0, 5, 5, 0]), 24)?;
    ensure!(response_type(&moved) == OK_NODATA);
    // And after all that the device still works: a good transfer, scanout and flush.
    d.expect(&transfer(1, (0, 0, 32, 32), 0), OK_NODATA)?;
    d.expect(&set_scanout(0, 1, (0, 0, 32, 32)), OK_NODATA)?;
    d.expect(&flush(1, (0, 0, 32, 32)), OK_NODATA)?;
    d.expect(&with(DETACH_BACKING, &[1, 0]), OK_NODATA)?;
    d.expect(&with(RESOURCE_UNREF, &[1, 0]), OK_NODATA)?;
    d.expect(&flush(1, (0, 0, 1, 1)), ERR_INVALID_RESOURCE_ID)?;
    d.assert_alive()
}

/// A small RFB 3.8 client for what vncdotool cannot be made to do.
struct Viewer {
    socket: TcpStream,
    width: u32,
    height: u32,
    bytes_per_pixel: usize,
    zlib: miniz_oxide::inflate::stream::InflateState,
}

#[derive(Debug)]
struct Rectangle {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
    encoding: i32,
    /// Pixels as the wire had them (raw), or decoded ZRLE cpixels padded to 4 bytes.
    pixels: Vec<u8>,
    wire_bytes: usize,
}

impl Viewer {
    fn connect(port: u16) -> Result<Viewer> {
        Self::connect_with(port, None)
    }

    /// Connects, with VNC authentication when a password is given.
    fn connect_with(port: u16, password: Option<&[u8]>) -> Result<Viewer> {
        let mut socket = TcpStream::connect(("127.0.0.1", port))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        let mut version = [0u8; 12];
        socket.read_exact(&mut version)?;
        ensure!(&version == b"RFB 003.008\n", "server version {version:?}");
        socket.write_all(b"RFB 003.008\n")?;
        let mut count = [0u8; 1];
        socket.read_exact(&mut count)?;
        let mut types = vec![0u8; usize::from(count[0])];
        socket.read_exact(&mut types)?;
        match password {
            None => {
                ensure!(types.contains(&1), "no security type None: {types:?}");
                socket.write_all(&[1])?;
            }
            Some(password) => {
                ensure!(types.contains(&2), "no VNC authentication: {types:?}");
                socket.write_all(&[2])?;
                let mut challenge = [0u8; 16];
                socket.read_exact(&mut challenge)?;
                socket.write_all(&vnc_response(password, &challenge))?;
            }
        }
        let mut result = [0u8; 4];
        socket.read_exact(&mut result)?;
        ensure!(result == [0; 4], "security result {result:?}");
        socket.write_all(&[1])?;
        let mut init = [0u8; 24];
        socket.read_exact(&mut init)?;
        let name_len = u32::from_be_bytes(init[20..24].try_into()?);
        let mut name = vec![0u8; name_len as usize];
        socket.read_exact(&mut name)?;
        Ok(Viewer {
            socket,
            width: u32::from(u16::from_be_bytes([init[0], init[1]])),
            height: u32::from(u16::from_be_bytes([init[2], init[3]])),
            bytes_per_pixel: usize::from(init[4] / 8),
            zlib: miniz_oxide::inflate::stream::InflateState::new(miniz_oxide::DataFormat::Zlib),
        })
    }

    fn set_encodings(&mut self, encodings: &[i32]) -> Result<()> {
        let mut m = vec![2, 0];
        m.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
        for e in encodings {
            m.extend_from_slice(&e.to_be_bytes());
        }
        Ok(self.socket.write_all(&m)?)
    }

    fn set_pixel_format(&mut self, format: [u8; 16]) -> Result<()> {
        let mut m = vec![0, 0, 0, 0];
        m.extend_from_slice(&format);
        self.bytes_per_pixel = usize::from(format[0] / 8);
        Ok(self.socket.write_all(&m)?)
    }

    fn request(&mut self, incremental: bool) -> Result<()> {
        let mut m = vec![3, u8::from(incremental)];
        for v in [0, 0, self.width as u16, self.height as u16] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        Ok(self.socket.write_all(&m)?)
    }

    fn read_update(&mut self) -> Result<Vec<Rectangle>> {
        let mut head = [0u8; 4];
        self.socket.read_exact(&mut head)?;
        ensure!(head[0] == 0, "message type {}", head[0]);
        let count = u16::from_be_bytes([head[2], head[3]]);
        let mut rects = Vec::new();
        for _ in 0..count {
            let mut h = [0u8; 12];
            self.socket.read_exact(&mut h)?;
            let f = |i: usize| u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
            let (x, y, width, height) = (f(0), f(2), f(4), f(6));
            let encoding = i32::from_be_bytes(h[8..12].try_into()?);
            let (pixels, wire_bytes) = match encoding {
                0 => {
                    let mut p = vec![0u8; (width * height) as usize * self.bytes_per_pixel];
                    self.socket.read_exact(&mut p)?;
                    let n = p.len();
                    (p, n)
                }
                16 => {
                    let mut len = [0u8; 4];
                    self.socket.read_exact(&mut len)?;
                    let mut data = vec![0u8; u32::from_be_bytes(len) as usize];
                    self.socket.read_exact(&mut data)?;
                    let n = data.len() + 4;
                    (self.decode_zrle(&data, width, height)?, n)
                }
                -223 => {
                    self.width = width;
                    self.height = height;
                    (Vec::new(), 0)
                }
                other => bail!("unexpected encoding {other}"),
            };
            rects.push(Rectangle {
                x,
                y,
                width,
                height,
                encoding,
                pixels,
                wire_bytes,
            });
        }
        Ok(rects)
    }

    /// Inflates and decodes what the server sends: solid, packed-palette and raw tiles of
    /// 3-byte cpixels; returns 4 bytes a pixel (B, G, R, 0).
    fn decode_zrle(&mut self, data: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; (width * height * 4) as usize + 4096];
        let r = miniz_oxide::inflate::stream::inflate(
            &mut self.zlib,
            data,
            &mut raw,
            miniz_oxide::MZFlush::Sync,
        );
        ensure!(r.bytes_consumed == data.len(), "zlib: {r:?}");
        raw.truncate(r.bytes_written);
        let mut it = raw.into_iter();
        let mut next = || it.next().context("ZRLE data ended early");
        let (w, h) = (width as usize, height as usize);
        let mut out = vec![0u8; w * h * 4];
        for ty in (0..h).step_by(64) {
            for tx in (0..w).step_by(64) {
                let (tw, th) = (64.min(w - tx), 64.min(h - ty));
                let sub = next()?;
                let cpixel = |next: &mut dyn FnMut() -> Result<u8>| -> Result<[u8; 4]> {
                    Ok([next()?, next()?, next()?, 0])
                };
                let mut tile = Vec::with_capacity(tw * th);
                match sub {
                    0 => {
                        for _ in 0..tw * th {
                            tile.push(cpixel(&mut next)?);
                        }
                    }
                    1 => {
                        let p = cpixel(&mut next)?;
                        tile.resize(tw * th, p);
                    }
                    2..=16 => {
                        let palette = (0..sub)
                            .map(|_| cpixel(&mut next))
                            .collect::<Result<Vec<_>>>()?;
                        let bits = match sub {
                            2 => 1,
                            3 | 4 => 2,
                            _ => 4,
                        };
                        for _ in 0..th {
                            let (mut byte, mut left) = (0u8, 0);
                            for _ in 0..tw {
                                if left == 0 {
                                    byte = next()?;
                                    left = 8;
                                }
                                left -= bits;
                                let index = (byte >> left) & ((1 << bits) - 1);
                                tile.push(*palette.get(usize::from(index)).context("index")?);
                            }
                        }
                    }
                    other => bail!("subencoding {other} not produced by this server"),
                }
                for (i, p) in tile.iter().enumerate() {
                    let (x, y) = (tx + i % tw, ty + i / tw);
                    out[(y * w + x) * 4..(y * w + x) * 4 + 4].copy_from_slice(p);
                }
            }
        }
        Ok(out)
    }
}

/// The rectangle's pixel at (x, y) in framebuffer coordinates, as R, G, B from 4-byte
/// little-endian 0x00RRGGBB pixels.
fn rgb_at(rect: &Rectangle, x: u32, y: u32) -> [u8; 3] {
    let i = (((y - rect.y) * rect.width + (x - rect.x)) * 4) as usize;
    [rect.pixels[i + 2], rect.pixels[i + 1], rect.pixels[i]]
}

#[test]
fn zrle_and_raw_carry_the_same_pixels_and_zrle_is_smaller() -> Result<()> {
    let mut d = Display::start()?;
    d.draw_pattern(1, 320, 240)?;
    let mut raw = Viewer::connect(d.port)?;
    raw.set_encodings(&[0])?;
    raw.request(false)?;
    let raw_rects = raw.read_update()?;
    let mut zrle = Viewer::connect(d.port)?;
    zrle.set_encodings(&[16, 0])?;
    zrle.request(false)?;
    let zrle_rects = zrle.read_update()?;
    ensure!(raw_rects.len() == 1 && zrle_rects.len() == 1);
    let (r, z) = (&raw_rects[0], &zrle_rects[0]);
    ensure!(
        r.encoding == 0 && z.encoding == 16,
        "{} {}",
        r.encoding,
        z.encoding
    );
    ensure!((z.width, z.height) == (320, 240));
    for &(x, y) in &PROBES {
        ensure!(rgb_at(r, x, y) == pattern(x, y), "raw ({x},{y})");
        ensure!(rgb_at(z, x, y) == pattern(x, y), "zrle ({x},{y})");
    }
    ensure!(r.pixels == z.pixels, "raw and ZRLE differ");
    ensure!(
        z.wire_bytes < r.wire_bytes,
        "ZRLE {} >= raw {}",
        z.wire_bytes,
        r.wire_bytes
    );
    // A second ZRLE update continues the same zlib stream.
    d.expect(&flush(1, (0, 0, 320, 240)), OK_NODATA)?;
    zrle.request(true)?;
    let again = zrle.read_update()?;
    ensure!(
        again.len() == 1 && again[0].pixels == r.pixels,
        "second ZRLE update differs"
    );
    d.assert_alive()
}

#[test]
fn a_mode_change_reaches_viewers_as_desktop_size() -> Result<()> {
    let mut d = Display::start()?;
    let mut viewer = Viewer::connect(d.port)?;
    ensure!((viewer.width, viewer.height) == (1024, 768));
    viewer.set_encodings(&[0, -223])?;
    viewer.request(false)?;
    viewer.read_update()?;
    d.draw_pattern(1, 320, 240)?;
    viewer.request(true)?;
    let rects = viewer.read_update()?;
    ensure!(rects[0].encoding == -223, "first rectangle {rects:?}");
    ensure!((viewer.width, viewer.height) == (320, 240));
    ensure!(rects.len() == 2 && (rects[1].width, rects[1].height) == (320, 240));
    ensure!(rgb_at(&rects[1], 100, 50) == pattern(100, 50));
    d.assert_alive()
}

#[test]
fn pixel_formats_viewers_ask_for_are_converted() -> Result<()> {
    let mut d = Display::start()?;
    d.draw_pattern(1, 320, 240)?;
    let mut viewer = Viewer::connect(d.port)?;
    // 32 bits, big-endian, red in the low byte: R at byte 3.
    viewer.set_pixel_format([32, 24, 1, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16, 0, 0, 0])?;
    viewer.set_encodings(&[0])?;
    viewer.request(false)?;
    let rect = &viewer.read_update()?[0];
    let i = ((50 * 320 + 100) * 4) as usize;
    let [r, g, b] = pattern(100, 50);
    ensure!(
        rect.pixels[i..i + 4] == [0, b, g, r],
        "{:?}",
        &rect.pixels[i..i + 4]
    );
    // RGB565 little-endian.
    viewer.set_pixel_format([16, 16, 0, 1, 0, 31, 0, 63, 0, 31, 11, 5, 0, 0, 0, 0])?;
    viewer.request(false)?;
    let rect = &viewer.read_update()?[0];
    let i = ((50 * 320 + 100) * 2) as usize;
    let value = u16::from_le_bytes([rect.pixels[i], rect.pixels[i + 1]]);
    let scale = |c: u8, max: u32| ((u32::from(c) * max + 127) / 255) as u16;
    ensure!(value == (scale(r, 31) << 11) | (scale(g, 63) << 5) | scale(b, 31));
    // A colour-map format is refused: that viewer is dropped, the worker carries on.
    viewer.set_pixel_format([8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])?;
    let mut byte = [0u8; 1];
    ensure!(
        matches!(viewer.socket.read(&mut byte), Ok(0) | Err(_)),
        "still connected"
    );
    d.assert_alive()
}

#[test]
fn garbage_and_hang_ups_affect_only_their_own_viewer() -> Result<()> {
    let mut d = Display::start()?;
    d.draw_pattern(1, 320, 240)?;
    let mut good = Viewer::connect(d.port)?;
    good.set_encodings(&[0])?;
    // Garbage before the handshake is done, and garbage after it.
    let mut early = TcpStream::connect(("127.0.0.1", d.port))?;
    early.write_all(b"GET / HTTP/1.1\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxx")?;
    let mut late = Viewer::connect(d.port)?;
    late.socket.write_all(&[0xff; 64])?;
    let mut huge = Viewer::connect(d.port)?;
    huge.socket.write_all(&[2, 0, 0xff, 0xff])?; // SetEncodings with 65535 entries
                                                 // Viewers that ask for the whole screen and leave mid-update.
    for _ in 0..4 {
        let mut quitter = Viewer::connect(d.port)?;
        quitter.set_encodings(&[0])?;
        quitter.request(false)?;
        let mut some = [0u8; 100];
        quitter.socket.read_exact(&mut some)?;
        drop(quitter);
    }
    // One that never reads at all, so its update stalls.
    let mut stalled = Viewer::connect(d.port)?;
    stalled.request(false)?;
    for (name, s) in [
        ("early", &mut early),
        ("late", &mut late.socket),
        ("huge", &mut huge.socket),
    ] {
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut rest = Vec::new();
        // EOF, or a reset because the server closed with the garbage unread.
        if let Err(e) = s.read_to_end(&mut rest) {
            ensure!(
                e.kind() == std::io::ErrorKind::ConnectionReset,
                "{name} was not disconnected: {e}"
            );
        }
    }
    // The good viewer still gets correct updates, for changes made after all that.
    good.request(false)?;
    let rect = &good.read_update()?[0];
    ensure!(rgb_at(rect, 100, 50) == pattern(100, 50));
    d.expect(&flush(1, (10, 10, 20, 20)), OK_NODATA)?;
    good.request(true)?;
    let rect = &good.read_update()?[0];
    ensure!(
        (rect.x, rect.y, rect.width, rect.height) == (10, 10, 20, 20),
        "{rect:?}"
    );
    ensure!(rgb_at(rect, 15, 15) == pattern(15, 15));
    drop(stalled);
    d.assert_alive()
}

#[test]
fn launched_worker_serves_vnc_on_the_listener_it_was_given() -> Result<()> {
    const VNC_FD: i32 = 5;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let config = DeviceConfig::Display(DisplayConfig {
        vnc_listen_fd: VNC_FD,
        width: 800,
        height: 600,
        vnc_password: Some("s3cret".into()),
        input_events_fd: None,
        state_fd: None,
    });
    let (worker, connection) =
        WorkerProcess::launched_with_fds("display0", config, &[(listener.as_raw_fd(), VNC_FD)])?;
    drop(listener);
    let mut device = gpu_device(connection)?;
    let info = send_command(&mut device, 0, &header(GET_DISPLAY_INFO), 408)?;
    ensure!(
        info[32..40] == [0x20, 3, 0, 0, 0x58, 2, 0, 0],
        "mode {:?}",
        &info[24..48]
    );
    let viewer = Viewer::connect_with(port, Some(b"s3cret"))?;
    ensure!((viewer.width, viewer.height) == (800, 600));
    drop(viewer);
    drop(device);
    let status = worker.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "exit {status}:\n{}", worker.stderr());
    Ok(())
}

#[test]
fn launched_worker_refuses_a_descriptor_that_is_not_listening() -> Result<()> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    let config = DeviceConfig::Display(DisplayConfig {
        vnc_listen_fd: 5,
        width: 800,
        height: 600,
        vnc_password: None,
        input_events_fd: None,
        state_fd: None,
    });
    let (worker, _connection) =
        WorkerProcess::launched_with_fds("display0", config, &[(a.as_raw_fd(), 5)])?;
    let status = worker.wait_exit(TIMEOUT)?;
    ensure!(!status.success());
    // The stderr pipe may still be draining after the exit.
    let deadline = Instant::now() + TIMEOUT;
    while !worker.stderr().contains("not a listening stream socket") {
        ensure!(Instant::now() < deadline, "stderr: {}", worker.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn a_password_keeps_out_viewers_without_it() -> Result<()> {
    let dir = ScratchDir::new("display-password")?;
    let file = dir.path().join("password");
    std::fs::write(&file, "hunter2\n")?;
    let mut d = Display::start_with(&["--vnc-password-file".as_ref(), file.as_os_str()])?;
    d.draw_pattern(1, 320, 240)?;
    // vncdotool answers the DES challenge itself.
    let png = dir.path().join("auth.png");
    vncdo(
        d.port,
        &["-p", "hunter2", "capture", png.to_str().context("path")?],
    )?;
    check_capture(&png, 320, 240)?;
    ensure!(
        vncdo(d.port, &["-p", "wrong", "capture", "/dev/null"]).is_err(),
        "a wrong password got in"
    );
    // A wrong answer gets SecurityResult 1 with a reason, and the connection ends.
    let mut s = TcpStream::connect(("127.0.0.1", d.port))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf)?;
    s.write_all(b"RFB 003.008\n")?;
    let mut types = [0u8; 2];
    s.read_exact(&mut types)?;
    ensure!(
        types == [1, 2],
        "offered {types:?}: with a password only VNC authentication"
    );
    s.write_all(&[2])?;
    let mut challenge = [0u8; 16];
    s.read_exact(&mut challenge)?;
    s.write_all(&vnc_response(b"hunter3", &challenge))?;
    let mut result = [0u8; 4];
    s.read_exact(&mut result)?;
    ensure!(result == [0, 0, 0, 1], "security result {result:?}");
    // Choosing None instead is refused too.
    let mut s = TcpStream::connect(("127.0.0.1", d.port))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.read_exact(&mut buf)?;
    s.write_all(b"RFB 003.008\n")?;
    s.read_exact(&mut types)?;
    s.write_all(&[1])?;
    s.read_exact(&mut result)?;
    ensure!(result == [0, 0, 0, 1], "None accepted: {result:?}");
    d.assert_alive()
}

fn viewer_bin() -> std::path::PathBuf {
    bulkhead_tests::built_binary("bulkhead-viewer", "BULKHEAD_VIEWER_BIN")
}

/// Runs a viewer command on SDL's offscreen driver (no X server) until it exits.
fn run_viewer(command: &mut Command) -> Result<String> {
    let mut child = command
        .env("SDL_VIDEODRIVER", "offscreen")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting bulkhead-viewer")?;
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("bulkhead-viewer did not finish in {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_string(&mut log)?;
    }
    ensure!(status.success(), "bulkhead-viewer: {status}\n{log}");
    Ok(log)
}

#[test]
fn sdl_viewer_on_the_vmms_private_socket_shows_the_pattern() -> Result<()> {
    // Wired as `bulkhead run --display sdl` wires it: the listener the worker is launched
    // with, and the connection queued on it handed to the viewer as descriptor 3.
    let spec: DisplaySpec = "sdl,size=800x600".parse().map_err(anyhow::Error::msg)?;
    let OpenedDisplay {
        display,
        display_files,
        viewer,
        ..
    } = open_display(&spec)?;
    let viewer = viewer.context("sdl gave no viewer connection")?;
    let config = DeviceConfig::Display(DisplayConfig {
        input_events_fd: None,
        state_fd: None,
        ..display
    });
    let listener = display_files.first().context("no listener")?;
    let (worker, connection) = WorkerProcess::launched_with_fds(
        "display0",
        config,
        &[(listener.as_raw_fd(), display.vnc_listen_fd)],
    )?;
    drop(display_files);
    let mut device = gpu_device(connection)?;
    draw_pattern(&mut device, 1, 320, 240)?;
    let dir = ScratchDir::new("display-sdl")?;
    let snapshot = dir.path().join("window.ppm");
    let mut command = viewer_command(&viewer_bin(), &viewer, "bulkhead test")?;
    drop(viewer);
    let log = run_viewer(command.arg("--snapshot").arg(&snapshot))?;
    ensure!(log.contains("snapshot written"), "{log}");
    check_capture(&snapshot, 320, 240)?;
    // The window closed; the worker serves on.
    std::thread::sleep(Duration::from_millis(100));
    ensure!(worker.is_running(), "the worker died:\n{}", worker.stderr());
    let info = send_command(&mut device, 0, &header(GET_DISPLAY_INFO), 408)?;
    ensure!(response_type(&info) == OK_DISPLAY_INFO);
    drop(device);
    let status = worker.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "exit {status}:\n{}", worker.stderr());
    Ok(())
}

#[test]
fn keys_and_pointer_from_the_sdl_viewer_reach_the_input_sink() -> Result<()> {
    let d = Display::start()?;
    let address = format!("127.0.0.1:{}", d.port);
    run_viewer(
        Command::new(viewer_bin())
            .args(["--connect", &address])
            .args(["--type", "aB>", "--point", "10,20"]),
    )?;
    // What SDL reported, as keysyms: `B` is the B key with Shift held, `>` the period key.
    let wanted = [
        "key down keysym 0x61",
        "key up keysym 0x61",
        "key down keysym 0xffe1",
        "key down keysym 0x42",
        "key up keysym 0x42",
        "key up keysym 0xffe1",
        "key down keysym 0xffe1",
        "key down keysym 0x3e",
        "key up keysym 0x3e",
        "key up keysym 0xffe1",
        "key down keysym 0xff0d",
        "key up keysym 0xff0d",
        "pointer buttons 0x0 at 10,20",
    ];
    let deadline = Instant::now() + TIMEOUT;
    while !d.worker.stderr().contains(wanted[wanted.len() - 1]) {
        ensure!(
            Instant::now() < deadline,
            "no pointer event logged:\n{}",
            d.worker.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = d.worker.stderr();
    let mut from = 0;
    for line in wanted {
        let at = log[from..]
            .find(line)
            .with_context(|| format!("{line:?} missing or out of order:\n{log}"))?;
        from += at + line.len();
    }
    d.assert_alive()
}

#[test]
fn sdl_viewer_refuses_bad_descriptors_and_servers() -> Result<()> {
    let fail = |args: &[&str], says: &str| -> Result<()> {
        let out = Command::new(viewer_bin())
            .args(args)
            .env("SDL_VIDEODRIVER", "offscreen")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{args:?} succeeded");
        ensure!(stderr.contains(says), "{args:?}: {stderr}");
        Ok(())
    };
    fail(&["--fd", "57"], "not an open descriptor")?;
    fail(&["--fd", "0"], "not a stream socket")?;
    fail(
        &["--connect", "unix:/nonexistent/vnc.sock"],
        "cannot connect",
    )?;
    // A server that speaks something else.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        s.write_all(b"SSH-2.0-nope\r\n")?;
        Ok(())
    });
    fail(
        &["--connect", &format!("127.0.0.1:{port}")],
        "not an RFB server",
    )?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread"))??;
    Ok(())
}

/// A display worker launched as the VMM launches one: the VNC listener and the state
/// store (descriptors 5 and 6) are the test's, kept for every incarnation.
fn launch_with_store(
    listener: &TcpListener,
    store: &std::fs::File,
    memory: &std::sync::Arc<bulkhead_tests::vhost::SharedMemory>,
    unanswered: Option<&[u8]>,
) -> Result<(WorkerProcess, UserspaceDevice, Option<GuestAddress>)> {
    let config = DeviceConfig::Display(DisplayConfig {
        vnc_listen_fd: 5,
        width: 800,
        height: 600,
        vnc_password: None,
        input_events_fd: None,
        state_fd: Some(6),
    });
    let (worker, connection) = WorkerProcess::launched_with(
        "display0",
        config,
        &[(listener.as_raw_fd(), 5), (store.as_raw_fd(), 6)],
        &[("BULKHEAD_LOG", "info")],
    )?;
    let mut setup = DeviceSetup::new(&[64, 16]).with_features(F_EDID);
    setup.protocol_features |= VhostUserProtocolFeatures::CONFIG;
    // A command already on the control ring when the worker starts, as one its predecessor
    // took but did not answer is: where its response will land.
    let mut response = None;
    let device = UserspaceDevice::start_prepared(connection, &setup, memory.clone(), |queues| {
        if let Some(bytes) = unanswered {
            let request = memory.allocate(bytes.len() as u64, 8)?;
            let answer = memory.allocate(24, 8)?;
            memory.write(request, bytes)?;
            queues[0].post(&[
                Buffer::readable(request, bytes.len() as u32),
                Buffer::writable(answer, 24),
            ])?;
            response = Some(answer);
        }
        Ok(())
    })?;
    Ok((worker, device, response))
}

fn wait_for_log(worker: &WorkerProcess, text: &str) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while !worker.stderr().contains(text) {
        ensure!(
            Instant::now() < deadline,
            "no {text:?} in the log:\n{}",
            worker.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// kill -9 the worker showing the guest's screen: a replacement given the same state
/// store and guest memory shows the same pixels to a VNC client on the same listener
/// before the guest sends anything, and the guest's next TRANSFER + FLUSH on its resource
/// works. A store a replacement cannot make sense of is logged and the device starts
/// empty.
#[test]
fn killed_worker_is_replaced_with_the_guests_screen() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let store = bulkhead_workers::display::gpu::store::new_store()?;
    let setup = DeviceSetup::new(&[]);
    let memory = std::sync::Arc::new(bulkhead_tests::vhost::SharedMemory::new(
        setup.memory_base,
        setup.memory_size,
    )?);
    let dir = ScratchDir::new("display-restart")?;
    let png = |name: &str| dir.path().join(name);
    let capture = |name: &str| -> Result<()> {
        vncdo(port, &["capture", png(name).to_str().context("path")?])
    };

    let (first, mut device, _) = launch_with_store(&listener, &store, &memory, None)?;
    let backing = draw_pattern_backed(&mut device, 1, 320, 240)?;
    // A cursor resource too: it is recreated, without a backing of its own.
    expect_response(
        &mut device,
        &create_2d(2, FORMAT_R8G8B8X8, 64, 64),
        OK_NODATA,
    )?;
    expect_response(
        &mut device,
        &with(UPDATE_CURSOR, &[0, 10, 20, 0, 2, 1, 1, 0]),
        OK_NODATA,
    )?;
    // A cursor whose resource the guest unrefs while it is still set: recorded as none.
    expect_response(
        &mut device,
        &create_2d(3, FORMAT_R8G8B8X8, 64, 64),
        OK_NODATA,
    )?;
    expect_response(
        &mut device,
        &with(UPDATE_CURSOR, &[0, 10, 20, 0, 3, 1, 1, 0]),
        OK_NODATA,
    )?;
    expect_response(&mut device, &with(RESOURCE_UNREF, &[3, 0]), OK_NODATA)?;
    capture("before.png")?;
    check_capture(&png("before.png"), 320, 240)?;
    first.kill()?;
    drop(device);

    // The ring resumes where the guest saw answers, so a command the killed worker ran
    // and recorded but did not answer comes again: it gets the OK it was owed.
    let replayed = create_2d(1, FORMAT_B8G8R8X8, 320, 240);
    let (second, mut device, response) =
        launch_with_store(&listener, &store, &memory, Some(&replayed))?;
    wait_for_log(&second, "screen is restored")?;
    // Nothing sent yet: the screen is the killed worker's.
    capture("after.png")?;
    check_capture(&png("after.png"), 320, 240)?;
    device.queues[0].kick()?;
    device.queues[0].wait_used(1, TIMEOUT)?;
    let response = memory.read(response.context("no replayed command")?, 24)?;
    ensure!(
        response_type(&response) == OK_NODATA,
        "the replayed create got {:#x}",
        response_type(&response)
    );
    // Past those, the resources exist again (their ids are taken) ...
    expect_response(
        &mut device,
        &create_2d(1, FORMAT_B8G8R8X8, 8, 8),
        ERR_INVALID_RESOURCE_ID,
    )?;
    expect_response(
        &mut device,
        &create_2d(2, FORMAT_B8G8R8X8, 8, 8),
        ERR_INVALID_RESOURCE_ID,
    )?;
    // ... with their backing: the guest draws anew (the pattern inverted) and flushes.
    for (addr, len) in backing {
        let bytes = memory.read(addr, len as usize)?;
        let inverted: Vec<u8> = bytes.iter().map(|b| !b).collect();
        memory.write(addr, &inverted)?;
    }
    expect_response(&mut device, &transfer(1, (0, 0, 320, 240), 0), OK_NODATA)?;
    expect_response(&mut device, &flush(1, (0, 0, 320, 240)), OK_NODATA)?;
    capture("redrawn.png")?;
    let (size, pixels) = png_pixels(&png("redrawn.png"), &PROBES)?;
    ensure!(size == (320, 240), "captured {size:?}");
    for (&(x, y), got) in PROBES.iter().zip(&pixels) {
        let want = pattern(x, y).map(|c| !c);
        ensure!(*got == want, "pixel ({x},{y}) is {got:?}, drew {want:?}");
    }
    ensure!(second.is_running(), "{}", second.stderr());
    second.kill()?;
    drop(device);

    // Both slots overwritten with garbage: refused, logged, and the device starts empty.
    use std::os::unix::fs::FileExt;
    let slot = bulkhead_workers::display::gpu::store::SLOT_SIZE;
    store.write_all_at(b"not a store", 0)?;
    store.write_all_at(b"not a store", slot)?;
    let (third, mut device, _) = launch_with_store(&listener, &store, &memory, None)?;
    wait_for_log(&third, "the device starts empty")?;
    ensure!(
        third.stderr().contains("state store is bad"),
        "{}",
        third.stderr()
    );
    expect_response(&mut device, &create_2d(1, FORMAT_B8G8R8X8, 8, 8), OK_NODATA)?;
    ensure!(third.is_running(), "{}", third.stderr());
    ensure!(!third.stderr().contains("panicked"), "{}", third.stderr());
    third.kill()?;
    Ok(())
}

/// `--display sdl` through a worker kill: the viewer's connection dies with the worker,
/// the VMM gives the replacement a fresh private listener (`reopen_sdl_listener`, as its
/// supervisor does before each restart) and a new viewer on it shows the guest's screen,
/// rebuilt from the state store.
#[test]
fn sdl_viewer_comes_back_after_a_worker_kill() -> Result<()> {
    let spec: DisplaySpec = "sdl,size=800x600".parse().map_err(anyhow::Error::msg)?;
    let OpenedDisplay {
        display,
        mut display_files,
        viewer,
        ..
    } = open_display(&spec)?;
    let viewer = viewer.context("sdl gave no viewer connection")?;
    ensure!(
        display_files.len() == 3,
        "listener, events socket, state store"
    );
    // No input worker here: the listener and the store, at the numbers the VMM gives them.
    let config = DeviceConfig::Display(DisplayConfig {
        input_events_fd: None,
        state_fd: Some(display.vnc_listen_fd + 1),
        ..display.clone()
    });
    let memory = std::sync::Arc::new(bulkhead_tests::vhost::SharedMemory::new(
        DeviceSetup::new(&[]).memory_base,
        DeviceSetup::new(&[]).memory_size,
    )?);
    let launch = |files: &[std::fs::File]| -> Result<(WorkerProcess, UserspaceDevice)> {
        let (worker, connection) = WorkerProcess::launched_with_fds(
            "display0",
            config.clone(),
            &[
                (files[0].as_raw_fd(), display.vnc_listen_fd),
                (files[2].as_raw_fd(), display.vnc_listen_fd + 1),
            ],
        )?;
        let mut setup = DeviceSetup::new(&[64, 16]).with_features(F_EDID);
        setup.protocol_features |= VhostUserProtocolFeatures::CONFIG;
        let device = UserspaceDevice::start_with_memory(connection, &setup, memory.clone())?;
        Ok((worker, device))
    };
    let dir = ScratchDir::new("display-sdl-restart")?;
    let snapshot = |viewer: std::os::unix::net::UnixStream, name: &str| -> Result<()> {
        let path = dir.path().join(name);
        let mut command = viewer_command(&viewer_bin(), &viewer, "bulkhead test")?;
        drop(viewer);
        let log = run_viewer(command.arg("--snapshot").arg(&path))?;
        ensure!(log.contains("snapshot written"), "{log}");
        check_capture(&path, 320, 240)
    };

    let (first, mut device) = launch(&display_files)?;
    draw_pattern(&mut device, 1, 320, 240)?;
    snapshot(viewer, "before.ppm")?;
    first.kill()?;
    drop(device);

    let viewer = bulkhead_vmm::display::reopen_sdl_listener(&mut display_files)?;
    let (second, device) = launch(&display_files)?;
    // The replacement draws nothing new: the window shows what the store rebuilt.
    snapshot(viewer, "after.ppm")?;
    ensure!(second.is_running(), "the worker died:\n{}", second.stderr());
    drop(device);
    let status = second.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "exit {status}:\n{}", second.stderr());
    Ok(())
}
