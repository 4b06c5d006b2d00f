//! One viewer: the RFB 3.8 handshake (security type None), then its messages, read on the
//! session's thread while [`super::update`] sends updates on a second one.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use super::des::vnc_response;
use super::pixel_format::PixelFormat;
use super::update::run_updates;
use super::{ENCODING_DESKTOP_SIZE, ENCODING_RAW, ENCODING_ZRLE};
use crate::display::framebuffer::{Framebuffer, Rect};
use crate::display::input::{InputEvent, InputSink};

/// Most encodings a SetEncodings may list; more is garbage.
const MAX_ENCODINGS: u16 = 1024;

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("protocol version {0:?} is not RFB 3.x")]
    Version(String),
    #[error("security type {0} was not offered")]
    Security(u8),
    #[error("wrong VNC password")]
    AuthFailed,
    #[error("unsupported pixel format {0:?}")]
    PixelFormat([u8; 16]),
    #[error("unknown message type {0}")]
    UnknownMessage(u8),
    #[error("SetEncodings with {0} encodings")]
    TooManyEncodings(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateRequest {
    pub incremental: bool,
    pub rect: Rect,
}

/// What the reader learns and the updater acts on.
#[derive(Debug)]
pub struct ClientState {
    pub pixel_format: PixelFormat,
    /// The encoding chosen from the viewer's list.
    pub encoding: i32,
    pub desktop_size: bool,
    pub request: Option<UpdateRequest>,
    pub closed: bool,
}

pub struct Client {
    state: Mutex<ClientState>,
}

impl Client {
    pub fn lock(&self) -> MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Ends the connection both ways, so whichever thread is blocked on it returns.
pub fn hang_up(socket: &File) {
    // SAFETY: shutdown on a descriptor the session owns; failure (already shut) is harmless.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
}

pub fn run_session(
    id: u64,
    mut socket: File,
    framebuffer: Arc<Framebuffer>,
    input: Arc<dyn InputSink>,
    name: &str,
    password: Option<&[u8]>,
) -> Result<(), SessionError> {
    // The size the viewer was told, which the updater starts from (a mode change right
    // after ServerInit then still reaches it).
    let (width, height) = handshake(&mut socket, &framebuffer, name, password)?;
    let client = Arc::new(Client {
        state: Mutex::new(ClientState {
            pixel_format: PixelFormat::SERVER,
            encoding: ENCODING_RAW,
            desktop_size: false,
            request: None,
            closed: false,
        }),
    });
    let writer = socket.try_clone()?;
    let updater = {
        let client = client.clone();
        let framebuffer = framebuffer.clone();
        std::thread::Builder::new()
            .name(format!("vnc-{id}-updates"))
            .spawn(move || {
                let result = run_updates(id, writer, &client, &framebuffer, (width, height));
                client.lock().closed = true;
                result
            })?
    };
    let result = read_messages(id, &mut socket, &client, &framebuffer, input.as_ref());
    client.lock().closed = true;
    hang_up(&socket);
    framebuffer.wake_all();
    let updates = updater.join().unwrap_or(Ok(()));
    match (result, updates) {
        (Err(SessionError::Io(e)), _) if is_disconnect(&e) => Ok(()),
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) if !is_disconnect(&e) => Err(e.into()),
        _ => Ok(()),
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::NotConnected
    )
}

fn handshake(
    socket: &mut File,
    framebuffer: &Framebuffer,
    name: &str,
    password: Option<&[u8]>,
) -> Result<(u32, u32), SessionError> {
    socket.write_all(b"RFB 003.008\n")?;
    let mut version = [0u8; 12];
    socket.read_exact(&mut version)?;
    let minor = match &version {
        b"RFB 003.003\n" => 3,
        b"RFB 003.007\n" => 7,
        // 3.8, and any later 3.x (Apple's 3.889) treated as 3.8 as the spec says.
        v if v.starts_with(b"RFB 003.") && v[11] == b'\n' => 8,
        v => {
            return Err(SessionError::Version(
                String::from_utf8_lossy(v).into_owned(),
            ))
        }
    };
    // 1: None; 2: VNC authentication, the only type offered when there is a password.
    let offered: u8 = if password.is_some() { 2 } else { 1 };
    if minor == 3 {
        // 3.3: the server decides.
        socket.write_all(&u32::from(offered).to_be_bytes())?;
    } else {
        socket.write_all(&[1, offered])?;
        let mut chosen = [0u8; 1];
        socket.read_exact(&mut chosen)?;
        if chosen[0] != offered {
            if minor == 8 {
                let reason = b"security type not offered";
                let mut msg = 1u32.to_be_bytes().to_vec();
                msg.extend_from_slice(&(reason.len() as u32).to_be_bytes());
                msg.extend_from_slice(reason);
                let _ = socket.write_all(&msg);
            }
            return Err(SessionError::Security(chosen[0]));
        }
    }
    let passed = match password {
        Some(password) => authenticate(socket, password)?,
        None => true,
    };
    // 3.8 always sends the result; earlier versions only for VNC authentication.
    if minor == 8 || password.is_some() {
        let mut result = u32::from(!passed).to_be_bytes().to_vec();
        if !passed && minor == 8 {
            let reason = b"authentication failed";
            result.extend_from_slice(&(reason.len() as u32).to_be_bytes());
            result.extend_from_slice(reason);
        }
        socket.write_all(&result)?;
    }
    if !passed {
        return Err(SessionError::AuthFailed);
    }
    // ClientInit's shared flag: every viewer shares the screen anyway.
    let mut shared = [0u8; 1];
    socket.read_exact(&mut shared)?;
    let (width, height) = {
        let fb = framebuffer.lock();
        (fb.width, fb.height)
    };
    let mut init = Vec::with_capacity(24 + name.len());
    init.extend_from_slice(&(width.min(0xffff) as u16).to_be_bytes());
    init.extend_from_slice(&(height.min(0xffff) as u16).to_be_bytes());
    init.extend_from_slice(&PixelFormat::SERVER.to_bytes());
    init.extend_from_slice(&(name.len() as u32).to_be_bytes());
    init.extend_from_slice(name.as_bytes());
    socket.write_all(&init)?;
    Ok((width, height))
}

/// Sends a random challenge and checks the viewer's DES answer.
fn authenticate(socket: &mut File, password: &[u8]) -> Result<bool, SessionError> {
    let mut challenge = [0u8; 16];
    // SAFETY: getrandom writes at most `challenge.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(challenge.as_mut_ptr().cast(), challenge.len(), 0) };
    if n != challenge.len() as isize {
        return Err(io::Error::last_os_error().into());
    }
    socket.write_all(&challenge)?;
    let mut answer = [0u8; 16];
    socket.read_exact(&mut answer)?;
    let expected = vnc_response(password, &challenge);
    // Compared in full whatever differs first: the time taken says nothing.
    let difference = expected
        .iter()
        .zip(&answer)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    Ok(difference == 0)
}

fn read_messages(
    id: u64,
    socket: &mut File,
    client: &Client,
    framebuffer: &Framebuffer,
    input: &dyn InputSink,
) -> Result<(), SessionError> {
    loop {
        let mut kind = [0u8; 1];
        match socket.read(&mut kind) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        match kind[0] {
            0 => {
                let mut b = [0u8; 19];
                socket.read_exact(&mut b)?;
                let mut format = [0u8; 16];
                format.copy_from_slice(&b[3..]);
                let pf = PixelFormat::parse(&format).ok_or(SessionError::PixelFormat(format))?;
                tracing::debug!("vnc: viewer {id} pixel format {pf:?}");
                client.lock().pixel_format = pf;
            }
            2 => {
                let mut b = [0u8; 3];
                socket.read_exact(&mut b)?;
                let count = u16::from_be_bytes([b[1], b[2]]);
                if count > MAX_ENCODINGS {
                    return Err(SessionError::TooManyEncodings(count));
                }
                let mut list = vec![0u8; usize::from(count) * 4];
                socket.read_exact(&mut list)?;
                let encodings: Vec<i32> = list
                    .chunks_exact(4)
                    .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                // The first encoding listed that the server has is the viewer's preference.
                let encoding = encodings
                    .iter()
                    .copied()
                    .find(|&e| e == ENCODING_RAW || e == ENCODING_ZRLE)
                    .unwrap_or(ENCODING_RAW);
                tracing::debug!(
                    "vnc: viewer {id} encoding {}",
                    if encoding == ENCODING_ZRLE {
                        "ZRLE"
                    } else {
                        "raw"
                    }
                );
                let mut state = client.lock();
                state.encoding = encoding;
                state.desktop_size = encodings.contains(&ENCODING_DESKTOP_SIZE);
            }
            3 => {
                let mut b = [0u8; 9];
                socket.read_exact(&mut b)?;
                let field = |i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
                let request = UpdateRequest {
                    incremental: b[0] != 0,
                    rect: Rect::new(field(1), field(3), field(5), field(7)),
                };
                client.lock().request = Some(request);
                framebuffer.wake_all();
            }
            4 => {
                let mut b = [0u8; 7];
                socket.read_exact(&mut b)?;
                input.send(InputEvent::Key {
                    down: b[0] != 0,
                    keysym: u32::from_be_bytes([b[3], b[4], b[5], b[6]]),
                });
            }
            5 => {
                let mut b = [0u8; 5];
                socket.read_exact(&mut b)?;
                input.send(InputEvent::Pointer {
                    buttons: b[0],
                    x: u16::from_be_bytes([b[1], b[2]]),
                    y: u16::from_be_bytes([b[3], b[4]]),
                });
            }
            6 => {
                let mut b = [0u8; 7];
                socket.read_exact(&mut b)?;
                let len = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                // Ignored, but read: the text is skipped without being held.
                let copied = io::copy(&mut (&mut *socket).take(u64::from(len)), &mut io::sink())?;
                if copied < u64::from(len) {
                    return Ok(());
                }
            }
            other => return Err(SessionError::UnknownMessage(other)),
        }
    }
}
