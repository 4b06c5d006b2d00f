//! `bulkhead-worker blk` driven from userspace: the harness frontend and split-queue driver
//! over memfd "guest RAM", the worker a real process serving raw and QCOW2 images made by
//! qemu-img, which then checks and compares what the worker left behind.
//!
//! Needs the worker binary (`cargo build -p bulkhead-workers`, same profile as the tests)
//! and qemu-img (qemu-utils).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_protocol::{BackingFile, BlkConfig, DeviceConfig, ImageFormat};
use bulkhead_tests::vhost::{
    Buffer, DeviceSetup, SplitQueueDriver, UsedElement, UserspaceDevice, UserspaceFrontend,
    WorkerProcess,
};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestAddress;

const TIMEOUT: Duration = Duration::from_secs(20);
const SECTOR: u64 = 512;
const DISK_SIZE: u64 = 64 << 20;
const QUEUE_SIZE: u16 = 128;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "bulkhead-blk-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn qemu_img(args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("run qemu-img")?;
    Ok(out)
}

fn qemu_img_ok(args: &[&str]) -> Result<()> {
    let out = qemu_img(args)?;
    ensure!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// qemu-img's verdict on what a worker left in `image`: `check` clean for QCOW2, and the
/// same bytes as the raw file `expected`.
fn qemu_img_agrees(image: &Path, format: &str, expected: &Path) -> Result<()> {
    if format == "qcow2" {
        qemu_img_ok(&["check", p(image)])?;
    }
    qemu_img_ok(&["compare", "-f", format, "-F", "raw", p(image), p(expected)])
}

/// An empty image of `DISK_SIZE` in `format`.
fn create(dir: &TempDir, name: &str, format: &str) -> Result<PathBuf> {
    let path = dir.path(name);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        format,
        p(&path),
        &DISK_SIZE.to_string(),
    ])?;
    Ok(path)
}

/// Deterministic bytes for a sector run, different for every `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn config_flags() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// A request's buffers, allocated once and reused.
struct Slot {
    header: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

/// A virtio-blk driver over the harness device.
struct Blk {
    device: UserspaceDevice,
    slots: Vec<Slot>,
}

/// One request as the driver describes it.
#[derive(Clone)]
struct Req<'a> {
    kind: u32,
    sector: u64,
    out: &'a [u8],
    in_len: u32,
}

impl Blk {
    fn start(connection: UnixStream, queues: usize, features: u64) -> Result<Blk> {
        let mut setup = DeviceSetup::new(&vec![QUEUE_SIZE; queues]).with_features(features);
        setup.memory_size = 96 << 20;
        setup.protocol_features = config_flags();
        let device = UserspaceDevice::start(connection, &setup)?;
        let slots = (0..64)
            .map(|_| {
                Ok(Slot {
                    header: device.memory.allocate(16, 16)?,
                    data: device.memory.allocate(1 << 20, 4096)?,
                    status: device.memory.allocate(1, 1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Blk { device, slots })
    }

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// Posts `req` from `slot` on queue `q`: header, data out split in two descriptors
    /// (so every request is a multi-descriptor chain), data in, status.
    fn post(&mut self, q: usize, slot: usize, req: &Req<'_>) -> Result<u16> {
        let s = &self.slots[slot];
        let memory = &self.device.memory;
        memory.write(s.header, &Self::header(req.kind, req.sector))?;
        memory.write(s.status, &[0xff])?;
        let mut buffers = vec![Buffer::readable(s.header, 16)];
        if !req.out.is_empty() {
            memory.write(s.data, req.out)?;
            let half = (req.out.len() as u32 / 2).max(1).min(req.out.len() as u32);
            buffers.push(Buffer::readable(s.data, half));
            if (req.out.len() as u32) > half {
                buffers.push(Buffer::readable(
                    GuestAddress(s.data.0 + u64::from(half)),
                    req.out.len() as u32 - half,
                ));
            }
        }
        if req.in_len > 0 {
            memory.write(s.data, &vec![0xaa; req.in_len as usize])?;
            buffers.push(Buffer::writable(s.data, req.in_len));
        }
        buffers.push(Buffer::writable(s.status, 1));
        Ok(self.device.queues[q].post(&buffers)?)
    }

    fn status(&self, slot: usize) -> Result<u8> {
        Ok(self.device.memory.read(self.slots[slot].status, 1)?[0])
    }

    fn data(&self, slot: usize, len: u32) -> Result<Vec<u8>> {
        Ok(self
            .device
            .memory
            .read(self.slots[slot].data, len as usize)?)
    }

    /// One request on queue `q`, waited for: its status, data in, and used length.
    fn run(&mut self, q: usize, req: &Req<'_>) -> Result<(u8, Vec<u8>, u32)> {
        self.post(q, 0, req)?;
        self.device.queues[q].kick()?;
        let used = self.device.queues[q].wait_used(1, TIMEOUT)?;
        ensure!(used.len() == 1, "one request, {} answers", used.len());
        Ok((self.status(0)?, self.data(0, req.in_len)?, used[0].len))
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> Result<u8> {
        let req = Req {
            kind: VIRTIO_BLK_T_OUT,
            sector,
            out: data,
            in_len: 0,
        };
        Ok(self.run(0, &req)?.0)
    }

    fn read(&mut self, sector: u64, len: u32) -> Result<(u8, Vec<u8>)> {
        let req = Req {
            kind: VIRTIO_BLK_T_IN,
            sector,
            out: &[],
            in_len: len,
        };
        let (status, data, used) = self.run(0, &req)?;
        if status == OK {
            ensure!(used == len + 1, "a read of {len} bytes used {used}");
        }
        Ok((status, data))
    }

    fn simple(&mut self, kind: u32) -> Result<u8> {
        let req = Req {
            kind,
            sector: 0,
            out: &[],
            in_len: 0,
        };
        Ok(self.run(0, &req)?.0)
    }

    fn ranges(&mut self, kind: u32, ranges: &[(u64, u32, u32)]) -> Result<u8> {
        let mut out = Vec::new();
        for &(sector, sectors, flags) in ranges {
            out.extend_from_slice(&sector.to_le_bytes());
            out.extend_from_slice(&sectors.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
        }
        let req = Req {
            kind,
            sector: 0,
            out: &out,
            in_len: 0,
        };
        Ok(self.run(0, &req)?.0)
    }

    fn config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let (_, payload) = self.device.frontend.inner().get_config(
            offset,
            size,
            VhostUserConfigFlags::WRITABLE,
            &vec![0u8; size as usize],
        )?;
        Ok(payload.to_vec())
    }
}

fn standalone(image: &Path, extra: &[&str]) -> Result<WorkerProcess> {
    let mut args = vec!["--image", p(image)];
    args.extend_from_slice(extra);
    Ok(WorkerProcess::standalone("blk", &args)?)
}

fn assert_alive(worker: &WorkerProcess) -> Result<()> {
    ensure!(worker.is_running(), "the worker died:\n{}", worker.stderr());
    ensure!(
        !worker.stderr().contains("panicked"),
        "the worker panicked:\n{}",
        worker.stderr()
    );
    Ok(())
}

/// Writes the same runs through the device and into `expected` (a plain file).
fn write_patterns(blk: &mut Blk, expected: &File) -> Result<()> {
    // Sector runs of several sizes, one straddling a 64 KiB cluster boundary, one at the
    // very end of the disk.
    let runs: [(u64, usize); 5] = [
        (0, 4096),
        (7, 512),
        (127, 64 << 10),
        (1000, 1 << 20),
        (DISK_SIZE / SECTOR - 8, 4096),
    ];
    for (i, &(sector, len)) in runs.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        ensure!(blk.write(sector, &data)? == OK, "write at sector {sector}");
        expected.write_all_at(&data, sector * SECTOR)?;
        let (status, back) = blk.read(sector, len as u32)?;
        ensure!(status == OK && back == data, "read back at sector {sector}");
    }
    ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK, "flush");
    Ok(())
}

fn expected_raw(dir: &TempDir) -> Result<(PathBuf, File)> {
    let path = dir.path("expected.raw");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    file.set_len(DISK_SIZE)?;
    Ok((path, file))
}

fn round_trip(format: &str) -> Result<()> {
    let dir = TempDir::new(format);
    let image = create(&dir, &format!("disk.{format}"), format)?;
    let (expected_path, expected) = expected_raw(&dir)?;
    let worker = standalone(&image, &["--format", format])?;
    let mut blk = Blk::start(worker.connect()?, 1, 1 << VIRTIO_RING_F_EVENT_IDX)?;
    write_patterns(&mut blk, &expected).with_context(|| worker.stderr())?;
    assert_alive(&worker)?;
    drop(blk);
    worker.kill()?;
    qemu_img_agrees(&image, format, &expected_path)
}

#[test]
fn raw_image_takes_writes_that_qemu_img_reads_back() -> Result<()> {
    round_trip("raw")
}

#[test]
fn qcow2_image_takes_writes_and_stays_clean() -> Result<()> {
    round_trip("qcow2")
}

#[test]
fn qcow2_over_a_backing_file_copies_on_write() -> Result<()> {
    let dir = TempDir::new("chain");
    let base = create(&dir, "base.raw", "raw")?;
    let base_data = pattern(99, 1 << 20);
    OpenOptions::new()
        .write(true)
        .open(&base)?
        .write_all_at(&base_data, 0)?;
    let top = dir.path("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&top),
    ])?;
    let worker = standalone(&top, &["--format", "qcow2"])?;
    let mut blk = Blk::start(worker.connect()?, 1, 0)?;
    let (status, back) = blk.read(0, 1 << 20)?;
    ensure!(
        status == OK && back == base_data,
        "the backing file shows through"
    );
    let data = pattern(5, 4096);
    ensure!(blk.write(8, &data)? == OK);
    ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK);
    drop(blk);
    worker.kill()?;
    let mut after = vec![0u8; 1 << 20];
    File::open(&base)?.read_exact_at(&mut after, 0)?;
    ensure!(after == base_data, "the backing file was written");
    qemu_img_ok(&["check", p(&top)])
}

#[test]
fn config_space_and_features_describe_the_disk() -> Result<()> {
    let dir = TempDir::new("config");
    let image = create(&dir, "disk.qcow2", "qcow2")?;
    let worker = standalone(&image, &["--queues", "3"])?;
    let mut blk = Blk::start(worker.connect()?, 3, u64::MAX)?;
    let features = blk.device.negotiated.features;
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        ensure!(features & (1 << bit) != 0, "feature {bit} not offered");
    }
    ensure!(
        features & (1 << VIRTIO_BLK_F_RO) == 0,
        "a writable disk offers RO"
    );
    let config = blk.config(0, 60)?;
    let u64_at = |at: usize| u64::from_le_bytes(config[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(config[at..at + 4].try_into().unwrap());
    ensure!(u64_at(0) == DISK_SIZE / SECTOR, "capacity {}", u64_at(0));
    ensure!(u32_at(20) == 512, "blk_size {}", u32_at(20));
    ensure!(
        u16::from_le_bytes([config[34], config[35]]) == 3,
        "num_queues"
    );
    // The QCOW2 cluster (64 KiB) is the discard alignment.
    ensure!(u32_at(44) == 128, "discard alignment {}", u32_at(44));
    ensure!(
        blk.device.frontend.inner().get_queue_num()? == 3,
        "GET_QUEUE_NUM"
    );
    // Every queue serves, and they all see one disk.
    for q in 0..3 {
        let data = pattern(q as u64 + 10, 4096);
        let req = Req {
            kind: VIRTIO_BLK_T_OUT,
            sector: q as u64 * 8,
            out: &data,
            in_len: 0,
        };
        ensure!(blk.run(q, &req)?.0 == OK, "write on queue {q}");
    }
    for q in 0..3 {
        let req = Req {
            kind: VIRTIO_BLK_T_IN,
            sector: ((q + 1) % 3) as u64 * 8,
            out: &[],
            in_len: 4096,
        };
        let (status, data, _) = blk.run(q, &req)?;
        ensure!(
            status == OK && data == pattern((q + 1) as u64 % 3 + 10, 4096),
            "queue {q} reads what another queue wrote"
        );
    }
    assert_alive(&worker)
}

/// Queues served at once by their own threads: every queue holds a batch of allocating
/// QCOW2 writes when all are kicked together, so the threads allocate clusters and update
/// L2 tables and refcounts side by side. Each write covers part of a cluster, interleaved
/// with the other queues' clusters, and then every queue reads another's writes back.
#[test]
fn queues_served_in_parallel_allocate_a_consistent_qcow2() -> Result<()> {
    const QUEUES: usize = 4;
    const PER_QUEUE: usize = 16;
    const CLUSTER_SECTORS: u64 = (64 << 10) / SECTOR;
    let dir = TempDir::new("parallel");
    let image = create(&dir, "disk.qcow2", "qcow2")?;
    let (expected_path, expected) = expected_raw(&dir)?;
    let worker = standalone(&image, &["--queues", &QUEUES.to_string()])?;
    let mut blk = Blk::start(worker.connect()?, QUEUES, 1 << VIRTIO_RING_F_EVENT_IDX)?;
    // Request `i` of queue `q`: 12 KiB at an odd sector of cluster `i * QUEUES + q`.
    let write_of = |q: usize, i: usize| {
        let cluster = (i * QUEUES + q) as u64;
        let sector = cluster * CLUSTER_SECTORS + 1 + (q as u64) * 3;
        (sector, pattern((q * PER_QUEUE + i) as u64 + 100, 12 << 10))
    };
    for q in 0..QUEUES {
        for i in 0..PER_QUEUE {
            let (sector, data) = write_of(q, i);
            let req = Req {
                kind: VIRTIO_BLK_T_OUT,
                sector,
                out: &data,
                in_len: 0,
            };
            blk.post(q, q * PER_QUEUE + i, &req)?;
            expected.write_all_at(&data, sector * SECTOR)?;
        }
    }
    for q in 0..QUEUES {
        blk.device.queues[q].kick()?;
    }
    for q in 0..QUEUES {
        let used = blk.device.queues[q]
            .wait_used(PER_QUEUE, TIMEOUT)
            .with_context(|| format!("writes on queue {q}: {}", worker.stderr()))?;
        ensure!(used.len() == PER_QUEUE, "queue {q}: {} answers", used.len());
        for i in 0..PER_QUEUE {
            ensure!(
                blk.status(q * PER_QUEUE + i)? == OK,
                "write {i} on queue {q}"
            );
        }
    }
    for q in 0..QUEUES {
        let other = (q + 1) % QUEUES;
        for i in [0, PER_QUEUE / 2, PER_QUEUE - 1] {
            let (sector, data) = write_of(other, i);
            let req = Req {
                kind: VIRTIO_BLK_T_IN,
                sector,
                out: &[],
                in_len: data.len() as u32,
            };
            let (status, back, _) = blk.run(q, &req)?;
            ensure!(
                status == OK && back == data,
                "queue {q} reads write {i} of queue {other}"
            );
        }
    }
    ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK, "flush");
    assert_alive(&worker)?;
    drop(blk);
    worker.kill()?;
    qemu_img_agrees(&image, "qcow2", &expected_path)
}

#[test]
fn read_only_disk_refuses_writes_with_ioerr() -> Result<()> {
    let dir = TempDir::new("ro");
    let image = create(&dir, "disk.raw", "raw")?;
    let before = fs::read(&image)?;
    let worker = standalone(&image, &["--ro"])?;
    let mut blk = Blk::start(worker.connect()?, 1, u64::MAX)?;
    ensure!(
        blk.device.negotiated.features & (1 << VIRTIO_BLK_F_RO) != 0,
        "RO not offered"
    );
    ensure!(
        blk.device.negotiated.features & (1 << VIRTIO_BLK_F_DISCARD) == 0,
        "a read-only disk offers DISCARD"
    );
    ensure!(
        blk.write(0, &pattern(1, 4096))? == IOERR,
        "a write was accepted"
    );
    ensure!(blk.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0)])? != OK);
    let (status, data) = blk.read(0, 4096)?;
    ensure!(
        status == OK && data.iter().all(|&b| b == 0),
        "read of the ro disk"
    );
    ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK, "flush of a ro disk");
    assert_alive(&worker)?;
    drop(blk);
    worker.kill()?;
    ensure!(fs::read(&image)? == before, "the ro image changed");
    Ok(())
}

#[test]
fn cow_disk_takes_writes_and_leaves_the_file_identical() -> Result<()> {
    let dir = TempDir::new("cow");
    for format in ["raw", "qcow2"] {
        let image = create(&dir, &format!("disk.{format}"), format)?;
        let before = fs::read(&image)?;
        let worker = standalone(&image, &["--cow", "--format", format])?;
        let mut blk = Blk::start(worker.connect()?, 1, 0)?;
        let data = pattern(3, 128 << 10);
        ensure!(blk.write(64, &data)? == OK, "{format}: cow write");
        let (status, back) = blk.read(64, 128 << 10)?;
        ensure!(status == OK && back == data, "{format}: cow read back");
        ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK);
        ensure!(blk.ranges(VIRTIO_BLK_T_DISCARD, &[(64, 128, 0)])? == OK);
        drop(blk);
        worker.kill()?;
        ensure!(
            fs::read(&image)? == before,
            "{format}: the cow image changed"
        );
    }
    Ok(())
}

#[test]
fn get_id_answers_the_serial() -> Result<()> {
    let dir = TempDir::new("id");
    let image = create(&dir, "disk.raw", "raw")?;
    let worker = standalone(&image, &["--serial", "bulkhead-serial-0042"])?;
    let mut blk = Blk::start(worker.connect()?, 1, 0)?;
    let req = Req {
        kind: VIRTIO_BLK_T_GET_ID,
        sector: 0,
        out: &[],
        in_len: 20,
    };
    let (status, id, used) = blk.run(0, &req)?;
    ensure!(
        status == OK && used == 21,
        "GET_ID: status {status}, used {used}"
    );
    ensure!(
        &id == b"bulkhead-serial-0042",
        "serial {:?}",
        String::from_utf8_lossy(&id)
    );
    let too_long = WorkerProcess::standalone(
        "blk",
        &["--image", p(&image), "--serial", "012345678901234567890"],
    );
    // Refused at startup: the worker exits (possibly before it is seen listening).
    if let Ok(w) = too_long {
        ensure!(
            w.wait_exit(TIMEOUT)?.code() == Some(1),
            "a 21-byte serial was taken"
        );
        ensure!(w.stderr().contains("serial"), "{}", w.stderr());
    }
    Ok(())
}

#[test]
fn discard_and_write_zeroes() -> Result<()> {
    let dir = TempDir::new("discard");
    for format in ["raw", "qcow2"] {
        let image = create(&dir, &format!("disk.{format}"), format)?;
        let worker = standalone(&image, &["--format", format])?;
        let mut blk = Blk::start(worker.connect()?, 1, u64::MAX)?;
        let data = pattern(7, 1 << 20);
        ensure!(blk.write(0, &data)? == OK);
        // Zero 64 KiB at 128 KiB, with and without unmap, in one request of two ranges.
        let status = blk.ranges(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[
                (256, 128, 0),
                (1024, 128, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            ],
        )?;
        ensure!(status == OK, "{format}: write zeroes: {status}");
        let (_, back) = blk.read(0, 1 << 20)?;
        let mut expected = data.clone();
        expected[256 * 512..384 * 512].fill(0);
        expected[1024 * 512..1152 * 512].fill(0);
        ensure!(back == expected, "{format}: zeroed ranges read back wrong");
        ensure!(
            blk.ranges(VIRTIO_BLK_T_DISCARD, &[(1536, 256, 0)])? == OK,
            "{format}: discard"
        );
        // Unmap is not a discard flag; unknown flags are unsupported.
        ensure!(blk.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 8, 1)])? == UNSUPP);
        ensure!(blk.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 2)])? == UNSUPP);
        // Out of range, or too many sectors: IOERR, and nothing changed.
        ensure!(
            blk.ranges(
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[(0, 8, 0), (DISK_SIZE / SECTOR, 8, 0)]
            )? == IOERR
        );
        ensure!(blk.ranges(VIRTIO_BLK_T_DISCARD, &[(0, u32::MAX, 0)])? == IOERR);
        let (_, first) = blk.read(0, 4096)?;
        ensure!(
            first == expected[..4096],
            "{format}: a refused request changed the disk"
        );
        ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK);
        assert_alive(&worker)?;
        drop(blk);
        worker.kill()?;
        if format == "qcow2" {
            qemu_img_ok(&["check", p(&image)])?;
        }
    }
    Ok(())
}

/// A loop device over a file of the test's: a host block device, detached when dropped.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> Result<LoopDevice> {
        let out = Command::new("losetup")
            .args(["--find", "--show", p(file)])
            .output()
            .context("run losetup")?;
        ensure!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(LoopDevice(PathBuf::from(device)))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// The promise for host block devices: served as a raw disk, written through in
/// read-write mode, and never written with ro or cow.
#[test]
fn a_host_block_device_is_a_raw_disk_and_cow_or_ro_never_write_it() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: loop devices need root");
        return Ok(());
    }
    let dir = TempDir::new("blockdev");
    let backing = dir.path("backing.raw");
    fs::write(&backing, pattern(11, DISK_SIZE as usize))?;
    let device = LoopDevice::attach(&backing)?;
    let before = fs::read(&backing)?;
    for mode in ["--cow", "--ro"] {
        let worker = standalone(&device.0, &["--format", "raw", mode])?;
        let mut blk = Blk::start(worker.connect()?, 1, 1 << VIRTIO_RING_F_EVENT_IDX)?;
        let capacity = blk.config(0, 8)?;
        ensure!(
            capacity == (DISK_SIZE / SECTOR).to_le_bytes(),
            "{mode}: capacity {capacity:?}, the device has {DISK_SIZE} bytes"
        );
        let (status, head) = blk.read(0, 64 << 10)?;
        ensure!(status == OK && head == before[..64 << 10], "{mode}: read");
        let data = pattern(12, 64 << 10);
        if mode == "--cow" {
            ensure!(blk.write(8, &data)? == OK, "cow write");
            ensure!(blk.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(512, 64, 0)])? == OK);
            let (_, back) = blk.read(8, 64 << 10)?;
            ensure!(back == data, "cow read back");
        } else {
            ensure!(blk.write(8, &data)? == IOERR, "ro write accepted");
        }
        ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK, "{mode}: flush");
        assert_alive(&worker)?;
        drop(blk);
        worker.kill()?;
        ensure!(fs::read(&device.0)? == before, "{mode}: the device changed");
    }
    // Read-write: writes and zeroes reach the device, and through it the file.
    let worker = standalone(&device.0, &["--format", "raw"])?;
    let mut blk = Blk::start(worker.connect()?, 1, 1 << VIRTIO_RING_F_EVENT_IDX)?;
    let data = pattern(13, 1 << 20);
    ensure!(blk.write(2048, &data)? == OK, "write");
    ensure!(blk.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(2048, 8, 0)])? == OK);
    ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK, "flush");
    assert_alive(&worker)?;
    drop(blk);
    worker.kill()?;
    let mut expected = before;
    let at = 2048 * SECTOR as usize;
    expected[at..at + data.len()].copy_from_slice(&data);
    expected[at..at + 8 * SECTOR as usize].fill(0);
    ensure!(
        fs::read(&device.0)? == expected,
        "the device holds other bytes"
    );
    drop(device);
    ensure!(
        fs::read(&backing)? == expected,
        "the file under the device differs"
    );
    Ok(())
}

#[test]
fn bad_requests_get_a_status_not_a_crash() -> Result<()> {
    let dir = TempDir::new("bad");
    let image = create(&dir, "disk.qcow2", "qcow2")?;
    let worker = standalone(&image, &[])?;
    let mut blk = Blk::start(worker.connect()?, 1, 0)?;
    let capacity = DISK_SIZE / SECTOR;
    let cases: [(&str, Req<'_>, u8); 6] = [
        (
            "read past the end",
            Req {
                kind: VIRTIO_BLK_T_IN,
                sector: capacity - 1,
                out: &[],
                in_len: 1024,
            },
            IOERR,
        ),
        (
            "sector overflowing",
            Req {
                kind: VIRTIO_BLK_T_IN,
                sector: u64::MAX - 1,
                out: &[],
                in_len: 1024,
            },
            IOERR,
        ),
        (
            "write past the end",
            Req {
                kind: VIRTIO_BLK_T_OUT,
                sector: capacity,
                out: &[1; 512],
                in_len: 0,
            },
            IOERR,
        ),
        (
            "partial sector",
            Req {
                kind: VIRTIO_BLK_T_OUT,
                sector: 0,
                out: &[1; 100],
                in_len: 0,
            },
            IOERR,
        ),
        (
            "unknown type",
            Req {
                kind: 99,
                sector: 0,
                out: &[],
                in_len: 0,
            },
            UNSUPP,
        ),
        (
            "empty range list",
            Req {
                kind: VIRTIO_BLK_T_DISCARD,
                sector: 0,
                out: &[],
                in_len: 0,
            },
            IOERR,
        ),
    ];
    for (what, req, want) in &cases {
        let (status, _, _) = blk.run(0, req)?;
        ensure!(status == *want, "{what}: status {status}, wanted {want}");
    }
    let memory = blk.device.memory.clone();
    let s = &blk.slots[0];
    // A header cut short: 8 bytes, then the status.
    memory.write(s.status, &[0xff])?;
    blk.device.queues[0].post(&[Buffer::readable(s.header, 8), Buffer::writable(s.status, 1)])?;
    blk.device.queues[0].kick()?;
    blk.device.queues[0].wait_used(1, TIMEOUT)?;
    ensure!(memory.read(s.status, 1)?[0] == IOERR, "short header");
    // No writable byte for the status: returned with nothing written.
    blk.device.queues[0].post(&[Buffer::readable(s.header, 16)])?;
    blk.device.queues[0].kick()?;
    let used: Vec<UsedElement> = blk.device.queues[0].wait_used(1, TIMEOUT)?;
    ensure!(
        used[0].len == 0,
        "a request without status used {}",
        used[0].len
    );
    // Status only readable (the driver forgot WRITE): the same.
    memory.write(s.header, &Blk::header(VIRTIO_BLK_T_IN, 0))?;
    blk.device.queues[0].post(&[
        Buffer::readable(s.header, 16),
        Buffer::readable(s.status, 1),
    ])?;
    blk.device.queues[0].kick()?;
    let used = blk.device.queues[0].wait_used(1, TIMEOUT)?;
    ensure!(used[0].len == 0, "a readable status used {}", used[0].len);
    // And the worker still serves.
    let data = pattern(11, 4096);
    ensure!(blk.write(16, &data)? == OK);
    ensure!(blk.read(16, 4096)? == (OK, data));
    assert_alive(&worker)
}

/// The worker as the VMM launches it: the image and its backing file arrive as inherited
/// descriptors named in the launch config.
#[test]
fn launched_worker_serves_inherited_image_and_backing_file() -> Result<()> {
    let dir = TempDir::new("launched");
    let base = create(&dir, "base.qcow2", "qcow2")?;
    let top = dir.path("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ])?;
    let image = OpenOptions::new().read(true).write(true).open(&top)?;
    let backing = File::open(&base)?;
    let config = DeviceConfig::Blk(BlkConfig {
        image_fd: 5,
        backing: vec![BackingFile {
            name: "base.qcow2".into(),
            fd: 6,
        }],
        format: Some(ImageFormat::Qcow2),
        read_only: false,
        copy_on_write: false,
        overlay_fd: None,
        num_queues: 2,
        serial: "launched".into(),
    });
    let (worker, connection) =
        WorkerProcess::launched_with_files("blk0", config, &[&image, &backing])?;
    let mut blk = Blk::start(connection, 2, 0)?;
    let data = pattern(21, 64 << 10);
    ensure!(blk.write(100, &data)? == OK, "launched write");
    ensure!(blk.read(100, 64 << 10)? == (OK, data), "launched read");
    ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK);
    assert_alive(&worker)?;
    drop(blk);
    worker.kill()?;
    qemu_img_ok(&["check", p(&top)])
}

/// A launch config is checked like any input: an overlay store for a disk that is not
/// copy-on-write, or a store that does not belong to the disk, is a clear error at startup.
#[test]
fn launched_worker_refuses_a_wrong_overlay_store() -> Result<()> {
    let dir = TempDir::new("overlay-refused");
    let image = create(&dir, "disk.raw", "raw")?;
    let config = |cow: bool| {
        DeviceConfig::Blk(BlkConfig {
            image_fd: 5,
            backing: Vec::new(),
            format: Some(ImageFormat::Raw),
            read_only: false,
            copy_on_write: cow,
            overlay_fd: Some(6),
            num_queues: 1,
            serial: String::new(),
        })
    };
    let store = bulkhead_workers::disk::cow::new_store()?;
    store.write_all_at(b"not a cow store", 0)?;
    for (cow, why) in [
        (
            false,
            "an overlay store for a disk that is not copy-on-write",
        ),
        (true, "no overlay header"),
    ] {
        let file = OpenOptions::new().read(true).write(!cow).open(&image)?;
        let (worker, _connection) =
            WorkerProcess::launched_with_files("blk0", config(cow), &[&file, &store])?;
        let status = worker.wait_exit(TIMEOUT)?;
        // Its stderr is collected by a thread of the harness: give that a moment.
        for _ in 0..100 {
            if worker.stderr().contains(why) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ensure!(
            status.code() == Some(1),
            "exit {status:?}: {}",
            worker.stderr()
        );
        ensure!(worker.stderr().contains(why), "{}", worker.stderr());
    }
    Ok(())
}

/// Counts the requests an inflight region (libvhost-user's layout) records as in flight
/// on queue 0.
fn in_flight_in_region(region: &File, queue_size: u16) -> Result<usize> {
    // Per queue: features u64, version u16, desc_num u16, last_batch_head u16, used_idx
    // u16, then desc_num descriptors of 16 bytes whose first byte is `inflight`.
    let mut bytes = vec![0u8; 16 + 16 * usize::from(queue_size)];
    region.read_exact_at(&mut bytes, 0)?;
    Ok((0..usize::from(queue_size))
        .filter(|i| bytes[16 + 16 * i] != 0)
        .count())
}

/// kill -9 with requests in flight; a replacement given the same inflight region completes
/// exactly those: every request answered once, none lost, none twice, data on disk. A raw
/// image, so that every write completed by the killed worker is in the file (QCOW2 metadata
/// is only promised durable by a FLUSH, which a crash test of the engine covers).
#[test]
fn killed_worker_with_requests_in_flight_is_replaced_without_loss() -> Result<()> {
    killed_mid_io(40, 256 << 10, |i| i as u64, false)
}

/// The same with 32 writes of 64 KiB (each its own io_uring op) at scattered places, all
/// posted at once: a queue depth of 32 in flight when the kill lands.
#[test]
fn killed_worker_with_qd32_in_flight_is_replaced_without_loss() -> Result<()> {
    // Slot i of the disk's 1024 64 KiB slots: a permutation, so no two writes overlap.
    killed_mid_io(32, 64 << 10, |i| (i as u64 * 397 + 11) % 1024, false)
}

/// The same on a `,cow` disk: the replacement is handed the killed worker's overlay store
/// (a memfd, as the VMM keeps one per cow disk), reads back every write the killed worker
/// completed and every one it left in flight, and the image file is never touched.
#[test]
fn killed_cow_worker_is_replaced_with_its_overlay_intact() -> Result<()> {
    killed_mid_io(40, 256 << 10, |i| i as u64, true)
}

/// Reads `len` bytes at `sector` through `queue`, one request, waited for.
fn read_through(
    memory: &bulkhead_tests::vhost::SharedMemory,
    queue: &mut SplitQueueDriver,
    sector: u64,
    len: u32,
) -> Result<Vec<u8>> {
    let header = memory.allocate(16, 16)?;
    let data = memory.allocate(u64::from(len), 4096)?;
    let status = memory.allocate(1, 1)?;
    memory.write(header, &Blk::header(VIRTIO_BLK_T_IN, sector))?;
    memory.write(status, &[0xff])?;
    queue.post(&[
        Buffer::readable(header, 16),
        Buffer::writable(data, len),
        Buffer::writable(status, 1),
    ])?;
    queue.kick()?;
    queue.wait_used(1, TIMEOUT)?;
    ensure!(memory.read(status, 1)?[0] == OK, "a read failed");
    Ok(memory.read(data, len as usize)?)
}

/// Posts `requests` writes of `len` bytes, write `i` at `len * place(i)`, kills the worker
/// while some are in flight, and checks a replacement finishes them exactly once. With
/// `cow` the disk is copy-on-write and the replacement gets the killed worker's overlay
/// store.
fn killed_mid_io(
    requests: usize,
    len: usize,
    place: impl Fn(usize) -> u64,
    cow: bool,
) -> Result<()> {
    let dir = TempDir::new(if cow { "inflight-cow" } else { "inflight" });
    let image = create(&dir, "disk.raw", "raw")?;
    let pristine = fs::read(&image)?;
    let open_image =
        || -> Result<File> { Ok(OpenOptions::new().read(true).write(!cow).open(&image)?) };
    let config = || {
        DeviceConfig::Blk(BlkConfig {
            image_fd: 5,
            backing: Vec::new(),
            format: Some(ImageFormat::Raw),
            read_only: false,
            copy_on_write: cow,
            overlay_fd: cow.then_some(6),
            num_queues: 1,
            serial: String::new(),
        })
    };
    // Several tries: the kill must land while requests are in flight, which the region
    // itself tells.
    for attempt in 0..20 {
        let store = bulkhead_workers::disk::cow::new_store()?;
        let files = |image: File| -> Result<Vec<File>> {
            let mut files = vec![image];
            if cow {
                files.push(store.try_clone()?);
            }
            Ok(files)
        };
        let first_files = files(open_image()?)?;
        let (first, connection) = WorkerProcess::launched_with_files(
            "blk0",
            config(),
            &first_files.iter().collect::<Vec<_>>(),
        )?;
        let mut setup = DeviceSetup::new(&[]);
        setup.memory_size = 96 << 20;
        let memory = std::sync::Arc::new(bulkhead_tests::vhost::SharedMemory::new(
            setup.memory_base,
            setup.memory_size,
        )?);
        let mut frontend = UserspaceFrontend::new(connection, 1);
        frontend.negotiate(0, config_flags())?;
        frontend.set_mem_table(&memory)?;
        let (inflight, region) = frontend.get_inflight_fd(1, QUEUE_SIZE)?;
        let mut queue = SplitQueueDriver::new(memory.clone(), QUEUE_SIZE)?;
        frontend.start_queue(0, &queue)?;

        let mut heads = Vec::new();
        for i in 0..requests {
            let header = memory.allocate(16, 16)?;
            let data = memory.allocate(len as u64, 4096)?;
            let status = memory.allocate(1, 1)?;
            let sector = place(i) * len as u64 / SECTOR;
            memory.write(header, &Blk::header(VIRTIO_BLK_T_OUT, sector))?;
            memory.write(data, &pattern(i as u64 + 1000, len))?;
            memory.write(status, &[0xff])?;
            let head = queue.post(&[
                Buffer::readable(header, 16),
                Buffer::readable(data, len as u32),
                Buffer::writable(status, 1),
            ])?;
            heads.push((head, status, sector));
        }
        queue.kick()?;
        // The worker writes the 10 MiB in a few milliseconds (page cache, straight from
        // the guest's buffers): aim the kill anywhere from at once to 5 ms in.
        std::thread::sleep(Duration::from_micros(250 * attempt));
        first.kill()?;
        let mut answered: Vec<u32> = queue.collect_used()?.iter().map(|u| u.id).collect();
        let left = in_flight_in_region(&region, QUEUE_SIZE)?;
        // Best: a kill between completions, some answered and some in flight.
        if left == 0 || (answered.is_empty() && attempt < 15) {
            continue;
        }

        let second_files = files(open_image()?)?;
        let (second, connection) = WorkerProcess::launched_with_files(
            "blk0",
            config(),
            &second_files.iter().collect::<Vec<_>>(),
        )?;
        let mut frontend = UserspaceFrontend::new(connection, 1);
        frontend.negotiate(0, config_flags())?;
        frontend.set_mem_table(&memory)?;
        frontend.set_inflight_fd(&inflight, &region)?;
        let used_ring = queue.layout().used_ring;
        let used_idx = memory.read(GuestAddress(used_ring.0 + 2), 2)?;
        frontend.resume_queue(0, &queue, u16::from_le_bytes([used_idx[0], used_idx[1]]))?;
        queue.kick()?;
        let rest = queue.wait_used(requests - answered.len(), TIMEOUT)?;
        answered.extend(rest.iter().map(|u| u.id));
        std::thread::sleep(Duration::from_millis(100));
        let extra = queue.collect_used()?;
        ensure!(extra.is_empty(), "requests completed twice: {extra:?}");
        let mut sorted = answered.clone();
        sorted.sort_unstable();
        sorted.dedup();
        ensure!(
            sorted.len() == requests && answered.len() == requests,
            "{requests} requests, answers {answered:?}"
        );
        for &(_, status, _) in &heads {
            ensure!(
                memory.read(status, 1)?[0] == OK,
                "a request failed around the restart"
            );
        }
        // Everything written is on disk.
        let flush_header = memory.allocate(16, 16)?;
        let flush_status = memory.allocate(1, 1)?;
        memory.write(flush_header, &Blk::header(VIRTIO_BLK_T_FLUSH, 0))?;
        queue.post(&[
            Buffer::readable(flush_header, 16),
            Buffer::writable(flush_status, 1),
        ])?;
        queue.kick()?;
        queue.wait_used(1, TIMEOUT)?;
        ensure!(
            memory.read(flush_status, 1)?[0] == OK,
            "flush after the restart"
        );
        // Every write reads back, those the killed worker completed and those its
        // replacement finished.
        for (i, &(_, _, sector)) in heads.iter().enumerate() {
            let back = read_through(&memory, &mut queue, sector, len as u32)?;
            ensure!(
                back == pattern(i as u64 + 1000, len),
                "write {i} at sector {sector} does not read back"
            );
        }
        // Before hanging up: a launched worker exits when its frontend goes.
        assert_alive(&second)?;
        drop(frontend);
        second.kill()?;
        eprintln!(
            "killed with {} requests answered and {left} in flight on attempt {attempt}",
            requests - left
        );
        if cow {
            ensure!(fs::read(&image)? == pristine, "the cow image changed");
            return Ok(());
        }
        let expected_path = dir.path("expected.raw");
        let expected = File::create(&expected_path)?;
        expected.set_len(DISK_SIZE)?;
        for i in 0..requests {
            expected.write_all_at(&pattern(i as u64 + 1000, len), place(i) * len as u64)?;
        }
        return qemu_img_agrees(&image, "raw", &expected_path);
    }
    anyhow::bail!("no kill landed with requests in flight")
}

/// Runs `bulkhead-worker blk --socket <dir>/s.sock <args>`, which must exit by itself
/// (within the timeout) with status 1; returns its stderr.
fn worker_refuses(dir: &TempDir, args: &[&str]) -> Result<String> {
    worker_refuses_with(dir, args, &[])
}

/// [`worker_refuses`] with `env` set for the worker.
fn worker_refuses_with(dir: &TempDir, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    use std::io::Read;
    let mut child = Command::new(bulkhead_tests::vhost::worker_bin())
        .arg("blk")
        .arg("--socket")
        .arg(dir.path("s.sock"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("bulkhead-worker blk {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr)?;
    }
    ensure!(
        status.code() == Some(1),
        "{args:?}: exit {status}: {stderr}"
    );
    ensure!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    ensure!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    Ok(stderr)
}

#[test]
fn bad_images_and_options_are_clear_errors_at_startup() -> Result<()> {
    let dir = TempDir::new("refuse");
    let missing = dir.path("missing.qcow2");
    let stderr = worker_refuses(&dir, &["--image", p(&missing)])?;
    ensure!(stderr.contains(p(&missing)), "{stderr}");

    // QCOW2 magic, version 3, absurd cluster_bits.
    let bad = dir.path("bad.qcow2");
    let mut header = vec![0u8; 512];
    header[0..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    header[20..24].copy_from_slice(&40u32.to_be_bytes());
    fs::write(&bad, &header)?;
    let stderr = worker_refuses(&dir, &["--image", p(&bad)])?;
    ensure!(stderr.contains("cluster"), "{stderr}");

    // A backing chain that loops: b names a, a names b.
    let a = dir.path("a.qcow2");
    let b = create(&dir, "b.qcow2", "qcow2")?;
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        p(&a),
    ])?;
    qemu_img_ok(&["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", p(&b)])?;
    let stderr = worker_refuses(&dir, &["--image", p(&a)])?;
    ensure!(
        stderr.contains("deeper") || stderr.contains("loop"),
        "{stderr}"
    );

    let image = create(&dir, "ok.raw", "raw")?;
    let stderr = worker_refuses(&dir, &["--image", p(&image), "--queues", "0"])?;
    ensure!(stderr.contains("queues"), "{stderr}");
    let tiny = dir.path("tiny.raw");
    fs::write(&tiny, [0u8; 100])?;
    let stderr = worker_refuses(&dir, &["--image", p(&tiny), "--format", "raw"])?;
    ensure!(stderr.contains("smaller"), "{stderr}");
    Ok(())
}

/// A raw disk whose bytes are a QCOW2 header (a guest can write one) names no backing
/// file: the worker must not open the path it names - here a FIFO, which would block the
/// open forever.
#[test]
fn a_raw_disk_that_looks_like_qcow2_opens_nothing_else() -> Result<()> {
    let dir = TempDir::new("lookalike");
    let base = create(&dir, "base.raw", "raw")?;
    let disk = dir.path("disk.raw");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&disk),
    ])?;
    fs::remove_file(&base)?;
    let status = Command::new("mkfifo").arg(&base).status()?;
    ensure!(status.success(), "mkfifo");
    let worker = standalone(&disk, &["--format", "raw"])?;
    let mut blk = Blk::start(worker.connect()?, 1, 0)?;
    let (status, header) = blk.read(0, 512)?;
    ensure!(
        status == OK && header.starts_with(b"QFI\xfb"),
        "the raw bytes read back"
    );
    assert_alive(&worker)
}

/// A small deterministic generator for the tests' random offsets and lengths.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Rounds of random writes, then random reads, with every slot of every queue in flight at
/// once on four queues; what reads back must match a plain file written the same way.
/// Writes in flight together never overlap (each owns a 1 MiB region of the disk, the
/// owners shuffled every round); their sizes, 512 B to 256 KiB, cover both the writes done
/// on the queue's thread and those that go to its io_uring.
fn random_io_on_all_queues(format: &str, create_args: &[&str]) -> Result<()> {
    const QUEUES: usize = 4;
    const PER_QUEUE: usize = 16;
    const REGION: u64 = 1 << 20;
    const ROUNDS: usize = 4;
    let slots = QUEUES * PER_QUEUE;
    let dir = TempDir::new("random");
    let image = dir.path(&format!("disk.{format}"));
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(create_args);
    let size = DISK_SIZE.to_string();
    args.extend_from_slice(&[p(&image), &size]);
    qemu_img_ok(&args)?;
    let (expected_path, expected) = expected_raw(&dir)?;
    let worker = standalone(
        &image,
        &["--format", format, "--queues", &QUEUES.to_string()],
    )?;
    let mut blk = Blk::start(worker.connect()?, QUEUES, 1 << VIRTIO_RING_F_EVENT_IDX)?;
    let mut rng = XorShift(0x5eed_0000 + format.len() as u64);
    let regions = DISK_SIZE / REGION;
    let random_run = |rng: &mut XorShift, region: u64| {
        let len = (1 + rng.below(512)) * SECTOR;
        let start = region * REGION + rng.below((REGION - len) / SECTOR + 1) * SECTOR;
        (start / SECTOR, len as usize)
    };
    let run_all = |blk: &mut Blk, reqs: &[(usize, Req<'_>)]| -> Result<()> {
        for (slot, req) in reqs {
            blk.post(slot / PER_QUEUE, *slot, req)?;
        }
        for q in 0..QUEUES {
            blk.device.queues[q].kick()?;
        }
        for q in 0..QUEUES {
            let used = blk.device.queues[q]
                .wait_used(PER_QUEUE, TIMEOUT)
                .with_context(|| format!("queue {q}: {}", worker.stderr()))?;
            ensure!(used.len() == PER_QUEUE, "queue {q}: {} answers", used.len());
        }
        for (slot, _) in reqs {
            ensure!(blk.status(*slot)? == OK, "request in slot {slot} failed");
        }
        Ok(())
    };
    for round in 0..ROUNDS {
        let offset = rng.below(regions);
        let writes: Vec<(u64, Vec<u8>)> = (0..slots)
            .map(|slot| {
                let (sector, len) = random_run(&mut rng, (slot as u64 + offset) % regions);
                (sector, pattern((round * slots + slot) as u64 + 7, len))
            })
            .collect();
        let reqs: Vec<(usize, Req<'_>)> = writes
            .iter()
            .enumerate()
            .map(|(slot, (sector, data))| {
                let req = Req {
                    kind: VIRTIO_BLK_T_OUT,
                    sector: *sector,
                    out: data,
                    in_len: 0,
                };
                (slot, req)
            })
            .collect();
        run_all(&mut blk, &reqs)?;
        for (sector, data) in &writes {
            expected.write_all_at(data, sector * SECTOR)?;
        }
    }
    for _ in 0..ROUNDS {
        let reads: Vec<(u64, usize)> = (0..slots)
            .map(|_| {
                let region = rng.below(regions);
                random_run(&mut rng, region)
            })
            .collect();
        let reqs: Vec<(usize, Req<'_>)> = reads
            .iter()
            .enumerate()
            .map(|(slot, &(sector, len))| {
                let req = Req {
                    kind: VIRTIO_BLK_T_IN,
                    sector,
                    out: &[],
                    in_len: len as u32,
                };
                (slot, req)
            })
            .collect();
        run_all(&mut blk, &reqs)?;
        for (slot, &(sector, len)) in reads.iter().enumerate() {
            let mut want = vec![0u8; len];
            expected.read_exact_at(&mut want, sector * SECTOR)?;
            ensure!(
                blk.data(slot, len as u32)? == want,
                "read of {len} bytes at sector {sector} differs from the reference"
            );
        }
    }
    ensure!(blk.simple(VIRTIO_BLK_T_FLUSH)? == OK, "flush");
    assert_alive(&worker)?;
    drop(blk);
    worker.kill()?;
    qemu_img_agrees(&image, format, &expected_path)
}

#[test]
fn random_io_in_flight_on_four_queues_matches_a_reference_on_raw() -> Result<()> {
    random_io_on_all_queues("raw", &[])
}

/// Preallocated metadata: the clusters are the image's already, so reads and writes go
/// straight to them (and to io_uring) rather than through allocation.
#[test]
fn random_io_in_flight_on_four_queues_matches_a_reference_on_qcow2() -> Result<()> {
    random_io_on_all_queues("qcow2", &["-o", "preallocation=metadata"])
}

/// A FLUSH posted behind writes still in flight is answered after every one of them (the
/// used ring's order says so), and the writes posted behind it complete too.
#[test]
fn flush_among_writes_in_flight_comes_after_every_earlier_write() -> Result<()> {
    const BEFORE: usize = 20;
    const AFTER: usize = 8;
    const LEN: usize = 128 << 10;
    let dir = TempDir::new("flush-order");
    let image = create(&dir, "disk.raw", "raw")?;
    let (expected_path, expected) = expected_raw(&dir)?;
    let worker = standalone(&image, &["--format", "raw"])?;
    let mut blk = Blk::start(worker.connect()?, 1, 1 << VIRTIO_RING_F_EVENT_IDX)?;
    let data: Vec<Vec<u8>> = (0..BEFORE + AFTER)
        .map(|i| pattern(i as u64 + 300, LEN))
        .collect();
    let mut heads = Vec::new();
    let mut flush_head = None;
    for (i, bytes) in data.iter().enumerate() {
        if i == BEFORE {
            let req = Req {
                kind: VIRTIO_BLK_T_FLUSH,
                sector: 0,
                out: &[],
                in_len: 0,
            };
            flush_head = Some(blk.post(0, BEFORE + AFTER, &req)?);
        }
        // Every other 128 KiB block, backwards: no two writes are adjacent.
        let sector = ((BEFORE + AFTER - i) * 2 * LEN) as u64 / SECTOR;
        let req = Req {
            kind: VIRTIO_BLK_T_OUT,
            sector,
            out: bytes,
            in_len: 0,
        };
        heads.push(blk.post(0, i, &req)?);
        expected.write_all_at(bytes, sector * SECTOR)?;
    }
    let flush_head = u32::from(flush_head.context("no flush posted")?);
    blk.device.queues[0].kick()?;
    let used = blk.device.queues[0]
        .wait_used(BEFORE + AFTER + 1, TIMEOUT)
        .with_context(|| worker.stderr())?;
    ensure!(used.len() == BEFORE + AFTER + 1, "{} answers", used.len());
    let flush_at = used
        .iter()
        .position(|u| u.id == flush_head)
        .context("the flush was not answered")?;
    for head in &heads[..BEFORE] {
        let at = used
            .iter()
            .position(|u| u.id == u32::from(*head))
            .context("a write was not answered")?;
        ensure!(
            at < flush_at,
            "a write posted before the flush was answered after it"
        );
    }
    ensure!(blk.status(BEFORE + AFTER)? == OK, "flush");
    for i in 0..BEFORE + AFTER {
        ensure!(blk.status(i)? == OK, "write {i}");
    }
    assert_alive(&worker)?;
    drop(blk);
    worker.kill()?;
    qemu_img_agrees(&image, "raw", &expected_path)
}

/// The rings of a worker process: its io_uring descriptors.
fn io_uring_descriptors(pid: u32) -> Result<usize> {
    let mut rings = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Ok(target) = fs::read_link(entry?.path()) {
            rings += usize::from(target.to_string_lossy() == "anon_inode:[io_uring]");
        }
    }
    Ok(rings)
}

/// The data path's knobs take only what they document; anything else is a clear error at
/// startup, naming the variable, not a default taken quietly.
#[test]
fn bad_data_path_settings_are_clear_errors_at_startup() -> Result<()> {
    let dir = TempDir::new("io-env");
    let image = create(&dir, "disk.raw", "raw")?;
    for (name, value, says) in [
        ("BULKHEAD_BLK_IO", "fast", "give sync or uring"),
        (
            "BULKHEAD_BLK_URING_PUNT",
            "1M",
            "give a size in bytes or off",
        ),
        (
            "BULKHEAD_BLK_URING_INLINE_WRITES",
            "-1",
            "give a size in bytes",
        ),
    ] {
        // The knobs are read on the io_uring path, whatever the caller's environment says.
        let env = [("BULKHEAD_BLK_IO", "uring"), (name, value)];
        let stderr = worker_refuses_with(&dir, &["--image", p(&image)], &env)?;
        ensure!(
            stderr.contains(&format!("{name}={value}: {says}")),
            "{name}={value}: {stderr}"
        );
    }
    Ok(())
}

/// Both data paths serve the same disk: io_uring (one ring per queue) by default where the
/// kernel allows it, and the synchronous path with `BULKHEAD_BLK_IO=sync`.
#[test]
fn io_uring_serves_by_default_and_sync_io_when_asked() -> Result<()> {
    let uring_allowed =
        fs::read_to_string("/proc/sys/kernel/io_uring_disabled").map_or(true, |v| v.trim() == "0");
    for (mode, rings) in [("uring", if uring_allowed { 2 } else { 0 }), ("sync", 0)] {
        let dir = TempDir::new(mode);
        let image = create(&dir, "disk.qcow2", "qcow2")?;
        let (expected_path, expected) = expected_raw(&dir)?;
        let socket = dir.path("blk.sock");
        let mut command = Command::new(bulkhead_tests::vhost::worker_bin());
        command
            .args(["blk", "--socket", p(&socket), "--image", p(&image)])
            .args(["--queues", "2"])
            .env("BULKHEAD_BLK_IO", mode);
        let worker = WorkerProcess::listening_command(command, socket)?;
        ensure!(
            io_uring_descriptors(worker.pid())? == rings,
            "{mode}: the worker should hold {rings} rings"
        );
        let mut blk = Blk::start(worker.connect()?, 2, 1 << VIRTIO_RING_F_EVENT_IDX)?;
        write_patterns(&mut blk, &expected)?;
        // Rewritten in place, now that the clusters are allocated: the direct path.
        write_patterns(&mut blk, &expected)?;
        assert_alive(&worker)?;
        drop(blk);
        worker.kill()?;
        qemu_img_agrees(&image, "qcow2", &expected_path)?;
    }
    Ok(())
}
