//! The terminal side of the serial console: stdin feeds the guest's UART, raw mode while
//! stdin is a terminal (restored at exit), and a Ctrl-A escape to quit, as in QEMU.

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

use crate::devices::bus::lock;
use crate::devices::serial::SerialPort;
use crate::exit::{ExitSignal, VmExit};

/// Ctrl-A starts an escape sequence; `x` then quits, Ctrl-A sends a literal Ctrl-A.
const ESCAPE: u8 = 0x01;
const ESCAPE_QUIT: u8 = b'x';
/// How long to wait for the guest to drain a full UART FIFO before retrying.
const FIFO_FULL_BACKOFF: Duration = Duration::from_millis(5);

/// Puts stdin in raw mode for as long as it lives, when stdin is a terminal.
pub struct RawTerminal {
    saved: Option<Termios>,
}

impl RawTerminal {
    pub fn enable() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return Self { saved: None }; // not a terminal: nothing to do
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // Keep output post-processing so our own messages still start at column 0.
        raw.output_flags = saved.output_flags;
        raw.local_flags.remove(LocalFlags::ECHO);
        if let Err(e) = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw) {
            tracing::warn!("cannot put the terminal in raw mode: {e}");
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }

    pub fn is_raw(&self) -> bool {
        self.saved.is_some()
    }

    pub fn restore(&mut self) {
        if let Some(saved) = self.saved.take() {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &saved);
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Splits console input into what goes to the guest and whether the user quit.
#[derive(Default)]
pub struct EscapeFilter {
    pending_escape: bool,
}

impl EscapeFilter {
    pub fn filter(&mut self, input: &[u8], to_guest: &mut Vec<u8>) -> bool {
        for &byte in input {
            if self.pending_escape {
                self.pending_escape = false;
                match byte {
                    ESCAPE_QUIT => return true,
                    ESCAPE => to_guest.push(ESCAPE),
                    _ => {} // unknown escape: swallow it, as QEMU does
                }
            } else if byte == ESCAPE {
                self.pending_escape = true;
            } else {
                to_guest.push(byte);
            }
        }
        false
    }
}

/// Forwards stdin to the UART until EOF or the VM ends. `interactive` enables the
/// Ctrl-A escape (only meaningful when a person types at a terminal).
pub fn spawn_input_pump(
    serial: Arc<Mutex<SerialPort>>,
    exit: Arc<ExitSignal>,
    interactive: bool,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buffer = [0u8; 256];
            let mut filter = EscapeFilter::default();
            let mut to_guest = Vec::new();
            loop {
                let n = match stdin.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("console input stopped: {e}");
                        return;
                    }
                };
                to_guest.clear();
                let quit = if interactive {
                    filter.filter(&buffer[..n], &mut to_guest)
                } else {
                    to_guest.extend_from_slice(&buffer[..n]);
                    false
                };
                let mut pending = &to_guest[..];
                while !pending.is_empty() && !exit.is_requested() {
                    let taken = lock(&serial).push_input(pending);
                    pending = &pending[taken..];
                    if taken == 0 {
                        std::thread::sleep(FIFO_FULL_BACKOFF);
                    }
                }
                if quit {
                    exit.request(VmExit::ConsoleQuit);
                    return;
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut filter = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(!filter.filter(b"ls\r", &mut out));
        assert_eq!(out, b"ls\r");
        out.clear();
        assert!(!filter.filter(&[ESCAPE, ESCAPE, b'a', ESCAPE], &mut out));
        assert_eq!(out, [ESCAPE, b'a']);
        // The escape carries over to the next read.
        assert!(filter.filter(b"x", &mut out));
    }
}
