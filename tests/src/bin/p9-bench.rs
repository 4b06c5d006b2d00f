//! The 9P benchmark's client (`bench/p9.sh` runs it against bulkhead's server and diod):
//! one connection, one request at a time, the test client's own encoding, so both
//! servers see exactly the same messages.
//!
//! `p9-bench SOCKET ANAME [FILES] [MIB] [MSIZE]` prints `key value` lines:
//! the negotiated msize, create/stat/unlink operations per second over FILES small files
//! (each a Twalk+Tlcreate+Twrite+Tclunk, a Twalk+Tgetattr+Tclunk, a Twalk+Tremove), and MB/s
//! writing then reading a MIB MiB file in 1 MiB application writes and reads (each split
//! into msize-sized Twrites and Treads, as a kernel client does).

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use bulkhead_tests::p9::{flags, t, Body, Client, NOFID};

const ROOT: u32 = 0;
const MIB: usize = 1 << 20;

fn run(args: &[String]) -> bulkhead_tests::p9::Result<()> {
    let socket = Path::new(&args[1]);
    let aname = &args[2];
    let files: u32 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let mib: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(128);
    let msize: u32 = args
        .get(5)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512 * 1024);

    let mut c = Client::connect(socket)?;
    let (msize, _) = c.version(msize, "9P2000.L")?;
    c.msize = msize;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    c.rpc(
        t::ATTACH,
        Body::new()
            .u32(ROOT)
            .u32(NOFID)
            .str("bench")
            .str(aname)
            .u32(uid),
    )?;
    println!("msize {msize}");

    // Metadata: create (with 100 bytes in each), stat, unlink.
    let payload = [0x5au8; 100];
    let start = Instant::now();
    for i in 0..files {
        c.walk(ROOT, 1, &[] as &[&str])?;
        c.lcreate(1, format!("f{i}"), flags::WRONLY | flags::CREATE, 0o644, 0)?;
        c.write(1, 0, &payload)?;
        c.clunk(1)?;
    }
    let create = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for i in 0..files {
        c.walk(ROOT, 1, &[format!("f{i}")])?;
        c.getattr(1)?;
        c.clunk(1)?;
    }
    let stat = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for i in 0..files {
        // Twalk+Tremove rather than Tunlinkat, which diod does not implement.
        c.walk(ROOT, 1, &[format!("f{i}")])?;
        c.remove(1)?;
    }
    let unlink = start.elapsed().as_secs_f64();
    let n = f64::from(files);
    println!("create_per_s {:.0}", n / create);
    println!("stat_per_s {:.0}", n / stat);
    println!("unlink_per_s {:.0}", n / unlink);
    println!("meta_ops_per_s {:.0}", 3.0 * n / (create + stat + unlink));

    // Data: 1 MiB application I/Os, each as many msize-sized requests as it takes.
    let chunk = (msize - 24) as usize;
    let block: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8).collect();
    c.walk(ROOT, 2, &[] as &[&str])?;
    c.lcreate(
        2,
        "big",
        flags::RDWR | flags::CREATE | flags::TRUNC,
        0o644,
        0,
    )?;
    let start = Instant::now();
    for m in 0..mib {
        let mut at = 0;
        while at < MIB {
            let end = (at + chunk).min(MIB);
            let written = c.write(2, (m * MIB + at) as u64, &block[at..end])?;
            at += written as usize;
        }
    }
    c.fsync(2)?;
    let write = start.elapsed().as_secs_f64();
    c.clunk(2)?;
    c.walk(ROOT, 3, &["big"])?;
    c.lopen(3, flags::RDONLY)?;
    let start = Instant::now();
    let mut total = 0usize;
    for m in 0..mib {
        let mut at = 0;
        while at < MIB {
            let want = (MIB - at).min(chunk) as u32;
            let data = c.read(3, (m * MIB + at) as u64, want)?;
            if data.is_empty() {
                break;
            }
            at += data.len();
        }
        total += at;
    }
    let read = start.elapsed().as_secs_f64();
    c.clunk(3)?;
    c.walk(ROOT, 3, &["big"])?;
    c.remove(3)?;
    let mb = (mib * MIB) as f64 / 1e6;
    println!("write_mb_s {:.0}", mb / write);
    println!("read_mb_s {:.0}", total as f64 / 1e6 / read);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: p9-bench SOCKET ANAME [FILES] [MIB] [MSIZE]");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p9-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
