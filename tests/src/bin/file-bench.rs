//! `file-bench --file PATH --size BYTES [--seconds S] [--only NAME] [--threads N]`: the
//! raw-file limit for bench/blk.sh. The same workloads as `blk-bench` straight on a file
//! with positioned reads and writes (pread/pwrite, buffered, as the workers do them), one
//! thread per request in flight (fio's psync engine with numjobs = queue depth;
//! `--threads` overrides that). Prints `<workload> <IOPS> <MiB/s>` per workload. Not a
//! test.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bulkhead_tests::blk_bench::{arg, Offsets, Workload, WORKLOADS};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = arg(&args, "--file").context("--file PATH")?;
    let size: u64 = arg(&args, "--size").context("--size BYTES")?.parse()?;
    let seconds: f64 = arg(&args, "--seconds").map_or(Ok(3.0), |s| s.parse())?;
    let only = arg(&args, "--only");
    let threads: Option<usize> = arg(&args, "--threads").map(|t| t.parse()).transpose()?;
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {path}"))?,
    );
    for workload in WORKLOADS {
        if only.as_deref().is_some_and(|o| !workload.name.contains(o)) {
            continue;
        }
        let (iops, mibs) = run(&file, size, workload, seconds, threads)?;
        println!("{} {iops:.0} {mibs:.1}", workload.name);
    }
    Ok(())
}

fn run(
    file: &Arc<std::fs::File>,
    size: u64,
    w: Workload,
    seconds: f64,
    threads: Option<usize>,
) -> Result<(f64, f64)> {
    ensure!(size >= w.len, "the file is smaller than one request");
    // Random streams are one per thread; a sequential one is shared, as the requests of
    // one sequential stream in flight together are.
    let shared = Arc::new(Mutex::new(Offsets::new(w, size, 0)));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..threads.unwrap_or(w.depth))
        .map(|t| {
            let (file, shared, done) = (file.clone(), shared.clone(), done.clone());
            let mut own = Offsets::new(w, size, t as u64 + 1);
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut buf: Vec<u8> = (0..w.len).map(|i| (i * 7 + 3) as u8).collect();
                while Instant::now() < deadline {
                    let at = if w.random {
                        own.next_offset()
                    } else {
                        shared.lock().map_or(0, |mut s| s.next_offset())
                    };
                    if w.write {
                        file.write_all_at(&buf, at)?;
                    } else {
                        file.read_exact_at(&mut buf, at)?;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let iops = done.load(Ordering::Relaxed) as f64 / elapsed;
    Ok((iops, iops * w.len as f64 / f64::from(1 << 20)))
}
