//! The protocol half of `bulkhead-viewer`: an RFB client with no window, shared by the SDL
//! viewer and the nested lab's screen probe.

pub mod rfb;
