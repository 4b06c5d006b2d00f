//! `bulkhead-worker p9` as a virtio-9p vhost-user device, driven from userspace: a
//! frontend and a split-queue driver in this process carry 9P messages through the
//! virtqueue, the worker a real, sandboxed process serving a scratch directory.
//!
//! Needs the worker binary: `cargo build --workspace` first (same profile as the tests).

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bulkhead_protocol::{DeviceConfig, P9Config};
use bulkhead_tests::micro::ScratchDir;
use bulkhead_tests::p9::{flags, Body, Client, P9Error, NOTAG};
use bulkhead_tests::p9_virtio::{Inflight, VirtioP9, VIRTIO_9P_F_MOUNT_TAG};
use bulkhead_tests::vhost::{Buffer, WorkerProcess};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

const MSIZE: u32 = 64 * 1024;
const ROOT_FID: u32 = 0;
/// Generous bound for anything that should take milliseconds; the suite shares two cores.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A worker serving a fresh `share/` (beside an `outside/` it must never reach).
struct Share {
    scratch: ScratchDir,
    worker: WorkerProcess,
}

impl Share {
    fn start(extra: &[&str]) -> Result<Share> {
        let scratch = ScratchDir::new("p9dev")?;
        fs::create_dir(scratch.path().join("share"))?;
        fs::create_dir(scratch.path().join("outside"))?;
        fs::write(scratch.path().join("outside/secret"), "host secret")?;
        let share = scratch.path().join("share");
        let share = share.to_str().context("scratch path is not UTF-8")?;
        let mut args = vec!["--dir", share, "--tag", "hostshare"];
        args.extend_from_slice(extra);
        let worker = WorkerProcess::standalone("p9", &args)?;
        Ok(Share { scratch, worker })
    }

    fn share(&self) -> std::path::PathBuf {
        self.scratch.path().join("share")
    }

    fn device(&self) -> Result<VirtioP9> {
        Ok(VirtioP9::start(self.worker.connect()?, MSIZE)?)
    }

    /// A client over the virtqueue, versioned and attached as fid 0.
    fn mount(&self) -> Result<Client> {
        let mut client = Client::over(Box::new(self.device()?));
        let (msize, _) = client.version(MSIZE, "9P2000.L")?;
        client.msize = msize;
        client.attach(ROOT_FID, 0)?;
        Ok(client)
    }

    fn assert_alive(&self) -> Result<()> {
        ensure!(
            self.worker.is_running(),
            "the worker died:\n{}",
            self.worker.stderr()
        );
        ensure!(
            !self.worker.stderr().contains("panicked"),
            "the worker panicked:\n{}",
            self.worker.stderr()
        );
        Ok(())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        // Shown only for a failing test: what the worker said about it.
        eprintln!("worker stderr:\n{}", self.worker.stderr());
    }
}

fn expect_errno<T: std::fmt::Debug>(
    result: bulkhead_tests::p9::Result<T>,
    errno: i32,
    what: &str,
) -> Result<()> {
    match result {
        Err(P9Error::Lerror(e)) if e as i32 == errno => Ok(()),
        other => bail!(
            "{what}: expected errno {errno} ({}), got {other:?}",
            std::io::Error::from_raw_os_error(errno)
        ),
    }
}

fn expect_error<T: std::fmt::Debug>(
    result: bulkhead_tests::p9::Result<T>,
    what: &str,
) -> Result<()> {
    match result {
        Err(P9Error::Lerror(_)) => Ok(()),
        other => bail!("{what}: expected an Rlerror, got {other:?}"),
    }
}

#[test]
fn mount_tag_is_in_the_config_space() -> Result<()> {
    let share = Share::start(&[])?;
    let mut device = share.device()?;
    ensure!(
        device.device.negotiated.has(0),
        "VIRTIO_9P_F_MOUNT_TAG ({VIRTIO_9P_F_MOUNT_TAG:#x}) not negotiated"
    );
    let (_, config) = device.device.frontend.inner().get_config(
        0,
        11,
        VhostUserConfigFlags::empty(),
        &[0u8; 11],
    )?;
    ensure!(config == b"\x09\x00hostshare", "config space {config:?}");
    share.assert_alive()
}

#[test]
fn files_round_trip_through_the_virtqueue() -> Result<()> {
    let share = Share::start(&[])?;
    fs::write(share.share().join("hello"), "from the host")?;
    let mut c = share.mount()?;

    // Read a host file.
    c.walk(ROOT_FID, 1, &["hello"])?;
    c.lopen(1, flags::RDONLY)?;
    ensure!(c.read_all(1)? == b"from the host");
    c.clunk(1)?;

    // Create and write one; the host sees it.
    c.walk(ROOT_FID, 2, &[] as &[&str])?;
    c.lcreate(2, "made-by-guest", flags::RDWR | flags::CREATE, 0o644, 0)?;
    let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let mut at = 0;
    while at < data.len() {
        let chunk = &data[at..(at + 8192).min(data.len())];
        ensure!(c.write(2, at as u64, chunk)? as usize == chunk.len());
        at += chunk.len();
    }
    c.clunk(2)?;
    ensure!(fs::read(share.share().join("made-by-guest"))? == data);
    c.walk(ROOT_FID, 3, &["made-by-guest"])?;
    c.lopen(3, flags::RDONLY)?;
    ensure!(c.read_all(3)? == data, "read back differs");
    ensure!(c.getattr(3)?.size == data.len() as u64);

    // A directory, then a listing with both names.
    c.mkdir(ROOT_FID, "dir", 0o755)?;
    ensure!(share.share().join("dir").is_dir());
    c.walk(ROOT_FID, 4, &[] as &[&str])?;
    c.lopen(4, flags::RDONLY | flags::DIRECTORY)?;
    let names: Vec<Vec<u8>> = c
        .readdir_all(4, 4096)?
        .into_iter()
        .map(|e| e.name)
        .collect();
    for name in [&b"hello"[..], b"made-by-guest", b"dir"] {
        ensure!(names.iter().any(|n| n == name), "{names:?} lacks {name:?}");
    }
    // A Tflush (of a request long answered) goes to the device's flush thread and back.
    c.flush(4321)?;
    // Rename and unlink show on the host too.
    c.renameat(ROOT_FID, "hello", ROOT_FID, "renamed")?;
    c.unlinkat(ROOT_FID, "made-by-guest", 0)?;
    ensure!(share.share().join("renamed").exists());
    ensure!(!share.share().join("made-by-guest").exists());
    share.assert_alive()
}

#[test]
fn read_only_share_refuses_writes() -> Result<()> {
    let share = Share::start(&["--ro"])?;
    fs::write(share.share().join("file"), "keep")?;
    let mut c = share.mount()?;
    c.walk(ROOT_FID, 1, &[] as &[&str])?;
    expect_errno(
        c.lcreate(1, "new", flags::WRONLY | flags::CREATE, 0o644, 0),
        libc::EROFS,
        "create on a read-only share",
    )?;
    c.walk(ROOT_FID, 2, &["file"])?;
    expect_errno(c.lopen(2, flags::RDWR), libc::EROFS, "open for writing")?;
    expect_errno(c.mkdir(ROOT_FID, "d", 0o755), libc::EROFS, "mkdir")?;
    expect_errno(c.unlinkat(ROOT_FID, "file", 0), libc::EROFS, "unlink")?;
    c.lopen(2, flags::RDONLY)?;
    ensure!(c.read_all(2)? == b"keep");
    ensure!(fs::read(share.share().join("file"))? == b"keep");
    ensure!(!share.share().join("new").exists());
    share.assert_alive()
}

#[test]
fn escapes_through_the_device_fail() -> Result<()> {
    let share = Share::start(&[])?;
    symlink("/etc/passwd", share.share().join("passwd"))?;
    symlink("../outside", share.share().join("out"))?;
    let mut c = share.mount()?;
    let root_qid = c.getattr(ROOT_FID)?.qid;

    // `..` from the root is the root.
    let qids = c.walk(ROOT_FID, 1, &["..", "..", ".."])?;
    ensure!(
        qids.last() == Some(&root_qid),
        "walked above the root: {qids:?}"
    );
    // A walk stops (Rwalk with fewer qids, or Rlerror) where it would leave the share.
    let partial = |r: bulkhead_tests::p9::Result<Vec<_>>, n: usize| match r {
        Ok(qids) => qids.len() < n,
        Err(P9Error::Lerror(_)) => true,
        Err(_) => false,
    };
    ensure!(
        partial(c.walk(ROOT_FID, 2, &["..", "outside", "secret"]), 3),
        "walked to ../outside/secret"
    );
    // Symlinks are walked to as links, never followed out.
    c.walk(ROOT_FID, 3, &["passwd"])?;
    expect_error(
        c.lopen(3, flags::RDONLY),
        "opening a symlink to /etc/passwd",
    )?;
    ensure!(
        partial(c.walk(ROOT_FID, 4, &["out", "secret"]), 2),
        "walked through a symlink out of the share"
    );
    // Names carrying a path are refused.
    expect_error(
        c.renameat(ROOT_FID, "passwd", ROOT_FID, "../outside/moved"),
        "rename out of the share",
    )?;
    c.walk(ROOT_FID, 5, &[] as &[&str])?;
    expect_error(
        c.lcreate(5, "../outside/x", flags::WRONLY | flags::CREATE, 0o644, 0),
        "create with ../ in the name",
    )?;
    ensure!(fs::read(share.scratch.path().join("outside/secret"))? == b"host secret");
    ensure!(!share.scratch.path().join("outside/moved").exists());
    ensure!(!share.scratch.path().join("outside/x").exists());
    share.assert_alive()
}

/// Posts a chain and returns the used length and what the device wrote at `reply`.
fn post(
    device: &mut VirtioP9,
    buffers: &[Buffer],
    reply: vm_memory::GuestAddress,
) -> Result<Vec<u8>> {
    Ok(device.exchange(buffers, reply)?)
}

#[test]
fn malformed_chains_and_truncated_messages_do_not_crash_the_worker() -> Result<()> {
    let share = Share::start(&[])?;
    let mut device = share.device()?;
    let memory = device.device.memory.clone();
    let out = memory.allocate(8192, 8)?;
    let reply = memory.allocate(8192, 8)?;
    let version = bulkhead_tests::p9::frame(100, NOTAG, &Body::new().u32(MSIZE).str("9P2000.L").0);
    memory.write(out, &version)?;

    // No readable part at all: nothing to answer.
    let got = post(&mut device, &[Buffer::writable(reply, 4096)], reply)?;
    ensure!(got.is_empty(), "a chain without a request got {got:?}");
    // Shorter than a 9P header.
    let got = post(
        &mut device,
        &[Buffer::readable(out, 3), Buffer::writable(reply, 4096)],
        reply,
    )?;
    ensure!(got.is_empty(), "a 3-byte request got {got:?}");
    // No room for any reply.
    let got = post(
        &mut device,
        &[Buffer::readable(out, version.len() as u32)],
        reply,
    )?;
    ensure!(got.is_empty());
    let got = post(
        &mut device,
        &[
            Buffer::readable(out, version.len() as u32),
            Buffer::writable(reply, 4),
        ],
        reply,
    )?;
    ensure!(got.is_empty(), "a 4-byte reply buffer got {got:?}");
    // A truncated message (its size field says more than the chain carries).
    let got = post(
        &mut device,
        &[
            Buffer::readable(out, version.len() as u32 - 3),
            Buffer::writable(reply, 4096),
        ],
        reply,
    )?;
    ensure!(
        got.is_empty() || got[4] == 7,
        "a truncated Tversion got {got:?}"
    );
    // A good Tversion whose reply is split over three buffers.
    let got = post(
        &mut device,
        &[
            Buffer::readable(out, version.len() as u32),
            Buffer::writable(reply, 5),
            Buffer::writable(vm_memory::GuestAddress(reply.0 + 5), 6),
            Buffer::writable(vm_memory::GuestAddress(reply.0 + 11), 4000),
        ],
        reply,
    )?;
    ensure!(got.len() > 7 && got[4] == 101, "Tversion got {got:?}");
    // The same device still serves a whole session.
    fs::write(share.share().join("page"), vec![7u8; 4096])?;
    let mut c = Client::over(Box::new(device));
    c.version(MSIZE, "9P2000.L")?;
    c.attach(ROOT_FID, 0)?;
    c.walk(ROOT_FID, 1, &["page"])?;
    c.lopen(1, flags::RDONLY)?;
    let share_alive = share.assert_alive();
    drop(c);
    share_alive?;

    // And an Rread that does not fit: Rlerror(EMSGSIZE) for its tag.
    let mut device = share.device()?;
    let memory = device.device.memory.clone();
    let out = memory.allocate(8192, 8)?;
    let reply = memory.allocate(8192, 8)?;
    let requests = [
        bulkhead_tests::p9::frame(100, NOTAG, &Body::new().u32(MSIZE).str("9P2000.L").0),
        bulkhead_tests::p9::frame(104, 1, &Body::new().u32(0).u32(!0).str("").str("").u32(0).0),
        bulkhead_tests::p9::frame(110, 2, &Body::new().u32(0).u32(1).u16(1).str("page").0),
        bulkhead_tests::p9::frame(12, 3, &Body::new().u32(1).u32(0).0),
    ];
    for request in &requests {
        memory.write(out, request)?;
        let got = post(
            &mut device,
            &[
                Buffer::readable(out, request.len() as u32),
                Buffer::writable(reply, 4096),
            ],
            reply,
        )?;
        ensure!(got.len() >= 7 && got[4] != 7, "setup request got {got:?}");
    }
    let read = bulkhead_tests::p9::frame(116, 9, &Body::new().u32(1).u64(0).u32(4096).0);
    memory.write(out, &read)?;
    let got = post(
        &mut device,
        &[
            Buffer::readable(out, read.len() as u32),
            Buffer::writable(reply, 20),
        ],
        reply,
    )?;
    ensure!(
        got.len() == 11 && got[4] == 7 && got[5..7] == [9, 0],
        "an Rread larger than its buffer got {got:?}"
    );
    ensure!(
        u32::from_le_bytes([got[7], got[8], got[9], got[10]]) == libc::EMSGSIZE as u32,
        "wrong errno in {got:?}"
    );
    // Garbage of every length, then a well-formed request still gets its answer.
    for len in [7u32, 8, 11, 64, 4096] {
        memory.write(out, &vec![0xa5; len as usize])?;
        post(
            &mut device,
            &[Buffer::readable(out, len), Buffer::writable(reply, 4096)],
            reply,
        )?;
    }
    let mut c = Client::over(Box::new(device));
    c.version(MSIZE, "9P2000.L")?;
    c.attach(ROOT_FID, 0)?;
    share.assert_alive()
}

#[test]
fn many_requests_in_flight_on_one_ring_all_get_answers() -> Result<()> {
    // 32 requests posted at once: the handler pool answers them in whatever order, each
    // chain once, each with a reply to its own tag.
    let share = Share::start(&[])?;
    let mut device = share.device()?;
    let memory = device.device.memory.clone();
    let out = memory.allocate(64 * 1024, 8)?;
    let replies = memory.allocate(64 * 4096, 8)?;
    let post_one = |device: &mut VirtioP9, slot: u64, frame: &[u8]| -> Result<()> {
        let addr = vm_memory::GuestAddress(out.0 + slot * 1024);
        memory.write(addr, frame)?;
        device.device.queues[0].post(&[
            Buffer::readable(addr, frame.len() as u32),
            Buffer::writable(vm_memory::GuestAddress(replies.0 + slot * 4096), 4096),
        ])?;
        Ok(())
    };
    post_one(
        &mut device,
        0,
        &bulkhead_tests::p9::frame(100, NOTAG, &Body::new().u32(MSIZE).str("9P2000.L").0),
    )?;
    device.device.queues[0].kick()?;
    device.device.queues[0].wait_used(1, TIMEOUT)?;
    post_one(
        &mut device,
        1,
        &bulkhead_tests::p9::frame(104, 1, &Body::new().u32(0).u32(!0).str("").str("").u32(0).0),
    )?;
    device.device.queues[0].kick()?;
    device.device.queues[0].wait_used(1, TIMEOUT)?;
    for tag in 2..34u16 {
        let frame = bulkhead_tests::p9::frame(24, tag, &Body::new().u32(0).u64(0x7ff).0);
        post_one(&mut device, u64::from(tag), &frame)?;
    }
    device.device.queues[0].kick()?;
    let used = device.device.queues[0].wait_used(32, TIMEOUT)?;
    ensure!(used.len() == 32, "{} of 32 answered", used.len());
    let mut tags = std::collections::BTreeSet::new();
    for element in used {
        ensure!(
            element.len > 7,
            "head {} got {} bytes",
            element.id,
            element.len
        );
        tags.insert(element.id);
    }
    ensure!(tags.len() == 32, "a chain came back twice");
    // Every reply slot holds an Rgetattr for the tag posted there.
    for tag in 2..34u16 {
        let reply = memory.read(
            vm_memory::GuestAddress(replies.0 + u64::from(tag) * 4096),
            7,
        )?;
        ensure!(
            reply[4] == 25 && reply[5..7] == tag.to_le_bytes(),
            "slot {tag}: {reply:?}"
        );
    }
    share.assert_alive()
}

#[test]
fn a_launched_worker_serves_the_directory_it_was_handed() -> Result<()> {
    let scratch = ScratchDir::new("p9launch")?;
    let share = scratch.path().join("share");
    fs::create_dir(&share)?;
    fs::write(share.join("hello"), "launched")?;
    // The VMM's part: open the directory and pass the descriptor, never the path.
    let dir = fs::File::open(&share)?;
    let config = DeviceConfig::P9(P9Config {
        root_fd: 5,
        tag: "vmshare".into(),
        read_only: false,
        journal_fd: None,
    });
    let (worker, connection) =
        WorkerProcess::launched_with("p9-0", config, &[(dir.as_raw_fd(), 5)], &[])?;
    drop(dir);
    let mut c = Client::over(Box::new(VirtioP9::start(connection, MSIZE)?));
    let (msize, _) = c.version(MSIZE, "9P2000.L")?;
    c.msize = msize;
    c.attach(ROOT_FID, 0)?;
    c.walk(ROOT_FID, 1, &["hello"])?;
    c.lopen(1, flags::RDONLY)?;
    ensure!(c.read_all(1)? == b"launched");
    c.walk(ROOT_FID, 2, &[] as &[&str])?;
    c.lcreate(2, "new", flags::WRONLY | flags::CREATE, 0o644, 0)?;
    ensure!(share.join("new").exists());
    ensure!(
        proc_status(worker.pid(), "Seccomp")? == "2",
        "no seccomp filter"
    );
    drop(c);
    let status = worker.wait_exit(TIMEOUT)?;
    ensure!(
        status.success(),
        "a launched worker should exit 0 when the VMM hangs up, got {status}:\n{}",
        worker.stderr()
    );
    Ok(())
}

/// The value of `field` in /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> Result<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|value| value.trim().to_owned())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))
}

#[test]
fn a_serving_worker_is_sandboxed() -> Result<()> {
    let share = Share::start(&[])?;
    let mut c = share.mount()?;
    c.walk(ROOT_FID, 1, &[] as &[&str])?;
    c.lcreate(1, "f", flags::WRONLY | flags::CREATE, 0o644, 0)?;
    let pid = share.worker.pid();
    // 2 = SECCOMP_MODE_FILTER; no capabilities left in any set; no way to regain them.
    ensure!(proc_status(pid, "Seccomp")? == "2", "no seccomp filter");
    ensure!(
        proc_status(pid, "NoNewPrivs")? == "1",
        "no_new_privs is not set"
    );
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let value = proc_status(pid, set)?;
        ensure!(u64::from_str_radix(&value, 16)? == 0, "{set} is {value}");
    }
    // Landlock: the shared directory's descriptor is open, and nothing else by path but
    // what serving created since (eventfds, epoll, memory regions, the fids' files).
    let fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|target| target.display().to_string())
        .collect();
    let share_path = share.share().display().to_string();
    ensure!(
        fds.contains(&share_path),
        "the shared directory is not held: {fds:?}"
    );
    for t in &fds {
        ensure!(
            !t.starts_with('/')
                || t.starts_with(&share_path)
                || t.starts_with("/dev/null")
                || t.starts_with("/memfd:"),
            "a host path outside the share is open: {t}"
        );
    }
    share.assert_alive()
}

/// The lines `NAME ok` / `NAME errno N` that p9-escape-probe printed for `dir`.
fn probe(dir: &std::path::Path, read_only: bool) -> Result<Vec<(String, Option<i32>)>> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_p9-escape-probe"));
    command.arg(dir);
    if read_only {
        command.arg("--ro");
    }
    let output = command.output()?;
    ensure!(
        output.status.success(),
        "probe failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?.to_owned();
            let errno = match (words.next(), words.next()) {
                (Some("errno"), Some(n)) => n.parse().ok(),
                _ => None,
            };
            Some((name, errno))
        })
        .collect())
}

#[test]
fn a_subverted_worker_cannot_open_host_paths_outside_the_share() -> Result<()> {
    let scratch = ScratchDir::new("p9probe")?;
    let share = scratch.path().join("share");
    fs::create_dir(&share)?;
    fs::create_dir(scratch.path().join("outside"))?;
    fs::write(scratch.path().join("outside/secret"), "host secret")?;
    fs::write(share.join("inside"), "ok")?;

    let results = probe(&share, false)?;
    let result = |name: &str| {
        results
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, errno)| *errno)
            .with_context(|| format!("the probe did not report {name}: {results:?}"))
    };
    for name in [
        "absolute-read",
        "dotdot-read",
        "absolute-create",
        "absolute-mkdir",
    ] {
        ensure!(
            result(name)? == Some(libc::EACCES),
            "{name}: expected EACCES from Landlock, got {:?}",
            result(name)?
        );
    }
    ensure!(
        result("inside-read")?.is_none(),
        "reading inside the share failed"
    );
    ensure!(
        result("inside-create")?.is_none(),
        "creating inside the share failed"
    );
    ensure!(!scratch.path().join("outside/created").exists());
    ensure!(!std::path::Path::new("/tmp/p9-escape-probe-dir").exists());

    // Read-only: Landlock itself refuses creating, even inside.
    let results = probe(&share, true)?;
    let created = results.iter().find(|(n, _)| n == "inside-create");
    ensure!(
        matches!(created, Some((_, Some(errno))) if *errno == libc::EACCES),
        "a read-only share's worker created a file: {results:?}"
    );
    Ok(())
}

/// The client's view of a device whose worker the test replaces under it.
struct SharedDevice(std::sync::Arc<std::sync::Mutex<VirtioP9>>);

impl bulkhead_tests::p9::Transport for SharedDevice {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .send(bytes)
    }

    fn recv(&mut self, msize: u32) -> bulkhead_tests::p9::Result<Option<Vec<u8>>> {
        self.0
            .lock()
            .map_err(|_| P9Error::Protocol("poisoned".into()))?
            .recv(msize)
    }
}

/// A launched p9 worker on `share` with `journal` (descriptors 5 and 6, as the VMM
/// passes them).
fn launch_journaled(
    share: &std::path::Path,
    journal: &fs::File,
) -> Result<(WorkerProcess, std::os::unix::net::UnixStream)> {
    let dir = fs::File::open(share)?;
    let config = DeviceConfig::P9(P9Config {
        root_fd: 5,
        tag: "vmshare".into(),
        read_only: false,
        journal_fd: Some(6),
    });
    let inherit = [(dir.as_raw_fd(), 5), (journal.as_raw_fd(), 6)];
    Ok(WorkerProcess::launched_with(
        "9p0",
        config,
        &inherit,
        &[("BULKHEAD_LOG", "info")],
    )?)
}

/// A device with inflight tracking over `connection`, shared with a client that has
/// negotiated the version and attached `ROOT_FID`: what a killed worker's test drives.
fn attached_tracked(
    connection: std::os::unix::net::UnixStream,
) -> Result<(std::sync::Arc<std::sync::Mutex<VirtioP9>>, Inflight, Client)> {
    let (device, inflight) = VirtioP9::start_tracked(connection, MSIZE)?;
    let device = std::sync::Arc::new(std::sync::Mutex::new(device));
    let mut c = Client::over(Box::new(SharedDevice(device.clone())));
    let (msize, _) = c.version(MSIZE, "9P2000.L")?;
    c.msize = msize;
    c.attach(ROOT_FID, 0)?;
    Ok((device, inflight, c))
}

fn names(entries: &[bulkhead_tests::p9::DirEntry]) -> Vec<String> {
    let mut names: Vec<String> = entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    names
}

/// kill -9 of a worker between requests: its replacement, handed the same journal, guest
/// memory and inflight region, carries on with every fid - open files read and write at
/// once, a directory lists, a fid renamed through 9P is found under its new name, and a
/// fid whose file was removed meanwhile (or an xattr fid) answers ESTALE until clunked.
/// A second kill and replacement (a journal rebuilt twice) changes nothing.
#[test]
fn a_killed_workers_replacement_keeps_the_guests_fids() -> Result<()> {
    let scratch = ScratchDir::new("p9restart")?;
    let share = scratch.path().join("share");
    fs::create_dir_all(share.join("sub"))?;
    fs::write(share.join("sub/a"), "a")?;
    fs::write(share.join("sub/b"), "b")?;
    fs::write(share.join("keep"), "")?;
    fs::write(share.join("doomed"), "soon gone")?;
    fs::write(share.join("old"), "renamed")?;
    let journal = bulkhead_workers::p9::journal::new_journal()?;

    let (first, connection) = launch_journaled(&share, &journal)?;
    let (device, inflight, mut c) = attached_tracked(connection)?;
    c.walk(ROOT_FID, 1, &["keep"])?;
    c.lopen(1, flags::RDWR)?;
    c.write(1, 0, b"written before")?;
    c.walk(ROOT_FID, 2, &["sub"])?;
    c.lopen(2, flags::RDONLY)?;
    c.walk(ROOT_FID, 3, &["doomed"])?;
    c.lopen(3, flags::RDONLY)?;
    c.walk(ROOT_FID, 4, &[] as &[&str])?;
    c.lcreate(
        4,
        "made",
        flags::WRONLY | flags::CREATE | flags::TRUNC,
        0o644,
        0,
    )?;
    c.write(4, 0, b"created")?;
    c.walk(ROOT_FID, 5, &["old"])?;
    c.renameat(ROOT_FID, "old", ROOT_FID, "new")?;
    c.walk(ROOT_FID, 6, &["sub", "a"])?;
    c.xattrwalk(6, 7, "")?;

    first.kill()?;
    // Meanwhile, on the host: the file fid 3 names goes.
    fs::remove_file(share.join("doomed"))?;
    let (second, connection) = launch_journaled(&share, &journal)?;
    device
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .replace(connection, &inflight)?;

    ensure!(c.read_all(1)? == b"written before", "fid 1 after the kill");
    c.write(1, 14, b" and after")?;
    ensure!(fs::read(share.join("keep"))? == b"written before and after");
    ensure!(
        names(&c.readdir(2, 0, 4096)?) == ["a", "b"],
        "fid 2's listing"
    );
    c.write(4, 7, b" then more")?;
    ensure!(fs::read(share.join("made"))? == b"created then more");
    ensure!(c.getattr(5)?.size == 7, "fid 5 under its new name");
    c.walk(5, 8, &[] as &[&str])?;
    c.lopen(8, flags::RDONLY)?;
    ensure!(c.read_all(8)? == b"renamed");
    expect_errno(c.read(3, 0, 10), libc::ESTALE, "the removed file's fid")?;
    expect_errno(c.getattr(3), libc::ESTALE, "the removed file's fid")?;
    expect_errno(c.read(7, 0, 10), libc::ESTALE, "the xattr fid")?;
    // A stale fid's number stays taken until it is clunked.
    expect_errno(
        c.walk(ROOT_FID, 3, &["keep"]),
        libc::EBADF,
        "walk onto a stale fid",
    )?;
    c.clunk(3)?;
    expect_errno(c.clunk(3), libc::EBADF, "a second clunk")?;
    c.walk(ROOT_FID, 3, &["sub", "b"])?;
    c.lopen(3, flags::RDONLY)?;
    c.clunk(7)?;
    c.clunk(4)?;
    ensure!(second.stderr().contains("stale"), "{}", second.stderr());

    second.kill()?;
    let (third, connection) = launch_journaled(&share, &journal)?;
    device
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .replace(connection, &inflight)?;
    ensure!(c.read_all(3)? == b"b", "a fid opened by the second worker");
    ensure!(c.read_all(1)? == b"written before and after");
    expect_errno(
        c.read(4, 0, 10),
        libc::EBADF,
        "a fid clunked before the kill",
    )?;
    c.clunk(1)?;
    c.clunk(2)?;
    ensure!(third.is_running(), "{}", third.stderr());
    ensure!(!third.stderr().contains("panicked"), "{}", third.stderr());
    Ok(())
}

/// A journal that does not check (a subverted worker's, say) is reported and ignored: the
/// worker starts with no fids, as without one, and serves a fresh mount.
#[test]
fn a_bad_journal_is_reported_and_the_worker_starts_afresh() -> Result<()> {
    let scratch = ScratchDir::new("p9badjournal")?;
    let share = scratch.path().join("share");
    fs::create_dir(&share)?;
    fs::write(share.join("hello"), "fresh")?;
    let journal = bulkhead_workers::p9::journal::new_journal()?;
    std::os::unix::fs::FileExt::write_all_at(&journal, b"not a journal at all", 0)?;
    let (worker, connection) = launch_journaled(&share, &journal)?;
    let mut c = Client::over(Box::new(VirtioP9::start(connection, MSIZE)?));
    expect_errno(
        c.walk(ROOT_FID, 1, &["hello"]),
        libc::EPROTO,
        "before Tversion",
    )?;
    let (msize, _) = c.version(MSIZE, "9P2000.L")?;
    c.msize = msize;
    c.attach(ROOT_FID, 0)?;
    c.walk(ROOT_FID, 1, &["hello"])?;
    c.lopen(1, flags::RDONLY)?;
    ensure!(c.read_all(1)? == b"fresh");
    ensure!(
        worker
            .stderr()
            .contains("session journal has no valid header"),
        "{}",
        worker.stderr()
    );
    ensure!(worker.is_running(), "{}", worker.stderr());
    Ok(())
}

/// What the journal costs through the virtqueue, on a launched, sandboxed worker: the
/// time of a walk and clunk pair with and without one. A measurement, not a check:
/// `cargo test --release -p bulkhead-tests --test p9_device journal_cost -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn journal_cost_through_the_virtqueue() -> Result<()> {
    const PAIRS: u32 = 20_000;
    let scratch = ScratchDir::new("p9journalcost")?;
    let share = scratch.path().join("share");
    fs::create_dir_all(share.join("sub"))?;
    fs::write(share.join("sub/file"), "x")?;
    let time = |journaled: bool| -> Result<Duration> {
        let dir = fs::File::open(&share)?;
        let journal = bulkhead_workers::p9::journal::new_journal()?;
        let mut inherit = vec![(dir.as_raw_fd(), 5)];
        if journaled {
            inherit.push((journal.as_raw_fd(), 6));
        }
        let config = DeviceConfig::P9(P9Config {
            root_fd: 5,
            tag: "cost".into(),
            read_only: false,
            journal_fd: journaled.then_some(6),
        });
        let (_worker, connection) = WorkerProcess::launched_with("9p0", config, &inherit, &[])?;
        let mut c = Client::over(Box::new(VirtioP9::start(connection, MSIZE)?));
        let (msize, _) = c.version(MSIZE, "9P2000.L")?;
        c.msize = msize;
        c.attach(ROOT_FID, 0)?;
        let start = std::time::Instant::now();
        for _ in 0..PAIRS {
            c.walk(ROOT_FID, 1, &["sub", "file"])?;
            c.clunk(1)?;
        }
        Ok(start.elapsed() / PAIRS)
    };
    for round in 0..3 {
        let without = time(false)?;
        let with = time(true)?;
        eprintln!("round {round}: walk+clunk {without:?} without a journal, {with:?} with");
    }
    Ok(())
}

/// Requests on the ring when the worker is killed - some answered, some in flight, some
/// not yet popped - are all answered once, by the killed worker or by its replacement in
/// the session rebuilt from the journal: every Tgetattr of the attached fid succeeds, and
/// every Tmkdir either succeeded or, replayed after it took effect, answers EEXIST; every
/// directory exists.
#[test]
fn requests_left_at_a_kill_are_answered_in_the_rebuilt_session() -> Result<()> {
    // Two descriptors a request, within the ring of 128.
    const PAIRS: u16 = 30;
    for attempt in 0..10u64 {
        let scratch = ScratchDir::new("p9inflight")?;
        let share = scratch.path().join("share");
        fs::create_dir(&share)?;
        let journal = bulkhead_workers::p9::journal::new_journal()?;
        let (first, connection) = launch_journaled(&share, &journal)?;
        let (device, inflight, _client) = attached_tracked(connection)?;

        let mut d = device.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let memory = d.device.memory.clone();
        let slots = memory.allocate(u64::from(2 * PAIRS) * 512, 8)?;
        let mut expected = std::collections::BTreeMap::new();
        for i in 0..2 * PAIRS {
            let tag = 100 + i;
            let frame = if i % 2 == 0 {
                let name = format!("dir{i}");
                let body = Body::new().u32(ROOT_FID).str(&name).u32(0o755).u32(0);
                bulkhead_tests::p9::frame(72, tag, &body.0)
            } else {
                bulkhead_tests::p9::frame(24, tag, &Body::new().u32(ROOT_FID).u64(0x7ff).0)
            };
            let request = vm_memory::GuestAddress(slots.0 + u64::from(i) * 512);
            let reply = vm_memory::GuestAddress(request.0 + 256);
            memory.write(request, &frame)?;
            let head = d.device.queues[0].post(&[
                Buffer::readable(request, frame.len() as u32),
                Buffer::writable(reply, 256),
            ])?;
            expected.insert(head, (i, reply));
        }
        d.device.queues[0].kick()?;
        std::thread::sleep(Duration::from_micros(200 * attempt));
        first.kill()?;
        let mut answered: Vec<u16> = d.device.queues[0]
            .collect_used()?
            .iter()
            .map(|u| u.id as u16)
            .collect();
        let before = answered.len();
        // Best: a kill between completions, some answered and some left.
        if before == expected.len() || (before == 0 && attempt < 7) {
            continue;
        }
        let (second, connection) = launch_journaled(&share, &journal)?;
        d.replace(connection, &inflight)?;
        let rest = d.device.queues[0].wait_used(expected.len() - before, TIMEOUT)?;
        answered.extend(rest.iter().map(|u| u.id as u16));
        std::thread::sleep(Duration::from_millis(100));
        ensure!(
            d.device.queues[0].collect_used()?.is_empty(),
            "a request answered twice"
        );
        let mut sorted = answered.clone();
        sorted.sort_unstable();
        sorted.dedup();
        ensure!(sorted.len() == expected.len(), "answers {answered:?}");
        let mut repeats = 0;
        for (i, reply) in expected.values() {
            let bytes = memory.read(*reply, 11)?;
            let kind = bytes[4];
            let tag = u16::from_le_bytes([bytes[5], bytes[6]]);
            ensure!(tag == 100 + i, "request {i} answered with tag {tag}");
            let errno = u32::from_le_bytes([bytes[7], bytes[8], bytes[9], bytes[10]]);
            match (i % 2, kind) {
                (0, 73) | (1, 25) => {}
                (0, 7) if errno == libc::EEXIST as u32 => repeats += 1,
                _ => bail!("request {i}: reply type {kind}, errno {errno}"),
            }
        }
        for i in (0..2 * PAIRS).step_by(2) {
            ensure!(share.join(format!("dir{i}")).is_dir(), "dir{i} missing");
        }
        ensure!(second.is_running(), "{}", second.stderr());
        eprintln!(
            "attempt {attempt}: {before} of {} answered before the kill, {repeats} mkdirs \
             replayed after taking effect (EEXIST)",
            expected.len()
        );
        return Ok(());
    }
    bail!("the kill never landed before every request was answered")
}
