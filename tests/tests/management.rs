//! Managing running VMs through their control sockets: `bulkhead list`, `status`,
//! `pause`/`resume`, `debug`, `stop`, `kill`, `restart-worker`, and the socket protocol
//! underneath, against real `bulkhead run` processes running micro-guests on /dev/kvm.
//!
//! Every test gives its VMs a private runtime directory (XDG_RUNTIME_DIR), so tests never
//! see each other's VMs. Nothing here asserts on timing: waits are bounded polls with
//! generous limits that only a broken VMM reaches.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_protocol::control::{Reply, VcpuRegisters, VmState, VmStatus};
use bulkhead_tests::bulkhead_bin;
use bulkhead_tests::micro::guest::CODE_BASE;
use bulkhead_tests::micro::hw::*;
use bulkhead_tests::micro::{BulkheadCommand, MicroGuest, RunOutcome, ScratchDir};
use iced_x86::code_asm::*;

/// Upper bound for anything a test waits for; reached only when something is broken.
const PATIENCE: Duration = Duration::from_secs(30);

/// A guest that prints `tick=<n>` lines about 20 times a second (paced by the ACPI PM
/// timer, so the rate does not depend on how fast guest code runs). With
/// `power_button`, it also watches PWRBTN_STS and powers off when the button is pressed,
/// as an OS without an SCI handler would.
fn ticker(power_button: bool) -> Result<Vec<u8>> {
    ticker_reading(power_button, None)
}

/// [`ticker`], each line also giving the 32-bit word at guest-physical `address` (a
/// device's config space): `tick=<n> word=<w>`.
fn ticker_reading(power_button: bool, address: Option<u32>) -> Result<Vec<u8>> {
    let mut guest = MicroGuest::new()?;
    let mut next_tick = guest.asm().create_label();
    let mut wait = guest.asm().create_label();
    let mut pressed = guest.asm().create_label();
    guest.asm().xor(r12d, r12d)?;
    guest.asm().set_label(&mut next_tick)?;
    guest.print("tick=")?;
    guest.print_hex(r12, 8)?;
    if let Some(address) = address {
        guest.asm().mov(eax, dword_ptr(u64::from(address)))?;
        guest.print(" word=")?;
        guest.print_hex(rax, 8)?;
    }
    guest.print("\n")?;
    let a = guest.asm();
    a.inc(r12)?;
    a.mov(dx, PM_TIMER as u32)?;
    a.in_(eax, dx)?;
    a.mov(r13d, eax)?;
    a.set_label(&mut wait)?;
    if power_button {
        a.mov(dx, PM1A_STATUS as u32)?;
        a.in_(ax, dx)?;
        a.test(ax, PM1_PWRBTN as u32)?;
        a.jnz(pressed)?;
    }
    a.mov(ecx, 200)?;
    let mut relax = a.create_label();
    a.set_label(&mut relax)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(relax)?;
    a.mov(dx, PM_TIMER as u32)?;
    a.in_(eax, dx)?;
    a.sub(eax, r13d)?;
    a.and(eax, 0xff_ffff)?;
    a.cmp(eax, PM_TIMER_HZ / 20)?;
    a.jb(wait)?;
    a.jmp(next_tick)?;
    a.set_label(&mut pressed)?;
    // Acknowledge the event (write 1 to clear), as an OS would.
    a.mov(ax, PM1_PWRBTN as u32)?;
    a.out(dx, ax)?;
    guest.print("power button pressed\n")?;
    guest.power_off()?;
    guest.build()
}

/// A private runtime directory, kernel files and the commands that use them.
struct Env {
    dir: ScratchDir,
}

impl Env {
    fn new() -> Result<Self> {
        let dir = ScratchDir::new("mgmt")?;
        std::fs::create_dir(dir.path().join("run"))?;
        Ok(Self { dir })
    }

    fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.runtime_dir()
            .join("bulkhead")
            .join(format!("{name}.sock"))
    }

    fn kernel(&self, file: &str, image: &[u8]) -> Result<PathBuf> {
        Ok(self.dir.write(file, image)?)
    }

    /// `bulkhead <args>` (a client command) in this environment.
    fn bulkhead(&self, args: &[&str]) -> Result<RunOutcome> {
        Ok(BulkheadCommand::new()
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .args(args)
            .timeout(PATIENCE * 2)
            .run()?)
    }

    /// `bulkhead <args>` that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let outcome = self.bulkhead(args)?;
        ensure!(
            outcome.status.success(),
            "bulkhead {args:?} failed:\n{outcome}"
        );
        Ok(outcome.stdout)
    }

    fn status(&self, name: &str) -> Result<VmStatus> {
        let json = self.ok(&["status", name, "--json"])?;
        serde_json::from_str(&json).with_context(|| format!("status --json printed {json}"))
    }

    /// Starts `bulkhead run --kernel KERNEL --name NAME <extra>` and waits for its socket.
    fn start(&self, name: &str, kernel: &Path, extra: &[&str]) -> Result<Vm> {
        let mut args: Vec<String> = vec!["run".into(), "--name".into(), name.into()];
        args.push("--kernel".into());
        args.push(kernel.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.start_args(name, &args)
    }

    /// [`Env::start`] with an audit log, whose path comes back with the VM.
    fn start_audited(&self, name: &str, kernel: &Path, extra: &[&str]) -> Result<(Vm, PathBuf)> {
        let audit = self.dir.path().join(format!("{name}-audit.jsonl"));
        let path = audit.to_str().context("audit log path")?;
        let args: Vec<&str> = extra.iter().copied().chain(["--audit-log", path]).collect();
        Ok((self.start(name, kernel, &args)?, audit))
    }

    fn start_args(&self, name: &str, args: &[String]) -> Result<Vm> {
        let mut child = Command::new(bulkhead_bin())
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().context("stdout")?, stdout.clone()),
            collect(child.stderr.take().context("stderr")?, stderr.clone()),
        ];
        let mut vm = Vm {
            child,
            _stdin: None,
            stdout,
            stderr,
            readers,
        };
        vm._stdin = vm.child.stdin.take();
        let socket = self.socket(name);
        // Connecting, not just seeing the file: a stale socket may be there already.
        let live = || UnixStream::connect(&socket).is_ok();
        wait_for(|| Ok(live() || vm.child.try_wait()?.is_some())).with_context(|| {
            format!("no control socket at {}:\n{}", socket.display(), vm.dump())
        })?;
        ensure!(live(), "bulkhead run ended early:\n{}", vm.finish()?);
        Ok(vm)
    }
}

/// A `bulkhead run` in the background; killed if a test ends without ending it.
struct Vm {
    child: Child,
    /// Held open: the guest's serial input stays idle rather than at EOF.
    _stdin: Option<std::process::ChildStdin>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buffer) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buffer[..n]);
            into.lock().unwrap().push_str(&text);
        }
    })
}

/// Polls `done` every 20 ms until it is true; an error after [`PATIENCE`].
fn wait_for(mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + PATIENCE;
    while !done()? {
        if Instant::now() > deadline {
            bail!("gave up waiting after {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Vm {
    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Complete `tick=` lines the guest printed so far.
    fn ticks(&self) -> usize {
        self.stdout()
            .lines()
            .filter(|l| l.starts_with("tick=") && l.len() == 13)
            .count()
    }

    fn dump(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for the process to end by itself; returns its status and output.
    fn wait(mut self) -> Result<(ExitStatus, String)> {
        let mut status = None;
        wait_for(|| {
            status = self.child.try_wait()?;
            Ok(status.is_some())
        })
        .with_context(|| format!("bulkhead run did not end:\n{}", self.dump()))?;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let status = status.context("no status")?;
        Ok((status, self.dump()))
    }

    /// Kills the process (if needed) and returns its output, for error messages.
    fn finish(mut self) -> Result<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(self.dump())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one raw line on a VM's socket and returns the raw reply line.
fn raw_request(socket: &Path, line: &[u8]) -> Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.write_all(line)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------------

#[test]
fn list_and_status_show_a_running_vm() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let vm = env.start("alpha", &kernel, &["--cpus", "2", "--memory", "64M"])?;

    let status = env.status("alpha")?;
    assert_eq!(status.name, "alpha");
    assert_eq!(status.pid, vm.child.id());
    assert_eq!(status.cpus, 2);
    assert_eq!(status.memory_bytes, 64 << 20);
    assert_eq!(status.state, VmState::Running);
    assert!(status.devices.is_empty(), "{status:?}");

    let text = env.ok(&["status", "alpha"])?;
    assert!(text.contains("state:   running"), "{text}");
    assert!(text.contains("memory:  64M"), "{text}");

    let list = env.ok(&["list"])?;
    let line = list
        .lines()
        .find(|l| l.starts_with("alpha "))
        .context(list.clone())?;
    assert!(line.contains(&vm.child.id().to_string()), "{list}");
    let listed: Vec<VmStatus> = serde_json::from_str(&env.ok(&["list", "--json"])?)?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "alpha");

    env.ok(&["kill", "alpha"])?;
    let (status, output) = vm.wait()?;
    assert!(status.success(), "{output}");
    assert!(!env.socket("alpha").exists(), "the socket outlived the VM");
    assert_eq!(env.ok(&["list", "--json"])?.trim(), "[]");
    Ok(())
}

#[test]
fn pause_stops_the_guest_and_resume_restarts_it() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let vm = env.start("beta", &kernel, &[])?;
    wait_for(|| Ok(vm.ticks() >= 2)).with_context(|| vm.dump())?;

    env.ok(&["pause", "beta"])?;
    assert_eq!(env.status("beta")?.state, VmState::Paused);
    // The output may still be on its way through the pipe: wait until it settles.
    let mut last = vm.ticks();
    wait_for(|| {
        std::thread::sleep(Duration::from_millis(500));
        let now = vm.ticks();
        let settled = now == last;
        last = now;
        Ok(settled)
    })?;
    // A running guest prints about 20 lines a second, and its registers change all the
    // time (rax holds the PM timer it polls); a paused one does neither.
    let registers = |env: &Env| -> Result<Vec<VcpuRegisters>> {
        Ok(serde_json::from_str(
            &env.ok(&["debug", "beta", "--json"])?,
        )?)
    };
    let frozen = registers(&env)?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(registers(&env)?, frozen, "the vCPU ran while paused");
    assert_eq!(
        vm.ticks(),
        last,
        "the guest ran while paused:\n{}",
        vm.dump()
    );
    assert_eq!(
        env.status("beta")?.state,
        VmState::Paused,
        "debug must not resume"
    );
    env.ok(&["pause", "beta"])?; // pausing twice is harmless

    env.ok(&["resume", "beta"])?;
    assert_eq!(env.status("beta")?.state, VmState::Running);
    wait_for(|| Ok(vm.ticks() >= last + 3)).with_context(|| vm.dump())?;
    // The counter carried on where it stopped: the guest kept its state.
    let stdout = vm.stdout();
    let values: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("tick="))
        .filter(|v| v.len() == 8)
        .map(|v| u64::from_str_radix(v, 16))
        .collect::<Result<_, _>>()?;
    assert!(values.windows(2).all(|w| w[1] == w[0] + 1), "{stdout}");

    env.ok(&["kill", "beta"])?;
    vm.wait()?;
    Ok(())
}

#[test]
fn debug_dumps_registers_inside_the_guest() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let vm = env.start("gamma", &kernel, &["--cpus", "2"])?;
    wait_for(|| Ok(vm.ticks() >= 1)).with_context(|| vm.dump())?;

    let json = env.ok(&["debug", "gamma", "--json"])?;
    let vcpus: Vec<VcpuRegisters> = serde_json::from_str(&json)?;
    assert_eq!(vcpus.len(), 2, "{json}");
    let boot = &vcpus[0];
    let rip = boot.registers["rip"];
    assert!(
        (CODE_BASE..CODE_BASE + 0x1_0000).contains(&rip),
        "rip {rip:#x} is outside the guest's code"
    );
    // Long mode with paging, as bulkhead entered the guest.
    assert_ne!(boot.registers["efer"] & (1 << 10), 0, "EFER.LMA: {json}");
    assert_ne!(boot.registers["cr0"] & (1 << 31), 0, "CR0.PG: {json}");

    let text = env.ok(&["debug", "gamma"])?;
    assert!(
        text.contains("vCPU 0:") && text.contains("vCPU 1:"),
        "{text}"
    );
    assert!(text.contains("rip: 00000000001"), "{text}");
    // Debug pauses only for the read.
    assert_eq!(env.status("gamma")?.state, VmState::Running);
    let before = vm.ticks();
    wait_for(|| Ok(vm.ticks() > before)).with_context(|| vm.dump())?;

    env.ok(&["kill", "gamma"])?;
    vm.wait()?;
    Ok(())
}

#[test]
fn stop_presses_the_power_button_and_the_guest_powers_off() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(true)?)?;
    let vm = env.start("delta", &kernel, &[])?;
    wait_for(|| Ok(vm.ticks() >= 1)).with_context(|| vm.dump())?;

    // A paused guest is resumed so that it can see the button.
    env.ok(&["pause", "delta"])?;
    env.ok(&["stop", "delta"])?;
    assert!(
        !env.socket("delta").exists(),
        "stop returned before the socket went"
    );
    let (status, output) = vm.wait()?;
    assert!(status.success(), "{output}");
    assert!(output.contains("power button pressed\n"), "{output}");
    assert!(!output.contains("still running after"), "{output}");
    Ok(())
}

#[test]
fn stop_ends_a_guest_that_ignores_the_button_after_the_timeout() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let vm = env.start("epsilon", &kernel, &[])?;
    env.ok(&["stop", "epsilon", "--timeout", "1"])?;
    let (status, output) = vm.wait()?;
    assert!(status.success(), "{output}");
    assert!(!env.socket("epsilon").exists());
    Ok(())
}

#[test]
fn the_socket_goes_however_the_vm_ends() -> Result<()> {
    let env = Env::new()?;
    type Ending = fn(&mut MicroGuest) -> Result<()>;
    let endings: [(&str, Ending, bool); 3] = [
        ("off", MicroGuest::power_off, true),
        ("reset", MicroGuest::reset_via_cf9, true),
        ("crash", MicroGuest::triple_fault, false),
    ];
    for (name, end, clean) in endings {
        let mut guest = MicroGuest::new()?;
        end(&mut guest)?;
        let kernel = env.kernel(name, &guest.build()?)?;
        let outcome = env.bulkhead(&[
            "run",
            "--name",
            name,
            "--kernel",
            kernel.to_str().context("path")?,
        ])?;
        assert_eq!(outcome.status.success(), clean, "{outcome}");
        assert!(
            !env.socket(name).exists(),
            "{name}: the socket outlived the VM"
        );
    }

    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let vm = env.start("zeta", &kernel, &[])?;
    // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
    assert_eq!(
        unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) },
        0
    );
    let (status, output) = vm.wait()?;
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{output}");
    assert!(!env.socket("zeta").exists(), "{output}");
    Ok(())
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_name_is_refused() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    // What a VMM killed with SIGKILL leaves: a socket file nobody listens on.
    std::fs::create_dir_all(env.socket("eta").parent().context("dir")?)?;
    drop(UnixListener::bind(env.socket("eta"))?);
    let stale = env.bulkhead(&["status", "eta"])?;
    stale.assert_error_mentioning(&["no VM named \"eta\""]);

    let vm = env.start("eta", &kernel, &[])?;
    assert_eq!(env.status("eta")?.pid, vm.child.id());
    let mode = std::fs::metadata(env.socket("eta"))?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let dir_mode = std::fs::metadata(env.runtime_dir().join("bulkhead"))?
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700, "directory mode {dir_mode:o}");

    let clash = env.bulkhead(&[
        "run",
        "--name",
        "eta",
        "--kernel",
        kernel.to_str().context("path")?,
    ])?;
    clash.assert_error_mentioning(&["a VM named \"eta\" is already running"]);
    assert_eq!(
        env.status("eta")?.pid,
        vm.child.id(),
        "the first VM must be unaffected"
    );

    env.ok(&["kill", "eta"])?;
    vm.wait()?;
    Ok(())
}

#[test]
fn malformed_requests_get_an_error_and_the_vm_carries_on() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let vm = env.start("theta", &kernel, &[])?;
    let socket = env.socket("theta");
    for (request, expected) in [
        (&b"this is not json\n"[..], "malformed request"),
        (
            b"{\"version\":1,\"command\":\"dance\"}\n",
            "unknown variant",
        ),
        (b"{\"command\":\"status\"}\n", "no \"version\""),
        (
            b"{\"version\":99,\"command\":\"status\"}\n",
            "unsupported protocol version 99",
        ),
        (
            b"{\"version\":1,\"command\":\"restart_worker\",\"device\":\"nope\"}\n",
            "no device named",
        ),
        (b"\n", "malformed request"),
    ] {
        let reply = raw_request(&socket, request)?;
        let parsed: Reply = serde_json::from_str(&reply).with_context(|| reply.clone())?;
        assert!(parsed.ok.is_none(), "{reply}");
        let error = parsed.error.context(reply.clone())?;
        assert!(
            error.contains(expected),
            "{:?} -> {reply}",
            String::from_utf8_lossy(request)
        );
    }
    // Far more than a request may be: refused without reading it all.
    let huge = vec![b'x'; 64 * 1024];
    let mut stream = UnixStream::connect(&socket)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    let _ = stream.write_all(&huge); // the VMM may close early
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    assert!(reply.contains("longer than"), "{reply}");

    let ok = raw_request(&socket, b"{\"version\":1,\"command\":\"status\"}\n")?;
    assert!(
        ok.starts_with("{\"version\":1,\"ok\":{\"kind\":\"status\""),
        "{ok}"
    );
    let before = vm.ticks();
    wait_for(|| Ok(vm.ticks() > before)).with_context(|| vm.dump())?;
    env.ok(&["kill", "theta"])?;
    vm.wait()?;
    Ok(())
}

#[test]
fn unknown_vm_names_are_errors() -> Result<()> {
    let env = Env::new()?;
    for command in ["status", "stop", "kill", "pause", "resume", "debug"] {
        let outcome = env.bulkhead(&[command, "nosuchvm"])?;
        outcome.assert_error_mentioning(&["no VM named \"nosuchvm\" is running"]);
    }
    let outcome = env.bulkhead(&["restart-worker", "nosuchvm", "rng0"])?;
    outcome.assert_error_mentioning(&["no VM named \"nosuchvm\""]);
    let outcome = env.bulkhead(&["stop", "../../etc/passwd"])?;
    outcome.assert_error_mentioning(&["invalid VM name"]);
    assert_eq!(env.ok(&["list"])?.lines().count(), 1, "only the header");
    Ok(())
}

#[test]
fn a_client_of_another_user_is_refused() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return Ok(());
    }
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let vm = env.start("iota", &kernel, &[])?;
    // Loosen the file permissions, so that only the VMM's own peer check stands
    // between the other user and the VM.
    let open =
        |path: &Path, mode| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    open(env.dir.path(), 0o755)?;
    open(&env.runtime_dir(), 0o755)?;
    open(&env.runtime_dir().join("bulkhead"), 0o755)?;
    open(&env.socket("iota"), 0o666)?;
    // The other user cannot reach the build directory: it gets a link to the binary in
    // the opened test directory. A link, not a copy: a copy's write descriptor, held for a
    // moment by any child another test's thread forks meanwhile, fails the exec with
    // ETXTBSY now and then.
    let binary = env.dir.path().join("bulkhead");
    if std::fs::hard_link(bulkhead_bin(), &binary).is_err() {
        std::fs::copy(bulkhead_bin(), &binary)?;
    }
    open(&binary, 0o755)?;

    let outcome = BulkheadCommand::new()
        .binary(&binary)
        .wrapped_in([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .env("XDG_RUNTIME_DIR", env.runtime_dir())
        .args(["pause", "iota"])
        .run()?;
    outcome.assert_error_mentioning(&["permission denied"]);
    outcome.assert_error_mentioning(&["uid 65534"]);
    assert_eq!(env.status("iota")?.state, VmState::Running);

    env.ok(&["kill", "iota"])?;
    vm.wait()?;
    Ok(())
}

#[test]
fn restart_worker_replaces_the_worker_and_is_audited() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let (vm, audit) = env.start_audited("kappa", &kernel, &["--rng"])?;
    let before = env.status("kappa")?;
    let rng = before.devices.first().context("no device")?.clone();
    assert_eq!(rng.name, "rng0");
    assert_eq!(rng.restarts, 0);
    let first_pid = rng.worker_pid.context("no worker pid")?;

    env.ok(&["restart-worker", "kappa", "rng0"])?;
    wait_for(|| {
        let device = env.status("kappa")?.devices[0].clone();
        Ok(device.restarts == 1 && device.worker_pid.is_some())
    })?;
    let after = env.status("kappa")?.devices[0].clone();
    assert_ne!(after.worker_pid, Some(first_pid));
    let log = std::fs::read_to_string(&audit)?;
    assert!(
        log.contains(&format!(
            "\"event\":\"operator_restart\",\"device\":\"rng0\",\"pid\":{first_pid}"
        )),
        "{log}"
    );
    assert!(log.contains("\"event\":\"restart\""), "{log}");

    let unknown = env.bulkhead(&["restart-worker", "kappa", "disk9"])?;
    unknown.assert_error_mentioning(&["no device named \"disk9\" (devices: rng0)"]);

    env.ok(&["kill", "kappa"])?;
    vm.wait()?;
    Ok(())
}

/// A `,cow` disk's worker is restarted like any other: its changes are in the overlay
/// store the VMM keeps, which the replacement is handed (the blk worker tests check that
/// the data survives; here the VMM's side: the store passed again, the worker serving).
#[test]
fn restart_worker_replaces_a_cow_disk_s_worker() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let image = env.dir.write("disk.raw", &vec![0x5a; 1 << 20])?;
    let disk = format!("{},format=raw,cow", image.display());
    let (vm, audit) = env.start_audited("mu", &kernel, &["--disk", &disk])?;
    let blk = env
        .status("mu")?
        .devices
        .first()
        .context("no device")?
        .clone();
    assert_eq!((blk.name.as_str(), blk.restarts), ("blk0", 0));
    let first_pid = blk.worker_pid.context("no worker pid")?;
    for restarts in 1..=2 {
        env.ok(&["restart-worker", "mu", "blk0"])?;
        wait_for(|| {
            let device = env.status("mu")?.devices[0].clone();
            Ok(device.restarts == restarts && device.worker_pid.is_some())
        })?;
    }
    let after = env.status("mu")?.devices[0].clone();
    ensure!(
        !after.failed && after.worker_pid != Some(first_pid),
        "{after:?}"
    );
    let log = std::fs::read_to_string(&audit)?;
    ensure!(log.matches("\"event\":\"restart\"").count() == 2, "{log}");
    ensure!(!log.contains("give_up"), "{log}");
    env.ok(&["kill", "mu"])?;
    vm.wait()?;
    ensure!(
        std::fs::read(&image)? == vec![0x5a; 1 << 20],
        "the cow image changed"
    );
    Ok(())
}

/// A worker that stops answering is killed and replaced, and the guest carries on: the
/// guest keeps reading its disk's config space (its capacity, which the VMM asks the blk
/// worker for with GET_CONFIG); with the worker stopped, one read waits out the VMM's limit
/// (20 s), the VMM kills the worker and audits why, the supervisor replaces it, and the
/// reads after that see the capacity again.
#[test]
fn a_worker_that_stops_answering_is_killed_and_replaced() -> Result<()> {
    const CAPACITY: &str = "word=00000800"; // 1 MiB in 512-byte sectors
    let env = Env::new()?;
    // Device 0's virtio-mmio window; its config space starts at 0x100.
    let kernel = env.kernel("reader", &ticker_reading(false, Some(0xc000_0100))?)?;
    let image = env.dir.write("disk.raw", &vec![0; 1 << 20])?;
    let disk = format!("{},format=raw", image.display());
    let (vm, audit) = env.start_audited("nu", &kernel, &["--disk", &disk])?;
    wait_for(|| Ok(vm.stdout().contains(CAPACITY)))
        .with_context(|| format!("the guest never read its capacity:\n{}", vm.dump()))?;
    let first_pid = env.status("nu")?.devices[0]
        .worker_pid
        .context("no worker pid")?;
    // SAFETY: kill takes a pid and a signal; the pid is bulkhead's unreaped child's.
    ensure!(unsafe { libc::kill(first_pid as libc::pid_t, libc::SIGSTOP) } == 0);
    let stopped_at = vm.stdout().len();

    // The limit, then the restart: more than PATIENCE.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let device = env.status("nu")?.devices[0].clone();
        if device.restarts == 1 && device.worker_pid.is_some() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no replacement: {device:?}\n{}",
            vm.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(|| Ok(vm.stdout()[stopped_at..].contains(CAPACITY)))
        .with_context(|| format!("no reads after the replacement:\n{}", vm.dump()))?;
    let log = std::fs::read_to_string(&audit)?;
    for event in [
        format!(
            "\"event\":\"unresponsive\",\"device\":\"blk0\",\"pid\":{first_pid},\"call\":\"GET_CONFIG\""
        ),
        format!("\"event\":\"crash\",\"device\":\"blk0\",\"pid\":{first_pid},\"signal\":9"),
        "\"event\":\"restart\",\"device\":\"blk0\",\"attempt\":1".to_owned(),
    ] {
        ensure!(log.contains(&event), "no {event} in the audit log:\n{log}");
    }
    env.ok(&["kill", "nu"])?;
    vm.wait()?;
    Ok(())
}

#[test]
fn a_config_file_gives_the_same_vm_as_flags() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let config = env.dir.write(
        "vm.toml",
        format!(
            "name = \"lambda\"\nkernel = \"{}\"\ncpus = 2\nmemory = \"96M\"\n",
            kernel.display()
        )
        .as_bytes(),
    )?;
    let vm = env.start_args(
        "lambda",
        &[
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ],
    )?;
    let status = env.status("lambda")?;
    assert_eq!((status.cpus, status.memory_bytes), (2, 96 << 20));
    env.ok(&["kill", "lambda"])?;
    vm.wait()?;

    // A flag overrides the file.
    let vm = env.start_args(
        "lambda",
        &[
            "run".into(),
            "--config".into(),
            config.display().to_string(),
            "--cpus".into(),
            "1".into(),
        ],
    )?;
    assert_eq!(env.status("lambda")?.cpus, 1);
    env.ok(&["kill", "lambda"])?;
    vm.wait()?;
    Ok(())
}

#[test]
fn config_file_errors_match_the_flags() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("ticker", &ticker(false)?)?;
    let k = kernel.display().to_string();
    let run_file = |name: &str, text: &str| -> Result<RunOutcome> {
        let path = env.dir.write(name, text.as_bytes())?;
        env.bulkhead(&["run", "--config", path.to_str().context("path")?])
    };
    // The same rule, the same message, whichever way the value came.
    for (key, flag_value, file_value) in [
        ("cpus", "0", "0"),
        ("memory", "1K", "\"1K\""),
        ("memory", "lots", "\"lots\""),
        ("name", "a/b", "\"a/b\""),
    ] {
        let flag = env.bulkhead(&["run", "--kernel", &k, &format!("--{key}"), flag_value])?;
        let file = run_file(
            "bad.toml",
            &format!("kernel = \"{k}\"\n{key} = {file_value}\n"),
        )?;
        let flag_error = flag.error_lines().join("\n");
        assert!(!flag_error.is_empty(), "{flag}");
        assert_eq!(flag_error, file.error_lines().join("\n"), "{flag}\n{file}");
    }
    run_file("typo.toml", &format!("kernel = \"{k}\"\ncpu = 2\n"))?
        .assert_error_mentioning(&["line 2: unknown field `cpu`"]);
    run_file("type.toml", &format!("kernel = \"{k}\"\ncpus = \"two\"\n"))?
        .assert_error_mentioning(&["line 2: invalid type"]);
    run_file("nokernel.toml", "cpus = 1\n")?.assert_error_mentioning(&["no kernel to boot"]);
    env.bulkhead(&["run", "--config", "/nonexistent/vm.toml"])?
        .assert_error_mentioning(&["cannot read config file /nonexistent/vm.toml"]);
    Ok(())
}

/// What Linux does with the fixed power button: enable PWRBTN_EN and take the SCI (IRQ 9,
/// level-triggered, active high, as the MADT says) through the IOAPIC.
fn sci_guest() -> Result<Vec<u8>> {
    const VECTOR: u8 = 0x41;
    const SCI_IRQ: u32 = 9;
    const PM1A_ENABLE: u16 = PM1A_STATUS + 2;
    let mut guest = MicroGuest::new()?;
    let mut handler = guest.asm().create_label();
    guest.set_interrupt_handler(VECTOR, handler)?;
    let a = guest.asm();
    // Mask the 8259s, so that IRQ 9 arrives once, through the IOAPIC.
    a.mov(al, 0xff)?;
    a.out(PIC_MASTER_DATA as u32, al)?;
    a.out(PIC_SLAVE_DATA as u32, al)?;
    a.mov(rdi, LAPIC_BASE)?;
    a.mov(dword_ptr(rdi + LAPIC_SPURIOUS_VECTOR), 0x1ff)?;
    a.mov(rdi, IOAPIC_BASE)?;
    a.mov(dword_ptr(rdi), ioapic_redirection_low(SCI_IRQ))?;
    // Fixed delivery, physical destination, level-triggered (bit 15), active high.
    a.mov(dword_ptr(rdi + IOAPIC_IOWIN), u32::from(VECTOR) | 1 << 15)?;
    a.mov(dword_ptr(rdi), ioapic_redirection_low(SCI_IRQ) + 1)?;
    a.mov(dword_ptr(rdi + IOAPIC_IOWIN), 0)?;
    a.mov(dx, PM1A_ENABLE as u32)?;
    a.mov(ax, PM1_PWRBTN as u32)?;
    a.out(dx, ax)?;
    guest.print("armed\n")?;
    let mut idle = guest.asm().create_label();
    let a = guest.asm();
    a.sti()?;
    a.set_label(&mut idle)?;
    a.hlt()?;
    a.jmp(idle)?;

    guest.asm().set_label(&mut handler)?;
    let a = guest.asm();
    a.mov(dx, PM1A_STATUS as u32)?;
    a.in_(ax, dx)?;
    a.movzx(r8d, ax)?;
    a.out(dx, ax)?; // write 1 to clear what was pending
    guest.print("sci status=")?;
    guest.print_hex(r8, 4)?;
    guest.print("\n")?;
    guest.power_off()?;
    guest.build()
}

#[test]
fn stop_raises_the_sci_when_the_guest_enabled_the_power_button() -> Result<()> {
    let env = Env::new()?;
    let kernel = env.kernel("sci", &sci_guest()?)?;
    let vm = env.start("mu", &kernel, &[])?;
    wait_for(|| Ok(vm.stdout().contains("armed\n"))).with_context(|| vm.dump())?;
    env.ok(&["stop", "mu"])?;
    let (status, output) = vm.wait()?;
    assert!(status.success(), "{output}");
    assert!(output.contains("sci status=0100\n"), "{output}");
    Ok(())
}
