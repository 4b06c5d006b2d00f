//! `vnc-probe ADDR:PORT [--type TEXT]`: the nested lab's RFB viewer (L1 has only
//! busybox), on the SDL viewer's protocol code. It grabs the screen (raw encoding) until
//! it shows something, prints it as a base64 PNG on stdout (`VNC-PNG: ` lines) with a
//! summary line, then types TEXT and Return with key events.

use std::io::Write;
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bulkhead_tests::screenshot::{base64_encode, Screen};
use bulkhead_viewer::rfb::{self, Framebuffer, ServerMessage, BYTES_PER_PIXEL};

/// Grabs until this many pixels differ from the background, or the time is up.
const ENOUGH_INK: usize = 500;
const GRAB_FOR: Duration = Duration::from_secs(30);
const CONNECT_FOR: Duration = Duration::from_secs(30);
const KEY_GAP: Duration = Duration::from_millis(20);
/// Mode changes one grab waits through before it gives up.
const MAX_MODE_CHANGES: usize = 8;

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

/// A connection and the screen as the server last sent it.
struct Viewer {
    stream: TcpStream,
    screen: Framebuffer,
}

impl Viewer {
    fn connect(address: &str) -> Result<Viewer, String> {
        let deadline = Instant::now() + CONNECT_FOR;
        let mut stream = loop {
            match TcpStream::connect(address) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
        let init = rfb::handshake(&mut reader, &mut stream).map_err(|e| e.to_string())?;
        let screen = Framebuffer::new(init.width, init.height).map_err(|e| e.to_string())?;
        Ok(Viewer { stream, screen })
    }

    /// The whole screen, fresh from the server (a full, not incremental, update). After a
    /// mode change the full screen comes with the next request.
    fn grab(&mut self) -> Result<Screen, String> {
        let mut resized = true;
        for _ in 0..MAX_MODE_CHANGES {
            let (width, height) = (self.screen.width, self.screen.height);
            rfb::request_update(&mut self.stream, false, width, height)
                .map_err(|e| format!("write: {e}"))?;
            resized = loop {
                match rfb::read_message(&mut self.stream, &mut self.screen) {
                    Ok(ServerMessage::Update { resized }) => break resized,
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            };
            if !resized {
                break;
            }
        }
        if resized {
            return Err(format!(
                "the mode changed {MAX_MODE_CHANGES} times in a row"
            ));
        }
        let pixels = self
            .screen
            .pixels
            .chunks_exact(BYTES_PER_PIXEL)
            .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) & 0x00ff_ffff)
            .collect();
        Ok(Screen {
            width: self.screen.width,
            height: self.screen.height,
            pixels,
        })
    }

    fn key(&mut self, keysym: u32, down: bool) -> Result<(), String> {
        rfb::key_event(&mut self.stream, down, keysym).map_err(|e| format!("write: {e}"))
    }
}
