//! Full-screen update throughput of `bulkhead-worker display`: a userspace virtio-gpu driver
//! redraws the whole screen (console-like content: coloured 8x16 glyph cells on black,
//! different every frame), transfers and flushes it; one RFB viewer asks for each update and
//! reads it. Prints frames per second, the worker's CPU time per frame and the bytes per
//! update, for one mode and one encoding per run.
//!
//! `display_bench WIDTH HEIGHT raw|zrle [SECONDS]`; run through `bench/display.sh`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::micro::ScratchDir;
use bulkhead_tests::vhost::{worker_bin, Buffer, DeviceSetup, UserspaceDevice, WorkerProcess};
use vm_memory::GuestAddress;

fn command(device: &mut UserspaceDevice, fields: &[u32], scratch: GuestAddress) -> Result<()> {
    let bytes: Vec<u8> = fields.iter().flat_map(|f| f.to_le_bytes()).collect();
    let response = GuestAddress(scratch.0 + 4096);
    device.memory.write(scratch, &bytes)?;
    let q = &mut device.queues[0];
    q.post(&[
        Buffer::readable(scratch, bytes.len() as u32),
        Buffer::writable(response, 24),
    ])?;
    q.kick()?;
    q.wait_used(1, Duration::from_secs(10))?;
    let kind = device.memory.read(response, 4)?;
    ensure!(
        kind == 0x1100u32.to_le_bytes(),
        "command {:#x} failed: {kind:?}",
        fields[0]
    );
    Ok(())
}

/// The 24-byte control header for `kind`, as u32 fields.
fn hdr(kind: u32) -> [u32; 6] {
    [kind, 0, 0, 0, 0, 0]
}

fn draw(frame: u32, width: u32, height: u32, out: &mut [u8]) {
    for y in 0..height {
        for x in 0..width {
            let (cx, cy) = (x / 8, y / 16);
            let cell =
                cx.wrapping_mul(73) ^ cy.wrapping_mul(151) ^ frame.wrapping_mul(2_654_435_761);
            let on = matches!(cell % 3, 1 | 2) && (x % 8 + y % 16 + cell) & 3 == 0;
            let i = ((y * width + x) * 4) as usize;
            let colour = if on {
                [0xaa, 0xaa, (cell % 7) as u8 * 36, 0]
            } else {
                [0; 4]
            };
            out[i..i + 4].copy_from_slice(&colour);
        }
    }
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name's closing parenthesis; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

struct Viewer(TcpStream);

impl Viewer {
    fn connect(port: u16, encoding: i32) -> Result<Viewer> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf)?;
        s.write_all(b"RFB 003.008\n")?;
        let mut n = [0u8; 1];
        s.read_exact(&mut n)?;
        let mut types = vec![0u8; usize::from(n[0])];
        s.read_exact(&mut types)?;
        s.write_all(&[1])?;
        s.read_exact(&mut buf[..4])?;
        s.write_all(&[1])?;
        let mut init = [0u8; 24];
        s.read_exact(&mut init)?;
        let mut name = vec![0u8; u32::from_be_bytes(init[20..24].try_into()?) as usize];
        s.read_exact(&mut name)?;
        let mut m = vec![2, 0, 0, 1];
        m.extend_from_slice(&encoding.to_be_bytes());
        s.write_all(&m)?;
        Ok(Viewer(s))
    }

    /// Requests an update of the whole screen and reads it; returns its size in bytes.
    fn update(&mut self, incremental: bool, width: u32, height: u32) -> Result<usize> {
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&(width as u16).to_be_bytes());
        m.extend_from_slice(&(height as u16).to_be_bytes());
        self.0.write_all(&m)?;
        let mut head = [0u8; 4];
        self.0.read_exact(&mut head)?;
        let mut total = 4;
        for _ in 0..u16::from_be_bytes([head[2], head[3]]) {
            let mut h = [0u8; 12];
            self.0.read_exact(&mut h)?;
            let w = u64::from(u16::from_be_bytes([h[4], h[5]]));
            let hh = u64::from(u16::from_be_bytes([h[6], h[7]]));
            let len = match i32::from_be_bytes(h[8..12].try_into()?) {
                0 => w * hh * 4,
                16 => {
                    let mut l = [0u8; 4];
                    self.0.read_exact(&mut l)?;
                    total += 4;
                    u64::from(u32::from_be_bytes(l))
                }
                other => bail!("encoding {other}"),
            };
            std::io::copy(&mut (&mut self.0).take(len), &mut std::io::sink())?;
            total += 12 + len as usize;
        }
        Ok(total)
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    ensure!(
        args.len() >= 4,
        "usage: display_bench WIDTH HEIGHT raw|zrle [SECONDS]"
    );
    let width: u32 = args[1].parse()?;
    let height: u32 = args[2].parse()?;
    let encoding = match args[3].as_str() {
        "raw" => 0,
        "zrle" => 16,
        other => bail!("encoding {other}"),
    };
    let seconds: f64 = args.get(4).map_or(Ok(3.0), |s| s.parse())?;

    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let scratch = ScratchDir::new("display-bench")?;
    let socket = scratch.path().join("gpu.sock");
    let mut cmd = Command::new(worker_bin());
    cmd.arg("display")
        .arg("--socket")
        .arg(&socket)
        .arg("--vnc-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--width")
        .arg(width.to_string())
        .arg("--height")
        .arg(height.to_string());
    let worker = WorkerProcess::listening_command(cmd, socket)?;
    let mut setup = DeviceSetup::new(&[64, 16]);
    setup.memory_size = 64 << 20;
    let mut device = UserspaceDevice::start(worker.connect()?, &setup)?;
    let cmd_page = device.memory.allocate(8192, 4096)?;
    let len = width * height * 4;
    let fb = device.memory.allocate(u64::from(len), 4096)?;
    let full = [0, 0, width, height];
    let c = |fields: Vec<u32>, d: &mut UserspaceDevice| command(d, &fields, cmd_page);
    c(
        [&hdr(0x101)[..], &[1, 2, width, height]].concat(),
        &mut device,
    )?;
    c(
        [
            &hdr(0x106)[..],
            &[1, 1],
            &[fb.0 as u32, (fb.0 >> 32) as u32, len, 0],
        ]
        .concat(),
        &mut device,
    )?;
    c([&hdr(0x103)[..], &full, &[0, 1]].concat(), &mut device)?;

    let mut viewer = Viewer::connect(port, encoding)?;
    viewer.update(false, width, height)?;
    let mut pixels = vec![0u8; len as usize];
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut draw_time = Duration::ZERO;
    let cpu_start = cpu_ticks(worker.pid())?;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        draw(frames as u32, width, height, &mut pixels);
        device.memory.write(fb, &pixels)?;
        draw_time += t.elapsed();
        c(
            [&hdr(0x105)[..], &full, &[0, 0, 1, 0]].concat(),
            &mut device,
        )?;
        c([&hdr(0x104)[..], &full, &[1, 0]].concat(), &mut device)?;
        bytes += viewer.update(true, width, height)? as u64;
        frames += 1;
    }
    let elapsed = start.elapsed();
    let cpu = (cpu_ticks(worker.pid())? - cpu_start) as f64 / 100.0;
    println!(
        "{width}x{height} {:>4}: {:6.1} frames/s ({:.1} without the driver's drawing), worker CPU {:5.2} ms/frame, {:9.0} bytes/update",
        args[3],
        frames as f64 / elapsed.as_secs_f64(),
        frames as f64 / (elapsed - draw_time).as_secs_f64(),
        cpu * 1000.0 / frames as f64,
        bytes as f64 / frames as f64,
    );
    Ok(())
}
