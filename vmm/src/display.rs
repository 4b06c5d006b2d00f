//! `--display vnc[=ADDR:PORT|unix:PATH][,password=PW|,password-file=PATH][,size=WxH]`
//! and `--display sdl[,size=WxH]`: the VMM opens the VNC listener and the socket pair that
//! carries viewers' input, so the display worker creates no socket and the input worker is
//! handed its events. For `sdl` the listener has no address left once the VMM's own
//! connection for the SDL viewer is queued on it, so nobody else can ever connect.

use std::fs::File;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use bulkhead_protocol::{DisplayConfig, InputConfig};
use thiserror::Error;

use crate::worker::launch::device_fds;

/// Where viewers connect when `vnc` names no address: loopback only.
pub const DEFAULT_VNC_ADDRESS: &str = "127.0.0.1:5900";
/// The mode the guest is offered unless `size=` says otherwise.
pub const DEFAULT_SIZE: (u32, u32) = (1024, 768);
/// What the display worker accepts (EDID states at most 4095).
const DIMENSIONS: std::ops::RangeInclusive<u32> = 64..=4095;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VncAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// `sdl`: one connection, the VMM's, handed to the `bulkhead-viewer` it starts.
    SdlViewer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    Inline(String),
    File(PathBuf),
}

/// One `--display` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplaySpec {
    pub address: VncAddress,
    pub password: Option<PasswordSource>,
    pub width: u32,
    pub height: u32,
}

const SYNTAX: &str =
    "vnc[=ADDR:PORT|unix:PATH][,password=PW|,password-file=PATH][,size=WIDTHxHEIGHT] \
     or sdl[,size=WIDTHxHEIGHT]";

impl std::str::FromStr for DisplaySpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',');
        let head = parts.next().unwrap_or_default();
        let address = match head.split_once('=') {
            None if head == "vnc" => DEFAULT_VNC_ADDRESS,
            Some(("vnc", address)) => address,
            None if head == "sdl" => "",
            _ => return Err(format!("unknown display {head:?}: {SYNTAX}")),
        };
        let address = match address.strip_prefix("unix:") {
            _ if head == "sdl" => VncAddress::SdlViewer,
            Some("") => return Err("unix: needs a socket path".into()),
            Some(path) => VncAddress::Unix(PathBuf::from(path)),
            None => VncAddress::Tcp(address.parse().map_err(|_| {
                format!("{address:?} is neither ADDR:PORT (e.g. 127.0.0.1:5900) nor unix:PATH")
            })?),
        };
        let mut spec = DisplaySpec {
            address,
            password: None,
            width: DEFAULT_SIZE.0,
            height: DEFAULT_SIZE.1,
        };
        for option in parts {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            match key {
                "password" | "password-file" if spec.address == VncAddress::SdlViewer => {
                    return Err(
                        "sdl's connection is private to its window and takes no password".into(),
                    )
                }
                "password" | "password-file" if spec.password.is_some() => {
                    return Err("give one password or password-file".into())
                }
                "password" if value.is_empty() => return Err("an empty VNC password".into()),
                "password" => spec.password = Some(PasswordSource::Inline(value.to_owned())),
                "password-file" if value.is_empty() => {
                    return Err("password-file needs a path".into())
                }
                "password-file" => spec.password = Some(PasswordSource::File(PathBuf::from(value))),
                "size" => {
                    let size = value
                        .split_once('x')
                        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
                    match size {
                        Some((w, h)) if DIMENSIONS.contains(&w) && DIMENSIONS.contains(&h) => {
                            (spec.width, spec.height) = (w, h)
                        }
                        _ => {
                            return Err(format!(
                                "size {value:?}: WIDTHxHEIGHT, each {} to {}",
                                DIMENSIONS.start(),
                                DIMENSIONS.end()
                            ))
                        }
                    }
                }
                _ => return Err(format!("unknown display option {option:?}: {SYNTAX}")),
            }
        }
        if let VncAddress::Tcp(addr) = spec.address {
            if !addr.ip().is_loopback() && spec.password.is_none() {
                return Err(format!(
                    "{addr} is not a loopback address: give a password (password=PW or \
                     password-file=PATH), or listen on 127.0.0.1 and tunnel"
                ));
            }
        }
        Ok(spec)
    }
}

#[derive(Debug, Error)]
pub enum DisplayOpenError {
    #[error("cannot listen for VNC viewers on {address}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("{0} is a socket another program is serving")]
    InUse(PathBuf),
    #[error("cannot read the VNC password from {path}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no password (its first line is empty)")]
    EmptyPassword(PathBuf),
    #[error("creating the input events socket pair")]
    EventsSocket(#[source] std::io::Error),
    #[error("creating the display's state store")]
    StateStore(#[source] std::io::Error),
    #[error("creating the SDL viewer's private VNC socket in {dir}")]
    ViewerSocket {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The display and input devices ready to hand to their workers: each launch config and
/// the files it names, in order.
#[derive(Debug)]
pub struct OpenedDisplay {
    pub display: DisplayConfig,
    pub display_files: Vec<File>,
    pub input: InputConfig,
    pub input_files: Vec<File>,
    /// `sdl`: the connection queued on the listener, for the viewer to speak RFB on.
    pub viewer: Option<UnixStream>,
}

/// Opens the VNC listener and the events socket pair for `spec`.
pub fn open_display(spec: &DisplaySpec) -> Result<OpenedDisplay, DisplayOpenError> {
    let password = match &spec.password {
        None => None,
        Some(PasswordSource::Inline(password)) => Some(password.clone()),
        Some(PasswordSource::File(path)) => Some(read_password(path)?),
    };
    let (listener, viewer) = listen(&spec.address)?;
    let (to_input, from_display) = events_pair().map_err(DisplayOpenError::EventsSocket)?;
    // Kept with the other files for every incarnation of the worker, like a cow disk's
    // overlay store: a replacement rebuilds the guest's screen from it.
    let store =
        bulkhead_workers::display::gpu::store::new_store().map_err(DisplayOpenError::StateStore)?;
    let display_fds = device_fds(3);
    let display = DisplayConfig {
        vnc_listen_fd: display_fds[0],
        width: spec.width,
        height: spec.height,
        vnc_password: password,
        input_events_fd: Some(display_fds[1]),
        state_fd: Some(display_fds[2]),
    };
    let input = InputConfig {
        events_fd: device_fds(1)[0],
    };
    Ok(OpenedDisplay {
        display,
        display_files: vec![File::from(listener), File::from(to_input), store],
        input,
        input_files: vec![File::from(from_display)],
        viewer,
    })
}

/// `sdl`, when the display worker is replaced: the old viewer's connection died with the
/// old worker, and the private listener has no address to connect a new one through. A
/// fresh private listener takes its place in the display worker's `files` (the VNC
/// listener comes first, as `DisplayConfig::descriptors` orders them), and the returned
/// connection, queued on it, is the new viewer's.
pub fn reopen_sdl_listener(files: &mut [File]) -> Result<UnixStream, DisplayOpenError> {
    let (listener, viewer) = private_listener()?;
    if let Some(slot) = files.first_mut() {
        *slot = File::from(listener);
    }
    Ok(viewer)
}

/// A listener with exactly one connection queued on it, and that connection: bound in a
/// fresh directory only root (or the VMM's user) can enter, connected to, then unlinked
/// with its directory before any other process could have reached it.
fn private_listener() -> Result<(OwnedFd, UnixStream), DisplayOpenError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let dir = base.join(format!("bulkhead-sdl-{}-{nonce}", std::process::id()));
    let failed = |source| DisplayOpenError::ViewerSocket {
        dir: dir.clone(),
        source,
    };
    // create (not create_all): an existing directory, perhaps somebody else's, is refused.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(failed)?;
    let path = dir.join("vnc.sock");
    let opened = UnixListener::bind(&path).and_then(|listener| {
        let viewer = UnixStream::connect(&path)?;
        Ok((listener, viewer))
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let (listener, viewer) = opened.map_err(failed)?;
    Ok((listener.into(), viewer))
}

fn read_password(path: &Path) -> Result<String, DisplayOpenError> {
    let text = std::fs::read_to_string(path).map_err(|source| DisplayOpenError::PasswordFile {
        path: path.to_owned(),
        source,
    })?;
    match text.lines().next() {
        Some(line) if !line.is_empty() => Ok(line.to_owned()),
        _ => Err(DisplayOpenError::EmptyPassword(path.to_owned())),
    }
}

/// The listener the display worker serves, and for `sdl` the viewer's connection to it.
fn listen(address: &VncAddress) -> Result<(OwnedFd, Option<UnixStream>), DisplayOpenError> {
    let listen_error = |source| DisplayOpenError::Listen {
        address: match address {
            VncAddress::Tcp(addr) => addr.to_string(),
            VncAddress::Unix(path) => format!("unix:{}", path.display()),
            VncAddress::SdlViewer => "the SDL viewer's socket".into(),
        },
        source,
    };
    match address {
        VncAddress::Tcp(addr) => Ok((TcpListener::bind(addr).map_err(listen_error)?.into(), None)),
        VncAddress::Unix(path) => {
            remove_stale_socket(path)?;
            Ok((UnixListener::bind(path).map_err(listen_error)?.into(), None))
        }
        VncAddress::SdlViewer => {
            let (listener, viewer) = private_listener()?;
            Ok((listener, Some(viewer)))
        }
    }
}

/// A socket file nobody answers on is what a VMM that ended left behind; one somebody
/// answers on, or a file that is not a socket, is not ours to remove.
fn remove_stale_socket(path: &Path) -> Result<(), DisplayOpenError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Ok(meta) if !meta.file_type().is_socket() => {
            Err(DisplayOpenError::NotASocket(path.to_owned()))
        }
        _ if UnixStream::connect(path).is_ok() => Err(DisplayOpenError::InUse(path.to_owned())),
        _ => {
            let _ = std::fs::remove_file(path);
            Ok(())
        }
    }
}

/// A non-blocking `SOCK_SEQPACKET` pair: reports keep their boundaries, and a full
/// socket makes the display worker drop a report rather than stall a viewer.
fn events_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
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
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both descriptors are fresh and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_options_parse() {
        let plain: DisplaySpec = "vnc".parse().unwrap();
        assert_eq!(
            plain.address,
            VncAddress::Tcp(DEFAULT_VNC_ADDRESS.parse().unwrap())
        );
        assert_eq!((plain.width, plain.height), DEFAULT_SIZE);
        let full: DisplaySpec = "vnc=0.0.0.0:5901,password-file=/p,size=800x600"
            .parse()
            .unwrap();
        assert_eq!(full.password, Some(PasswordSource::File("/p".into())));
        assert_eq!((full.width, full.height), (800, 600));
        let unix: DisplaySpec = "vnc=unix:/tmp/v.sock,password=pw".parse().unwrap();
        assert_eq!(unix.address, VncAddress::Unix("/tmp/v.sock".into()));
        assert_eq!(unix.password, Some(PasswordSource::Inline("pw".into())));
        let v6: DisplaySpec = "vnc=[::1]:5900".parse().unwrap();
        assert!(v6.password.is_none());
        let sdl: DisplaySpec = "sdl,size=800x600".parse().unwrap();
        assert_eq!(sdl.address, VncAddress::SdlViewer);
        assert_eq!((sdl.width, sdl.height), (800, 600));
    }

    #[test]
    fn bad_display_options_are_refused() {
        for (bad, says) in [
            ("", "unknown display"),
            ("rdp", "unknown display"),
            ("sdl=:1", "unknown display"),
            ("sdl,password=pw", "takes no password"),
            ("vnc=5900", "neither ADDR:PORT"),
            ("vnc=unix:", "needs a socket path"),
            ("vnc,bogus", "unknown display option"),
            ("vnc,password=", "empty VNC password"),
            ("vnc,password=a,password-file=/b", "one password"),
            ("vnc,size=10x10", "WIDTHxHEIGHT"),
            ("vnc,size=800", "WIDTHxHEIGHT"),
            ("vnc=0.0.0.0:5900", "not a loopback address"),
            ("vnc=[fe80::1]:5900", "not a loopback address"),
        ] {
            let error = bad.parse::<DisplaySpec>().unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[test]
    fn opening_gives_each_worker_its_descriptors() {
        let dir = std::env::temp_dir().join(format!("bulkhead-display-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vnc.sock");
        let spec: DisplaySpec = format!("vnc=unix:{}", path.display()).parse().unwrap();
        let opened = open_display(&spec).unwrap();
        assert_eq!(opened.display.vnc_listen_fd, 5);
        assert_eq!(opened.display.input_events_fd, Some(6));
        assert_eq!(opened.display.state_fd, Some(7));
        assert_eq!(opened.input.events_fd, 5);
        assert_eq!(opened.display_files.len(), 3);
        assert_eq!(opened.input_files.len(), 1);
        // Somebody is listening there now: a second display may not take the path.
        assert!(matches!(
            open_display(&spec),
            Err(DisplayOpenError::InUse(_))
        ));
        drop(opened);
        // Left behind by a display that ended: replaced.
        assert!(open_display(&spec).is_ok());
        std::fs::write(dir.join("file"), "x").unwrap();
        let spec: DisplaySpec = format!("vnc=unix:{}", dir.join("file").display())
            .parse()
            .unwrap();
        assert!(matches!(
            open_display(&spec),
            Err(DisplayOpenError::NotASocket(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sdl_gets_a_listener_whose_only_connection_is_the_viewers() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixListener;

        let opened = open_display(&"sdl".parse().unwrap()).unwrap();
        assert_eq!(opened.display.vnc_listen_fd, 5);
        let mut viewer = opened.viewer.unwrap();
        let listener = UnixListener::from(OwnedFd::from(
            opened.display_files.into_iter().next().unwrap(),
        ));
        // Nothing names the listener any more: no path to connect to.
        let address = listener.local_addr().unwrap();
        let path = address.as_pathname().unwrap();
        assert!(!path.exists() && !path.parent().unwrap().exists());
        let (mut served, _) = listener.accept().unwrap();
        served.write_all(b"RFB 003.008\n").unwrap();
        let mut greeting = [0u8; 12];
        viewer.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"RFB 003.008\n");
    }
}
