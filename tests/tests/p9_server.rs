//! `bulkhead-worker p9` over its debug transport (9P on a Unix socket): driven by diod's
//! real clients (`diodls`, `diodcat`, `diodload`) and by the small client in
//! `bulkhead_tests::p9` for the operations they do not cover, escape attempts and bad input.
//!
//! Needs the worker binary (`cargo build --workspace` first, same profile as the tests) and
//! diod's tools (`bash tests/lab/install-packages.sh` installs the `diod` package).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::p9::{flags, frame, setattr, t, Body, Client, P9Error, P9Server, NOTAG};

const ROOT_FID: u32 = 0;
const MSIZE: u32 = 64 * 1024;

fn start() -> Result<P9Server> {
    P9Server::start(false).context("starting bulkhead-worker p9")
}

/// The server must still be running and never have panicked.
fn assert_alive(server: &P9Server) -> Result<()> {
    ensure!(
        server.worker.is_running(),
        "the server died:\n{}",
        server.worker.stderr()
    );
    ensure!(
        !server.worker.stderr().contains("panicked"),
        "the server panicked:\n{}",
        server.worker.stderr()
    );
    // And it still serves a new client.
    let mut client = server.mount()?;
    client.getattr(ROOT_FID)?;
    Ok(())
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
) -> Result<i32> {
    match result {
        Err(P9Error::Lerror(e)) => Ok(e as i32),
        other => bail!("{what}: expected an Rlerror, got {other:?}"),
    }
}

/// A walk of `names` must not get to the end: an Rlerror, or a partial Rwalk (the qids
/// up to the name that failed), which leaves `newfid` unused.
fn walk_fails(c: &mut Client, newfid: u32, names: &[&str]) -> Result<()> {
    match c.walk(ROOT_FID, newfid, names) {
        Err(P9Error::Lerror(_)) => {}
        Ok(qids) if qids.len() < names.len() => {}
        other => bail!("walk {names:?}: {other:?}"),
    }
    expect_errno(c.clunk(newfid), libc::EBADF, "the fid of a failed walk")
}

/// Runs one of diod's tools (`/usr/sbin/<tool>`) with a deadline.
fn diod_tool(tool: &str, args: &[&str]) -> Result<Output> {
    let path = ["/usr/sbin", "/usr/bin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.exists())
        .with_context(|| {
            format!("{tool} not found: install diod (bash tests/lab/install-packages.sh)")
        })?;
    let child = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", path.display()))?;
    // Output is collected while the tool runs (a full pipe would stall it).
    let pid = child.id() as libc::pid_t;
    let (done, finished) = mpsc::channel();
    thread::spawn(move || done.send(child.wait_with_output()));
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => Ok(output?),
        Err(_) => {
            // SAFETY: kill(2) of our own child, which has not been reaped yet (its
            // waiter has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = finished.recv();
            bail!("{tool} {args:?} still running after 60 s")
        }
    }
}

fn stdout_of(output: &Output, what: &str) -> Result<String> {
    ensure!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Bytes that differ from one offset to the next, so misplaced data shows.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------- diod's clients

#[test]
fn diodls_lists_the_share() -> Result<()> {
    let server = start()?;
    fs::write(server.share.join("hello.txt"), "hello\n")?;
    fs::create_dir(server.share.join("sub"))?;
    fs::write(server.share.join("sub/inner.txt"), "inner\n")?;
    let socket = server.socket_arg();

    let listing = stdout_of(
        &diod_tool("diodls", &["-s", &socket, "-t", "30"])?,
        "diodls",
    )?;
    let names: BTreeSet<&str> = listing.lines().collect();
    ensure!(
        names == BTreeSet::from(["hello.txt", "sub"]),
        "diodls listed {names:?}"
    );

    let long = stdout_of(
        &diod_tool("diodls", &["-s", &socket, "-t", "30", "-l", "sub"])?,
        "diodls -l sub",
    )?;
    ensure!(
        long.lines()
            .any(|l| l.starts_with("-rw") && l.contains(" 6 ") && l.ends_with("inner.txt")),
        "diodls -l sub:\n{long}"
    );
    assert_alive(&server)
}

#[test]
fn diodcat_reads_files_at_several_msizes() -> Result<()> {
    let server = start()?;
    let big = pattern(3 * 1024 * 1024 + 123, 7);
    fs::write(server.share.join("big"), &big)?;
    fs::create_dir(server.share.join("d"))?;
    fs::write(server.share.join("d/small"), "small file\n")?;
    let socket = server.socket_arg();
    for msize in ["8192", "65536", "524288", "1048576"] {
        let output = diod_tool("diodcat", &["-s", &socket, "-t", "30", "-m", msize, "big"])?;
        ensure!(
            output.status.success(),
            "diodcat -m {msize}: {} after {} bytes: {}",
            output.status,
            output.stdout.len(),
            String::from_utf8_lossy(&output.stderr)
        );
        ensure!(
            output.stdout == big,
            "diodcat -m {msize} read {} bytes that differ",
            output.stdout.len()
        );
    }
    let small = stdout_of(
        &diod_tool("diodcat", &["-s", &socket, "-t", "30", "d/small"])?,
        "diodcat d/small",
    )?;
    ensure!(small == "small file\n");
    let missing = diod_tool("diodcat", &["-s", &socket, "-t", "30", "nope"])?;
    ensure!(
        !missing.status.success(),
        "diodcat of a missing file succeeded"
    );
    assert_alive(&server)
}

#[test]
fn diodload_runs_io_and_getattr_load_on_parallel_connections() -> Result<()> {
    let server = start()?;
    // diodload reads "zero" and writes "null" in the attached directory.
    fs::write(server.share.join("zero"), pattern(256 * 1024, 3))?;
    fs::write(server.share.join("null"), "")?;
    let socket = server.socket_arg();
    let io = diod_tool("diodload", &["-s", &socket, "-r", "1", "-n", "8"])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&io.stdout),
        String::from_utf8_lossy(&io.stderr)
    );
    ensure!(
        io.status.success() && text.contains("ops/s"),
        "diodload: {text}"
    );
    ensure!(!text.contains("error"), "diodload: {text}");
    // It wrote msize bytes at offset 0 of null.
    ensure!(
        fs::metadata(server.share.join("null"))?.len() > 0,
        "diodload wrote nothing"
    );

    let getattr = diod_tool("diodload", &["-s", &socket, "-r", "1", "-n", "4", "-g"])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&getattr.stdout),
        String::from_utf8_lossy(&getattr.stderr)
    );
    ensure!(
        getattr.status.success() && text.contains("ops/s") && !text.contains("error"),
        "diodload -g: {text}"
    );
    assert_alive(&server)
}

#[test]
fn diodcat_never_reads_through_a_symlink_out_of_the_share() -> Result<()> {
    let server = start()?;
    std::os::unix::fs::symlink("/etc/passwd", server.share.join("passwd"))?;
    std::os::unix::fs::symlink("/etc", server.share.join("etc"))?;
    let socket = server.socket_arg();
    for path in ["passwd", "etc/passwd", "etc/hostname"] {
        let output = diod_tool("diodcat", &["-s", &socket, "-t", "30", path])?;
        ensure!(
            !output.status.success(),
            "diodcat {path} succeeded: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        ensure!(
            !String::from_utf8_lossy(&output.stdout).contains("root:"),
            "diodcat {path} leaked"
        );
    }
    let listing = diod_tool("diodls", &["-s", &socket, "-t", "30", "etc"])?;
    ensure!(
        !listing.status.success() && listing.stdout.is_empty(),
        "diodls etc listed the host's /etc: {}",
        String::from_utf8_lossy(&listing.stdout)
    );
    // `diodls -l` stats each entry through a walk: `etc` is the link itself, not /etc.
    let long = stdout_of(
        &diod_tool("diodls", &["-s", &socket, "-t", "30", "-l"])?,
        "diodls -l",
    )?;
    ensure!(
        long.lines()
            .any(|l| l.ends_with(" etc") && l.starts_with('-')),
        "diodls -l:\n{long}"
    );
    assert_alive(&server)
}

#[test]
fn bad_arguments_are_one_clear_error() -> Result<()> {
    let scratch = bulkhead_tests::micro::ScratchDir::new("p9args")?;
    let file = scratch.write("file", b"not a directory")?;
    let socket = format!("unix:{}", scratch.path().join("s.sock").display());
    let missing = scratch.path().join("missing");
    for (args, status, mentions) in [
        (
            vec![
                "p9",
                "--listen",
                &socket,
                "--dir",
                missing.to_str().context("path")?,
            ],
            1,
            "--dir",
        ),
        (
            vec![
                "p9",
                "--listen",
                &socket,
                "--dir",
                file.to_str().context("path")?,
            ],
            1,
            "--dir",
        ),
        (
            vec!["p9", "--listen", "/no/scheme.sock", "--dir", "/"],
            2,
            "unix:PATH",
        ),
        (vec!["p9", "--dir", "/"], 2, "--listen"),
    ] {
        let output = Command::new(bulkhead_tests::vhost::worker_process::worker_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(status) && stderr.contains(mentions),
            "{args:?}: {} with {stderr}",
            output.status
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- operations

#[test]
fn version_negotiates_msize_and_refuses_other_protocols() -> Result<()> {
    let server = start()?;
    let mut c = Client::connect(&server.socket)?;
    // Before Tversion nothing else is served.
    expect_errno(c.attach(0, 0), libc::EPROTO, "attach before version")?;
    let (msize, version) = c.version(4 * 1024 * 1024, "9P2000.L")?;
    ensure!(
        msize == 512 * 1024 && version == "9P2000.L",
        "got {msize} {version}"
    );
    let (_, version) = c.version(8192, "9P2000.u")?;
    ensure!(version == "unknown", "9P2000.u answered {version}");
    expect_errno(c.version(100, "9P2000.L"), libc::EINVAL, "msize 100")?;
    let (msize, _) = c.version(16384, "9P2000.L")?;
    ensure!(msize == 16384);
    c.attach(0, 0)?;
    // Tauth: no authentication, said as diod's clients expect.
    expect_errno(
        c.rpc(t::AUTH, Body::new().u32(5).str("u").str("").u32(0)),
        libc::ENOENT,
        "auth",
    )?;
    assert_alive(&server)
}

#[test]
fn create_write_read_back_and_getattr() -> Result<()> {
    let server = start()?;
    let mut c = server.mount()?;
    c.walk(ROOT_FID, 1, &[] as &[&str])?;
    let qid = c.lcreate(
        1,
        "file",
        flags::RDWR | flags::CREATE | flags::EXCL,
        0o640,
        0,
    )?;
    ensure!(!qid.is_dir());
    let data = pattern(200_000, 1);
    let mut offset = 0;
    for chunk in data.chunks(MSIZE as usize - 23) {
        ensure!(c.write(1, offset, chunk)? as usize == chunk.len());
        offset += chunk.len() as u64;
    }
    c.fsync(1)?;
    ensure!(c.read_all(1)? == data, "read back differs");
    c.clunk(1)?;
    ensure!(
        fs::read(server.share.join("file"))? == data,
        "the host sees other bytes"
    );
    let meta = fs::metadata(server.share.join("file"))?;
    ensure!(meta.mode() & 0o7777 == 0o640, "mode {:o}", meta.mode());

    c.walk(ROOT_FID, 2, &["file"])?;
    let attr = c.getattr(2)?;
    ensure!(attr.size == data.len() as u64 && attr.qid == qid && attr.mode & 0o170000 == 0o100000);
    // A second create of the same name with EXCL fails; without it, it opens.
    c.walk(ROOT_FID, 3, &[] as &[&str])?;
    expect_errno(
        c.lcreate(
            3,
            "file",
            flags::RDWR | flags::CREATE | flags::EXCL,
            0o600,
            0,
        ),
        libc::EEXIST,
        "exclusive create of an existing file",
    )?;
    c.lopen(2, flags::RDONLY)?;
    ensure!(c.read(2, 10, 10)? == data[10..20]);
    // Reading past the end is an empty read.
    ensure!(c.read(2, 1 << 40, 100)?.is_empty());
    expect_errno(c.write(2, 0, b"x"), libc::EBADF, "write to a read-only fid")?;
    // Opening twice is an error; an unopened fid cannot be read.
    expect_error(c.lopen(2, flags::RDONLY), "second lopen")?;
    c.walk(ROOT_FID, 4, &["file"])?;
    expect_errno(c.read(4, 0, 10), libc::EBADF, "read of an unopened fid")?;
    // Directory opened as a file and a file as a directory.
    c.walk(ROOT_FID, 5, &[] as &[&str])?;
    expect_errno(
        c.lopen(5, flags::RDWR),
        libc::EISDIR,
        "directory opened for writing",
    )?;
    expect_errno(
        c.lopen(4, flags::DIRECTORY),
        libc::ENOTDIR,
        "file opened as a directory",
    )?;
    // Ownership: the worker runs sandboxed without capabilities, so even as root the
    // attaching user's uid and the create's gid cannot pass through: files belong to the
    // user running the worker, and Tlcreate's gid is accepted and ignored.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut other = Client::connect(&server.socket)?;
        other.version(MSIZE, "9P2000.L")?;
        other.attach(0, 1234)?;
        other.lcreate(0, "owned", flags::WRONLY | flags::CREATE, 0o600, 4321)?;
        let meta = fs::metadata(server.share.join("owned"))?;
        ensure!(
            (meta.uid(), meta.gid()) == (0, 0),
            "owner {}:{}",
            meta.uid(),
            meta.gid()
        );
        // Opening an existing file through Tlcreate (no O_EXCL) leaves it alone.
        other.attach(1, 1234)?;
        other.lcreate(1, "file", flags::RDONLY | flags::CREATE, 0o600, 4321)?;
        let meta = fs::metadata(server.share.join("file"))?;
        ensure!(
            meta.mode() & 0o7777 == 0o640,
            "an existing file's mode changed"
        );
    }
    assert_alive(&server)
}

#[test]
fn mkdir_symlink_link_rename_mknod_and_unlink() -> Result<()> {
    let server = start()?;
    let share = server.share.clone();
    let mut c = server.mount()?;
    let qid = c.mkdir(ROOT_FID, "dir", 0o750)?;
    ensure!(qid.is_dir());
    ensure!(fs::metadata(share.join("dir"))?.is_dir());
    ensure!(fs::metadata(share.join("dir"))?.mode() & 0o7777 == 0o750);
    expect_errno(c.mkdir(ROOT_FID, "dir", 0o755), libc::EEXIST, "mkdir twice")?;

    c.walk(ROOT_FID, 1, &["dir"])?;
    c.lcreate(1, "a", flags::WRONLY | flags::CREATE, 0o644, 0)?;
    c.write(1, 0, b"contents of a")?;
    c.clunk(1)?;

    // symlink + readlink
    c.walk(ROOT_FID, 2, &["dir"])?;
    let qid = c.symlink(2, "link", "a")?;
    ensure!(qid.is_symlink());
    ensure!(fs::read_link(share.join("dir/link"))? == Path::new("a"));
    c.walk(2, 3, &["link"])?;
    ensure!(c.readlink(3)? == b"a");
    expect_errno(c.readlink(2), libc::EINVAL, "readlink of a directory")?;

    // hard link
    c.walk(2, 4, &["a"])?;
    c.link(ROOT_FID, 4, "hard")?;
    ensure!(fs::read(share.join("hard"))? == b"contents of a");
    ensure!(fs::metadata(share.join("dir/a"))?.nlink() == 2);
    expect_errno(
        c.link(ROOT_FID, 2, "dirlink"),
        libc::EPERM,
        "hard link to a directory",
    )?;

    // Trename moves the fid with it: reading through it afterwards finds the file.
    c.rename(4, ROOT_FID, "moved")?;
    ensure!(!share.join("dir/a").exists() && share.join("moved").exists());
    c.lopen(4, flags::RDONLY)?;
    ensure!(c.read_all(4)? == b"contents of a");

    // Trenameat of a directory; fids at and below it follow.
    c.walk(ROOT_FID, 5, &["dir"])?;
    c.renameat(ROOT_FID, "dir", ROOT_FID, "dir2")?;
    ensure!(share.join("dir2/link").symlink_metadata().is_ok());
    ensure!(
        c.walk(5, 10, &[".."])? == vec![c.getattr(ROOT_FID)?.qid],
        "`..` of the renamed directory"
    );
    c.walk(5, 6, &[] as &[&str])?;
    // Opening reopens by the fid's path, which must now be dir2.
    c.lopen(6, flags::RDONLY | flags::DIRECTORY)?;
    let names: BTreeSet<Vec<u8>> = c
        .readdir_all(6, 4096)?
        .into_iter()
        .map(|e| e.name)
        .collect();
    ensure!(
        names.contains(b"link".as_slice()),
        "readdir after rename: {names:?}"
    );

    // mknod: a FIFO (and a regular file) always; a device node only as root.
    let qid = c.mknod(ROOT_FID, "fifo", libc::S_IFIFO | 0o600, 0, 0)?;
    ensure!(!qid.is_dir());
    ensure!(fs::symlink_metadata(share.join("fifo"))?.mode() & libc::S_IFMT == libc::S_IFIFO);
    c.walk(ROOT_FID, 7, &["fifo"])?;
    expect_errno(
        c.lopen(7, flags::RDONLY),
        libc::EOPNOTSUPP,
        "opening a FIFO on the host",
    )?;

    // unlinkat of a file, of a non-empty and then an empty directory, and Tremove.
    c.unlinkat(ROOT_FID, "hard", 0)?;
    ensure!(!share.join("hard").exists());
    expect_errno(
        c.unlinkat(ROOT_FID, "dir2", 0x200),
        libc::ENOTEMPTY,
        "rmdir of a full directory",
    )?;
    c.walk(ROOT_FID, 8, &["dir2"])?;
    c.unlinkat(8, "link", 0)?;
    c.unlinkat(ROOT_FID, "dir2", 0x200)?;
    ensure!(!share.join("dir2").exists());
    c.walk(ROOT_FID, 9, &["moved"])?;
    c.remove(9)?;
    ensure!(!share.join("moved").exists());
    // Tremove clunked fid 9.
    expect_errno(c.clunk(9), libc::EBADF, "clunk after remove")?;
    expect_errno(
        c.unlinkat(ROOT_FID, "nope", 0),
        libc::ENOENT,
        "unlink of a missing name",
    )?;
    assert_alive(&server)
}

#[test]
fn setattr_changes_mode_size_and_times() -> Result<()> {
    let server = start()?;
    let path = server.share.join("f");
    fs::write(&path, pattern(10_000, 2))?;
    let mut c = server.mount()?;
    c.walk(ROOT_FID, 1, &["f"])?;
    c.setattr(1, setattr::MODE, 0o600, 0, 0, 0, (0, 0), (0, 0))?;
    ensure!(fs::metadata(&path)?.permissions().mode() & 0o7777 == 0o600);
    c.setattr(1, setattr::SIZE, 0, 0, 0, 1234, (0, 0), (0, 0))?;
    ensure!(fs::metadata(&path)?.len() == 1234);
    c.setattr(
        1,
        setattr::ATIME | setattr::ATIME_SET | setattr::MTIME | setattr::MTIME_SET,
        0,
        0,
        0,
        0,
        (1_000_000_000, 5),
        (1_100_000_000, 7),
    )?;
    let meta = fs::metadata(&path)?;
    ensure!(
        meta.atime() == 1_000_000_000 && meta.atime_nsec() == 5,
        "atime {}",
        meta.atime()
    );
    ensure!(
        meta.mtime() == 1_100_000_000 && meta.mtime_nsec() == 7,
        "mtime {}",
        meta.mtime()
    );
    let attr = c.getattr(1)?;
    ensure!(attr.mtime == (1_100_000_000, 7) && attr.size == 1234 && attr.mode & 0o7777 == 0o600);
    // MTIME without MTIME_SET: now.
    c.setattr(1, setattr::MTIME, 0, 0, 0, 0, (0, 0), (0, 0))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    ensure!(
        (fs::metadata(&path)?.mtime() - now).abs() < 60,
        "mtime not set to now"
    );
    // chown to the current owner always succeeds (as another user it is ignored unless root).
    let meta = fs::metadata(&path)?;
    c.setattr(
        1,
        setattr::UID | setattr::GID,
        0,
        meta.uid(),
        meta.gid(),
        0,
        (0, 0),
        (0, 0),
    )?;
    // Truncate a directory: EISDIR.
    expect_errno(
        c.setattr(ROOT_FID, setattr::SIZE, 0, 0, 0, 0, (0, 0), (0, 0)),
        libc::EISDIR,
        "truncating a directory",
    )?;
    assert_alive(&server)
}

#[test]
fn readdir_resumes_at_the_offsets_it_returned() -> Result<()> {
    let server = start()?;
    let mut expected = BTreeSet::from([b".".to_vec(), b"..".to_vec()]);
    for i in 0..300 {
        let name = format!("file-with-a-longish-name-{i:04}");
        fs::write(server.share.join(&name), "")?;
        expected.insert(name.into_bytes());
    }
    fs::create_dir(server.share.join("subdir"))?;
    expected.insert(b"subdir".to_vec());
    let mut c = server.mount()?;
    for count in [200u32, 1000, 8192, 60_000] {
        c.walk(ROOT_FID, 1, &[] as &[&str])?;
        c.lopen(1, flags::RDONLY | flags::DIRECTORY)?;
        let entries = c.readdir_all(1, count)?;
        let names: Vec<Vec<u8>> = entries.iter().map(|e| e.name.clone()).collect();
        let unique: BTreeSet<Vec<u8>> = names.iter().cloned().collect();
        ensure!(names.len() == unique.len(), "count {count}: duplicates");
        ensure!(
            unique == expected,
            "count {count}: {} names, expected {}",
            unique.len(),
            expected.len()
        );
        let subdir = entries
            .iter()
            .find(|e| e.name == b"subdir")
            .context("subdir")?;
        ensure!(subdir.qid.is_dir());
        c.clunk(1)?;
    }
    // A count too small for any entry is an error, not an endless empty directory.
    c.walk(ROOT_FID, 2, &[] as &[&str])?;
    c.lopen(2, flags::RDONLY | flags::DIRECTORY)?;
    expect_errno(c.readdir(2, 0, 10), libc::EINVAL, "readdir with count 10")?;
    // Readdir of an unopened fid.
    expect_errno(
        c.readdir(ROOT_FID, 0, 4096),
        libc::EBADF,
        "readdir of an unopened fid",
    )?;
    assert_alive(&server)
}

#[test]
fn xattrs_in_the_user_namespace() -> Result<()> {
    let server = start()?;
    fs::write(server.share.join("f"), "x")?;
    let mut c = server.mount()?;
    c.walk(ROOT_FID, 1, &["f"])?;
    let value = b"a value of the attribute";
    c.xattrcreate(1, "user.test", value.len() as u64, 0)?;
    c.write(1, 0, value)?;
    match c.clunk(1) {
        Err(P9Error::Lerror(e)) if e as i32 == libc::EOPNOTSUPP => {
            eprintln!("this file system has no user xattrs; skipping the rest");
            return assert_alive(&server);
        }
        other => other?,
    }
    c.walk(ROOT_FID, 2, &["f"])?;
    let size = c.xattrwalk(2, 3, "user.test")?;
    ensure!(size == value.len() as u64);
    ensure!(c.read(3, 0, 4096)? == value);
    c.clunk(3)?;
    let size = c.xattrwalk(2, 4, "")?;
    let list = c.read(4, 0, 4096)?;
    ensure!(size as usize == list.len());
    ensure!(
        list.split(|&b| b == 0).any(|n| n == b"user.test"),
        "list {list:?}"
    );
    c.clunk(4)?;
    expect_errno(
        c.xattrwalk(2, 5, "user.missing"),
        libc::ENODATA,
        "missing xattr",
    )?;
    // An empty value removes the attribute (as the Linux client's removexattr does).
    c.walk(ROOT_FID, 7, &["f"])?;
    c.xattrcreate(7, "user.test", 0, 2)?;
    c.clunk(7)?;
    expect_errno(
        c.xattrwalk(2, 5, "user.test"),
        libc::ENODATA,
        "removed xattr",
    )?;
    // Only user.*; a size beyond the kernel's maximum; a short value fails at clunk.
    expect_errno(
        c.xattrcreate(2, "trusted.x", 1, 0),
        libc::EOPNOTSUPP,
        "trusted xattr",
    )?;
    expect_errno(
        c.xattrcreate(2, "security.capability", 1, 0),
        libc::EOPNOTSUPP,
        "security xattr",
    )?;
    c.walk(ROOT_FID, 6, &["f"])?;
    expect_errno(
        c.xattrcreate(6, "user.big", 1 << 20, 0),
        libc::E2BIG,
        "1 MiB xattr",
    )?;
    c.xattrcreate(6, "user.short", 10, 0)?;
    c.write(6, 0, b"abc")?;
    expect_error(c.clunk(6), "clunk of a short xattr")?;
    assert_alive(&server)
}

#[test]
fn locks_conflict_between_fids_and_getlock_reports_them() -> Result<()> {
    let server = start()?;
    fs::write(server.share.join("f"), "lock me")?;
    let mut c = server.mount()?;
    c.walk(ROOT_FID, 1, &["f"])?;
    c.lopen(1, flags::RDWR)?;
    c.walk(ROOT_FID, 2, &["f"])?;
    c.lopen(2, flags::RDWR)?;
    ensure!(c.lock(1, 1, 0, 100)? == 0, "first write lock");
    ensure!(
        c.lock(2, 1, 50, 10)? == 1,
        "conflicting write lock not blocked"
    );
    ensure!(c.lock(2, 0, 200, 10)? == 0, "a lock elsewhere");
    let (kind, start, length) = c.getlock(2, 1, 0, 0)?;
    ensure!(
        kind == 1 && start == 0 && length == 100,
        "getlock: {kind} {start} {length}"
    );
    ensure!(c.lock(1, 2, 0, 100)? == 0, "unlock");
    ensure!(c.lock(2, 1, 50, 10)? == 0, "lock after unlock");
    let (kind, ..) = c.getlock(1, 0, 500, 10)?;
    ensure!(kind == 2, "getlock with no conflict said {kind}");
    // A lock on an unopened fid.
    c.walk(ROOT_FID, 3, &["f"])?;
    expect_errno(c.lock(3, 1, 0, 1), libc::EBADF, "lock of an unopened fid")?;
    assert_alive(&server)
}

#[test]
fn statfs_fsync_and_flush() -> Result<()> {
    let server = start()?;
    let mut c = server.mount()?;
    let (bsize, blocks, namelen) = c.statfs(ROOT_FID)?;
    ensure!(
        bsize > 0 && blocks > 0 && namelen >= 255,
        "statfs {bsize} {blocks} {namelen}"
    );
    c.walk(ROOT_FID, 1, &[] as &[&str])?;
    c.lcreate(1, "f", flags::WRONLY | flags::CREATE, 0o644, 0)?;
    c.write(1, 0, b"data")?;
    c.fsync(1)?;
    expect_errno(c.fsync(ROOT_FID), libc::EBADF, "fsync of an unopened fid")?;
    // A flush of a tag not in flight, and of NOTAG, answer at once.
    c.flush(1234)?;
    c.flush(NOTAG)?;
    // Requests with a flush for one of them right behind: the flushed request's reply
    // (it is answered here: nothing takes long) always comes before Rflush.
    fs::write(server.share.join("big"), pattern(512 * 1024, 8))?;
    c.walk(ROOT_FID, 2, &["big"])?;
    c.lopen(2, flags::RDONLY)?;
    for round in 0..200 {
        let tags: Vec<u16> = (0..4).map(|_| c.tag()).collect();
        let flush_tag = c.tag();
        let flushed = tags[round % 4];
        let mut batch = Vec::new();
        for &tag in &tags {
            batch.extend(frame(
                t::READ,
                tag,
                &Body::new().u32(2).u64(0).u32(60_000).0,
            ));
        }
        batch.extend(frame(t::FLUSH, flush_tag, &Body::new().u16(flushed).0));
        c.send_raw(&batch)?;
        let mut seen_flushed = false;
        for _ in 0..5 {
            let reply = c.recv()?.context("the server closed the connection")?;
            if reply.tag == flushed {
                seen_flushed = true;
            }
            if reply.tag == flush_tag {
                ensure!(
                    reply.kind == t::FLUSH + 1,
                    "Tflush answered with type {}",
                    reply.kind
                );
                ensure!(
                    seen_flushed,
                    "round {round}: Rflush overtook the reply to tag {flushed}"
                );
            }
        }
    }
    assert_alive(&server)
}

#[test]
fn read_only_share_refuses_every_change() -> Result<()> {
    let scratch = bulkhead_tests::micro::ScratchDir::new("p9ro")?;
    let share = scratch.path().join("share");
    fs::create_dir(&share)?;
    fs::write(share.join("f"), "read only")?;
    fs::create_dir(share.join("d"))?;
    let server = P9Server::serve(scratch, share.clone(), true)?;
    let mut c = server.mount()?;
    c.walk(ROOT_FID, 1, &["f"])?;
    expect_errno(c.lopen(1, flags::RDWR), libc::EROFS, "open for writing")?;
    expect_errno(
        c.lopen(1, flags::RDONLY | flags::TRUNC),
        libc::EROFS,
        "open with O_TRUNC",
    )?;
    c.lopen(1, flags::RDONLY)?;
    ensure!(c.read_all(1)? == b"read only");
    expect_errno(
        c.setattr(1, setattr::MODE, 0o777, 0, 0, 0, (0, 0), (0, 0)),
        libc::EROFS,
        "chmod",
    )?;
    c.walk(ROOT_FID, 2, &[] as &[&str])?;
    expect_errno(
        c.lcreate(2, "new", flags::WRONLY | flags::CREATE, 0o644, 0),
        libc::EROFS,
        "create",
    )?;
    expect_errno(c.mkdir(ROOT_FID, "new", 0o755), libc::EROFS, "mkdir")?;
    expect_errno(c.symlink(ROOT_FID, "new", "f"), libc::EROFS, "symlink")?;
    expect_errno(
        c.mknod(ROOT_FID, "new", libc::S_IFIFO | 0o600, 0, 0),
        libc::EROFS,
        "mknod",
    )?;
    expect_errno(c.link(ROOT_FID, 1, "new"), libc::EROFS, "link")?;
    expect_errno(
        c.renameat(ROOT_FID, "f", ROOT_FID, "g"),
        libc::EROFS,
        "renameat",
    )?;
    expect_errno(c.rename(1, ROOT_FID, "g"), libc::EROFS, "rename")?;
    expect_errno(c.unlinkat(ROOT_FID, "f", 0), libc::EROFS, "unlinkat")?;
    expect_errno(c.xattrcreate(1, "user.x", 1, 0), libc::EROFS, "xattrcreate")?;
    c.walk(ROOT_FID, 3, &["d"])?;
    expect_errno(c.remove(3), libc::EROFS, "remove")?;
    ensure!(share.join("f").exists() && share.join("d").exists() && !share.join("new").exists());
    ensure!(fs::read(share.join("f"))? == b"read only");
    assert_alive(&server)
}

#[test]
fn many_requests_in_flight_on_one_connection_all_get_answers() -> Result<()> {
    let server = start()?;
    fs::write(server.share.join("f"), pattern(100_000, 5))?;
    let mut c = server.mount()?;
    c.walk(ROOT_FID, 1, &["f"])?;
    c.lopen(1, flags::RDONLY)?;
    let mut batch = Vec::new();
    let mut tags = BTreeSet::new();
    for i in 0..200u64 {
        let tag = c.tag();
        tags.insert(tag);
        if i % 2 == 0 {
            batch.extend(frame(
                t::GETATTR,
                tag,
                &Body::new().u32(ROOT_FID).u64(0x7ff).0,
            ));
        } else {
            batch.extend(frame(
                t::READ,
                tag,
                &Body::new().u32(1).u64(i * 100).u32(4096).0,
            ));
        }
    }
    c.send_raw(&batch)?;
    for _ in 0..200 {
        let reply = c.recv()?.context("the server closed the connection")?;
        ensure!(reply.kind != t::RLERROR, "an Rlerror for tag {}", reply.tag);
        ensure!(tags.remove(&reply.tag), "unexpected tag {}", reply.tag);
    }
    ensure!(tags.is_empty());
    assert_alive(&server)
}

#[test]
fn as_an_ordinary_user_files_belong_to_it_and_chown_is_accepted() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot start the server as another user; skipped");
        return Ok(());
    }
    const NOBODY: u32 = 65534;
    let server =
        P9Server::start_as(NOBODY, NOBODY).context("starting bulkhead-worker p9 as nobody")?;
    let share = server.share.clone();
    fs::write(share.join("roots"), "root's secret")?;
    fs::set_permissions(share.join("roots"), fs::Permissions::from_mode(0o600))?;
    let mut c = Client::connect(&server.socket)?;
    c.version(MSIZE, "9P2000.L")?;
    // The client says it is uid 1234 and asks for gid 4321: the files are nobody's anyway.
    c.attach(ROOT_FID, 1234)?;
    c.walk(ROOT_FID, 1, &[] as &[&str])?;
    c.lcreate(1, "f", flags::RDWR | flags::CREATE, 0o640, 4321)?;
    c.write(1, 0, b"data")?;
    c.mkdir(ROOT_FID, "d", 0o700)?;
    c.symlink(ROOT_FID, "s", "f")?;
    for name in ["f", "d", "s"] {
        let meta = fs::symlink_metadata(share.join(name))?;
        ensure!(
            (meta.uid(), meta.gid()) == (NOBODY, NOBODY),
            "{name} is {}:{}",
            meta.uid(),
            meta.gid()
        );
    }
    // chown is accepted and changes nothing.
    c.setattr(1, setattr::UID | setattr::GID, 0, 0, 0, 0, (0, 0), (0, 0))?;
    let meta = fs::metadata(share.join("f"))?;
    ensure!((meta.uid(), meta.gid()) == (NOBODY, NOBODY));
    // chmod of its own file works; the host's permissions still apply to others' files.
    c.setattr(1, setattr::MODE, 0o600, 0, 0, 0, (0, 0), (0, 0))?;
    ensure!(fs::metadata(share.join("f"))?.mode() & 0o7777 == 0o600);
    c.walk(ROOT_FID, 2, &["roots"])?;
    expect_errno(
        c.lopen(2, flags::RDONLY),
        libc::EACCES,
        "opening root's 0600 file",
    )?;
    expect_errno(
        c.setattr(2, setattr::MODE, 0o666, 0, 0, 0, (0, 0), (0, 0)),
        libc::EPERM,
        "chmod of root's file",
    )?;
    // Device nodes only as root; a FIFO is fine.
    expect_errno(
        c.mknod(ROOT_FID, "null", libc::S_IFCHR | 0o666, 1, 3),
        libc::EPERM,
        "mknod of a device",
    )?;
    c.mknod(ROOT_FID, "fifo", libc::S_IFIFO | 0o600, 0, 0)?;
    assert_alive(&server)
}

// ---------------------------------------------------------------- confinement

#[test]
fn symlink_to_etc_passwd_is_never_followed() -> Result<()> {
    let server = start()?;
    std::os::unix::fs::symlink("/etc/passwd", server.share.join("passwd"))?;
    std::os::unix::fs::symlink("/etc", server.share.join("etc"))?;
    std::os::unix::fs::symlink("../../../../../../etc/passwd", server.share.join("rel"))?;
    let mut c = server.mount()?;
    for (fid, name) in [(1, "passwd"), (2, "rel")] {
        let qids = c.walk(ROOT_FID, fid, &[name])?;
        ensure!(
            qids.len() == 1 && qids[0].is_symlink(),
            "{name} walked to {qids:?}"
        );
        expect_error(c.lopen(fid, flags::RDONLY), &format!("lopen of {name}"))?;
        expect_error(c.read(fid, 0, 4096), &format!("read of {name}"))?;
        // Its text is readable, and is only text.
        ensure!(!c.readlink(fid)?.is_empty());
        expect_error(c.xattrwalk(fid, 10 + fid, ""), "xattrs through a symlink")?;
        expect_error(
            c.setattr(fid, setattr::SIZE, 0, 0, 0, 0, (0, 0), (0, 0)),
            "truncate through a symlink",
        )?;
    }
    // Walking through a symlinked directory fails at the link.
    walk_fails(&mut c, 3, &["etc", "passwd"])?;
    walk_fails(&mut c, 3, &["etc", "hostname"])?;
    walk_fails(&mut c, 3, &["passwd", "x"])?;
    // Creating beneath the symlink fails too.
    c.walk(ROOT_FID, 4, &["etc"])?;
    expect_error(
        c.lcreate(
            4,
            "bulkhead-p9-test",
            flags::WRONLY | flags::CREATE,
            0o644,
            0,
        ),
        "create in a symlink",
    )?;
    expect_error(c.mkdir(4, "bulkhead-p9-test", 0o755), "mkdir in a symlink")?;
    ensure!(!Path::new("/etc/bulkhead-p9-test").exists());
    // chmod through the symlink must not touch /etc/passwd.
    let before = fs::metadata("/etc/passwd")?.mode();
    let _ = c.setattr(1, setattr::MODE, 0o777, 0, 0, 0, (0, 0), (0, 0));
    ensure!(
        fs::metadata("/etc/passwd")?.mode() == before,
        "/etc/passwd's mode changed"
    );
    assert_alive(&server)
}

#[test]
fn dotdot_walks_stay_inside_the_share() -> Result<()> {
    let server = start()?;
    fs::write(server.outside().join("outside.txt"), "outside")?;
    fs::create_dir(server.share.join("sub"))?;
    fs::write(server.share.join("inside.txt"), "inside")?;
    let mut c = server.mount()?;
    let root = c.getattr(ROOT_FID)?.qid;
    for (fid, path) in [
        (1, vec![".."]),
        (2, vec!["..", "..", "..", "..", ".."]),
        (3, vec!["sub", "..", ".."]),
        (4, vec!["sub", "..", "..", "sub", "..", ".."]),
    ] {
        let qids = c.walk(ROOT_FID, fid, &path)?;
        ensure!(
            qids.last() == Some(&root),
            "{path:?} ended at {:?}, not the root {root:?}",
            qids.last()
        );
    }
    for names in [
        vec!["..", "outside.txt"],
        vec!["sub", "..", "..", "outside.txt"],
        vec!["..", "..", "share"],
    ] {
        walk_fails(&mut c, 5, &names)?;
    }
    // The directory reached by `..` lists the share, not its parent.
    c.lopen(2, flags::RDONLY | flags::DIRECTORY)?;
    let names: BTreeSet<Vec<u8>> = c
        .readdir_all(2, 8192)?
        .into_iter()
        .map(|e| e.name)
        .collect();
    ensure!(
        names.contains(b"inside.txt".as_slice()) && !names.contains(b"outside.txt".as_slice()),
        "{names:?}"
    );
    // Names that are paths are refused everywhere.
    expect_errno(
        c.walk(ROOT_FID, 6, &["../outside.txt"]),
        libc::EINVAL,
        "walk ../outside.txt",
    )?;
    expect_errno(c.walk(ROOT_FID, 6, &["/etc"]), libc::EINVAL, "walk /etc")?;
    assert_alive(&server)
}

#[test]
fn rename_and_link_cannot_leave_the_share() -> Result<()> {
    let server = start()?;
    fs::write(server.share.join("f"), "secret of the share")?;
    let outside = server.outside().to_path_buf();
    let mut c = server.mount()?;
    c.walk(ROOT_FID, 1, &["f"])?;
    c.walk(ROOT_FID, 2, &[".."])?; // the root again
    for name in ["../escaped", "/tmp/escaped", "..", ".", "", "a/b"] {
        expect_errno(
            c.rename(1, ROOT_FID, name),
            libc::EINVAL,
            &format!("rename to {name:?}"),
        )?;
        expect_errno(
            c.rename(1, 2, name),
            libc::EINVAL,
            &format!("rename via .. to {name:?}"),
        )?;
        expect_errno(
            c.renameat(ROOT_FID, "f", ROOT_FID, name),
            libc::EINVAL,
            &format!("renameat to {name:?}"),
        )?;
        expect_errno(
            c.link(ROOT_FID, 1, name),
            libc::EINVAL,
            &format!("link to {name:?}"),
        )?;
        expect_errno(
            c.symlink(ROOT_FID, name, "f"),
            libc::EINVAL,
            &format!("symlink named {name:?}"),
        )?;
        expect_errno(
            c.unlinkat(ROOT_FID, name, 0),
            libc::EINVAL,
            &format!("unlinkat {name:?}"),
        )?;
    }
    expect_errno(
        c.renameat(ROOT_FID, "../share/f", ROOT_FID, "g"),
        libc::EINVAL,
        "renameat from a path",
    )?;
    // Renaming the root itself has no parent inside the share to move it in.
    expect_error(
        c.rename(ROOT_FID, ROOT_FID, "rootmoved"),
        "rename of the root",
    )?;
    expect_error(c.remove(2), "remove of the root")?;
    // Rename "into" the symlinked directory /tmp: the target directory fid cannot exist.
    std::os::unix::fs::symlink(&outside, server.share.join("out"))?;
    c.walk(ROOT_FID, 3, &["out"])?;
    expect_errno(
        c.rename(1, 3, "escaped"),
        libc::ENOTDIR,
        "rename into a symlink",
    )?;
    expect_errno(
        c.link(3, 1, "escaped"),
        libc::ENOTDIR,
        "link into a symlink",
    )?;
    expect_errno(
        c.renameat(ROOT_FID, "f", 3, "escaped"),
        libc::ENOTDIR,
        "renameat into a symlink",
    )?;
    let leaked: Vec<_> = fs::read_dir(&outside)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "share" && n != "p9.sock")
        .collect();
    ensure!(leaked.is_empty(), "appeared outside the share: {leaked:?}");
    ensure!(server.share.join("f").exists());
    assert_alive(&server)
}

#[test]
fn symlink_swapped_in_during_walks_never_reaches_outside() -> Result<()> {
    let server = start()?;
    let outside_dir = server.outside().join("secret-dir");
    fs::create_dir(&outside_dir)?;
    fs::write(outside_dir.join("secret"), "OUTSIDE")?;
    let share = server.share.clone();
    fs::create_dir(share.join("d"))?;
    fs::write(share.join("d/secret"), "inside")?;
    std::os::unix::fs::symlink(&outside_dir, share.join("l"))?;
    // And a directory `r` holding etc/passwd, swapped with a symlink to `/`.
    fs::create_dir_all(share.join("r/etc"))?;
    fs::write(share.join("r/etc/passwd"), "inside passwd")?;
    std::os::unix::fs::symlink("/", share.join("rl"))?;

    // Swap each directory with its symlink as fast as possible.
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let c =
            |name: &str| std::ffi::CString::new(share.join(name).as_os_str().as_encoded_bytes());
        let pairs = [(c("d")?, c("l")?), (c("r")?, c("rl")?)];
        thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (a, b) in &pairs {
                    // SAFETY: two NUL-terminated paths; no memory is written.
                    let ret = unsafe {
                        libc::syscall(
                            libc::SYS_renameat2,
                            libc::AT_FDCWD,
                            a.as_ptr(),
                            libc::AT_FDCWD,
                            b.as_ptr(),
                            libc::RENAME_EXCHANGE,
                        )
                    };
                    if ret == 0 {
                        swaps += 1;
                    }
                }
            }
            swaps
        })
    };
    let mut c = server.mount()?;
    let (mut inside_reads, mut failures) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut fid = 10;
    let result = (|| -> Result<()> {
        while Instant::now() < deadline {
            fid += 1;
            // A whole path in one walk, and step by step with an open between.
            match c.walk(ROOT_FID, fid, &["d", "secret"]) {
                Ok(qids) if qids.len() == 2 => match c
                    .lopen(fid, flags::RDONLY)
                    .and_then(|_| c.read(fid, 0, 100))
                {
                    Ok(data) => {
                        ensure!(
                            data == b"inside",
                            "read {:?} through a swapped symlink",
                            String::from_utf8_lossy(&data)
                        );
                        inside_reads += 1;
                    }
                    Err(_) => failures += 1,
                },
                _ => failures += 1,
            }
            let _ = c.clunk(fid);
            // r/etc/passwd, one name per walk from the fid before: each step may land
            // on the symlink to `/`, and must then stop there.
            fid += 1;
            let (start, mid, end) = (fid, fid + 1, fid + 2);
            fid += 2;
            let walked = c.walk(ROOT_FID, start, &["r"]).is_ok()
                && c.walk(start, mid, &["etc"]).is_ok()
                && c.walk(mid, end, &["passwd"]).is_ok();
            if walked {
                match c
                    .lopen(end, flags::RDONLY)
                    .and_then(|_| c.read(end, 0, 100))
                {
                    Ok(data) => {
                        ensure!(
                            data == b"inside passwd",
                            "read {:?} through a symlink to /",
                            String::from_utf8_lossy(&data)
                        );
                        inside_reads += 1;
                    }
                    Err(_) => failures += 1,
                }
            } else {
                failures += 1;
            }
            for f in [start, mid, end] {
                let _ = c.clunk(f);
            }
            fid += 1;
            if c.walk(ROOT_FID, fid, &["r"]).is_ok() {
                if c.lopen(fid, flags::RDONLY | flags::DIRECTORY).is_ok() {
                    if let Ok(entries) = c.readdir_all(fid, 4096) {
                        ensure!(
                            entries
                                .iter()
                                .all(|e| e.name != b"usr" && e.name != b"proc"),
                            "listed the host's /"
                        );
                    }
                }
                let _ = c.clunk(fid);
            }
            fid += 1;
            if c.walk(ROOT_FID, fid, &["d"]).is_ok() {
                if c.lopen(fid, flags::RDONLY | flags::DIRECTORY).is_ok() {
                    if let Ok(entries) = c.readdir_all(fid, 4096) {
                        ensure!(
                            entries
                                .iter()
                                .all(|e| !e.name.starts_with(b"p9.sock") && e.name != b"share"),
                            "listed the directory outside the share"
                        );
                    }
                }
                let _ = c.clunk(fid);
            } else {
                failures += 1;
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper
        .join()
        .map_err(|_| anyhow::anyhow!("the swapper panicked"))?;
    result?;
    eprintln!("{swaps} swaps; {inside_reads} reads inside, {failures} refused walks or opens");
    ensure!(swaps > 0, "the swapper never swapped");
    assert_alive(&server)
}

// ---------------------------------------------------------------- bad input

#[test]
fn truncated_and_overlong_bodies_get_eproto() -> Result<()> {
    let server = start()?;
    let mut c = server.mount()?;
    // A Twalk announcing two names but carrying one.
    let body = Body::new().u32(ROOT_FID).u32(1).u16(2).str("a").0;
    expect_errno(
        c.rpc(t::WALK, Body(body)),
        libc::EPROTO,
        "walk with a missing name",
    )?;
    // A string whose length runs past the end of the message.
    let body = Body::new()
        .u32(ROOT_FID)
        .u32(1)
        .u16(1)
        .u16(500)
        .bytes(b"abc")
        .0;
    expect_errno(
        c.rpc(t::WALK, Body(body)),
        libc::EPROTO,
        "string longer than the message",
    )?;
    // A Twrite whose count exceeds its data.
    let body = Body::new()
        .u32(ROOT_FID)
        .u64(0)
        .u32(60_000)
        .bytes(b"tiny")
        .0;
    expect_errno(
        c.rpc(t::WRITE, Body(body)),
        libc::EPROTO,
        "write count beyond the data",
    )?;
    // Truncated fixed fields, and bytes trailing a complete message.
    expect_errno(
        c.rpc(t::CLUNK, Body(vec![1, 2])),
        libc::EPROTO,
        "short clunk",
    )?;
    expect_errno(
        c.rpc(t::GETATTR, Body::new().u32(0).u64(0).u8(9)),
        libc::EPROTO,
        "trailing byte",
    )?;
    expect_errno(
        c.rpc(t::LOCK, Body::new().u32(0).u8(1)),
        libc::EPROTO,
        "short lock",
    )?;
    // Nothing at all after the header.
    for kind in [
        t::VERSION,
        t::ATTACH,
        t::WALK,
        t::READ,
        t::LCREATE,
        t::SETATTR,
        t::RENAMEAT,
    ] {
        expect_errno(
            c.rpc(kind, Body::new()),
            libc::EPROTO,
            &format!("empty type {kind}"),
        )?;
    }
    // Still a working session.
    c.getattr(ROOT_FID)?;
    assert_alive(&server)
}

#[test]
fn unknown_message_types_get_eopnotsupp() -> Result<()> {
    let server = start()?;
    let mut c = server.mount()?;
    // 9P2000's Topen and Tstat, Rlerror and R-types sent as requests, and nothing at all.
    for kind in [0u8, 6, t::RLERROR, 101, t::OPEN, t::STAT, 126, 200, 255] {
        expect_errno(
            c.rpc(kind, Body::new().u32(0)),
            libc::EOPNOTSUPP,
            &format!("type {kind}"),
        )?;
    }
    c.getattr(ROOT_FID)?;
    assert_alive(&server)
}

#[test]
fn frame_sizes_out_of_range_close_only_that_connection() -> Result<()> {
    let server = start()?;
    let mut bystander = server.mount()?;
    for size in [0u32, 3, 6, 64 * 1024 + 1, u32::MAX] {
        let mut c = server.mount()?;
        let mut bytes = size.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[t::CLUNK, 1, 0, 0, 0, 0, 0]);
        c.send_raw(&bytes)?;
        ensure!(c.is_closed(), "size {size}: the connection stayed open");
        bystander.getattr(ROOT_FID)?;
    }
    // Before Tversion the limit is the initial 8 KiB.
    let mut c = Client::connect(&server.socket)?;
    c.send_raw(&frame(
        t::VERSION,
        NOTAG,
        &Body::new()
            .u32(8192)
            .str("9P2000.L")
            .bytes(&vec![0; 9000])
            .0,
    ))?;
    ensure!(c.is_closed(), "a 9 KiB first message was accepted");
    // A client that stops in the middle of a message and stays connected holds up
    // no one else.
    let mut stalled = server.mount()?;
    let whole = frame(t::GETATTR, 1, &Body::new().u32(0).u64(0).0);
    stalled.send_raw(&whole[..9])?;
    bystander.getattr(ROOT_FID)?;
    server.mount()?.getattr(ROOT_FID)?;
    drop(stalled);
    // Half a message, then the client goes away.
    let mut c = server.mount()?;
    let whole = frame(t::GETATTR, 1, &Body::new().u32(0).u64(0).0);
    c.send_raw(&whole[..9])?;
    drop(c);
    // Random garbage.
    let mut c = Client::connect(&server.socket)?;
    let _ = c.send_raw(&pattern(100_000, 9));
    drop(c);
    bystander.getattr(ROOT_FID)?;
    assert_alive(&server)
}

#[test]
fn running_out_of_fids_or_descriptors_is_an_error_not_a_crash() -> Result<()> {
    let server = start()?;
    let mut c = server.mount()?;
    // Clone the root until the server refuses: its own fid cap (64 Ki) or the
    // descriptor limit, whichever comes first.
    let mut next_fid = 1u32;
    let errno = 'fill: loop {
        let mut batch = Vec::new();
        let first = next_fid;
        for fid in first..first + 1000 {
            let tag = c.tag();
            batch.extend(frame(
                t::WALK,
                tag,
                &Body::new().u32(ROOT_FID).u32(fid).u16(0).0,
            ));
        }
        c.send_raw(&batch)?;
        let mut refused = None;
        for _ in 0..1000 {
            let reply = c.recv()?.context("the server closed the connection")?;
            if reply.kind == t::RLERROR && refused.is_none() {
                refused = Some(u32::from_le_bytes(reply.body[..4].try_into()?) as i32);
            }
        }
        next_fid += 1000;
        if let Some(errno) = refused {
            break 'fill errno;
        }
        ensure!(next_fid < 200_000, "the server never refused a fid");
    };
    ensure!(
        errno == libc::EMFILE || errno == libc::ENFILE,
        "refused with errno {errno}"
    );
    // Let them go again: the server recovers.
    for fid in 1..next_fid {
        let tag = c.tag();
        c.send_raw(&frame(t::CLUNK, tag, &Body::new().u32(fid).0))?;
        c.recv()?.context("the server closed the connection")?;
    }
    c.walk(ROOT_FID, 1, &[] as &[&str])?;
    assert_alive(&server)
}

#[test]
fn absurd_read_counts_are_clamped_to_msize() -> Result<()> {
    let server = start()?;
    fs::write(server.share.join("big"), pattern(2 * 1024 * 1024, 4))?;
    let mut c = Client::mount(&server.socket, 8192)?;
    c.walk(ROOT_FID, 1, &["big"])?;
    c.lopen(1, flags::RDONLY)?;
    let data = c.read(1, 0, u32::MAX)?;
    ensure!(
        data.len() == 8192 - 11,
        "read {} bytes at msize 8192",
        data.len()
    );
    c.lopen(ROOT_FID, flags::RDONLY | flags::DIRECTORY)?;
    ensure!(c.readdir(ROOT_FID, 0, u32::MAX)?.len() >= 3);
    // Offsets at the end of the range.
    match c.read(1, u64::MAX, 100) {
        Ok(data) => ensure!(data.is_empty(), "read at u64::MAX gave data"),
        Err(P9Error::Lerror(_)) => {}
        Err(e) => return Err(e.into()),
    }
    expect_error(c.write(ROOT_FID, u64::MAX, b"x"), "write at u64::MAX")?;
    expect_error(c.lock(1, 0, u64::MAX, u64::MAX), "lock at u64::MAX").or_else(|_| {
        match c.lock(1, 0, u64::MAX, u64::MAX) {
            Ok(2) => Ok(0),
            other => bail!("lock at u64::MAX: {other:?}"),
        }
    })?;
    assert_alive(&server)
}

#[test]
fn unknown_fids_fid_reuse_and_bad_names() -> Result<()> {
    let server = start()?;
    fs::write(server.share.join("f"), "x")?;
    let mut c = server.mount()?;
    expect_errno(c.clunk(999), libc::EBADF, "clunk of an unknown fid")?;
    expect_errno(c.getattr(999), libc::EBADF, "getattr of an unknown fid")?;
    expect_errno(
        c.walk(999, 1000, &["f"]),
        libc::EBADF,
        "walk from an unknown fid",
    )?;
    expect_errno(c.read(999, 0, 10), libc::EBADF, "read of an unknown fid")?;
    expect_errno(c.lopen(999, 0), libc::EBADF, "lopen of an unknown fid")?;
    expect_errno(
        c.mkdir(999, "x", 0o755),
        libc::EBADF,
        "mkdir in an unknown fid",
    )?;
    expect_errno(
        c.rename(999, ROOT_FID, "x"),
        libc::EBADF,
        "rename of an unknown fid",
    )?;
    expect_errno(c.statfs(999), libc::EBADF, "statfs of an unknown fid")?;
    // Reusing a fid that is in use.
    expect_errno(c.attach(ROOT_FID, 0), libc::EBADF, "attach to a used fid")?;
    c.walk(ROOT_FID, 1, &["f"])?;
    expect_errno(
        c.walk(ROOT_FID, 1, &["f"]),
        libc::EBADF,
        "walk to a used newfid",
    )?;
    expect_errno(
        c.xattrwalk(ROOT_FID, 1, ""),
        libc::EBADF,
        "xattrwalk to a used newfid",
    )?;
    // Walking a fid onto itself is allowed and replaces it.
    c.walk(ROOT_FID, 2, &[] as &[&str])?;
    c.walk(2, 2, &["f"])?;
    ensure!(!c.getattr(2)?.qid.is_dir());
    // Walking from a file, and too many names.
    expect_errno(c.walk(1, 3, &["x"]), libc::ENOTDIR, "walk from a file")?;
    let names: Vec<String> = (0..17).map(|_| ".".to_string()).collect();
    expect_errno(c.walk(ROOT_FID, 3, &names), libc::EINVAL, "17 names")?;
    let names: Vec<String> = (0..16).map(|_| ".".to_string()).collect();
    ensure!(c.walk(ROOT_FID, 3, &names)?.len() == 16);
    // Names with / or NUL, empty, or too long.
    for name in [&b"a/b"[..], b"a\0b", b"\0", b"", &[b'x'; 300]] {
        expect_error(c.walk(ROOT_FID, 4, &[name]), &format!("walk {name:?}"))?;
        expect_error(c.mkdir(ROOT_FID, name, 0o755), &format!("mkdir {name:?}"))?;
        c.walk(ROOT_FID, 5, &[] as &[&str])?;
        expect_error(
            c.lcreate(5, name, flags::WRONLY | flags::CREATE, 0o644, 0),
            &format!("lcreate {name:?}"),
        )?;
        c.clunk(5)?;
    }
    expect_errno(
        c.symlink(ROOT_FID, "s", "a\0b"),
        libc::EINVAL,
        "symlink target with NUL",
    )?;
    ensure!(
        fs::read_dir(&server.share)?.count() == 1,
        "something was created"
    );
    assert_alive(&server)
}
