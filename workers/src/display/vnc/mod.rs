//! An RFB 3.8 (VNC) server showing the framebuffer (RFC 6143).
//!
//! - `server`: accepts viewers on a listening socket the worker was given (it creates
//!   none) and runs each in its own threads, so a viewer that misbehaves, stalls or leaves
//!   mid-update affects only itself.
//! - `session`: the handshake and the client-to-server messages.
//! - `update`: deciding what a viewer needs and sending FramebufferUpdates.
//! - [`pixel_format`]: converting the framebuffer's pixels to the format a viewer asked for.
//! - [`zrle`]: the ZRLE encoding, one zlib stream per connection.
//! - [`des`]: the DES block VNC authentication (an optional password) checks answers with.

pub mod des;
pub mod pixel_format;
mod server;
mod session;
mod update;
pub mod zrle;

pub use server::{VncServer, MAX_VIEWERS};

/// Encoding numbers (RFC 6143, section 7.7).
pub const ENCODING_RAW: i32 = 0;
pub const ENCODING_ZRLE: i32 = 16;
pub const ENCODING_DESKTOP_SIZE: i32 = -223;
