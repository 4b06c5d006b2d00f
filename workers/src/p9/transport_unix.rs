//! The debug transport: 9P over a Unix stream socket, each message framed by its own
//! size field, so that ordinary 9P clients (diod's tools, the kernel's `trans=unix`) can
//! talk to the server without a VM.
//!
//! Each connection is a [`Session`]. A reader thread frames requests and a few handler
//! threads answer them, so one slow request does not hold up the others; replies go out
//! as they are ready, in any order, as 9P allows.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use thiserror::Error;

use super::server::{Export, Pending, Session};
use super::wire::HEADER_LEN;

/// Requests of one connection handled at the same time.
const HANDLERS_PER_CONNECTION: usize = 4;
/// Requests read ahead of the handlers; past this the reader stops reading, so a client
/// that pipelines without end holds at most this many frames of server memory.
const QUEUE_DEPTH: usize = 64;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("accepting a connection: {0}")]
    Accept(io::Error),
}

/// Serves every connection to `listener`, each on its own threads, until accepting fails
/// for good.
pub fn serve_listener(listener: &UnixListener, export: Arc<Export>) -> Result<(), TransportError> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let export = export.clone();
                let spawned = thread::Builder::new()
                    .name("p9-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_connection(stream, export) {
                            tracing::warn!("9p connection: {e}");
                        }
                    });
                // Out of threads: this client is turned away (its socket closes with
                // the closure), the others keep being served.
                if let Err(e) = spawned {
                    tracing::warn!("refusing a 9p connection: cannot start its thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Out of descriptors or memory: the next accept may succeed once a client
            // goes, so wait instead of quitting or spinning.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EMFILE
                            | libc::ENFILE
                            | libc::ENOBUFS
                            | libc::ENOMEM
                            | libc::ECONNABORTED
                    )
                ) =>
            {
                tracing::warn!("accepting a 9p connection: {e}");
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(TransportError::Accept(e)),
        }
    }
}

/// Serves one client until it disconnects or sends something that is not 9P framing.
pub fn serve_connection(stream: UnixStream, export: Arc<Export>) -> io::Result<()> {
    let session = Session::new(export);
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let (queue, requests) = mpsc::sync_channel::<Pending>(QUEUE_DEPTH);
    let requests = Arc::new(Mutex::new(requests));
    let mut handlers = Vec::with_capacity(HANDLERS_PER_CONNECTION);
    for _ in 0..HANDLERS_PER_CONNECTION {
        let requests = requests.clone();
        let writer = writer.clone();
        handlers.push(
            thread::Builder::new()
                .name("p9-handler".into())
                .spawn(move || handle_requests(&requests, &writer))?,
        );
    }
    let result = read_requests(&stream, &session, &queue, &writer);
    drop(queue);
    for handler in handlers {
        let _ = handler.join();
    }
    result
}

fn handle_requests(requests: &Mutex<mpsc::Receiver<Pending>>, writer: &Mutex<UnixStream>) {
    loop {
        let next = requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(pending) = next else { return };
        answer(pending, writer);
    }
}

/// Handles one request and sends its reply; a frame that is not 9P closes the connection.
/// `pending` is dropped only after the reply is written, which is what lets a Tflush for
/// it go out.
fn answer(pending: Pending, writer: &Mutex<UnixStream>) {
    let reply = pending.handle();
    let mut stream = writer.lock().unwrap_or_else(PoisonError::into_inner);
    match reply {
        Ok(reply) => {
            if let Err(e) = stream.write_all(&reply) {
                tracing::debug!("9p client went away: {e}");
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        Err(e) => {
            tracing::warn!("closing a 9p connection: {e}");
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
    drop(stream);
    drop(pending);
}

/// Reads frames until EOF or bad framing and queues them; a size below the header's or
/// above the negotiated msize ends the connection (nothing after it can be trusted).
fn read_requests(
    mut stream: &UnixStream,
    session: &Arc<Session>,
    queue: &mpsc::SyncSender<Pending>,
    writer: &Mutex<UnixStream>,
) -> io::Result<()> {
    loop {
        let mut size = [0u8; 4];
        match read_full(&mut stream, &mut size)? {
            0 => return Ok(()),
            4 => {}
            _ => {
                tracing::debug!("9p client closed mid-header");
                return Ok(());
            }
        }
        let size = u32::from_le_bytes(size);
        if (size as usize) < HEADER_LEN || size > session.msize() {
            tracing::warn!(
                "closing a 9p connection: frame size {size} outside {HEADER_LEN}..={}",
                session.msize()
            );
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        let mut frame = vec![0u8; size as usize];
        frame[..4].copy_from_slice(&size.to_le_bytes());
        if read_full(&mut stream, &mut frame[4..])? != frame.len() - 4 {
            tracing::debug!("9p client closed mid-message");
            return Ok(());
        }
        let pending = session.receive(frame);
        if pending.waits_for_others() {
            // A Tflush waits for the request it names, which may still be queued: here
            // the handlers keep draining the queue meanwhile, so it cannot wait forever
            // for a handler that is itself waiting.
            answer(pending, writer);
        } else if queue.send(pending).is_err() {
            return Ok(());
        }
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(stream: &mut &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
