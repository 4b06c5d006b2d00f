//! `vncdo` (vncdotool), the real VNC client the display and input tests drive.

use std::process::Command;

use anyhow::{ensure, Context, Result};

/// Runs `vncdo` with `args` against the VNC server on 127.0.0.1:`port`; a failure carries
/// what vncdo printed.
pub fn vncdo(port: u16, args: &[&str]) -> Result<()> {
    let out = Command::new("vncdo")
        .arg("-s")
        .arg(format!("127.0.0.1::{port}"))
        .args(args)
        .output()
        .context("running vncdo (pip install vncdotool)")?;
    ensure!(
        out.status.success(),
        "vncdo {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
