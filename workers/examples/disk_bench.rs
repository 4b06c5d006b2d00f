//! The disk engine alone, no vhost-user: 4 KiB random writes and reads at queue depth 1,
//! 64 KiB and 1 MiB sequential writes, on a fresh (allocating) and a fully allocated QCOW2
//! image and on a raw file, with `qemu-img bench` beside the sequential rows when qemu-img
//! is installed. Not a test: figures depend on the host.
//!
//!     cargo run --release -p bulkhead-workers --example disk_bench -- [DIR] [SIZE_MIB]

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use bulkhead_workers::disk::{self, DiskImage, Format, Mode};

fn open(path: &Path, format: Format) -> Arc<dyn DiskImage> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image");
    disk::open(file, Some(format), Mode::ReadWrite, &disk::NoBacking).expect("open disk")
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
}

/// Runs `ops` requests of `bs` bytes, random or sequential, then a flush; MiB/s and IOPS.
fn run(d: &dyn DiskImage, bs: u64, ops: u64, random: bool, write: bool) -> (f64, f64) {
    let mut buf = vec![0x5au8; bs as usize];
    let mut rng = Lcg(42);
    let slots = d.len() / bs;
    let t = Instant::now();
    for i in 0..ops {
        let off = if random {
            rng.next() % slots
        } else {
            i % slots
        } * bs;
        if write {
            d.write_at(&buf, off).expect("write");
        } else {
            d.read_at(&mut buf, off).expect("read");
        }
    }
    d.flush().expect("flush");
    let s = t.elapsed().as_secs_f64();
    ((bs * ops) as f64 / s / (1 << 20) as f64, ops as f64 / s)
}

fn qemu_img_bench(img: &Path, bs: u64, count: u64, write: bool) -> Option<f64> {
    let mut args = vec![
        "bench".to_string(),
        "-f".into(),
        "qcow2".into(),
        "-t".into(),
        "none".into(),
    ];
    if write {
        args.push("-w".into());
    }
    args.extend(["-d", "1", "-s"].map(String::from));
    args.extend([
        bs.to_string(),
        "-c".into(),
        count.to_string(),
        img.display().to_string(),
    ]);
    let t = Instant::now();
    let out = Command::new("qemu-img").args(&args).output().ok()?;
    out.status
        .success()
        .then(|| (bs * count) as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map_or_else(std::env::temp_dir, Into::into);
    let size_mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let size = size_mib << 20;
    let q = dir.join("disk-bench.qcow2");
    let r = dir.join("disk-bench.raw");
    let fresh = || {
        let _ = std::fs::remove_file(&q);
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg(size.to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "qemu-img create failed (is qemu-utils installed?)");
    };
    File::create(&r)
        .and_then(|f| f.set_len(size))
        .expect("raw file");
    println!(
        "{:<38} {:>10} {:>10} {:>14}",
        "row", "MiB/s", "IOPS", "qemu-img MiB/s"
    );
    let rows: &[(&str, u64, bool, bool)] = &[
        ("4k random write", 4096, true, true),
        ("4k random read", 4096, true, false),
        ("64k sequential write", 65536, false, true),
        ("1m sequential write", 1 << 20, false, true),
    ];
    for (name, bs, random, write) in rows {
        let ops = (size / 4 / bs).max(64);
        for (kind, allocate_first) in [
            ("qcow2 fresh", false),
            ("qcow2 allocated", true),
            ("raw", true),
        ] {
            let (path, format) = if kind == "raw" {
                (&r, Format::Raw)
            } else {
                (&q, Format::Qcow2)
            };
            if kind != "raw" {
                fresh();
                if allocate_first {
                    run(&*open(path, format), 1 << 20, size >> 20, false, true);
                }
            }
            let d = open(path, format);
            let (mbs, iops) = run(&*d, *bs, ops, *random, *write);
            drop(d);
            let theirs = if kind != "raw" && !random {
                if !allocate_first {
                    fresh();
                }
                qemu_img_bench(path, *bs, ops, *write).map_or("-".into(), |v| format!("{v:.0}"))
            } else {
                "-".into()
            };
            println!(
                "{:<38} {mbs:>10.0} {iops:>10.0} {theirs:>14}",
                format!("{name}, {kind}")
            );
        }
    }
    let _ = std::fs::remove_file(&q);
    let _ = std::fs::remove_file(&r);
}
