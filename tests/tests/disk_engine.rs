//! The block worker's disk engine against the reference, qemu-img and qemu-io: images made
//! by qemu-img read back identical to their raw source; after random writes through the
//! engine `qemu-img check` is clean and `qemu-img compare` matches a raw file given the same
//! writes; internal snapshots survive; a writer killed with SIGKILL leaves no corruption and
//! loses no flushed write; hand-made bad images give clear errors.
//!
//! Needs qemu-img and qemu-io (qemu-utils).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use bulkhead_workers::disk::{self, DiskError, DiskImage, DiskOptions, Format, Mode};
use vm_memory::VolatileSlice;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "bulkhead-disk-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("run {cmd}"))?;
    Ok(out)
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = run("qemu-img", args)?;
    ensure!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// `qemu-img check`: 0 clean, 3 leaks only (accepted when `leaks_ok`).
fn check(img: &Path, leaks_ok: bool) -> Result<()> {
    let out = run("qemu-img", &["check", p(img)])?;
    let code = out.status.code().unwrap_or(-1);
    ensure!(
        code == 0 || (leaks_ok && code == 3),
        "qemu-img check {} exited {code}:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn compare(a: &Path, b: &Path) -> Result<()> {
    let out = run("qemu-img", &["compare", p(a), p(b)])?;
    ensure!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A raw source with random, compressible and zero regions, so every cluster kind appears.
fn make_source(path: &Path, size: usize, seed: u64) -> Result<Vec<u8>> {
    let mut rng = Rng(seed | 1);
    let mut data = vec![0u8; size];
    let chunk = 24 * 1024;
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        match i % 4 {
            0 => rng.fill(c),
            1 => c
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j / 64) as u8 ^ i as u8),
            2 => {}
            _ => rng.fill(&mut c[..100]),
        }
    }
    std::fs::write(path, &data)?;
    Ok(data)
}

/// Backing files resolved in `dir` only, the way a VMM would by policy.
fn resolver(dir: &Path) -> impl Fn(&str) -> std::io::Result<File> + Send + Sync {
    let dir = dir.to_path_buf();
    move |name: &str| {
        let path = if Path::new(name).is_absolute() {
            PathBuf::from(name)
        } else {
            dir.join(name)
        };
        if !path.starts_with(&dir) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "outside the image directory",
            ));
        }
        File::open(path)
    }
}

fn open(path: &Path, mode: Mode) -> Result<Arc<dyn DiskImage>> {
    open_opts(path, mode, &DiskOptions::default())
}

/// Caches of two tables each: every few writes evict a dirty L2 table or refcount block.
const TINY_CACHES: DiskOptions = DiskOptions {
    l2_cache_bytes: 0,
    refcount_cache_bytes: 0,
    fail_writes_after: None,
};

fn open_opts(path: &Path, mode: Mode, options: &DiskOptions) -> Result<Arc<dyn DiskImage>> {
    let file = OpenOptions::new()
        .read(true)
        .write(mode == Mode::ReadWrite)
        .open(path)?;
    let dir = path.parent().context("image has a directory")?;
    Ok(disk::open_with(file, None, mode, &resolver(dir), options)?)
}

fn read_all(img: &dyn DiskImage) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; img.len() as usize];
    // In odd-sized pieces, so requests straddle clusters.
    let mut off = 0;
    while off < buf.len() {
        let n = (buf.len() - off).min(300_000 + off % 7777);
        img.read_at(&mut buf[off..off + n], off as u64)?;
        off += n;
    }
    Ok(buf)
}

/// Splits `buf` the way a guest's scatter-gather list might: odd sizes, an empty piece.
fn scattered(buf: &mut [u8]) -> Vec<VolatileSlice<'_>> {
    let mut pieces = Vec::new();
    let mut rest = buf;
    for size in [1000, 0, 4096 + 7, 513] {
        let (piece, tail) = rest.split_at_mut(size.min(rest.len()));
        pieces.push(VolatileSlice::from(piece));
        rest = tail;
    }
    pieces.push(VolatileSlice::from(rest));
    pieces
}

/// `read_into` through scattered buffers: the path guest requests take.
fn read_scattered(img: &dyn DiskImage, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0xa5u8; len];
    img.read_into(&scattered(&mut buf), off)?;
    Ok(buf)
}

fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

const MIB: usize = 1 << 20;

/// `qemu-img convert` options of every image kind the engine must read.
const KINDS: &[(&str, &[&str])] = &[
    ("v2-64k", &["-o", "compat=0.10"]),
    ("v3-512", &["-o", "cluster_size=512"]),
    ("v3-4k", &["-o", "cluster_size=4096"]),
    ("v3-2m", &["-o", "cluster_size=2M"]),
    ("rc1", &["-o", "refcount_bits=1,cluster_size=4096"]),
    ("rc64", &["-o", "refcount_bits=64"]),
    ("deflate", &["-c"]),
    ("deflate-4k", &["-c", "-o", "cluster_size=4096"]),
    ("deflate-512", &["-c", "-o", "cluster_size=512"]),
    ("deflate-2m", &["-c", "-o", "cluster_size=2M"]),
    (
        "zstd-2m-extl2",
        &[
            "-c",
            "-o",
            "compression_type=zstd,cluster_size=2M,extended_l2=on",
        ],
    ),
    ("zstd", &["-c", "-o", "compression_type=zstd"]),
    ("v2-deflate", &["-c", "-o", "compat=0.10"]),
    ("extl2", &["-o", "extended_l2=on"]),
    ("extl2-2m", &["-o", "extended_l2=on,cluster_size=2M"]),
];

fn convert(dir: &TempDir, src: &Path, name: &str, opts: &[&str]) -> Result<PathBuf> {
    let out = dir.path(&format!("{name}.qcow2"));
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(opts);
    args.push(p(src));
    args.push(p(&out));
    qemu_img(&args)?;
    Ok(out)
}

#[test]
fn preopened_chain_opens_like_paths() -> Result<()> {
    let dir = TempDir::new("preopen");
    let (top, flat) = make_chain(&dir, 3 * MIB, "")?;
    // The VMM's side: walk the chain, opening each file itself.
    let mut files = Vec::new();
    let mut cur = File::open(&top)?;
    while let Some((name, _format)) = disk::backing_of(&cur)? {
        let f = File::open(dir.path(&name))?;
        files.push((name, f.try_clone()?));
        cur = f;
    }
    ensure!(files.len() == 2, "chain of {} backing files", files.len());
    // The worker's side: only the files passed.
    let resolver = disk::PreopenedBacking::new(files);
    let d = disk::open(File::open(&top)?, None, Mode::ReadOnly, &resolver)?;
    ensure!(read_all(&*d)? == std::fs::read(&flat)?);
    // The same files for another image's names are refused.
    let (name, f) = ("other.qcow2".to_string(), File::open(&top)?);
    let wrong = disk::PreopenedBacking::new(vec![(name, f)]);
    ensure!(matches!(
        disk::open(File::open(&top)?, None, Mode::ReadOnly, &wrong),
        Err(DiskError::BackingRefused { .. })
    ));
    Ok(())
}

#[test]
fn qemu_images_read_back_identical() -> Result<()> {
    let dir = TempDir::new("read");
    let src = dir.path("src.raw");
    let data = make_source(&src, 5 * MIB + 12345 / 512 * 512, 1)?;
    for (name, opts) in KINDS {
        let img = convert(&dir, &src, name, opts)?;
        let disk = open(&img, Mode::ReadOnly)?;
        ensure!(
            disk.len() == data.len() as u64,
            "{name}: size {}",
            disk.len()
        );
        if *name == "v3-2m" {
            ensure!(disk.discard_granularity() == 2 << 20);
        }
        let got = read_all(&*disk)?;
        if let Some(at) = first_mismatch(&got, &data) {
            bail!("{name}: differs from the source at {at:#x}");
        }
        // A few unaligned reads.
        let mut rng = Rng(7);
        for _ in 0..50 {
            let off = rng.below(data.len() as u64 - 1) as usize;
            let len = 1 + rng.below((data.len() - off).min(200_000) as u64) as usize;
            let mut buf = vec![0u8; len];
            disk.read_at(&mut buf, off as u64)?;
            ensure!(
                buf == data[off..off + len],
                "{name}: read {off:#x}+{len:#x}"
            );
            ensure!(
                read_scattered(&*disk, off as u64, len)? == data[off..off + len],
                "{name}: scattered read {off:#x}+{len:#x}"
            );
        }
        ensure!(
            disk.write_at(&[0], 0)
                .is_err_and(|e| matches!(e, DiskError::ReadOnly)),
            "{name}: read-only image took a write"
        );
        ensure!(disk.read_at(&mut [0u8; 2], disk.len() - 1).is_err());
    }
    Ok(())
}

/// qcow2 on qcow2 on raw, the middle layer partly overwritten, zeroed and discarded.
fn make_chain(dir: &TempDir, size: usize, top_opts: &str) -> Result<(PathBuf, PathBuf)> {
    let base = dir.path("base.raw");
    make_source(&base, size, 2)?;
    let mid = dir.path("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&mid),
    ])?;
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 100k 300k",
            "-c",
            "write -z 1m 64k",
            "-c",
            "write -P 0x22 2047k 3k",
            p(&mid),
        ],
    )?;
    ensure!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = dir.path("top.qcow2");
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
    ];
    if !top_opts.is_empty() {
        args.extend(["-o", top_opts]);
    }
    args.push(p(&top));
    qemu_img(&args)?;
    let out = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 250k 100k", p(&top)],
    )?;
    ensure!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flat = dir.path("flat.raw");
    qemu_img(&["convert", "-O", "raw", p(&top), p(&flat)])?;
    Ok((top, flat))
}

#[test]
fn backing_chain_reads_back_identical() -> Result<()> {
    for top_opts in ["", "extended_l2=on", "compat=0.10,cluster_size=512"] {
        let dir = TempDir::new("chain");
        let (top, flat) = make_chain(&dir, 3 * MIB, top_opts)?;
        let disk = open(&top, Mode::ReadOnly)?;
        let got = read_all(&*disk)?;
        let want = std::fs::read(&flat)?;
        if let Some(at) = first_mismatch(&got, &want) {
            bail!("chain ({top_opts}): differs at {at:#x}");
        }
        let got = read_scattered(&*disk, 0, want.len())?;
        if let Some(at) = first_mismatch(&got, &want) {
            bail!("chain ({top_opts}), scattered read: differs at {at:#x}");
        }
    }
    Ok(())
}

/// Random writes (and zeroes) through the engine and into a raw reference.
fn random_writes(
    disk: &dyn DiskImage,
    reference: &File,
    seed: u64,
    count: usize,
    cluster: u64,
    zeroes: bool,
) -> Result<()> {
    let mut rng = Rng(seed | 1);
    let size = disk.len();
    for i in 0..count {
        // Mostly sector-aligned like a guest's, some byte-granular; some straddle clusters.
        let len = match rng.below(4) {
            0 => 1 + rng.below(600),
            1 => 512 * (1 + rng.below(16)),
            2 => cluster * (1 + rng.below(3)),
            _ => 1 + rng.below(3 * cluster),
        }
        .min(size);
        let mut off = rng.below(size - len + 1);
        if rng.below(2) == 0 {
            off &= !511;
        }
        if zeroes && i % 7 == 3 {
            disk.write_zeroes(off, len)?;
            reference.write_all_at(&vec![0u8; len as usize], off)?;
        } else {
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf);
            // Half through the guest-buffer path, as the blk worker writes.
            if i % 2 == 0 {
                disk.write_at(&buf, off)?;
            } else {
                let mut copy = buf.clone();
                disk.write_from(&scattered(&mut copy), off)?;
            }
            reference.write_all_at(&buf, off)?;
        }
        if i % 50 == 49 {
            disk.flush()?;
        }
    }
    Ok(())
}

fn write_and_verify(
    options: &DiskOptions,
    name: &str,
    img: &Path,
    reference: &Path,
    cluster: u64,
    count: usize,
    zeroes: bool,
) -> Result<()> {
    {
        let disk = open_opts(img, Mode::ReadWrite, options)?;
        let r = OpenOptions::new().write(true).open(reference)?;
        random_writes(&*disk, &r, 99, count, cluster, zeroes)
            .with_context(|| format!("{name}: writing"))?;
        let got = read_all(&*disk)?;
        let want = std::fs::read(reference)?;
        if let Some(at) = first_mismatch(&got, &want) {
            bail!("{name}: engine reads back something else at {at:#x}");
        }
        disk.flush()?;
    }
    check(img, false).with_context(|| name.to_string())?;
    compare(img, reference).with_context(|| name.to_string())?;
    Ok(())
}

#[test]
fn random_writes_keep_images_clean() -> Result<()> {
    let dir = TempDir::new("write");
    let src = dir.path("src.raw");
    make_source(&src, 3 * MIB, 3)?;
    let cases: &[(&str, &[&str], u64)] = &[
        ("v2-64k", &["-o", "compat=0.10"], 65536),
        ("v3-4k", &["-o", "cluster_size=4096"], 4096),
        (
            "v3-512-rc64",
            &["-o", "cluster_size=512,refcount_bits=64"],
            512,
        ),
        ("rc1", &["-o", "refcount_bits=1,cluster_size=4096"], 4096),
        ("rc2", &["-o", "refcount_bits=2,cluster_size=4096"], 4096),
        ("deflate", &["-c", "-o", "cluster_size=4096"], 4096),
        ("zstd", &["-c", "-o", "compression_type=zstd"], 65536),
        ("extl2", &["-o", "extended_l2=on,cluster_size=16384"], 16384),
        ("v3-2m", &["-o", "cluster_size=2M"], 2 << 20),
    ];
    for (name, opts, cluster) in cases {
        let img = convert(&dir, &src, name, opts)?;
        let reference = dir.path(&format!("{name}.ref"));
        std::fs::copy(&src, &reference)?;
        let count = if *cluster >= 2 << 20 { 40 } else { 300 };
        write_and_verify(
            &DiskOptions::default(),
            name,
            &img,
            &reference,
            *cluster,
            count,
            true,
        )?;
    }
    Ok(())
}

#[test]
fn fresh_images_and_chains_take_writes() -> Result<()> {
    let dir = TempDir::new("fresh");
    // An empty image: every write allocates; 512-byte clusters with 64-bit refcounts make
    // the refcount table grow many times.
    for (name, opts) in [
        ("fresh-512", "cluster_size=512,refcount_bits=64"),
        ("fresh-v2", "compat=0.10,cluster_size=4096"),
    ] {
        let img = dir.path(&format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p(&img), "8M"])?;
        let reference = dir.path(&format!("{name}.ref"));
        File::create(&reference)?.set_len(8 * MIB as u64)?;
        write_and_verify(
            &DiskOptions::default(),
            name,
            &img,
            &reference,
            32768,
            400,
            true,
        )?;
        let clusters = u32::from_be_bytes(std::fs::read(&img)?[56..60].try_into()?);
        ensure!(
            name != "fresh-512" || clusters > 1,
            "{name}: the refcount table never grew"
        );
    }
    for top_opts in ["", "extended_l2=on", "compat=0.10,cluster_size=512"] {
        let dir = TempDir::new("chainw");
        let (top, flat) = make_chain(&dir, 3 * MIB, top_opts)?;
        write_and_verify(
            &DiskOptions::default(),
            &format!("chain {top_opts}"),
            &top,
            &flat,
            4096,
            300,
            true,
        )?;
    }
    Ok(())
}

/// `qemu-io -c 'read -P'`: QEMU itself reads the pattern back.
fn qemu_io_reads(img: &Path, pattern: u8, off: u64, len: u64) -> Result<()> {
    let cmd = format!("read -P {pattern:#x} {off} {len}");
    let out = run("qemu-io", &["-r", "-f", "qcow2", "-c", &cmd, p(img)])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmd}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn qemu_io_reads_what_the_engine_wrote() -> Result<()> {
    let dir = TempDir::new("qemuio");
    for opts in [
        "cluster_size=65536",
        "compat=0.10,cluster_size=512",
        "extended_l2=on",
    ] {
        let img = dir.path("w.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p(&img), "8M"])?;
        let disk = open(&img, Mode::ReadWrite)?;
        disk.write_at(&[0x5a; 100_000], 1_000_000)?;
        disk.write_at(&[0xa5; 4096], 4096)?;
        disk.write_zeroes(1_020_000, 30_000)?;
        drop(disk);
        qemu_io_reads(&img, 0x5a, 1_000_000, 20_000)?;
        qemu_io_reads(&img, 0, 1_020_000, 30_000)?;
        qemu_io_reads(&img, 0x5a, 1_050_000, 50_000)?;
        qemu_io_reads(&img, 0xa5, 4096, 4096)?;
        qemu_io_reads(&img, 0, 0, 4096)?;
        // And a mismatch is noticed.
        ensure!(qemu_io_reads(&img, 0x5b, 1_000_000, 512).is_err());
    }
    Ok(())
}

#[test]
fn tiny_caches_evict_safely() -> Result<()> {
    let dir = TempDir::new("tiny");
    let img = dir.path("fresh.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p(&img),
        "32M",
    ])?;
    let reference = dir.path("fresh.ref");
    File::create(&reference)?.set_len(32 * MIB as u64)?;
    write_and_verify(&TINY_CACHES, "fresh", &img, &reference, 4096, 400, true)?;
    let src = dir.path("src.raw");
    make_source(&src, 4 * MIB, 10)?;
    for (name, opts) in [
        ("v2-512", "compat=0.10,cluster_size=512"),
        ("extl2", "extended_l2=on,cluster_size=16384"),
    ] {
        let img = convert(&dir, &src, name, &["-o", opts])?;
        qemu_img(&["snapshot", "-c", "s", p(&img)])?;
        let reference = dir.path(&format!("{name}.ref"));
        std::fs::copy(&src, &reference)?;
        write_and_verify(&TINY_CACHES, name, &img, &reference, 4096, 300, true)?;
        let snap = dir.path(&format!("{name}.snap.raw"));
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            "-l",
            "snapshot.name=s",
            p(&img),
            p(&snap),
        ])?;
        compare(&snap, &src).context("snapshot content changed")?;
    }
    Ok(())
}

#[test]
fn internal_snapshot_survives_writes() -> Result<()> {
    let dir = TempDir::new("snap");
    let src = dir.path("src.raw");
    make_source(&src, 2 * MIB, 4)?;
    for (name, opts) in [
        ("snap-64k", "cluster_size=65536"),
        ("snap-4k-v2", "cluster_size=4096,compat=0.10"),
    ] {
        let img = convert(&dir, &src, name, &["-o", opts])?;
        qemu_img(&["snapshot", "-c", "before", p(&img)])?;
        let reference = dir.path(&format!("{name}.ref"));
        std::fs::copy(&src, &reference)?;
        write_and_verify(
            &DiskOptions::default(),
            name,
            &img,
            &reference,
            4096,
            300,
            true,
        )?;
        let snap = dir.path(&format!("{name}.snap.raw"));
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            "-l",
            "snapshot.name=before",
            p(&img),
            p(&snap),
        ])?;
        compare(&snap, &src).context("snapshot content changed")?;
    }
    Ok(())
}

#[test]
fn cow_mode_leaves_the_image_alone_and_ro_refuses() -> Result<()> {
    let dir = TempDir::new("cow");
    let src = dir.path("src.raw");
    let data = make_source(&src, MIB, 5)?;
    let img = convert(&dir, &src, "cow", &["-o", "cluster_size=4096"])?;
    let before = std::fs::read(&img)?;
    for path in [&src, &img] {
        let disk = open(path, Mode::Cow)?;
        ensure!(!disk.is_read_only());
        disk.write_at(&[0xaa; 5000], 1000)?;
        disk.write_zeroes(0, 100)?;
        disk.flush()?;
        let mut want = data.clone();
        want[1000..6000].fill(0xaa);
        want[..100].fill(0);
        ensure!(read_all(&*disk)? == want);
        let ro = open(path, Mode::ReadOnly)?;
        ensure!(ro.is_read_only());
        ensure!(matches!(ro.write_at(&[1], 0), Err(DiskError::ReadOnly)));
        ensure!(matches!(ro.discard(0, 512), Err(DiskError::ReadOnly)));
        ensure!(matches!(ro.write_zeroes(0, 512), Err(DiskError::ReadOnly)));
    }
    ensure!(std::fs::read(&src)? == data, "cow wrote the raw file");
    ensure!(std::fs::read(&img)? == before, "cow wrote the qcow2 file");
    Ok(())
}

#[test]
fn raw_images_take_writes() -> Result<()> {
    let dir = TempDir::new("raw");
    let img = dir.path("disk.raw");
    let data = make_source(&img, 2 * MIB, 6)?;
    let reference = dir.path("ref.raw");
    std::fs::write(&reference, &data)?;
    let file = OpenOptions::new().read(true).write(true).open(&img)?;
    let disk = disk::open(file, Some(Format::Raw), Mode::ReadWrite, &disk::NoBacking)?;
    let r = OpenOptions::new().write(true).open(&reference)?;
    random_writes(&*disk, &r, 5, 200, 4096, true)?;
    disk.discard(0, 8192)?;
    r.write_all_at(&[0u8; 8192], 0)?;
    disk.flush()?;
    drop(disk);
    compare(&img, &reference)?;
    Ok(())
}

#[test]
fn concurrent_writers_on_one_image() -> Result<()> {
    let dir = TempDir::new("threads");
    let img = dir.path("t.qcow2");
    let base = dir.path("base.raw");
    let base_data = make_source(&base, 16 * MIB, 13)?;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&img),
    ])?;
    let disk = open(&img, Mode::ReadWrite)?;
    let stripe = 4 * MIB as u64;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A flusher racing the writers, so frees become reusable while I/O is in flight.
    let flusher = {
        let (disk, stop) = (disk.clone(), stop.clone());
        std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                disk.flush()?;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Ok(())
        })
    };
    // Each thread owns a disjoint stripe and keeps its own model of it.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let disk = disk.clone();
            let mut model = base_data[(t * stripe) as usize..((t + 1) * stripe) as usize].to_vec();
            std::thread::spawn(move || -> Result<(u64, Vec<u8>)> {
                let mut rng = Rng(t + 11);
                for _ in 0..300 {
                    let rel = rng.below(stripe - 20000);
                    let len = 1 + rng.below(20000);
                    let r = rel as usize..(rel + len) as usize;
                    match rng.below(6) {
                        0 => {
                            disk.write_zeroes(t * stripe + rel, len)?;
                            model[r.clone()].fill(0);
                        }
                        1 => {
                            // Whole clusters: a v3 image reads discarded clusters as zeros.
                            let (a, l) = (rel & !4095, (len + 4095) & !4095);
                            disk.discard(t * stripe + a, l)?;
                            model[a as usize..(a + l) as usize].fill(0);
                        }
                        _ => {
                            let mut data = vec![0u8; len as usize];
                            rng.fill(&mut data);
                            disk.write_at(&data, t * stripe + rel)?;
                            model[r.clone()].copy_from_slice(&data);
                        }
                    }
                    let mut back = vec![0u8; len as usize];
                    disk.read_at(&mut back, t * stripe + rel)?;
                    ensure!(back == model[r], "thread {t} read back something else");
                }
                Ok((t, model))
            })
        })
        .collect();
    let mut want = vec![0u8; 16 * MIB];
    for th in threads {
        let (t, model) = th
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        want[(t * stripe) as usize..((t + 1) * stripe) as usize].copy_from_slice(&model);
    }
    stop.store(true, Ordering::Relaxed);
    flusher
        .join()
        .map_err(|_| anyhow::anyhow!("flusher panicked"))??;
    ensure!(read_all(&*disk)? == want, "final content differs");
    drop(disk);
    check(&img, false)
}

// ---- Crash safety ----------------------------------------------------------------------

const CRASH_ENV: &str = "BULKHEAD_DISK_CRASH_CHILD";
const CRASH_SIZE: u64 = 16 << 20;
// More than any machine gets through before the kill (at most 1.5 s).
const CRASH_WRITES: u64 = 10_000_000;
const SECTOR: u64 = 512;

/// Write `i` of the crash workload, `seed` per round: whole sectors, each sector's bytes a
/// function of (round, write, sector), so any sector says which write left it.
fn crash_write(seed: u64, i: u64, size: u64) -> (u64, u64) {
    let mut rng = Rng((seed << 32 | i) * 2 + 1);
    rng.next();
    let max = if rng.below(4) == 0 { 300 } else { 16 };
    let sectors = 1 + rng.below(max);
    let off = rng.below(size / SECTOR - sectors) * SECTOR;
    (off, sectors * SECTOR)
}

fn sector_pattern(seed: u64, i: u64, sector: u64) -> [u8; SECTOR as usize] {
    let mut rng = Rng(((seed * 1_000_003 + i) << 24 | sector) * 2 + 1);
    let mut s = [0u8; SECTOR as usize];
    rng.fill(&mut s);
    s
}

/// Random writes, a flush every 8 (`flushed(i)` once writes 0..=i are durable), and every
/// 97th write's range zeroed and written again.
fn crash_workload(
    disk: &dyn DiskImage,
    seed: u64,
    count: u64,
    mut flushed: impl FnMut(u64) -> Result<()>,
) -> Result<()> {
    let size = disk.len();
    for i in 0..count {
        let (off, len) = crash_write(seed, i, size);
        let mut buf = Vec::with_capacity(len as usize);
        for s in 0..len / SECTOR {
            buf.extend_from_slice(&sector_pattern(seed, i, off / SECTOR + s));
        }
        disk.write_at(&buf, off)?;
        if i % 8 == 7 {
            disk.flush()?;
            flushed(i)?;
        }
        if i % 97 == 0 {
            disk.write_zeroes(off, len)?;
            disk.write_at(&buf, off)?;
        }
    }
    Ok(())
}

/// After a crash in round `seed` with writes 0..n_flushed durable: every sector holds what
/// the last durable write to it left (or `before`, the round's starting content), or what
/// a later write that may have reached the disk left. `later` bounds how far the writer
/// can have got.
fn verify_crashed(seed: u64, got: &[u8], before: &[u8], n_flushed: u64, later: u64) -> Result<()> {
    let size = got.len() as u64;
    let sectors = (size / SECTOR) as usize;
    let mut last: Vec<Option<u64>> = vec![None; sectors];
    for i in 0..n_flushed {
        let (off, len) = crash_write(seed, i, size);
        for s in off / SECTOR..(off + len) / SECTOR {
            last[s as usize] = Some(i);
        }
    }
    let mut maybe: Vec<Vec<u64>> = vec![Vec::new(); sectors];
    for i in n_flushed..n_flushed + later {
        let (off, len) = crash_write(seed, i, size);
        for s in off / SECTOR..(off + len) / SECTOR {
            maybe[s as usize].push(i);
        }
    }
    for s in 0..sectors {
        let range = s * SECTOR as usize..(s + 1) * SECTOR as usize;
        let have = &got[range.clone()];
        let ok = match last[s] {
            Some(i) => have == sector_pattern(seed, i, s as u64),
            None => have == &before[range.clone()],
        } || maybe[s].iter().any(|&i| have == sector_pattern(seed, i, s as u64))
            // A 97th write zeroes its range before writing it again.
            || (have.iter().all(|&b| b == 0)
                && (maybe[s].iter().any(|&i| i % 97 == 0) || last[s].is_some_and(|i| i % 97 == 0)));
        ensure!(
            ok,
            "sector {s} lost a flushed write (writes 0..{n_flushed} were flushed)"
        );
    }
    Ok(())
}

/// The child: runs the workload until killed, logging each flushed write's index after
/// the flush returns.
#[test]
fn crash_child() -> Result<()> {
    let Ok(spec) = std::env::var(CRASH_ENV) else {
        return Ok(());
    };
    let (img, rest) = spec.split_once(':').context("spec")?;
    let (seed, log) = rest.split_once(':').context("spec")?;
    let seed: u64 = seed.parse()?;
    // Even rounds evict dirty metadata all the time, so a kill lands mid-eviction too.
    let options = if seed.is_multiple_of(2) {
        TINY_CACHES
    } else {
        DiskOptions::default()
    };
    let disk = open_opts(Path::new(img), Mode::ReadWrite, &options)?;
    let log = OpenOptions::new().append(true).create(true).open(log)?;
    crash_workload(&*disk, seed, CRASH_WRITES, |i| {
        use std::io::Write;
        (&log).write_all(format!("{i}\n").as_bytes())?;
        Ok(())
    })
}

#[test]
fn killed_writer_leaves_consistent_image() -> Result<()> {
    let dir = TempDir::new("crash");
    let base = dir.path("base.raw");
    make_source(&base, CRASH_SIZE as usize, 8)?;
    let img = dir.path("crash.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&img),
    ])?;
    let exe = std::env::current_exe()?;
    let mut rng = Rng(0x5eed);
    // What the disk held when the round began.
    let mut state = std::fs::read(&base)?;
    for round in 1..=5u64 {
        let log = dir.path(&format!("log{round}"));
        File::create(&log)?;
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CRASH_ENV, format!("{}:{round}:{}", p(&img), p(&log)))
            .stdout(std::process::Stdio::null())
            .spawn()?;
        // Kill at a random moment after the first flush, however slow the start.
        let started = std::time::Instant::now();
        while std::fs::metadata(&log)?.len() == 0 {
            if let Some(status) = child.try_wait()? {
                bail!("crash child exited before its first flush: {status}");
            }
            ensure!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "crash child never flushed"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.below(1200)));
        if let Some(status) = child.try_wait()? {
            bail!("crash child exited early: {status}");
        }
        child.kill()?;
        child.wait()?;
        check(&img, true).with_context(|| format!("round {round}"))?;
        let flushed: Option<u64> = std::fs::read_to_string(&log)?
            .lines()
            .filter_map(|l| l.parse().ok())
            .next_back();
        let n_flushed = flushed.map_or(0, |f| f + 1);
        eprintln!("round {round}: {n_flushed} writes flushed before the kill");
        ensure!(
            n_flushed > 0,
            "round {round}: the child flushed nothing before it was killed"
        );
        let disk = open(&img, Mode::ReadOnly)?;
        let got = read_all(&*disk)?;
        drop(disk);
        // The child cannot have got more than a few thousand writes past its last flush.
        verify_crashed(round, &got, &state, n_flushed, 5000)
            .with_context(|| format!("round {round}"))?;
        state = got;
    }
    Ok(())
}

/// A kill at every point of a write sequence, deterministically: the engine's writes are
/// cut off after N of them, for every N, and each image left behind must pass `qemu-img
/// check` and hold every flushed write.
#[test]
fn writes_cut_off_at_every_point_leave_consistent_images() -> Result<()> {
    let dir = TempDir::new("cutoff");
    const SIZE: u64 = 2 << 20;
    let base = dir.path("base.raw");
    let before = make_source(&base, SIZE as usize, 12)?;
    let pristine = dir.path("pristine.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&pristine),
    ])?;
    // Compressed clusters under an internal snapshot: writes free compressed clusters and
    // copy L2 tables and data clusters shared with the snapshot.
    let shared = dir.path("shared.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-c",
        "-o",
        "cluster_size=4096",
        p(&base),
        p(&shared),
    ])?;
    qemu_img(&["snapshot", "-c", "s", p(&shared)])?;
    let img = dir.path("cut.qcow2");
    // Three flushes' worth: every cut point costs a qemu-img check.
    const WRITES: u64 = 24;
    for (pristine, tiny, writes) in [
        (&pristine, false, WRITES),
        (&pristine, true, WRITES),
        (&shared, false, 16),
    ] {
        let mut cut = 0u64;
        let t0 = std::time::Instant::now();
        loop {
            std::fs::copy(pristine, &img)?;
            let mut options = if tiny {
                TINY_CACHES
            } else {
                DiskOptions::default()
            };
            options.fail_writes_after = Some(cut);
            let mut n_flushed = 0;
            let done = {
                let disk = open_opts(&img, Mode::ReadWrite, &options)?;
                crash_workload(&*disk, 77, writes, |i| {
                    n_flushed = i + 1;
                    Ok(())
                })
                .is_ok()
            };
            check(&img, true)
                .with_context(|| format!("cut after {cut} writes (tiny caches: {tiny})"))?;
            let got = read_all(&*open(&img, Mode::ReadOnly)?)?;
            verify_crashed(77, &got, &before, n_flushed, writes)
                .with_context(|| format!("cut after {cut} writes (tiny caches: {tiny})"))?;
            if done {
                ensure!(cut > 0, "the workload wrote nothing");
                break;
            }
            cut += 1;
        }
        eprintln!(
            "{} cut points in {:?} (tiny caches: {tiny})",
            cut + 1,
            t0.elapsed()
        );
        if pristine == &shared {
            let snap = dir.path("snap.raw");
            qemu_img(&[
                "convert",
                "-O",
                "raw",
                "-l",
                "snapshot.name=s",
                p(&img),
                p(&snap),
            ])?;
            compare(&snap, &base).context("snapshot content changed")?;
        }
    }
    Ok(())
}

// ---- Bad images ------------------------------------------------------------------------

fn be64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A small 64 KiB-cluster image with data in its first cluster, and where its first L2
/// table and first L2 entry live.
fn small_image(dir: &TempDir, name: &str, opts: &[&str]) -> Result<(PathBuf, u64, u64)> {
    let src = dir.path("small.raw");
    make_source(&src, MIB, 9)?;
    let img = convert(dir, &src, name, opts)?;
    let bytes = std::fs::read(&img)?;
    let l1 = be64_at(&bytes, 40) as usize;
    let l2 = be64_at(&bytes, l1) & 0x00ff_ffff_ffff_fe00;
    let l2e = be64_at(&bytes, l2 as usize);
    Ok((img, l2, l2e))
}

fn patch(path: &Path, at: u64, bytes: &[u8]) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all_at(bytes, at)?;
    Ok(())
}

fn open_err(path: &Path, mode: Mode) -> DiskError {
    let file = OpenOptions::new()
        .read(true)
        .write(mode == Mode::ReadWrite)
        .open(path)
        .expect("open");
    match disk::open(
        file,
        Some(Format::Qcow2),
        mode,
        &resolver(path.parent().expect("dir")),
    ) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

fn read_err(path: &Path) -> DiskError {
    let disk = open(path, Mode::ReadOnly).expect("opens");
    let mut buf = vec![0u8; 4096];
    match disk.read_at(&mut buf, 0) {
        Ok(()) => panic!("{} read cleanly", path.display()),
        Err(e) => e,
    }
}

fn is_corrupt(e: &DiskError, what: &str) -> bool {
    matches!(e, DiskError::Corrupt(m) if m.contains(what))
}

#[test]
fn bad_l2_entries_fail_at_access() -> Result<()> {
    let dir = TempDir::new("badl2");
    let (img, l2, e) = small_image(&dir, "a", &[])?;
    let l1 = be64_at(&std::fs::read(&img)?, 40);
    let copied = 1u64 << 63;
    for (what, entry) in [
        ("past the end", copied | (1u64 << 40)),
        ("not cluster aligned", (e & !(1u64 << 63)) + 512),
        ("reserved bits", e | 2),
        ("overlaps other metadata", copied | l1),
    ] {
        patch(&img, l2, &entry.to_be_bytes())?;
        let err = read_err(&img);
        ensure!(is_corrupt(&err, what), "{what}: got {err}");
    }
    // An entry of offset 0 (COPIED flag or not) is unallocated: a write allocates rather
    // than landing on the header.
    patch(&img, l2, &copied.to_be_bytes())?;
    let disk = open(&img, Mode::ReadWrite)?;
    let mut buf = vec![1u8; 4096];
    disk.read_at(&mut buf, 0)?;
    ensure!(
        buf.iter().all(|&b| b == 0),
        "offset-0 entry did not read as unallocated"
    );
    disk.write_at(&[9; 4096], 0)?;
    drop(disk);
    let head = std::fs::read(&img)?;
    ensure!(head[..4] == *b"QFI\xfb", "the header was overwritten");
    ensure!(open(&img, Mode::ReadOnly)?.read_at(&mut buf, 0).is_ok() && buf == [9; 4096]);
    // Writes over a bad entry fail the same way and leave the file alone.
    patch(&img, l2, &(copied | (1u64 << 40)).to_be_bytes())?;
    let len = std::fs::metadata(&img)?.len();
    let disk = open(&img, Mode::ReadWrite)?;
    ensure!(disk.write_at(&[1; 512], 0).is_err());
    drop(disk);
    ensure!(std::fs::metadata(&img)?.len() == len);
    Ok(())
}

#[test]
fn writes_never_land_on_snapshot_metadata() -> Result<()> {
    let dir = TempDir::new("snapmeta");
    let (img, l2, _) = small_image(&dir, "s", &[])?;
    qemu_img(&["snapshot", "-c", "s1", p(&img)])?;
    let bytes = std::fs::read(&img)?;
    let table = be64_at(&bytes, 64);
    let snap_l1 = be64_at(&bytes, table as usize);
    for target in [table, snap_l1] {
        patch(&img, l2, &((1u64 << 63) | target).to_be_bytes())?;
        let disk = open(&img, Mode::ReadWrite)?;
        let err = disk.write_at(&[1; 512], 0).unwrap_err();
        ensure!(is_corrupt(&err, "overlaps"), "{target:#x}: {err}");
    }
    // A snapshot table that runs off the end of the file is refused for writing.
    patch(&img, 64, &(bytes.len() as u64 + (1 << 16)).to_be_bytes())?;
    ensure!(is_corrupt(
        &open_err(&img, Mode::ReadWrite),
        "snapshot table"
    ));
    Ok(())
}

#[test]
fn bad_compressed_descriptors_fail_at_access() -> Result<()> {
    let dir = TempDir::new("badcomp");
    let (img, l2, e) = small_image(&dir, "c", &["-c"])?;
    ensure!(e & (1 << 62) != 0, "first cluster is compressed");
    let x = 62 - (16 - 8);
    let comp = 1u64 << 62;
    patch(&img, l2, &(comp | (1u64 << 40)).to_be_bytes())?;
    ensure!(is_corrupt(&read_err(&img), "past the end"));
    patch(&img, l2, &(comp | 100).to_be_bytes())?;
    ensure!(is_corrupt(&read_err(&img), "header"));
    // Right place, garbage stream: the refcount table's cluster is not deflate data.
    let (_, _, _) = (x, 0, 0);
    let rt = be64_at(&std::fs::read(&img)?, 48);
    patch(&img, l2, &(comp | rt).to_be_bytes())?;
    ensure!(matches!(read_err(&img), DiskError::Decompress { .. }));
    Ok(())
}

#[test]
fn bad_l1_entries_fail_at_access() -> Result<()> {
    let dir = TempDir::new("badl1");
    let (img, _, _) = small_image(&dir, "l1", &[])?;
    let bytes = std::fs::read(&img)?;
    let l1 = be64_at(&bytes, 40);
    let rt = be64_at(&bytes, 48);
    for (what, entry) in [
        ("overlaps", rt),
        ("overlaps", l1),
        ("past the end", 1u64 << 45),
        ("not cluster aligned", 0x10200),
    ] {
        patch(&img, l1, &entry.to_be_bytes())?;
        let err = read_err(&img);
        ensure!(is_corrupt(&err, what), "{what}: got {err}");
    }
    Ok(())
}

#[test]
fn bad_headers_fail_at_open() -> Result<()> {
    let dir = TempDir::new("badhdr");
    let fresh = || -> Result<PathBuf> { Ok(small_image(&dir, "h", &[])?.0) };
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("absurd cluster_bits", 20, &[0, 0, 0, 40], "cluster_bits"),
        ("huge L1", 36, &[0xff, 0xff, 0xff, 0xff], "too large"),
        ("L1 over header", 40, &[0; 8], "header"),
        ("L1 past EOF", 40, &[0, 0, 0, 1, 0, 0, 0, 0], "past the end"),
        ("reftable over header", 48, &[0; 8], "header"),
        ("huge reftable", 56, &[0, 1, 0, 0], "too large"),
        ("absurd size", 24, &[0xff; 8], "absurd"),
        ("refcount order", 96, &[0, 0, 0, 7], "refcount_order"),
    ];
    for (name, at, bytes, what) in cases {
        let img = fresh()?;
        patch(&img, *at, bytes)?;
        let err = open_err(&img, Mode::ReadOnly);
        ensure!(is_corrupt(&err, what), "{name}: got {err}");
    }
    // L1 table overlapping the refcount table.
    let img = fresh()?;
    let rt = be64_at(&std::fs::read(&img)?, 48);
    patch(&img, 40, &rt.to_be_bytes())?;
    ensure!(is_corrupt(&open_err(&img, Mode::ReadOnly), "overlaps"));
    // Unknown incompatible feature.
    let img = fresh()?;
    patch(&img, 72, &(1u64 << 20).to_be_bytes())?;
    let err = open_err(&img, Mode::ReadOnly);
    ensure!(
        matches!(&err, DiskError::Unsupported(m) if m.contains("bit 20")),
        "{err}"
    );
    // Truncated: the L1 table is gone.
    let img = fresh()?;
    let l1 = be64_at(&std::fs::read(&img)?, 40);
    OpenOptions::new().write(true).open(&img)?.set_len(l1)?;
    ensure!(is_corrupt(&open_err(&img, Mode::ReadOnly), "past the end"));
    Ok(())
}

#[test]
fn dirty_or_corrupt_images_refuse_writes() -> Result<()> {
    let dir = TempDir::new("dirty");
    for (bit, name) in [(1u64, "dirty"), (2u64, "corrupt")] {
        let (img, _, _) = small_image(&dir, name, &[])?;
        patch(&img, 72, &bit.to_be_bytes())?;
        let err = open_err(&img, Mode::ReadWrite);
        ensure!(matches!(err, DiskError::NeedsRepair(_)), "{name}: {err}");
        open(&img, Mode::ReadOnly)?;
    }
    // lazy_refcounts itself (clean) is fine to write: refcounts are kept exact.
    let img = dir.path("lazy.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p(&img),
        "4M",
    ])?;
    let disk = open(&img, Mode::ReadWrite)?;
    disk.write_at(&[7; 70000], 1000)?;
    drop(disk);
    check(&img, false)
}

#[test]
fn bad_refcount_blocks_fail_writes() -> Result<()> {
    let dir = TempDir::new("badrc");
    let (img, _, _) = small_image(&dir, "rc", &[])?;
    let rt = be64_at(&std::fs::read(&img)?, 48);
    patch(&img, rt, &(1u64 << 44).to_be_bytes())?;
    let disk = open(&img, Mode::ReadWrite)?;
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 0)?;
    let err = disk.write_at(&buf, 8192).unwrap_err();
    ensure!(
        matches!(&err, DiskError::Corrupt(m) if m.contains("refcount block")),
        "{err}"
    );
    drop(disk);
    // Refcount at its maximum: the engine never increments past it (refcount_bits=1).
    let (img, _, _) = small_image(&dir, "rc1", &["-o", "refcount_bits=1"])?;
    let disk = open(&img, Mode::ReadWrite)?;
    disk.write_at(&[3; 100_000], 500_000)?;
    drop(disk);
    check(&img, false)
}

#[test]
fn undercounted_refcounts_never_hand_out_live_clusters() -> Result<()> {
    let dir = TempDir::new("undercount");
    let img = dir.path("u.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "4M"])?;
    let out = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x61 0 1M", p(&img)],
    )?;
    ensure!(out.status.success(), "qemu-io write");
    // Every refcount in the first block says 0: the live data looks free.
    let bytes = std::fs::read(&img)?;
    let block = be64_at(&bytes, be64_at(&bytes, 48) as usize);
    patch(&img, block, &[0u8; 65536])?;
    let disk = open(&img, Mode::ReadWrite)?;
    let mut rng = Rng(3);
    for _ in 0..50 {
        let off = MIB as u64 + rng.below(3 * MIB as u64 - 70000);
        disk.write_at(&[0x62; 70000], off)?;
    }
    disk.flush()?;
    let mut buf = vec![0u8; MIB];
    disk.read_at(&mut buf, 0)?;
    ensure!(buf.iter().all(|&b| b == 0x61), "live data was overwritten");
    Ok(())
}

#[test]
fn backing_files_only_through_the_resolver() -> Result<()> {
    let dir = TempDir::new("backing");
    // A loop: the image names itself.
    let img = dir.path("loop.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "1M"])?;
    let other = dir.path("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&other), "1M"])?;
    qemu_img(&["rebase", "-u", "-b", "loop.qcow2", "-F", "qcow2", p(&img)])?;
    ensure!(matches!(
        open_err(&img, Mode::ReadOnly),
        DiskError::BackingTooDeep
    ));
    // A name pointing elsewhere: the resolver says no, the engine opens nothing itself.
    qemu_img(&["rebase", "-u", "-b", "/etc/passwd", "-F", "raw", p(&img)])?;
    let err = open_err(&img, Mode::ReadOnly);
    ensure!(
        matches!(&err, DiskError::BackingRefused { name, .. } if name == "/etc/passwd"),
        "{err}"
    );
    let file = File::open(&img)?;
    ensure!(matches!(
        disk::open(file, None, Mode::ReadOnly, &disk::NoBacking),
        Err(DiskError::BackingRefused { .. })
    ));
    Ok(())
}

/// The mapping the blk worker's io_uring path asks for: raw maps everything; QCOW2 maps
/// only data clusters the image owns (a write to an unallocated cluster must allocate, a
/// read of one comes from elsewhere), in host-contiguous runs, with a hold that keeps a
/// discarded cluster from being handed out again until the I/O has ended.
#[test]
fn direct_mappings_name_owned_clusters_and_hold_them() -> Result<()> {
    const CLUSTER: u64 = 64 << 10;
    let dir = TempDir::new("direct");
    let raw = dir.path("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&raw), "4M"])?;
    let disk = open(&raw, Mode::ReadWrite)?;
    let map = disk
        .map_direct(4096, 8192, true)?
        .context("raw maps every range")?;
    ensure!(map.runs.len() == 1 && map.runs[0].host == 4096 && map.runs[0].len == 8192);
    ensure!(map.hold.is_none(), "nothing moves under a raw mapping");
    ensure!(
        disk.map_direct(4 << 20, 512, false).is_err(),
        "a range past the end is refused"
    );

    let qcow2 = dir.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&qcow2), "4M"])?;
    let disk = open(&qcow2, Mode::ReadWrite)?;
    ensure!(
        disk.map_direct(0, CLUSTER, true)?.is_none() && disk.map_direct(0, 4096, false)?.is_none(),
        "an unallocated cluster maps to nothing"
    );
    disk.write_at(&vec![7u8; 3 * CLUSTER as usize], 0)?;
    let map = disk
        .map_direct(512, 2 * CLUSTER, true)?
        .context("owned clusters map")?;
    let mapped: u64 = map.runs.iter().map(|r| r.len).sum();
    ensure!(
        mapped == 2 * CLUSTER && map.runs[0].at == 0,
        "runs cover the request"
    );
    ensure!(map.hold.is_some(), "a QCOW2 mapping holds its clusters");
    ensure!(
        disk.map_direct(2 * CLUSTER, 2 * CLUSTER, false)?.is_none(),
        "a range reaching an unallocated cluster maps to nothing"
    );
    // The first cluster freed while the mapping is held: a flush may not reuse it yet.
    let first = map.runs[0].host - 512;
    disk.discard(0, CLUSTER)?;
    disk.flush()?;
    disk.write_at(&vec![9u8; CLUSTER as usize], 3 * CLUSTER)?;
    let fourth = disk
        .map_direct(3 * CLUSTER, CLUSTER, false)?
        .context("the new cluster maps")?;
    ensure!(
        fourth.runs[0].host != first,
        "a cluster was reused while an I/O held it"
    );
    drop((map, fourth));
    // Released: the next flush frees it, and the image stays consistent.
    disk.flush()?;
    drop(disk);
    check(&qcow2, false)
}
