//! `vnc-probe ADDR:PORT [--type TEXT]`: a minimal RFB 3.8 viewer for the nested lab, where
//! L1 has only busybox. It grabs the screen (raw encoding) until it shows something,
//! prints it as a base64 PNG on stdout (`VNC-PNG: ` lines) with a summary line, then types
//! TEXT and Return with key events.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bulkhead_tests::screenshot::{base64_encode, Screen};

/// Grabs until this many pixels differ from the background, or the time is up.
const ENOUGH_INK: usize = 500;
const GRAB_FOR: Duration = Duration::from_secs(30);
const CONNECT_FOR: Duration = Duration::from_secs(30);
const KEY_GAP: Duration = Duration::from_millis(20);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (address, typed) = match args.as_slice() {
        [address] => (address.clone(), None),
        [address, flag, text] if flag == "--type" => (address.clone(), Some(text.clone())),
        _ => {
            eprintln!("usage: vnc-probe ADDR:PORT [--type TEXT]");
            return ExitCode::from(2);
        }
    };
    match probe(&address, typed.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("VNC-PROBE: error {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(address: &str, typed: Option<&str>) -> Result<(), String> {
    let mut viewer = Viewer::connect(address)?;
    let deadline = Instant::now() + GRAB_FOR;
    let mut grabs = 0;
    let screen = loop {
        let screen = viewer.grab()?;
        grabs += 1;
        if screen.foreground_pixels() >= ENOUGH_INK || Instant::now() > deadline {
            break screen;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "VNC-PROBE: size={}x{} foreground={} grabs={grabs}",
        screen.width,
        screen.height,
        screen.foreground_pixels()
    );
    let encoded = base64_encode(&screen.to_png());
    for line in encoded.as_bytes().chunks(96) {
        println!("VNC-PNG: {}", String::from_utf8_lossy(line));
    }
    println!("VNC-PROBE: png done");
    let _ = std::io::stdout().flush();
    if let Some(text) = typed {
        const RETURN: u32 = 0xff0d;
        for keysym in text.chars().map(|c| c as u32).chain([RETURN]) {
            viewer.key(keysym, true)?;
            viewer.key(keysym, false)?;
            std::thread::sleep(KEY_GAP);
        }
        println!("VNC-PROBE: typed {} keys", text.chars().count() + 1);
    }
    Ok(())
}

struct Viewer {
    stream: TcpStream,
    width: u32,
    height: u32,
}

impl Viewer {
    fn connect(address: &str) -> Result<Viewer, String> {
        let deadline = Instant::now() + CONNECT_FOR;
        let stream = loop {
            match TcpStream::connect(address) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut viewer = Viewer {
            stream,
            width: 0,
            height: 0,
        };
        let version = viewer.read(12)?;
        if !version.starts_with(b"RFB 003.") {
            return Err(format!("not an RFB server: {version:?}"));
        }
        viewer.write(b"RFB 003.008\n")?;
        let count = viewer.read(1)?[0];
        let types = viewer.read(usize::from(count))?;
        if !types.contains(&1) {
            return Err(format!("security types {types:?} lack None"));
        }
        viewer.write(&[1])?;
        if viewer.read(4)? != [0, 0, 0, 0] {
            return Err("security handshake failed".into());
        }
        viewer.write(&[1])?; // ClientInit: shared
        let init = viewer.read(24)?;
        viewer.width = u32::from(u16::from_be_bytes([init[0], init[1]]));
        viewer.height = u32::from(u16::from_be_bytes([init[2], init[3]]));
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
        viewer.read(name_len as usize)?;
        // SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 0x00RRGGBB.
        let mut format = vec![0u8, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0];
        format.extend([0, 0, 0]);
        viewer.write(&format)?;
        // SetEncodings: raw only.
        viewer.write(&[2, 0, 0, 1, 0, 0, 0, 0])?;
        Ok(viewer)
    }

    fn grab(&mut self) -> Result<Screen, String> {
        let (w, h) = (self.width, self.height);
        let mut request = vec![3u8, 0, 0, 0, 0, 0];
        request.extend((w as u16).to_be_bytes());
        request.extend((h as u16).to_be_bytes());
        self.write(&request)?;
        let mut pixels = vec![0u32; (w * h) as usize];
        loop {
            match self.read(1)?[0] {
                0 => break,
                2 => {} // Bell
                3 => {
                    let header = self.read(7)?;
                    let len = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
                    self.read(len as usize)?;
                }
                other => return Err(format!("server message type {other}")),
            }
        }
        let header = self.read(3)?;
        let rects = u16::from_be_bytes([header[1], header[2]]);
        for _ in 0..rects {
            let r = self.read(12)?;
            let field = |i: usize| u32::from(u16::from_be_bytes([r[i], r[i + 1]]));
            let (x, y, rw, rh) = (field(0), field(2), field(4), field(6));
            let encoding = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
            if encoding != 0 {
                return Err(format!("encoding {encoding} was not asked for"));
            }
            if x + rw > w || y + rh > h {
                return Err(format!("rectangle {x},{y} {rw}x{rh} outside {w}x{h}"));
            }
            let data = self.read((rw * rh * 4) as usize)?;
            for (i, p) in data.chunks_exact(4).enumerate() {
                let (dx, dy) = (i as u32 % rw, i as u32 / rw);
                pixels[((y + dy) * w + x + dx) as usize] =
                    u32::from_le_bytes([p[0], p[1], p[2], p[3]]) & 0x00ff_ffff;
            }
        }
        Ok(Screen {
            width: w,
            height: h,
            pixels,
        })
    }

    fn key(&mut self, keysym: u32, down: bool) -> Result<(), String> {
        let mut event = vec![4u8, u8::from(down), 0, 0];
        event.extend(keysym.to_be_bytes());
        self.write(&event)
    }

    fn read(&mut self, len: usize) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        self.stream
            .read_exact(&mut buf)
            .map_err(|e| format!("read: {e}"))?;
        Ok(buf)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("write: {e}"))
    }
}
