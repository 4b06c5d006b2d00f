//! Serving a device to vhost-user frontends: on one socket that is already connected (a
//! worker the VMM launched with one end of a socketpair), or on a listening socket, one
//! frontend after another (a standalone backend for QEMU, cloud-hypervisor, ...).

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};
use vhost_user_backend::{VhostUserBackend, VringT};

use super::session::{Session, SessionError};
use super::tracked_queue::InflightTracking;
use super::vring_thread::{EventSource, GuestRam, VringThreadError};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot start the session: {0}")]
    Session(#[from] SessionError),
    #[error("cannot clone the connection socket: {0}")]
    CloneSocket(io::Error),
    #[error("vhost-user session failed: {0}")]
    Protocol(VhostUserError),
    #[error("the device's queue thread failed: {0}")]
    VringThread(#[from] VringThreadError),
    #[error("cannot accept a connection: {0}")]
    Accept(io::Error),
    #[error("cannot create the device for a new connection: {0}")]
    NewDevice(Box<dyn std::error::Error + Send + Sync>),
}

/// A device ready to serve one connection.
pub struct DeviceBackend<T> {
    /// The `vhost-user-backend` device.
    pub backend: T,
    /// Host descriptors its vring threads watch beside the queue kicks.
    pub event_sources: Vec<EventSource>,
    /// Set by a device that completes requests out of order and serves its queues through
    /// [`TrackedQueue`](super::TrackedQueue)s: the session then offers
    /// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` and keeps these queues in step with the
    /// inflight region, so a restarted worker loses and repeats no request.
    pub inflight: Option<InflightTracking>,
}

/// Serves `device` to the frontend on `connection` until the frontend hangs up.
///
/// `Ok` when the frontend disconnected; an error when it broke the protocol (the
/// connection is then closed) or a vring thread failed.
pub fn serve_connection<T>(
    connection: UnixStream,
    device: DeviceBackend<T>,
) -> Result<(), ServeError>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: VringT<GuestRam> + Clone + Send + Sync + 'static,
{
    let shutdown_handle = connection.try_clone().map_err(ServeError::CloneSocket)?;
    let session = Arc::new(Mutex::new(Session::new(
        device.backend,
        &device.event_sources,
        device.inflight,
        shutdown_handle,
    )?));
    let mut requests = BackendReqHandler::from_stream(connection, session.clone());
    let end = loop {
        if let Err(e) = requests.handle_request() {
            break e;
        }
    };

    let mut session = session.lock().unwrap_or_else(PoisonError::into_inner);
    session.close();
    if let Some(failure) = session.take_failure() {
        return Err(failure.into());
    }
    match end {
        // The frontend closed between messages, or its end of the socket went away.
        VhostUserError::Disconnected | VhostUserError::SocketBroken(_) => Ok(()),
        other => Err(ServeError::Protocol(other)),
    }
}

/// Serves frontends connecting to `listener`, one at a time, each with a fresh device from
/// `new_device`. A frontend that breaks the protocol loses its connection; the next one is
/// served all the same. Returns only when accepting fails.
pub fn serve_listener<T, F, E>(listener: &UnixListener, mut new_device: F) -> Result<(), ServeError>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: VringT<GuestRam> + Clone + Send + Sync + 'static,
    F: FnMut() -> Result<DeviceBackend<T>, E>,
    E: std::error::Error + Send + Sync + 'static,
{
    loop {
        let connection = match listener.accept() {
            Ok((connection, _)) => connection,
            // The peer gave up before we got to it, or a signal: nothing wrong with us.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(ServeError::Accept(e)),
        };
        tracing::info!("frontend connected");
        let device = new_device().map_err(|e| ServeError::NewDevice(Box::new(e)))?;
        match serve_connection(connection, device) {
            Ok(()) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!("frontend connection ended: {e}"),
        }
    }
}
