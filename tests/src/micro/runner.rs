//! Runs the real `bulkhead` binary with captured stdio and a hard timeout.
//!
//! A micro-guest that the VMM mishandles usually ends up halted with interrupts off, which
//! never returns; a test must then fail with the output so far, never hang.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::bulkhead_bin;

use super::guest::STILL_RUNNING;
use super::scratch::ScratchDir;

/// Generous: micro-guests finish in well under a second even under PVM's emulator, but the
/// whole suite shares two host cores.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// What a finished `bulkhead` run left behind.
#[derive(Debug)]
pub struct RunOutcome {
    pub status: ExitStatus,
    /// Guest serial output (COM1).
    pub stdout: String,
    /// bulkhead's own log and errors.
    pub stderr: String,
}

impl RunOutcome {
    /// The stderr lines that start bulkhead's error reports (`error: ...`).
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|line| line.starts_with("error: "))
            .collect()
    }

    /// stderr from the first `error: ` line on: the error report without the log before it.
    /// (clap, for one, puts details on the lines after `error: `.)
    pub fn error_report(&self) -> &str {
        if self.stderr.starts_with("error: ") {
            return &self.stderr;
        }
        self.stderr
            .find("\nerror: ")
            .map_or("", |at| &self.stderr[at + 1..])
    }

    /// Asserts bulkhead exited 0 and did not let the guest run past its power-off or reset.
    pub fn assert_clean_exit(&self) {
        assert!(self.status.success(), "bulkhead failed:\n{self}");
        assert!(
            !self.stdout.contains(STILL_RUNNING),
            "the guest kept running:\n{self}"
        );
        assert!(
            !self.stderr.contains("panicked"),
            "bulkhead panicked:\n{self}"
        );
    }

    /// Asserts bulkhead failed cleanly: non-zero exit, no panic, and an error report that
    /// mentions one of `any_of` (compared case-insensitively).
    pub fn assert_error_mentioning(&self, any_of: &[&str]) {
        assert!(
            !self.status.success(),
            "bulkhead should have failed:\n{self}"
        );
        assert!(
            !self.stderr.contains("panicked"),
            "bulkhead panicked:\n{self}"
        );
        let errors = self.error_report().to_lowercase();
        assert!(!errors.is_empty(), "no `error: ` line on stderr:\n{self}");
        assert!(
            any_of
                .iter()
                .any(|expected| errors.contains(&expected.to_lowercase())),
            "the error should mention one of {any_of:?}:\n{self}"
        );
    }
}

/// Printed by failing assertions, so that a failure shows everything bulkhead said.
impl fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("could not start {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("bulkhead was still running after {timeout:?} and was killed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")]
    Timeout {
        timeout: Duration,
        stdout: String,
        stderr: String,
    },
    #[error("waiting for bulkhead: {0}")]
    Wait(std::io::Error),
}

/// `bulkhead <args>` with stdin bytes and a timeout.
pub struct BulkheadCommand {
    /// Environment variables set for bulkhead (and the workers it starts).
    env: Vec<(OsString, OsString)>,
    /// The bulkhead binary; [`bulkhead_bin`] unless overridden.
    binary: Option<PathBuf>,
    /// A program (and its arguments) that runs bulkhead, e.g. to drop privileges.
    wrapper: Vec<OsString>,
    args: Vec<OsString>,
    stdin: Vec<u8>,
    timeout: Duration,
}

impl Default for BulkheadCommand {
    fn default() -> Self {
        Self::new()
    }
}

impl BulkheadCommand {
    pub fn new() -> Self {
        BulkheadCommand {
            env: Vec::new(),
            binary: None,
            wrapper: Vec::new(),
            args: Vec::new(),
            stdin: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Bytes written to bulkhead's stdin (the guest's serial input) right after it starts.
    /// Kept small: they must fit in the pipe buffer, since nothing drains it but bulkhead.
    pub fn stdin(mut self, bytes: &[u8]) -> Self {
        assert!(
            bytes.len() <= 16 * 1024,
            "stdin input must fit in a pipe buffer"
        );
        self.stdin = bytes.to_vec();
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs this copy of the bulkhead binary instead of the one cargo built.
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_owned());
        self
    }

    /// Runs bulkhead as `wrapper... bulkhead args...`.
    pub fn wrapped_in<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, wrapper: I) -> Self {
        self.wrapper = wrapper
            .into_iter()
            .map(|arg| arg.as_ref().to_owned())
            .collect();
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn run(self) -> Result<RunOutcome, RunError> {
        let binary = self.binary.clone().unwrap_or_else(bulkhead_bin);
        let mut command = match self.wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let mut child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RunError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;

        let stdout = drain(child.stdout.take().expect("piped stdout"));
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        // Keep stdin open until bulkhead exits: like an idle terminal, not an EOF.
        let mut stdin = child.stdin.take().expect("piped stdin");
        // A write error means bulkhead already exited; its status tells the story.
        let _ = stdin.write_all(&self.stdin).and_then(|()| stdin.flush());

        let finished = wait_with_deadline(&mut child, self.timeout);
        drop(stdin);
        let (stdout, stderr) = (join(stdout), join(stderr));
        match finished {
            Ok(Some(status)) => Ok(RunOutcome {
                status,
                stdout,
                stderr,
            }),
            Ok(None) => Err(RunError::Timeout {
                timeout: self.timeout,
                stdout,
                stderr,
            }),
            Err(error) => Err(RunError::Wait(error)),
        }
    }
}

/// `bulkhead run --kernel <file holding kernel_image> <args>`.
pub fn run_kernel_image(kernel_image: &[u8], args: &[&str]) -> Result<RunOutcome, RunError> {
    run_kernel_image_with_stdin(kernel_image, args, b"")
}

/// Like [`run_kernel_image`], with bytes for the guest's serial input.
pub fn run_kernel_image_with_stdin(
    kernel_image: &[u8],
    args: &[&str],
    stdin: &[u8],
) -> Result<RunOutcome, RunError> {
    let dir = ScratchDir::new("kernel").expect("create a scratch directory");
    let kernel = dir
        .write("micro-guest.elf", kernel_image)
        .expect("write the kernel image");
    run_kernel_file(&kernel, args, stdin)
}

fn run_kernel_file(kernel: &Path, args: &[&str], stdin: &[u8]) -> Result<RunOutcome, RunError> {
    BulkheadCommand::new()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(args)
        .stdin(stdin)
        .run()
}

/// Waits for `child` until `timeout`; on expiry kills it and returns `None`.
fn wait_with_deadline(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Reads a pipe to its end on a thread, so that a chatty child never blocks on a full pipe.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn join(reader: JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&reader.join().expect("pipe reader thread")).into_owned()
}
