//! The client side of the control socket, used by `bulkhead list/stop/pause/...`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_protocol::control::{Answer, Command, Reply, Request, VmStatus};
use thiserror::Error;

use super::{runtime_dir, socket_path};

/// How long to wait for a reply. Generous: `debug` and `pause` wait for every vCPU.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no VM named {name:?} is running (nothing answers at {path})")]
    NoSuchVm { name: String, path: PathBuf },
    #[error("cannot reach VM {name:?} at {path}")]
    Connect {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to VM {name:?}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {name:?} closed the connection without answering")]
    NoReply { name: String },
    #[error("VM {name:?} sent a reply this bulkhead cannot read: {detail}")]
    BadReply { name: String, detail: String },
    #[error("VM {name:?}: {message}")]
    Refused { name: String, message: String },
}

/// Sends `command` to the VM called `name` and returns its answer.
pub fn send(name: &str, command: Command) -> Result<Answer, ClientError> {
    send_to(name, &socket_path(name), command)
}

fn send_to(name: &str, path: &Path, command: Command) -> Result<Answer, ClientError> {
    let mut stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        // A missing socket, or one whose VMM died (nobody listens): either way no VM.
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NoSuchVm {
                name: name.to_owned(),
                path: path.to_owned(),
            }
        }
        _ => ClientError::Connect {
            name: name.to_owned(),
            path: path.to_owned(),
            source,
        },
    })?;
    let io = |source| ClientError::Io {
        name: name.to_owned(),
        source,
    };
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
    let mut line =
        serde_json::to_string(&Request::new(command)).map_err(|e| ClientError::BadReply {
            name: name.to_owned(),
            detail: e.to_string(),
        })?;
    line.push('\n');
    match stream.write_all(line.as_bytes()) {
        Ok(()) => {}
        // The VMM refuses some clients (another uid) before reading their request; its
        // reply is waiting to be read all the same.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(io(e)),
    }
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    if reply.is_empty() {
        return Err(ClientError::NoReply {
            name: name.to_owned(),
        });
    }
    let reply: Reply = serde_json::from_str(&reply).map_err(|e| ClientError::BadReply {
        name: name.to_owned(),
        detail: e.to_string(),
    })?;
    match (reply.ok, reply.error) {
        (_, Some(message)) => Err(ClientError::Refused {
            name: name.to_owned(),
            message,
        }),
        (Some(answer), None) => Ok(answer),
        (None, None) => Err(ClientError::BadReply {
            name: name.to_owned(),
            detail: "neither ok nor error".into(),
        }),
    }
}

/// Every VM of this user with a live control socket, sorted by name; sockets whose VM
/// died are skipped (the next VM with that name replaces them).
pub fn list() -> Vec<VmStatus> {
    let Ok(entries) = std::fs::read_dir(runtime_dir()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".sock"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| match send(&name, Command::Status) {
            Ok(Answer::Status(status)) => Some(status),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!("skipping {name}: {e}");
                None
            }
        })
        .collect()
}

/// Waits until the VM called `name` is gone, up to `timeout`; returns whether it went.
/// The VMM removes its socket as it exits, so this watches the file rather than
/// connecting (each connection would cost the VMM a thread).
pub fn wait_until_gone(name: &str, timeout: Duration) -> bool {
    let path = socket_path(name);
    let deadline = std::time::Instant::now() + timeout;
    while std::fs::symlink_metadata(&path).is_ok() {
        if std::time::Instant::now() >= deadline {
            // A VMM killed outright leaves its socket behind with nobody listening.
            return matches!(
                UnixStream::connect(&path),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
