//! Bad command lines and bad kernel/initrd files: bulkhead must refuse each with a non-zero
//! exit and an `error: ` report that names the problem, and must never panic (a debug
//! build panics on arithmetic overflow, which is what several of these files provoke).

use std::path::Path;

use anyhow::Result;
use bulkhead_tests::micro::bzimage::{bzimage, setup_size};
use bulkhead_tests::micro::elf::{build_elf, patch_program_header, ProgramHeaderField};
use bulkhead_tests::micro::hw::MIB;
use bulkhead_tests::micro::{BulkheadCommand, MicroGuest, RunOutcome, ScratchDir, Segment};

/// A kernel that works: it powers off at once. Errors must come from the one bad input.
fn power_off_kernel() -> Result<Vec<u8>> {
    let mut guest = MicroGuest::new()?;
    guest.power_off()?;
    guest.build()
}

/// `bulkhead run --kernel <kernel> <args>`.
fn run(kernel: &Path, args: &[&str]) -> Result<RunOutcome> {
    Ok(BulkheadCommand::new()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(args)
        .run()?)
}

/// `bulkhead run --kernel <a file holding image> <args>`.
fn run_image(image: &[u8], args: &[&str]) -> Result<RunOutcome> {
    let dir = ScratchDir::new("cli")?;
    run(&dir.write("kernel", image)?, args)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// The control for every test below: the same kernel with sane flags boots and powers off.
#[test]
fn valid_kernel_and_flags_succeed() -> Result<()> {
    run_image(&power_off_kernel()?, &["--cpus", "2", "--memory", "64M"])?.assert_clean_exit();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Kernel files
// ---------------------------------------------------------------------------------------

#[test]
fn missing_kernel_file() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let missing = dir.path().join("no-such-vmlinux");
    run(&missing, &[])?.assert_error_mentioning(&[path_str(&missing)]);
    Ok(())
}

#[test]
fn directory_as_kernel() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    run(dir.path(), &[])?.assert_error_mentioning(&[path_str(dir.path())]);
    Ok(())
}

#[test]
fn empty_kernel_file() -> Result<()> {
    run_image(&[], &[])?.assert_error_mentioning(&["empty", "not a kernel"]);
    Ok(())
}

#[test]
fn random_bytes_are_not_a_kernel() -> Result<()> {
    // Deterministic noise (xorshift64) that has neither ELF magic nor a "HdrS" header.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..8192)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    assert!(!noise.starts_with(b"\x7fELF") && &noise[0x202..0x206] != b"HdrS");
    run_image(&noise, &[])?.assert_error_mentioning(&["not a kernel", "not an elf or bzimage"]);
    Ok(())
}

#[test]
fn bzimage_cut_inside_its_setup_header() -> Result<()> {
    let whole = bzimage(4, &[0; 4096]);
    run_image(&whole[..0x240], &[])?.assert_error_mentioning(&["truncated"]);
    Ok(())
}

#[test]
fn bzimage_shorter_than_its_header_says() -> Result<()> {
    // syssize promises 64 KiB of protected-mode code; the file holds 1 KiB of it.
    let whole = bzimage(4, &[0; 64 * 1024]);
    run_image(&whole[..setup_size(4) + 1024], &[])?.assert_error_mentioning(&["truncated"]);
    Ok(())
}

#[test]
fn elf_segment_runs_past_end_of_file() -> Result<()> {
    let mut image = power_off_kernel()?;
    patch_program_header(&mut image, 0, ProgramHeaderField::FileSize, 0x10_0000);
    patch_program_header(&mut image, 0, ProgramHeaderField::MemSize, 0x10_0000);
    run_image(&image, &[])?.assert_error_mentioning(&["truncated", "end of file", "past the end"]);
    Ok(())
}

#[test]
fn elf_segment_offset_overflows() -> Result<()> {
    let mut image = power_off_kernel()?;
    patch_program_header(&mut image, 0, ProgramHeaderField::Offset, u64::MAX - 8);
    run_image(&image, &[])?.assert_error_mentioning(&["overflow", "truncated", "end of file"]);
    Ok(())
}

#[test]
fn elf_segment_address_overflows() -> Result<()> {
    let mut image = power_off_kernel()?;
    patch_program_header(
        &mut image,
        0,
        ProgramHeaderField::PhysAddr,
        u64::MAX - 0xfff,
    );
    run_image(&image, &[])?.assert_error_mentioning(&["overflow", "does not fit", "outside"]);
    Ok(())
}

#[test]
fn elf_segment_beyond_guest_memory() -> Result<()> {
    // A valid segment at 4 GiB, for a guest with 64 MiB of RAM.
    let image = build_elf(1 << 32, &[Segment::new(1 << 32, vec![0xf4; 16])]);
    run_image(&image, &["--memory", "64M"])?.assert_error_mentioning(&[
        "does not fit",
        "outside",
        "beyond",
    ]);
    Ok(())
}

#[test]
fn elf_segment_larger_than_guest_memory() -> Result<()> {
    let mut image = power_off_kernel()?;
    patch_program_header(&mut image, 0, ProgramHeaderField::MemSize, 128 * MIB);
    run_image(&image, &["--memory", "64M"])?.assert_error_mentioning(&[
        "does not fit",
        "too large",
        "outside",
    ]);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Initrd files
// ---------------------------------------------------------------------------------------

#[test]
fn missing_initrd() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let kernel = dir.write("kernel", &power_off_kernel()?)?;
    let missing = dir.path().join("no-such-initrd.img");
    run(&kernel, &["--initrd", path_str(&missing)])?.assert_error_mentioning(&[path_str(&missing)]);
    Ok(())
}

#[test]
fn initrd_larger_than_guest_memory() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let kernel = dir.write("kernel", &power_off_kernel()?)?;
    let initrd = dir.path().join("huge-initrd.img");
    // Sparse: 80 MiB of apparent size, no disk or time spent.
    std::fs::File::create(&initrd)?.set_len(80 * MIB)?;
    let outcome = run(&kernel, &["--memory", "64M", "--initrd", path_str(&initrd)])?;
    outcome.assert_error_mentioning(&["initrd"]);
    outcome.assert_error_mentioning(&["does not fit", "too large"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------

fn run_with_flags(args: &[&str]) -> Result<RunOutcome> {
    run_image(&power_off_kernel()?, args)
}

#[test]
fn zero_cpus() -> Result<()> {
    run_with_flags(&["--cpus", "0"])?.assert_error_mentioning(&["cpu"]);
    Ok(())
}

#[test]
fn too_many_cpus() -> Result<()> {
    run_with_flags(&["--cpus", "100000"])?.assert_error_mentioning(&["cpu"]);
    Ok(())
}

#[test]
fn cpus_not_a_number() -> Result<()> {
    run_with_flags(&["--cpus", "abc"])?.assert_error_mentioning(&["cpu"]);
    Ok(())
}

#[test]
fn zero_memory() -> Result<()> {
    run_with_flags(&["--memory", "0"])?.assert_error_mentioning(&["memory"]);
    Ok(())
}

#[test]
fn one_kilobyte_of_memory() -> Result<()> {
    run_with_flags(&["--memory", "1K"])?.assert_error_mentioning(&["memory"]);
    Ok(())
}

#[test]
fn absurd_amount_of_memory() -> Result<()> {
    run_with_flags(&["--memory", "99999T"])?.assert_error_mentioning(&["memory"]);
    Ok(())
}

#[test]
fn unknown_memory_unit() -> Result<()> {
    run_with_flags(&["--memory", "12Q"])?.assert_error_mentioning(&["memory"]);
    Ok(())
}

#[test]
fn overlong_command_line() -> Result<()> {
    // Far beyond x86 Linux's COMMAND_LINE_SIZE (2048), and beyond what the page at 0x20000
    // is meant to hold.
    let cmdline = "x".repeat(100_000);
    run_with_flags(&["--cmdline", &cmdline])?.assert_error_mentioning(&["command line", "cmdline"]);
    Ok(())
}

#[test]
fn unknown_flag() -> Result<()> {
    run_with_flags(&["--frobnicate"])?.assert_error_mentioning(&["--frobnicate"]);
    Ok(())
}

#[test]
fn kernel_flag_is_required() -> Result<()> {
    BulkheadCommand::new()
        .arg("run")
        .run()?
        .assert_error_mentioning(&["--kernel"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Device workers
// ---------------------------------------------------------------------------------------

#[test]
fn missing_worker_binary() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let kernel = dir.write("kernel", &power_off_kernel()?)?;
    let missing = dir.path().join("no-such-worker");
    BulkheadCommand::new()
        .env("BULKHEAD_WORKER", &missing)
        .args(["run", "--rng", "--kernel"])
        .arg(&kernel)
        .run()?
        .assert_error_mentioning(&["cannot start its worker"]);
    Ok(())
}

#[test]
fn audit_log_in_a_missing_directory() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let log = dir.path().join("no-such-dir").join("audit.jsonl");
    let log = path_str(&log).to_owned();
    run_image(&power_off_kernel()?, &["--audit-log", &log])?
        .assert_error_mentioning(&["cannot open audit log"]);
    Ok(())
}

/// The control for the two above: with a worker binary and a writable log, a VM with an
/// rng device starts its worker (the vhost-user handshake happens before the guest
/// runs), logs it, and ends cleanly.
#[test]
fn rng_worker_is_started_and_audited() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let log = dir.path().join("audit.jsonl");
    run_image(
        &power_off_kernel()?,
        &["--rng", "--audit-log", path_str(&log)],
    )?
    .assert_clean_exit();
    let audit = std::fs::read_to_string(&log)?;
    assert!(
        audit.contains(r#""event":"spawn","device":"rng0","kind":"rng""#),
        "{audit}"
    );
    assert!(audit.contains(r#""event":"policy""#), "{audit}");
    assert!(!audit.contains(r#""event":"crash""#), "{audit}");
    Ok(())
}

/// A kernel that powers off two seconds after it starts, paced by the ACPI PM timer so
/// that the wait does not depend on how fast guest code runs.
fn power_off_later_kernel() -> Result<Vec<u8>> {
    use bulkhead_tests::micro::hw::{PM_TIMER, PM_TIMER_HZ};
    use iced_x86::code_asm::{dx, eax, r13d};

    let mut guest = MicroGuest::new()?;
    let a = guest.asm();
    a.mov(dx, PM_TIMER as u32)?;
    a.in_(eax, dx)?;
    a.mov(r13d, eax)?;
    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.pause()?;
    a.in_(eax, dx)?;
    a.sub(eax, r13d)?;
    // The timer is 24 bits wide: two seconds fit before it wraps.
    a.and(eax, 0xff_ffff)?;
    a.cmp(eax, 2 * PM_TIMER_HZ)?;
    a.jb(wait)?;
    guest.power_off()?;
    guest.build()
}

#[test]
fn display_sdl_starts_the_viewer_beside_the_workers() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let outcome = BulkheadCommand::new()
        .env("SDL_VIDEODRIVER", "offscreen")
        .arg("run")
        .arg("--kernel")
        .arg(dir.write("kernel", &power_off_later_kernel()?)?)
        .args(["--display", "sdl,size=640x480"])
        .run()?;
    // The viewer's own log: it spoke RFB with the display worker, at the size asked for.
    assert!(
        outcome.stderr.contains("connected width=640 height=480"),
        "{}",
        outcome.stderr
    );
    outcome.assert_clean_exit();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Disks
// ---------------------------------------------------------------------------------------

fn qemu_img(args: &[&str]) -> Result<()> {
    let status = std::process::Command::new("qemu-img").args(args).status()?;
    anyhow::ensure!(status.success(), "qemu-img {args:?} failed");
    Ok(())
}

#[test]
fn missing_disk_image() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let missing = dir.path().join("no-such-disk.img");
    let disk = format!("{},format=raw", path_str(&missing));
    run_image(&power_off_kernel()?, &["--disk", &disk])?
        .assert_error_mentioning(&[path_str(&missing)]);
    Ok(())
}

#[test]
fn bad_disk_options_are_usage_errors() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let image = dir.write("disk.img", &[0u8; 4096])?;
    for bad in ["format=vmdk", "rw", "ro,cow"] {
        let disk = format!("{},{bad}", path_str(&image));
        let outcome = run_image(&power_off_kernel()?, &["--disk", &disk])?;
        outcome.assert_error_mentioning(&[bad.split(',').next().unwrap_or(bad)]);
    }
    Ok(())
}

#[test]
fn qcow2_backing_loop_is_refused() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&b), "1M"])?;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        path_str(&a),
    ])?;
    // Point b back at a, behind qemu-img's back.
    qemu_img(&["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", path_str(&b)])?;
    let disk = format!("{},format=qcow2", path_str(&a));
    run_image(&power_off_kernel()?, &["--disk", &disk])?.assert_error_mentioning(&["loop"]);
    Ok(())
}

#[test]
fn blk_workers_are_started_and_audited() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let log = dir.path().join("audit.jsonl");
    let raw = dir.path().join("disk.raw");
    let qcow2 = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", path_str(&raw), "8M"])?;
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&qcow2), "8M"])?;
    let before = std::fs::read(&qcow2)?;
    let raw_disk = format!("{},format=raw,ro", path_str(&raw));
    let qcow2_disk = format!("{},cow", path_str(&qcow2));
    run_image(
        &power_off_kernel()?,
        &[
            "--disk",
            &raw_disk,
            "--disk",
            &qcow2_disk,
            "--audit-log",
            path_str(&log),
        ],
    )?
    .assert_clean_exit();
    let audit = std::fs::read_to_string(&log)?;
    for device in ["blk0", "blk1"] {
        let spawn = format!(r#""event":"spawn","device":"{device}","kind":"blk""#);
        assert!(audit.contains(&spawn), "{audit}");
    }
    assert!(audit.contains(r#""event":"policy""#), "{audit}");
    assert!(!audit.contains(r#""event":"crash""#), "{audit}");
    assert_eq!(std::fs::read(&qcow2)?, before, "a cow disk was written");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 9p shares
// ---------------------------------------------------------------------------------------

#[test]
fn bad_9p_options_are_usage_errors() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let share = path_str(dir.path()).to_owned();
    let long_tag = format!("{share},tag={}", "t".repeat(70_000));
    let cases = [
        (format!("{share},rw"), "rw"),
        (format!("{share},tag="), "empty"),
        (format!("{share},ro=yes"), "ro=yes"),
        (",tag=x".to_owned(), "directory"),
        (long_tag, "65535"),
    ];
    for (bad, mentioned) in cases {
        let outcome = run_image(&power_off_kernel()?, &["--9p", &bad])?;
        outcome.assert_error_mentioning(&[mentioned]);
        assert!(outcome.error_report().contains("--9p"), "{outcome}");
        assert_eq!(outcome.status.code(), Some(2), "a usage error:\n{outcome}");
    }
    Ok(())
}

#[test]
fn missing_shared_directory() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let missing = dir.path().join("no-such-dir");
    let outcome = run_image(&power_off_kernel()?, &["--9p", path_str(&missing)])?;
    outcome.assert_error_mentioning(&[path_str(&missing)]);
    assert!(outcome.error_report().contains("No such file"), "{outcome}");
    assert_eq!(outcome.status.code(), Some(1), "{outcome}");
    Ok(())
}

#[test]
fn a_file_is_no_shared_directory() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let file = dir.write("plain-file", b"not a directory")?;
    let outcome = run_image(&power_off_kernel()?, &["--9p", path_str(&file)])?;
    outcome.assert_error_mentioning(&["not a directory"]);
    assert!(
        outcome.error_report().contains(path_str(&file)),
        "{outcome}"
    );
    assert_eq!(outcome.status.code(), Some(1), "{outcome}");
    Ok(())
}

#[test]
fn two_shares_with_one_tag_are_refused() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    for sub in ["a/data", "b/data"] {
        std::fs::create_dir_all(dir.path().join(sub))?;
    }
    let first = dir.path().join("a/data");
    let second = format!("{},ro", path_str(&dir.path().join("b/data")));
    // The default tags clash ("data"), and so do a default and an explicit one.
    for other in [second, format!("{},tag=data", path_str(dir.path()))] {
        let outcome = run_image(
            &power_off_kernel()?,
            &["--9p", path_str(&first), "--9p", &other],
        )?;
        outcome.assert_error_mentioning(&["\"data\""]);
        assert!(outcome.error_report().contains("tag=TAG"), "{outcome}");
        assert_eq!(outcome.status.code(), Some(1), "{outcome}");
    }
    Ok(())
}

/// Two shares, one read-only: each gets a p9 worker that completes its handshake, and
/// the audit log's policy digest for each is that of the policy the worker applies (its
/// Landlock grant read-only or not), not the printable shape `bulkhead policy p9` shows.
#[test]
fn p9_workers_are_started_and_audited() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let log = dir.path().join("audit.jsonl");
    for sub in ["rw", "ro"] {
        std::fs::create_dir_all(dir.path().join(sub))?;
    }
    let writable = path_str(&dir.path().join("rw")).to_owned();
    let read_only = format!("{},tag=ro-share,ro", path_str(&dir.path().join("ro")));
    run_image(
        &power_off_kernel()?,
        &[
            "--9p",
            &writable,
            "--9p",
            &read_only,
            "--audit-log",
            path_str(&log),
        ],
    )?
    .assert_clean_exit();
    let audit = std::fs::read_to_string(&log)?;
    for (device, ro) in [("9p0", false), ("9p1", true)] {
        let spawn = format!(r#""event":"spawn","device":"{device}","kind":"p9""#);
        assert!(audit.contains(&spawn), "{audit}");
        let digest = bulkhead_seccomp::p9_policy(5, ro).digest();
        let policy =
            format!(r#""event":"policy","device":"{device}","kind":"p9","digest":"{digest}""#);
        assert!(audit.contains(&policy), "{device}: {policy}\n{audit}");
    }
    let shape = bulkhead_seccomp::policy_for(bulkhead_protocol::WorkerKind::P9).digest();
    assert!(!audit.contains(&shape.to_string()), "{audit}");
    assert!(!audit.contains(r#""event":"crash""#), "{audit}");
    assert!(!audit.contains(r#""event":"exit""#), "{audit}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// display
// ---------------------------------------------------------------------------------------

#[test]
fn bad_display_options_are_errors() -> Result<()> {
    let kernel = power_off_kernel()?;
    for (bad, says) in [
        ("vnc=0.0.0.0:5900", "loopback"),
        ("vnc=5900", "neither ADDR:PORT"),
        ("vnc,size=1x1", "WIDTHxHEIGHT"),
        (
            "vnc,password-file=/nonexistent/pw",
            "cannot read the VNC password",
        ),
        ("rdp", "unknown display"),
        ("sdl,password=pw", "takes no password"),
    ] {
        run_image(&kernel, &["--display", bad])?.assert_error_mentioning(&[says]);
    }
    let busy = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken = format!("vnc={}", busy.local_addr()?);
    run_image(&kernel, &["--display", &taken])?.assert_error_mentioning(&["cannot listen"]);
    Ok(())
}

#[test]
fn display_and_input_workers_are_started_and_audited() -> Result<()> {
    let dir = ScratchDir::new("cli")?;
    let log = dir.path().join("audit.jsonl");
    let display = format!("vnc=unix:{}", path_str(&dir.path().join("vnc.sock")));
    run_image(
        &power_off_kernel()?,
        &["--display", &display, "--audit-log", path_str(&log)],
    )?
    .assert_clean_exit();
    let audit = std::fs::read_to_string(&log)?;
    for (device, kind) in [("display0", "display"), ("input0", "input")] {
        let spawn = format!(r#""event":"spawn","device":"{device}","kind":"{kind}""#);
        assert!(audit.contains(&spawn), "{audit}");
    }
    assert!(!audit.contains(r#""event":"crash""#), "{audit}");
    Ok(())
}
