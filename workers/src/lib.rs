//! bulkhead's device workers: each device runs as its own process, `bulkhead-worker <kind>`,
//! a standard vhost-user backend that sees guest memory through the memfd regions the
//! frontend shares and nothing else of the VM.
//!
//! - [`vhost_user`]: serves a device over one vhost-user connection - the frontend's
//!   messages, the memory table, vring start/stop and the thread that runs the queues. It
//!   works on a socket it accepted as well as on one it inherited already connected.
//! - [`virtio`]: guest-facing helpers shared by devices (descriptor chain checks, requests
//!   walked from their head index).
//! - [`p9`]: a 9P2000.L file server confined to one host directory, and its Unix socket
//!   debug transport.
//! - [`blk`]: virtio-blk on the disk engine, inflight-tracked so a restart loses no request.
//! - [`net`]: virtio-net on a host TAP device, offloads passed through in the vnet header.
//! - [`input`]: virtio-input, a keyboard and tablet fed with VNC viewers' input by the
//!   display worker.
//! - [`rng`]: virtio-rng, entropy from the host's getrandom(2), optionally rate limited.
//! - [`disk`]: the disk engine behind the block worker: raw and QCOW2 images, read-only
//!   and in-memory copy-on-write modes, opened from files the VMM hands over.
//! - [`launch`]: how a worker started by the VMM finds its configuration and socket.
//! - [`sandbox`]: the one place a worker confines itself before serving.
//! - [`cli`]: the command line.

pub mod blk;
pub mod cli;
pub mod disk;
pub mod display;
mod fd;
pub mod input;
pub mod launch;
pub mod net;
pub mod p9;
pub mod rng;
pub mod sandbox;
pub mod vhost_user;
pub mod virtio;
