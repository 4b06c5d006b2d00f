//! Runs QEMU TCG with emulated SVM (the L1 machine), its serial console on QEMU's stdio.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::LabError;

/// L1's kernel command line. `panic=-1` reboots at once on a panic (or if /init dies), and
/// with `-no-reboot` that ends QEMU instead of waiting for the timeout. loglevel=4 keeps
/// L1's boot chatter (which can interleave with the L2 console) to warnings and worse.
///
/// `tsc=reliable` describes the lab's hardware truthfully: TCG's TSC is the host's
/// invariant TSC, but `-cpu max` presents an AMD family 0xf without the invariant-TSC
/// bit, so L1 would mark its TSC unstable and run KVM without its master clock - a path
/// real hosts never take, and one where L2 guests' timekeeping is at its weakest.
const L1_CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4 tsc=reliable";

/// A machine for QEMU TCG to boot: normally L1, or an L2 guest image booted directly to check
/// the harness without bulkhead.
pub struct QemuMachine {
    pub qemu: PathBuf,
    /// An ELF vmlinux: QEMU boots it through its PVH entry point (Debian sets CONFIG_PVH),
    /// skipping the bzImage's decompressor, which takes about 7 s under TCG.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// `-m`, e.g. "3G".
    pub memory: String,
    /// `-smp`.
    pub cpus: u32,
    /// How long the console may stay silent before the machine is taken for frozen and
    /// killed: for L1, whose init prints a heartbeat (`LAB: alive`) every 10 s.
    pub silence_limit: Option<Duration>,
}

/// One line of the L1 console, stamped with when the host read it.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// Time since QEMU started.
    pub at: Duration,
    pub text: String,
}

/// The console of one L1 boot and how QEMU ended.
#[derive(Debug)]
pub struct Console {
    pub lines: Vec<ConsoleLine>,
    /// QEMU's exit status; `None` when it had to be killed (at the deadline, or silent).
    pub status: Option<ExitStatus>,
    /// QEMU was killed because its console went silent past the machine's limit.
    pub silenced: bool,
    pub elapsed: Duration,
}

/// QEMU options shared by every lab boot. `-cpu max` offers SVM with nested paging, which
/// is what lets kvm-amd load in L1. `-nodefaults` drops the NIC, VGA, floppy and CD-ROM:
/// nothing the lab uses, and each costs boot time.
const QEMU_OPTIONS: &str = "-accel tcg,thread=multi -cpu max -nodefaults -display none -no-reboot";

/// L1 prints its heartbeat every 10 s; a minute and a half without it (or anything else)
/// means L1 froze, which under QEMU's emulated SVM it now and then does with its one CPU
/// stuck in an L2 guest. Killing it then, rather than at the scenario's deadline, saves up
/// to ten minutes before the boot is retried.
const L1_SILENCE_LIMIT: Duration = Duration::from_secs(90);

/// L1's CPUs: `BULKHEAD_LAB_L1_CPUS`, or 1.
///
/// With two (one per host core, QEMU's multi-threaded TCG running them side by side) L2
/// guests died far more often: on 2026-12-03, 5 of 11 boots on this kind of machine had a
/// dead L1, an L2 that died in kernel boot, or an L2 that triple-faulted in the middle of a
/// transfer, against 1 of 24 boots with one CPU (L1 froze) - which runs the scenarios about as
/// fast, since an L2 boot is mostly one vCPU's work anyway. Cross-CPU work in L1 (IPIs, TLB
/// shootdowns while a CPU runs L2) is the likely trigger in the emulated SVM; with one CPU
/// there is none. L2 guests keep their two vCPUs, which L1 then runs in turn.
fn l1_cpus() -> u32 {
    match std::env::var("BULKHEAD_LAB_L1_CPUS") {
        Err(_) => 1,
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n| (1..=8).contains(&n))
            .unwrap_or_else(|| panic!("BULKHEAD_LAB_L1_CPUS={v:?}: give a number of CPUs, 1 to 8")),
    }
}

impl QemuMachine {
    /// L1: one vCPU (see [`l1_cpus`]; bulkhead's L2 vCPUs run on it) and room for a few L2
    /// guests next to the ~100 MiB initramfs.
    pub fn l1(qemu: &Path, kernel: &Path, initrd: &Path) -> Self {
        Self {
            qemu: qemu.to_owned(),
            kernel: kernel.to_owned(),
            initrd: initrd.to_owned(),
            cmdline: L1_CMDLINE.to_owned(),
            memory: "3G".to_owned(),
            cpus: l1_cpus(),
            silence_limit: Some(L1_SILENCE_LIMIT),
        }
    }

    fn command(&self, serial: &str) -> Command {
        let mut qemu = Command::new(&self.qemu);
        qemu.args(QEMU_OPTIONS.split_whitespace())
            .args(["-smp", &self.cpus.to_string()])
            .args(["-m", &self.memory, "-serial", serial])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(&self.cmdline);
        qemu
    }

    /// Boots with the console captured line by line into `log` (and echoed to stdout when
    /// `echo`), killing QEMU if it is still running after `timeout` or its console stays
    /// silent past the machine's limit.
    pub fn run_captured(
        &self,
        log: &Path,
        timeout: Duration,
        echo: bool,
    ) -> Result<Console, LabError> {
        let mut command = self.command("stdio");
        // A machine that may freeze (L1) gets a monitor, to ask where its CPU is first.
        let monitor = self.silence_limit.map(|_| monitor_path(log));
        if let Some(path) = &monitor {
            let _ = std::fs::remove_file(path);
            command
                .arg("-monitor")
                .arg(format!("unix:{},server=on,wait=off", path.display()));
        }
        let log_err = |e| LabError::io(format!("writing {}", log.display()), e);
        let mut log_file = File::create(log).map_err(log_err)?;
        writeln!(log_file, "==== lab: {}", describe(&command)).map_err(log_err)?;

        let start = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::io(format!("starting {}", self.qemu.display()), e))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let mut qemu = KillOnDrop(child);

        let last_line = Arc::new(AtomicU64::new(0));
        let reader = {
            let last_line = last_line.clone();
            thread::spawn(move || read_console(stdout, log_file, start, echo, &last_line))
        };
        let stderr_reader = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let silent = || {
            let quiet_since = Duration::from_millis(last_line.load(Ordering::Relaxed));
            self.silence_limit
                .is_some_and(|limit| start.elapsed().saturating_sub(quiet_since) > limit)
        };
        let (status, silenced) = qemu.wait_until(start + timeout, silent)?;
        let cpu_state = match (&status, &monitor) {
            (None, Some(path)) => Some(ask_monitor(path, FROZEN_CPU_QUERIES)),
            _ => None,
        };
        drop(qemu);
        if let Some(path) = &monitor {
            let _ = std::fs::remove_file(path);
        }
        let elapsed = start.elapsed();

        let (lines, mut log_file) = reader.join().expect("console reader does not panic");
        let stderr = stderr_reader.join().expect("stderr reader does not panic");
        let ending = match status {
            Some(status) => format!("qemu exited: {status}"),
            None if silenced => "qemu killed: its console went silent (L1 froze)".to_owned(),
            None => format!("qemu killed: still running after {}s", timeout.as_secs()),
        };
        if !stderr.trim().is_empty() {
            writeln!(log_file, "==== lab: qemu stderr:\n{}", stderr.trim_end()).map_err(log_err)?;
        }
        if let Some(state) = cpu_state {
            writeln!(
                log_file,
                "==== lab: the CPU when qemu was killed (monitor: registers, stack):\n{}",
                state.trim_end()
            )
            .map_err(log_err)?;
        }
        writeln!(
            log_file,
            "==== lab: {ending} after {:.1}s",
            elapsed.as_secs_f64()
        )
        .map_err(log_err)?;
        Ok(Console {
            lines,
            status,
            silenced,
            elapsed,
        })
    }

    /// Boots with the console (and QEMU's monitor, Ctrl-A c) on this terminal.
    pub fn run_interactive(&self) -> Result<ExitStatus, LabError> {
        self.command("mon:stdio")
            .status()
            .map_err(|e| LabError::io(format!("running {}", self.qemu.display()), e))
    }
}

/// Reads the console until QEMU closes it: each line goes to the log as it arrives (so
/// `tail -f` shows a boot in progress) and is kept, stamped, for the report.
fn read_console(
    stdout: impl Read,
    mut log: File,
    start: Instant,
    echo: bool,
    last_line: &AtomicU64,
) -> (Vec<ConsoleLine>, File) {
    let mut lines = Vec::new();
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        // Serial consoles end lines with \r\n (\r\r\n once a tty in L1 adds its own).
        let text: String = String::from_utf8_lossy(&raw)
            .chars()
            .filter(|&c| c != '\r' && c != '\n')
            .collect();
        let _ = writeln!(log, "{text}");
        if echo {
            println!("{text}");
        }
        let at = start.elapsed();
        last_line.store(at.as_millis() as u64, Ordering::Relaxed);
        lines.push(ConsoleLine { at, text });
    }
    (lines, log)
}

/// Where the monitor of the machine logging to `log` listens: a short path, as socket
/// paths are limited to 108 bytes.
fn monitor_path(log: &Path) -> PathBuf {
    let name = log
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::env::temp_dir().join(format!(
        "bulkhead-lab-{}-{name}.monitor",
        std::process::id()
    ))
}

/// What to ask a machine's monitor before it is killed: the CPU's registers, then the 64
/// words at its stack pointer (`$esp` is the whole rsp in 64-bit mode; the monitor knows no
/// `$rsp`). With the kernel's debug symbols (Debian's
/// linux-image-*-dbg) the return addresses among them say what L1 was doing; on
/// 2026-12-03 one frozen L1 was spinning on a spinlock with interrupts off
/// (native_queued_spin_lock_slowpath) right after a worker restart.
const FROZEN_CPU_QUERIES: &[&str] = &["info registers", "x/64gx $esp"];

/// Runs `commands` on the QEMU monitor at `path` and returns what it printed, or why
/// nothing: for the log of a machine about to be killed, so never an error.
fn ask_monitor(path: &Path, commands: &[&str]) -> String {
    use std::os::unix::net::UnixStream;
    let read_for = |stream: &mut UnixStream| {
        let mut text = Vec::new();
        let mut buffer = [0u8; 4096];
        // The reply ends when the monitor goes quiet; a timeout ends each read.
        while let Ok(n @ 1..) = stream.read(&mut buffer) {
            text.extend_from_slice(&buffer[..n]);
            if text.len() > 1 << 16 {
                break;
            }
        }
        text
    };
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e) => return format!("no monitor at {}: {e}", path.display()),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(1000)));
    read_for(&mut stream); // the banner and prompt
    let mut replies = Vec::new();
    for command in commands {
        if let Err(e) = writeln!(stream, "{command}") {
            replies.extend_from_slice(
                format!("the monitor did not take {command:?}: {e}\n").as_bytes(),
            );
            break;
        }
        replies.extend(read_for(&mut stream));
    }
    // Keep lines; drop the terminal escapes the monitor's line editor sends.
    String::from_utf8_lossy(&replies)
        .replace("\x1b[K", "")
        .replace("\x1b[D", "")
        .chars()
        .filter(|&c| c == '\n' || !c.is_control())
        .collect()
}

/// Kills QEMU if the harness returns early, so that no TCG machine outlives its test.
struct KillOnDrop(Child);

impl KillOnDrop {
    /// Waits for QEMU to exit; at `deadline`, or once `silent` says so, returns `None`
    /// (and whether it was for silence) and leaves QEMU to be killed when this is dropped.
    fn wait_until(
        &mut self,
        deadline: Instant,
        silent: impl Fn() -> bool,
    ) -> Result<(Option<ExitStatus>, bool), LabError> {
        let wait_err = |e| LabError::io("waiting for qemu", e);
        loop {
            if let Some(status) = self.0.try_wait().map_err(wait_err)? {
                return Ok((Some(status), false));
            }
            if silent() {
                return Ok((None, true));
            }
            if Instant::now() >= deadline {
                return Ok((None, false));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The command line, for the log: enough to rerun the boot by hand.
fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| super::scenario::shell_quote(&arg.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::micro::ScratchDir;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for QEMU that prints `lines` and then hangs.
    fn machine(dir: &ScratchDir, silence_limit: Option<Duration>) -> QemuMachine {
        let script = dir
            .write("qemu", b"#!/bin/sh\necho booting\necho up\nexec sleep 60\n")
            .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        QemuMachine {
            qemu: script,
            kernel: PathBuf::from("/nonexistent"),
            initrd: PathBuf::from("/nonexistent"),
            cmdline: String::new(),
            memory: "1M".to_owned(),
            cpus: 1,
            silence_limit,
        }
    }

    #[test]
    fn a_silent_machine_is_killed_before_its_deadline() {
        let dir = ScratchDir::new("qemu-silence").unwrap();
        let log = dir.path().join("console.log");
        let console = machine(&dir, Some(Duration::from_millis(500)))
            .run_captured(&log, Duration::from_secs(30), false)
            .unwrap();
        assert!(console.silenced && console.status.is_none());
        assert!(console.elapsed < Duration::from_secs(20), "{console:?}");
        assert_eq!(console.lines.len(), 2);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("went silent"), "{text}");
        // This stand-in has no monitor to ask; the log says so rather than failing.
        assert!(
            text.contains("(monitor: registers, stack):\nno monitor at"),
            "{text}"
        );
    }

    #[test]
    fn without_a_limit_silence_lasts_until_the_deadline() {
        let dir = ScratchDir::new("qemu-deadline").unwrap();
        let log = dir.path().join("console.log");
        let console = machine(&dir, None)
            .run_captured(&log, Duration::from_secs(1), false)
            .unwrap();
        assert!(!console.silenced && console.status.is_none());
        assert!(console.elapsed >= Duration::from_secs(1));
    }
}
