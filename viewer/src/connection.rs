//! Reaching the VNC server: a Unix socket path, a TCP address, or a connected socket the
//! viewer inherited (how `bulkhead run --display sdl` starts it: no address exists that
//! anybody else could connect to).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot connect to {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--fd {0} is not an open descriptor")]
    NotOpen(RawFd),
    #[error("--fd {0} is not a stream socket")]
    NotAStream(RawFd),
    #[error("duplicating the connection for the reader thread")]
    Clone(#[source] std::io::Error),
}

pub enum Connection {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// The read and write halves the reader thread and the input path each own.
pub type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>);

impl Connection {
    /// `unix:PATH`, or `HOST:PORT` for TCP.
    pub fn connect(address: &str) -> Result<Self, ConnectError> {
        let failed = |source| ConnectError::Connect {
            address: address.to_owned(),
            source,
        };
        match address.strip_prefix("unix:") {
            Some(path) => Ok(Self::Unix(UnixStream::connect(path).map_err(failed)?)),
            None => {
                let stream = TcpStream::connect(address).map_err(failed)?;
                // Key and pointer events are tiny and a person is waiting on each.
                let _ = stream.set_nodelay(true);
                Ok(Self::Tcp(stream))
            }
        }
    }

    /// Takes over inherited descriptor `fd`, which must be a connected stream socket.
    pub fn inherited(fd: RawFd) -> Result<Self, ConnectError> {
        // SAFETY: F_GETFD only reads the descriptor's flags; -1 means it is not open.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(ConnectError::NotOpen(fd));
        }
        let mut kind: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `kind` and `len` are valid for the int SO_TYPE writes.
        let ret = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut kind as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if ret < 0 || kind != libc::SOCK_STREAM {
            return Err(ConnectError::NotAStream(fd));
        }
        // SAFETY: the descriptor is open, was handed to this process to own, and nothing
        // else in it refers to it; the viewer's own children must not inherit it.
        let owned = unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            OwnedFd::from_raw_fd(fd)
        };
        Ok(Self::Unix(UnixStream::from(owned)))
    }

    pub fn split(self) -> Result<Halves, ConnectError> {
        Ok(match self {
            Self::Unix(stream) => (
                Box::new(stream.try_clone().map_err(ConnectError::Clone)?),
                Box::new(stream),
            ),
            Self::Tcp(stream) => (
                Box::new(stream.try_clone().map_err(ConnectError::Clone)?),
                Box::new(stream),
            ),
        })
    }
}
