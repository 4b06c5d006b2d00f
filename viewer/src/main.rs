//! `bulkhead-viewer`: a guest's display in an SDL2 window. It is an RFB client of the
//! display worker's VNC server, so the worker's sandbox knows nothing of windows: it
//! serves one more viewer. Keys and mouse go back as RFB key and pointer events, which the
//! worker feeds to the guest's virtio-input devices. Closing the window ends the viewer,
//! not the VM.

mod connection;
mod keysym;
mod window;

use std::io::Write;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Parser;
use sdl2::event::{Event, WindowEvent};
use sdl2::keyboard::{Keycode, Mod};
use sdl2::mouse::{MouseButton, MouseState, MouseWheelDirection};

use bulkhead_viewer::rfb::{self, Framebuffer, RfbError, ServerMessage};
use connection::Connection;

/// How long the window waits for a person before looking for new frames.
const FRAME_POLL: Duration = Duration::from_millis(15);

#[derive(Parser, Debug)]
#[command(name = "bulkhead-viewer", version, about)]
struct Args {
    /// The VNC server: unix:PATH or HOST:PORT.
    #[arg(long, required_unless_present = "fd", conflicts_with = "fd")]
    connect: Option<String>,
    /// An inherited descriptor, a stream socket already connected to the server.
    #[arg(long)]
    fd: Option<RawFd>,
    /// The window's title.
    #[arg(long, default_value = "bulkhead")]
    title: String,
    /// Test hook: once the first full frame is in the window, write what the window shows
    /// to PATH as a PPM image, then exit.
    #[arg(long, value_name = "PATH")]
    snapshot: Option<PathBuf>,
    /// Test hook: once the first full frame is shown, type TEXT (ASCII) and Return as key
    /// events through SDL's event queue, then exit.
    #[arg(long = "type", value_name = "TEXT")]
    type_text: Option<String>,
    /// Test hook: once the first full frame is shown, move the mouse to X,Y through SDL's
    /// event queue, then exit.
    #[arg(long, value_name = "X,Y", value_parser = parse_point)]
    point: Option<(i32, i32)>,
}

impl Args {
    fn has_hooks(&self) -> bool {
        self.snapshot.is_some() || self.type_text.is_some() || self.point.is_some()
    }
}

fn parse_point(text: &str) -> Result<(i32, i32), String> {
    text.split_once(',')
        .and_then(|(x, y)| Some((x.parse().ok()?, y.parse().ok()?)))
        .filter(|&(x, y)| x >= 0 && y >= 0)
        .ok_or_else(|| format!("{text:?} is not X,Y"))
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-viewer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the reader thread tells the window.
enum Note {
    Frame,
    Ended(RfbError),
}

type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(writer: &Writer, message: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) {
    let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
    // A failed write means the server is gone; the reader thread reports that.
    if let Err(e) = message(&mut **writer) {
        tracing::debug!("sending to the server: {e}");
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let connection = match (&args.connect, args.fd) {
        (_, Some(fd)) => Connection::inherited(fd)?,
        (Some(address), None) => Connection::connect(address)?,
        (None, None) => return Err(anyhow!("give --connect or --fd")),
    };
    let (mut reader, mut writer) = connection.split()?;
    let init = rfb::handshake(&mut reader, &mut writer).context("RFB handshake")?;
    tracing::info!(
        width = init.width,
        height = init.height,
        name = %init.name,
        "connected"
    );
    let screen = Arc::new(Mutex::new(Framebuffer::new(init.width, init.height)?));
    rfb::request_update(&mut writer, false, init.width, init.height)?;
    let writer: Writer = Arc::new(Mutex::new(writer));
    let (notes, notes_rx) = channel();
    {
        let (screen, writer) = (screen.clone(), writer.clone());
        let mut local = Framebuffer::new(init.width, init.height)?;
        std::thread::Builder::new()
            .name("rfb-reader".into())
            .spawn(move || read_updates(reader, &mut local, &screen, &writer, &notes))
            .context("starting the reader thread")?;
    }
    show(args, &init.name, &screen, &writer, &notes_rx)
}

/// Applies server messages to a private framebuffer and publishes each finished update,
/// so that the window never shows half an update and the socket never waits on drawing.
fn read_updates(
    mut reader: Box<dyn std::io::Read + Send>,
    local: &mut Framebuffer,
    screen: &Mutex<Framebuffer>,
    writer: &Writer,
    notes: &Sender<Note>,
) {
    loop {
        match rfb::read_message(&mut reader, local) {
            Ok(ServerMessage::Update { resized }) => {
                if resized {
                    tracing::info!(width = local.width, height = local.height, "mode change");
                }
                screen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone_from(local);
                if notes.send(Note::Frame).is_err() {
                    return;
                }
                let (width, height) = (local.width, local.height);
                send(writer, |w| rfb::request_update(w, !resized, width, height));
            }
            Ok(ServerMessage::Bell | ServerMessage::CutText) => {}
            Err(e) => {
                let _ = notes.send(Note::Ended(e));
                return;
            }
        }
    }
}

/// The window's event loop: frames in, keys and mouse out, until the window closes or the
/// server goes away.
fn show(
    args: &Args,
    name: &str,
    screen: &Mutex<Framebuffer>,
    writer: &Writer,
    notes: &Receiver<Note>,
) -> anyhow::Result<()> {
    let sdl = sdl2::init().map_err(|e| anyhow!("SDL: {e}"))?;
    let video = sdl.video().map_err(|e| anyhow!("SDL video: {e}"))?;
    let events = sdl.event().map_err(|e| anyhow!("SDL events: {e}"))?;
    let (width, height) = {
        let screen = screen.lock().unwrap_or_else(PoisonError::into_inner);
        (screen.width.max(1), screen.height.max(1))
    };
    let title = if name.is_empty() {
        args.title.clone()
    } else {
        format!("{} - {name}", args.title)
    };
    let mut window = video
        .window(&title, width, height)
        .position_centered()
        .build()
        .context("opening the window")?;
    let window_id = window.id();
    let mut pump = sdl.event_pump().map_err(|e| anyhow!("SDL: {e}"))?;
    let mut input = Input::default();
    let mut first_frame_shown = false;
    loop {
        if let Some(event) = pump.wait_event_timeout(FRAME_POLL.as_millis() as u32) {
            let mut pending = vec![event];
            pending.extend(pump.poll_iter());
            for event in pending {
                match event {
                    Event::Quit { .. }
                    | Event::Window {
                        win_event: WindowEvent::Close,
                        ..
                    } => {
                        tracing::info!("window closed");
                        return Ok(());
                    }
                    Event::Window {
                        win_event: WindowEvent::Exposed,
                        ..
                    } => redraw(&mut window, &pump, screen)?,
                    other => input.forward(&other, writer),
                }
            }
        }
        let mut frame = false;
        for note in notes.try_iter() {
            match note {
                Note::Frame => frame = true,
                Note::Ended(RfbError::Closed) => {
                    tracing::info!("the display closed the connection");
                    return Ok(());
                }
                Note::Ended(e) => return Err(e).context("the display's connection"),
            }
        }
        if !frame {
            continue;
        }
        redraw(&mut window, &pump, screen)?;
        if !first_frame_shown {
            first_frame_shown = true;
            if let Some(path) = &args.snapshot {
                window::snapshot(&window, &pump, path)?;
                tracing::info!(path = %path.display(), "snapshot written");
            }
            if args.has_hooks() {
                push_hook_events(args, &events, window_id)?;
            }
        }
    }
}

fn redraw(
    window: &mut sdl2::video::Window,
    pump: &sdl2::EventPump,
    screen: &Mutex<Framebuffer>,
) -> anyhow::Result<()> {
    let mut screen = screen.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(window::present(window, pump, &mut screen)?)
}

/// Queues the test hooks' events behind whatever SDL already has, and a Quit after them,
/// so that they travel the same path as a person's keys and the viewer ends once they
/// are sent.
fn push_hook_events(
    args: &Args,
    events: &sdl2::EventSubsystem,
    window_id: u32,
) -> anyhow::Result<()> {
    let mut queue = Vec::new();
    if let Some(text) = &args.type_text {
        let key = |down: bool, keycode: Keycode, keymod: Mod| {
            let (repeat, timestamp, scancode) = (false, 0, None);
            let keycode = Some(keycode);
            if down {
                Event::KeyDown {
                    timestamp,
                    window_id,
                    keycode,
                    scancode,
                    keymod,
                    repeat,
                }
            } else {
                Event::KeyUp {
                    timestamp,
                    window_id,
                    keycode,
                    scancode,
                    keymod,
                    repeat,
                }
            }
        };
        for c in text.chars() {
            if !c.is_ascii() || c.is_ascii_control() {
                return Err(anyhow!("--type takes printable ASCII, not {c:?}"));
            }
            // As SDL reports a person's typing: the key's own code, Shift in the modifiers.
            let (plain, keymod) = match keysym::unshifted(c) {
                Some(plain) => (plain, Mod::LSHIFTMOD),
                None => (c, Mod::NOMOD),
            };
            let keycode =
                Keycode::from_i32(plain as i32).with_context(|| format!("no SDL key for {c:?}"))?;
            if keymod == Mod::LSHIFTMOD {
                queue.push(key(true, Keycode::LSHIFT, keymod));
            }
            queue.push(key(true, keycode, keymod));
            queue.push(key(false, keycode, keymod));
            if keymod == Mod::LSHIFTMOD {
                queue.push(key(false, Keycode::LSHIFT, Mod::NOMOD));
            }
        }
        queue.push(key(true, Keycode::RETURN, Mod::NOMOD));
        queue.push(key(false, Keycode::RETURN, Mod::NOMOD));
    }
    if let Some((x, y)) = args.point {
        queue.push(Event::MouseMotion {
            timestamp: 0,
            window_id,
            which: 0,
            mousestate: MouseState::from_sdl_state(0),
            x,
            y,
            xrel: 0,
            yrel: 0,
        });
    }
    if args.snapshot.is_some() || !queue.is_empty() {
        queue.push(Event::Quit { timestamp: 0 });
    }
    for event in queue {
        events
            .push_event(event)
            .map_err(|e| anyhow!("queueing a test event: {e}"))?;
    }
    Ok(())
}

/// The pointer as the server last heard of it.
#[derive(Default)]
struct Input {
    buttons: u8,
    x: u16,
    y: u16,
}

impl Input {
    fn forward(&mut self, event: &Event, writer: &Writer) {
        match *event {
            Event::KeyDown {
                keycode: Some(key),
                keymod,
                ..
            } => {
                if let Some(sym) = keysym::keysym(key, keymod) {
                    send(writer, |w| rfb::key_event(w, true, sym));
                }
            }
            Event::KeyUp {
                keycode: Some(key),
                keymod,
                ..
            } => {
                if let Some(sym) = keysym::keysym(key, keymod) {
                    send(writer, |w| rfb::key_event(w, false, sym));
                }
            }
            Event::MouseMotion { x, y, .. } => self.pointer(writer, x, y),
            Event::MouseButtonDown {
                mouse_btn, x, y, ..
            } => {
                self.buttons |= button_bit(mouse_btn);
                self.pointer(writer, x, y);
            }
            Event::MouseButtonUp {
                mouse_btn, x, y, ..
            } => {
                self.buttons &= !button_bit(mouse_btn);
                self.pointer(writer, x, y);
            }
            Event::MouseWheel { y, direction, .. } => {
                let y = if direction == MouseWheelDirection::Flipped {
                    -y
                } else {
                    y
                };
                // RFB has no wheel: a click of button 4 (up) or 5 (down) per notch.
                let bit = if y > 0 { 1 << 3 } else { 1 << 4 };
                for _ in 0..y.unsigned_abs().min(16) {
                    let (buttons, x, y) = (self.buttons, self.x, self.y);
                    send(writer, |w| rfb::pointer_event(w, buttons | bit, x, y));
                    send(writer, |w| rfb::pointer_event(w, buttons, x, y));
                }
            }
            _ => {}
        }
    }

    fn pointer(&mut self, writer: &Writer, x: i32, y: i32) {
        let clamp = |v: i32| v.clamp(0, i32::from(u16::MAX)) as u16;
        (self.x, self.y) = (clamp(x), clamp(y));
        let (buttons, x, y) = (self.buttons, self.x, self.y);
        send(writer, |w| rfb::pointer_event(w, buttons, x, y));
    }
}

fn button_bit(button: MouseButton) -> u8 {
    match button {
        MouseButton::Left => 1,
        MouseButton::Middle => 1 << 1,
        MouseButton::Right => 1 << 2,
        _ => 0,
    }
}
