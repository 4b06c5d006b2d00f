//! `bulkhead-worker rng` driven from userspace: a frontend and a split-queue driver in this
//! process, guest memory in a memfd, the worker a real process - standalone on a socket or
//! launched the way the VMM launches it.
//!
//! Needs the worker binary: `cargo build --workspace` first (same profile as the tests).

use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bulkhead_protocol::{DeviceConfig, RngConfig};
use bulkhead_tests::vhost::raw_message::{self, message, request, send_raw, NEED_REPLY, VERSION_1};
use bulkhead_tests::vhost::{
    worker_bin, Buffer, Descriptor, DeviceSetup, Response, SplitQueueDriver, UsedElement,
    UserspaceDevice, UserspaceFrontend, WorkerProcess, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestAddress;

/// Generous bound for anything that should take milliseconds; the suite shares two cores.
const TIMEOUT: Duration = Duration::from_secs(10);
const PAGE: u32 = 4096;

fn rng_device(connection: UnixStream, queue_size: u16) -> Result<UserspaceDevice> {
    Ok(UserspaceDevice::start(
        connection,
        &DeviceSetup::new(&[queue_size]),
    )?)
}

/// Posts one writable `len`-byte buffer per entry of `buffers`, kicks once, and waits for all.
fn request_entropy(
    device: &mut UserspaceDevice,
    buffers: &[GuestAddress],
    len: u32,
) -> Result<Vec<(UsedElement, Vec<u8>)>> {
    let queue = &mut device.queues[0];
    let mut heads = Vec::new();
    for &addr in buffers {
        heads.push((queue.post(&[Buffer::writable(addr, len)])?, addr));
    }
    queue.kick()?;
    let used = queue.wait_used(buffers.len(), TIMEOUT)?;
    used.into_iter()
        .map(|element| {
            let addr = heads
                .iter()
                .find(|(head, _)| u32::from(*head) == element.id)
                .map(|&(_, addr)| addr)
                .context("the device returned a chain that was not offered")?;
            Ok((element, device.memory.read(addr, element.len as usize)?))
        })
        .collect()
}

/// One 4 KiB request must come back full of random bytes.
fn assert_serves_a_good_request(device: &mut UserspaceDevice) -> Result<()> {
    let buffer = device.memory.allocate(u64::from(PAGE), 8)?;
    let answers = request_entropy(device, &[buffer], PAGE)?;
    ensure!(answers.len() == 1, "expected one answer, got {answers:?}");
    let (used, bytes) = &answers[0];
    ensure!(used.len == PAGE, "a good request got {} bytes", used.len);
    ensure!(bytes.iter().any(|&b| b != 0), "4 KiB of zeros");
    Ok(())
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

#[test]
fn delivers_random_bytes() -> Result<()> {
    let worker = WorkerProcess::standalone("rng", &[])?;
    let mut device = rng_device(worker.connect()?, 256)?;
    let buffers = (0..8)
        .map(|_| device.memory.allocate(u64::from(PAGE), 8))
        .collect::<Result<Vec<_>, _>>()?;

    let answers = request_entropy(&mut device, &buffers, PAGE)?;

    ensure!(answers.len() == 8);
    let mut distinct = HashSet::new();
    for (used, bytes) in &answers {
        ensure!(
            used.len == PAGE,
            "buffer {} got {} bytes",
            used.id,
            used.len
        );
        ensure!(
            bytes.iter().any(|&b| b != 0),
            "buffer {} is all zeros",
            used.id
        );
        distinct.insert(bytes.clone());
    }
    ensure!(distinct.len() == 8, "some buffers got the same bytes");
    assert_alive(&worker)
}

#[test]
fn launched_worker_serves_the_vmm_socketpair_and_exits_when_it_closes() -> Result<()> {
    let (worker, connection) =
        WorkerProcess::launched("rng0", DeviceConfig::Rng(RngConfig::default()))?;
    let mut device = rng_device(connection, 64)?;
    assert_serves_a_good_request(&mut device)?;

    drop(device);
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|value| value.trim().to_owned())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))
}

#[test]
fn a_serving_worker_is_sandboxed() -> Result<()> {
    let (worker, connection) =
        WorkerProcess::launched("rng0", DeviceConfig::Rng(RngConfig::default()))?;
    let mut device = rng_device(connection, 64)?;
    assert_serves_a_good_request(&mut device)?;
    let pid = worker.pid();
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
    // Only stdio and the vhost-user socket survive from before the sandbox, plus what
    // serving created since (eventfds, epoll, the memory table's mappings' fds).
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|target| target.display().to_string())
        .collect();
    ensure!(
        !fds.iter().any(|t| t.contains("bulkhead-worker-launch")),
        "the launch memfd is still open: {fds:?}"
    );
    Ok(())
}

#[test]
fn launch_fd_that_is_not_open_is_a_clean_error() -> Result<()> {
    let output = Command::new(worker_bin())
        .args(["rng", "--launch-fd", "97"])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(1),
        "{}: {stderr}",
        output.status
    );
    ensure!(
        stderr.starts_with("error: ") && stderr.contains("not open"),
        "unexpected report: {stderr}"
    );
    Ok(())
}

/// Keeps up to `depth` 4 KiB requests in flight for `duration`; returns the bytes served.
fn bytes_served_under_pressure(
    device: &mut UserspaceDevice,
    duration: Duration,
    depth: usize,
) -> Result<u64> {
    let buffers = (0..depth)
        .map(|_| device.memory.allocate(u64::from(PAGE), 8))
        .collect::<Result<Vec<_>, _>>()?;
    let queue = &mut device.queues[0];
    let mut idle: Vec<GuestAddress> = buffers.clone();
    let mut posted: Vec<(u16, GuestAddress)> = Vec::new();
    let mut served = 0u64;
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        while let Some(addr) = idle.pop() {
            posted.push((queue.post(&[Buffer::writable(addr, PAGE)])?, addr));
        }
        queue.kick()?;
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        for used in queue.used_during(slice)? {
            served += u64::from(used.len);
            let at = posted
                .iter()
                .position(|&(head, _)| u32::from(head) == used.id)
                .context("unknown chain returned")?;
            idle.push(posted.swap_remove(at).1);
        }
    }
    Ok(served)
}

#[test]
fn rate_limit_holds() -> Result<()> {
    // Control: unlimited, half a second of pressure gets far more than the limit allows.
    let unlimited = WorkerProcess::standalone("rng", &[])?;
    let mut device = rng_device(unlimited.connect()?, 64)?;
    let unlimited_bytes = bytes_served_under_pressure(&mut device, Duration::from_millis(500), 8)?;
    ensure!(
        unlimited_bytes > 16 * u64::from(PAGE),
        "without a limit only {unlimited_bytes} bytes came in 0.5 s"
    );

    // 4096 bytes per second, for two seconds: one budget at the start, one after 1 s, and
    // perhaps a third right at 2 s - at most 3 pages. One page of slack for a slow machine
    // (a test that overran its two seconds), still far below the control.
    let limited = WorkerProcess::standalone("rng", &["--rate-limit", "4096/1000"])?;
    let mut device = rng_device(limited.connect()?, 64)?;
    let limited_bytes = bytes_served_under_pressure(&mut device, Duration::from_secs(2), 8)?;
    ensure!(
        limited_bytes >= u64::from(PAGE),
        "the limited worker served nothing ({limited_bytes} bytes)"
    );
    ensure!(
        limited_bytes <= 4 * u64::from(PAGE),
        "4096/1000 let {limited_bytes} bytes through in 2 s"
    );
    assert_alive(&limited)
}

/// Offers a chain written by `write` (given the queue and a scratch page) and returns the
/// device's answer to it.
fn post_malformed(
    device: &mut UserspaceDevice,
    write: impl FnOnce(&mut SplitQueueDriver, GuestAddress) -> Result<()>,
) -> Result<UsedElement> {
    let scratch = device.memory.allocate(u64::from(PAGE), 8)?;
    let queue = &mut device.queues[0];
    write(queue, scratch)?;
    queue.kick()?;
    let used = queue.wait_used(1, TIMEOUT)?;
    ensure!(
        used.len() == 1,
        "one malformed request, {} answers",
        used.len()
    );
    Ok(used[0])
}

/// A chain written by hand from `descriptors`, whose `next` fields index into `slots`.
fn offer_by_hand(
    queue: &mut SplitQueueDriver,
    descriptors: &[(u64, u32, u16, usize)],
) -> Result<()> {
    let slots = queue.take_slots(descriptors.len())?;
    for (i, &(addr, len, flags, next)) in descriptors.iter().enumerate() {
        let next = slots.get(next).copied().unwrap_or(next as u16);
        queue.write_descriptor(
            slots[i],
            Descriptor {
                addr,
                len,
                flags,
                next,
            },
        )?;
    }
    let head = slots[0];
    queue.offer(head, slots)?;
    Ok(())
}

#[test]
fn malformed_chains_are_refused_and_the_worker_carries_on() -> Result<()> {
    const QUEUE_SIZE: u16 = 16;
    let worker = WorkerProcess::standalone("rng", &[])?;
    // With EVENT_IDX, so that the device's notification suppression path runs as well.
    let setup = DeviceSetup::new(&[QUEUE_SIZE]).with_features(1 << VIRTIO_RING_F_EVENT_IDX);
    let mut device = UserspaceDevice::start(worker.connect()?, &setup)?;
    ensure!(device.negotiated.has(VIRTIO_RING_F_EVENT_IDX));
    let outside = device.memory.end().0 + 0x1000;
    let last_page = device.memory.end().0 - 100;
    const W: u16 = DESC_F_WRITE;
    const WN: u16 = DESC_F_WRITE | DESC_F_NEXT;

    type Case = Box<dyn FnOnce(&mut SplitQueueDriver, GuestAddress) -> Result<()>>;
    let cases: Vec<(&str, Case)> = vec![
        (
            "two descriptors pointing at each other",
            Box::new(|q, buf| offer_by_hand(q, &[(buf.0, 64, WN, 1), (buf.0 + 64, 64, WN, 0)])),
        ),
        (
            "a chain through every descriptor and back to the first",
            Box::new(|q, buf| {
                let ring: Vec<_> = (0..usize::from(QUEUE_SIZE))
                    .map(|i| (buf.0, 8, WN, (i + 1) % usize::from(QUEUE_SIZE)))
                    .collect();
                offer_by_hand(q, &ring)
            }),
        ),
        (
            "a next index outside the table",
            Box::new(|q, buf| offer_by_hand(q, &[(buf.0, 64, WN, usize::from(QUEUE_SIZE) + 7)])),
        ),
        (
            "a buffer outside guest memory",
            Box::new(move |q, _| offer_by_hand(q, &[(outside, PAGE, W, 0)])),
        ),
        (
            "a buffer running past the end of guest memory",
            Box::new(move |q, _| offer_by_hand(q, &[(last_page, PAGE, W, 0)])),
        ),
        (
            "lengths whose sum overflows 32 bits",
            Box::new(|q, buf| {
                offer_by_hand(q, &[(buf.0, 0xffff_f000, WN, 1), (buf.0, 0x2000, W, 0)])
            }),
        ),
        (
            "a device-readable buffer",
            Box::new(|q, buf| {
                q.post(&[Buffer::readable(buf, PAGE)])?;
                Ok(())
            }),
        ),
        (
            "a writable buffer followed by a readable one",
            Box::new(|q, buf| offer_by_hand(q, &[(buf.0, 64, WN, 1), (buf.0 + 64, 64, 0, 0)])),
        ),
    ];

    for (what, write) in cases {
        let used = post_malformed(&mut device, write).with_context(|| what.to_owned())?;
        ensure!(used.len == 0, "{what}: answered with {} bytes", used.len);
        assert_alive(&worker).with_context(|| what.to_owned())?;
        assert_serves_a_good_request(&mut device).with_context(|| format!("after {what}"))?;
    }

    // A head index outside the table names no chain the device could give back: it is
    // dropped, and the requests after it are served.
    let queue = &mut device.queues[0];
    queue.offer(QUEUE_SIZE + 5, Vec::new())?;
    queue.kick()?;
    let answers = queue.used_during(Duration::from_millis(200))?;
    ensure!(
        answers.is_empty(),
        "a head outside the table was answered: {answers:?}"
    );
    assert_alive(&worker)?;
    assert_serves_a_good_request(&mut device)?;
    ensure!(
        device.queues[0].free_descriptors() == usize::from(QUEUE_SIZE),
        "descriptors leaked"
    );
    Ok(())
}

/// A SET_MEM_TABLE payload describing one 4 KiB region (whose memfd is not attached).
fn one_region_table() -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&1u32.to_le_bytes()); // num_regions
    payload.extend_from_slice(&0u32.to_le_bytes()); // padding
    for field in [0u64, 0x1000, 0x7f00_0000_0000, 0] {
        // guest_phys_addr, memory_size, user_addr, mmap_offset
        payload.extend_from_slice(&field.to_le_bytes());
    }
    payload
}

#[test]
fn malformed_messages_cost_the_sender_its_connection_not_the_worker() -> Result<()> {
    let worker = WorkerProcess::standalone("rng", &[])?;
    let u64_payload = 0u64.to_le_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a header claiming a 4 GiB payload",
            message(request::GET_FEATURES, VERSION_1, u32::MAX, &[]),
        ),
        ("an unknown request code", message(9999, VERSION_1, 0, &[])),
        (
            "a truncated payload",
            message(request::SET_FEATURES, VERSION_1, 8, &u64_payload[..4]),
        ),
        (
            "a payload of the wrong size",
            message(request::SET_FEATURES, VERSION_1, 4, &u64_payload[..4]),
        ),
        (
            "protocol version 0",
            message(request::GET_FEATURES, 0, 0, &[]),
        ),
        (
            "a reply where a request belongs",
            message(request::SET_OWNER, VERSION_1 | 0x4, 0, &[]),
        ),
        (
            "a memory table without descriptors",
            message(request::SET_MEM_TABLE, VERSION_1, 40, &one_region_table()),
        ),
        (
            "a queue index out of range",
            message(
                request::SET_VRING_NUM,
                VERSION_1 | NEED_REPLY,
                8,
                &[200, 0, 0, 0, 16, 0, 0, 0],
            ),
        ),
        ("half a header", vec![3, 0, 0, 0, 1]),
        (
            "noise",
            (0..64u8).map(|i| i.wrapping_mul(73) ^ 0x5a).collect(),
        ),
    ];

    for (what, bytes) in cases {
        let mut connection = worker.connect()?;
        if what == "half a header" {
            // Sent, then the sender hangs up mid-message.
            let response = send_raw(&mut connection, &bytes, Duration::from_millis(100))?;
            ensure!(response == Response::Silent, "{what}: {response:?}");
            connection.shutdown(std::net::Shutdown::Write)?;
            let response = raw_message::observe(&mut connection, TIMEOUT)?;
            ensure!(response == Response::Closed, "{what}: {response:?}");
        } else {
            let response = send_raw(&mut connection, &bytes, TIMEOUT)?;
            // REPLY_ACK is not negotiated on these connections, so an error is a hang-up.
            ensure!(
                response == Response::Closed,
                "{what}: expected the connection closed, got {response:?}"
            );
        }
        drop(connection);
        assert_alive(&worker).with_context(|| what.to_owned())?;
        // The next frontend gets a working device.
        let mut device =
            rng_device(worker.connect()?, 16).with_context(|| format!("after {what}"))?;
        assert_serves_a_good_request(&mut device).with_context(|| format!("after {what}"))?;
    }
    Ok(())
}

#[test]
fn a_memory_table_larger_than_its_file_is_refused() -> Result<()> {
    let worker = WorkerProcess::standalone("rng", &[])?;
    let memory = bulkhead_tests::vhost::SharedMemory::new(GuestAddress(0), 1 << 20)?;
    let mut frontend = UserspaceFrontend::new(worker.connect()?, 1);
    frontend.negotiate(0, VhostUserProtocolFeatures::REPLY_ACK)?;
    // The memfd holds 1 MiB; the table claims 64 MiB of it. Mapping that and touching the
    // end would kill the worker with SIGBUS.
    let regions: Vec<VhostUserMemoryRegionInfo> = memory
        .regions()
        .into_iter()
        .map(|region| VhostUserMemoryRegionInfo {
            memory_size: 64 << 20,
            ..region
        })
        .collect();
    ensure!(
        frontend.inner().set_mem_table(&regions).is_err(),
        "the oversized memory table was accepted"
    );
    assert_alive(&worker)?;
    let mut device = rng_device(worker.connect()?, 16)?;
    assert_serves_a_good_request(&mut device)
}

#[test]
fn a_stopped_queue_reports_its_position_and_resumes_there() -> Result<()> {
    let worker = WorkerProcess::standalone("rng", &[])?;
    let mut device = rng_device(worker.connect()?, 16)?;
    for _ in 0..3 {
        assert_serves_a_good_request(&mut device)?;
    }
    let base = device.frontend.stop_queue(0)?;
    ensure!(base == 3, "GET_VRING_BASE said {base} after 3 requests");

    // Posted while the ring is stopped: nothing may happen to it...
    let buffer = device.memory.allocate(u64::from(PAGE), 8)?;
    let head = device.queues[0].post(&[Buffer::writable(buffer, PAGE)])?;
    device.queues[0].kick()?;
    let early = device.queues[0].used_during(Duration::from_millis(200))?;
    ensure!(early.is_empty(), "a stopped ring was served: {early:?}");

    // ...until the ring restarts where it stopped, without needing another kick.
    device
        .frontend
        .resume_queue(0, &device.queues[0], base as u16)?;
    let used = device.queues[0].wait_used(1, TIMEOUT)?;
    ensure!(
        used == [UsedElement {
            id: u32::from(head),
            len: PAGE
        }],
        "after resuming: {used:?}"
    );
    assert_alive(&worker)
}

#[test]
fn a_broken_ring_stalls_only_itself() -> Result<()> {
    let worker = WorkerProcess::standalone("rng", &[])?;
    let mut device = rng_device(worker.connect()?, 16)?;
    assert_serves_a_good_request(&mut device)?;

    // An avail index 1000 entries ahead: more chains than the ring can hold.
    let avail_idx = GuestAddress(device.queues[0].layout().avail_ring.0 + 2);
    device.memory.write(avail_idx, &1001u16.to_le_bytes())?;
    device.queues[0].kick()?;
    let used = device.queues[0].used_during(Duration::from_millis(200))?;
    ensure!(used.is_empty(), "a broken ring was served: {used:?}");
    assert_alive(&worker)?;

    drop(device);
    let mut device = rng_device(worker.connect()?, 16)?;
    assert_serves_a_good_request(&mut device)
}

#[test]
fn indirect_chains_are_served_within_bounds() -> Result<()> {
    const QUEUE_SIZE: u16 = 16;
    let worker = WorkerProcess::standalone("rng", &[])?;
    let setup = DeviceSetup::new(&[QUEUE_SIZE]).with_features(1 << VIRTIO_RING_F_INDIRECT_DESC);
    let mut device = UserspaceDevice::start(worker.connect()?, &setup)?;
    ensure!(device.negotiated.has(VIRTIO_RING_F_INDIRECT_DESC));
    let buffer = device.memory.allocate(u64::from(PAGE), 8)?;
    let writable = |i: u64, len: u32, last: bool| Descriptor {
        addr: buffer.0 + i * u64::from(len),
        len,
        flags: if last {
            DESC_F_WRITE
        } else {
            DESC_F_WRITE | DESC_F_NEXT
        },
        next: (i + 1) as u16,
    };

    let cases: Vec<(&str, Vec<Descriptor>, u32)> = vec![
        (
            "two 2 KiB buffers",
            vec![writable(0, 2048, false), writable(1, 2048, true)],
            PAGE,
        ),
        (
            "a table twice as long as the queue",
            (0..2 * u64::from(QUEUE_SIZE))
                .map(|i| writable(i, 8, i + 1 == 2 * u64::from(QUEUE_SIZE)))
                .collect(),
            0,
        ),
        (
            "an indirect descriptor inside the table",
            vec![Descriptor {
                addr: buffer.0,
                len: 16,
                flags: DESC_F_INDIRECT,
                next: 0,
            }],
            0,
        ),
    ];
    for (what, table, expected) in cases {
        let table_addr = device.memory.allocate(16 * table.len() as u64, 16)?;
        let used = post_malformed(&mut device, |q, _| {
            q.write_indirect_table(table_addr, &table)?;
            let slots = q.take_slots(1)?;
            let head = Descriptor {
                addr: table_addr.0,
                len: 16 * table.len() as u32,
                flags: DESC_F_INDIRECT,
                next: 0,
            };
            q.write_descriptor(slots[0], head)?;
            q.offer(slots[0], slots)?;
            Ok(())
        })
        .with_context(|| what.to_owned())?;
        ensure!(
            used.len == expected,
            "{what}: {} bytes, expected {expected}",
            used.len
        );
        assert_alive(&worker).with_context(|| what.to_owned())?;
    }
    assert_serves_a_good_request(&mut device)
}

/// What the VMM's supervisor does when a worker dies, done by the test: start a
/// replacement, negotiate, share the same memory and resume the queue at the used index
/// the guest's ring shows (requests the dead worker took but never completed are served
/// again). The stream of reads goes on without a lost or failed request.
#[test]
fn a_killed_worker_is_replaced_and_the_stream_resumes() -> Result<()> {
    const DEPTH: usize = 8;
    const TOTAL: usize = 64;
    let config = || DeviceConfig::Rng(RngConfig::default());
    let (first, connection) = WorkerProcess::launched("rng0", config())?;
    let mut device = rng_device(connection, 64)?;
    let buffers = (0..DEPTH)
        .map(|_| device.memory.allocate(u64::from(PAGE), 8))
        .collect::<Result<Vec<_>, _>>()?;

    let mut replacement = None;
    let mut in_flight = 0;
    let mut completed = 0;
    let mut next_buffer = 0;
    while completed < TOTAL {
        while in_flight < DEPTH && completed + in_flight < TOTAL {
            let addr = buffers[next_buffer % DEPTH];
            next_buffer += 1;
            device.queues[0].post(&[Buffer::writable(addr, PAGE)])?;
            in_flight += 1;
        }
        device.queues[0].kick()?;
        if completed >= TOTAL / 2 && replacement.is_none() {
            // SIGKILL with requests in flight, as a crash would.
            first.kill()?;
            let (worker, connection) = WorkerProcess::launched("rng0", config())?;
            let mut frontend = UserspaceFrontend::new(connection, 1);
            frontend.negotiate(0, VhostUserProtocolFeatures::REPLY_ACK)?;
            frontend.set_mem_table(&device.memory)?;
            let used_ring = device.queues[0].layout().used_ring;
            let used_index = device.memory.read(GuestAddress(used_ring.0 + 2), 2)?;
            let resume_at = u16::from_le_bytes([used_index[0], used_index[1]]);
            frontend.resume_queue(0, &device.queues[0], resume_at)?;
            device.frontend = frontend;
            replacement = Some(worker);
            device.queues[0].kick()?;
        }
        for used in device.queues[0].wait_used(1, TIMEOUT)? {
            ensure!(
                used.len == PAGE,
                "request {} got {} bytes around the restart",
                completed,
                used.len
            );
            completed += 1;
            in_flight -= 1;
        }
    }
    let worker = replacement.context("the worker was never replaced")?;
    assert_alive(&worker)
}

/// The replacement dance again, the way Linux's virtio-rng drives the queue: EVENT_IDX,
/// one 64-byte request in flight at a time, and a kick only when the device's
/// `avail_event` asks for one.
#[test]
fn a_replaced_worker_serves_a_driver_that_suppresses_kicks() -> Result<()> {
    const QUEUE_SIZE: u16 = 64;
    const REQUESTS: usize = 300;
    let config = || DeviceConfig::Rng(RngConfig::default());
    let features = 1 << VIRTIO_RING_F_EVENT_IDX;
    let (first, connection) = WorkerProcess::launched("rng0", config())?;
    let setup = DeviceSetup::new(&[QUEUE_SIZE]).with_features(features);
    let mut device = UserspaceDevice::start(connection, &setup)?;
    let buffer = device.memory.allocate(64, 8)?;
    let layout = device.queues[0].layout();
    let read_u16 = |device: &UserspaceDevice, addr: u64| -> Result<u16> {
        let bytes = device.memory.read(GuestAddress(addr), 2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    };
    let avail_event_at = layout.used_ring.0 + 4 + 8 * u64::from(QUEUE_SIZE);
    let mut replacement = None;
    for request in 0..REQUESTS {
        let old = read_u16(&device, layout.avail_ring.0 + 2)?;
        device.queues[0].post(&[Buffer::writable(buffer, 64)])?;
        let new = old.wrapping_add(1);
        let avail_event = read_u16(&device, avail_event_at)?;
        if new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old) {
            device.queues[0].kick()?;
        }
        if request == REQUESTS / 3 {
            first.kill()?;
            let (worker, connection) = WorkerProcess::launched("rng0", config())?;
            let mut frontend = UserspaceFrontend::new(connection, 1);
            frontend.negotiate(features, VhostUserProtocolFeatures::REPLY_ACK)?;
            frontend.set_mem_table(&device.memory)?;
            let resume_at = read_u16(&device, layout.used_ring.0 + 2)?;
            frontend.resume_queue(0, &device.queues[0], resume_at)?;
            device.frontend = frontend;
            replacement = Some(worker);
            // As the VMM does after a restart: one kick so the new worker looks.
            device.queues[0].kick()?;
        }
        let used = device.queues[0]
            .wait_used(1, TIMEOUT)
            .with_context(|| format!("request {request} was never served"))?;
        ensure!(
            used[0].len == 64,
            "request {request} got {} bytes",
            used[0].len
        );
    }
    let worker = replacement.context("the worker was never replaced")?;
    assert_alive(&worker)
}
