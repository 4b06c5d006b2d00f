//! Hand-made vhost-user messages, for what no well-behaved frontend would send: bad
//! headers, unknown requests, truncated payloads. The framing is the specification's: a
//! 12-byte header (request, flags, payload size; little endian) and then the payload.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Header flag bits 0-1: the protocol version, always 1.
pub const VERSION_1: u32 = 0x1;
/// Header flag: the sender wants a reply (REPLY_ACK).
pub const NEED_REPLY: u32 = 0x8;

/// Some front-end request codes (the vhost-user specification's numbering).
pub mod request {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
}

/// A message: header followed by `payload`, whose length the header claims to be `size`.
pub fn message(request: u32, flags: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(12 + payload.len());
    bytes.extend_from_slice(&request.to_le_bytes());
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes.extend_from_slice(&size.to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// What the backend did after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// It answered (these bytes).
    Reply(Vec<u8>),
    /// It closed the connection.
    Closed,
    /// Nothing within the timeout: still waiting for more, or ignoring us.
    Silent,
}

/// Sends `bytes` and watches the socket for `timeout`.
pub fn send_raw(
    connection: &mut UnixStream,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    match connection.write_all(bytes) {
        Ok(()) => {}
        // The backend may have closed already, which is an answer too.
        Err(e) if is_closed(&e) => return Ok(Response::Closed),
        Err(e) => return Err(e),
    }
    observe(connection, timeout)
}

/// Reads whatever comes within `timeout`.
pub fn observe(connection: &mut UnixStream, timeout: Duration) -> io::Result<Response> {
    connection.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 4096];
    match connection.read(&mut buf) {
        Ok(0) => Ok(Response::Closed),
        Ok(n) => {
            buf.truncate(n);
            Ok(Response::Reply(buf))
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(Response::Silent)
        }
        Err(e) if is_closed(&e) => Ok(Response::Closed),
        Err(e) => Err(e),
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}
