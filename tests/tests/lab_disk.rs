//! Disks in a real Linux guest, inside the nested lab: one L1 boot, two L2 boots of a
//! guest with four virtio-blk disks, checked from inside the guest and then from L1 with
//! the real qemu-img.
//!
//! The host makes the images with qemu-img and writes known patterns into the raw ones;
//! L1 gets them under /disks with qemu-img itself. The disks, in `--disk` order (the guest
//! must see them in that order: each has its own serial and size):
//!
//! | guest | image | mode |
//! | --- | --- | --- |
//! | vda | raw.img, 16 MiB, a host pattern at 0 | `format=raw` |
//! | vdb | q.qcow2, 12 MiB, fresh | `format=qcow2` |
//! | vdc | cow.qcow2, 8 MiB over base.raw (raw, with a host pattern) | `cow`, format probed |
//! | vdd | ro.raw, 4 MiB, a host pattern at 0 | `format=raw,ro` |
//!
//! The first boot reads the host's patterns through the workers, then writes the same
//! patterns at the same (partly unaligned, partly cluster-straddling) offsets on vda and
//! vdb with O_DIRECT from both vCPUs at once, so that both request queues of each disk
//! carry requests, and reads them back from the other vCPU. On vdc it writes over the
//! backing file's data and reads its own writes back; on vdd writing must fail. The
//! second boot, on the same files, finds the writes on vda and vdb still there and the
//! cow disk as it was before the first boot. L1 then checks the files themselves: the raw
//! image holds every write at its offset, `qemu-img check` finds the QCOW2 clean,
//! `qemu-img compare` finds it identical to the raw image, and the cow and ro images (and
//! the cow disk's backing file) are byte-identical to what the host made.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulkhead_tests::lab::{boot_scenario, lab_dir, random_token, Guest, LabReport, Run, Scenario};

const GUEST_IMAGE: &str = "/disk.cpio";
/// Prefix of what L1 prints about the image files; it must not contain `LAB: `, which the
/// lab harness parses.
const L1_PREFIX: &str = "L1-DISK ";
/// Each run's guest writes and reads a few MiB with O_DIRECT and generates its patterns
/// with busybox; a boot takes about 40 s on an idle machine. Leave room for a busy one.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

const MIB: u64 = 1 << 20;
const RAW_SIZE: u64 = 16 * MIB;
const QCOW2_SIZE: u64 = 12 * MIB;
const COW_SIZE: u64 = 8 * MIB;
const RO_SIZE: u64 = 4 * MIB;

/// The pattern the host writes at offset 0 of raw.img: (seed, bytes).
const RAW_HOST_PATTERN: (u64, u64) = (3, 256 << 10);
/// The pattern at offset 0 of base.raw, the cow disk's backing file.
const COW_BASE_PATTERN: (u64, u64) = (5, 512 << 10);
/// The pattern at offset 0 of ro.raw.
const RO_PATTERN: (u64, u64) = (9, 64 << 10);

/// The guest's writes to vda and vdb: (byte offset, seed, bytes). Whole sectors, for
/// O_DIRECT; the first covers the host's pattern on vda, one is at an odd sector inside
/// a QCOW2 cluster, one straddles clusters unaligned, one ends at vdb's last byte.
const WRITES: [(u64, u64, u64); 5] = [
    (0, 10, 256 << 10),
    (MIB, 11, MIB),
    (777 * 512, 12, 4096),
    (QCOW2_SIZE - (64 << 10), 13, 64 << 10),
    (5 * MIB + 3 * 512, 14, 200 << 10),
];
/// The guest's write to the cow disk, over the backing file's pattern: (offset, seed,
/// bytes).
const COW_WRITE: (u64, u64, u64) = ((64 << 10) + 512, 20, 128 << 10);

/// What busybox prints for `seq SEED 7 999999999 | head -c LEN`: a pattern the guest, L1
/// and the host can all produce, different for every seed and never periodic.
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len as usize + 16);
    let mut n = seed;
    while (bytes.len() as u64) < len {
        bytes.extend_from_slice(format!("{n}\n").as_bytes());
        n += 7;
    }
    bytes.truncate(len as usize);
    bytes
}

/// Shell functions shared by the guest and L1 (both run busybox).
const SHELL_HELPERS: &str = r#"
pat() { seq "$1" 7 999999999 | head -c "$2"; }
sum() { sha256sum | cut -d' ' -f1; }
"#;

fn writes_list() -> String {
    WRITES
        .iter()
        .map(|(offset, seed, len)| format!("{offset}:{seed}:{len}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The L2 init: `bulkhead.disk=write` on the command line for the first boot, `reread`
/// for the second.
fn guest_init() -> String {
    let writes = writes_list();
    let (raw_seed, raw_len) = RAW_HOST_PATTERN;
    let (base_seed, base_len) = COW_BASE_PATTERN;
    let (ro_seed, ro_len) = RO_PATTERN;
    let (cow_offset, cow_seed, cow_len) = COW_WRITE;
    format!(
        r#"{SHELL_HELPERS}
WRITES="{writes}"
mode=$(sed -n 's/.*bulkhead\.disk=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "GUEST: token=$(sed -n 's/.*bulkhead\.token=\([0-9a-f]*\).*/\1/p' /proc/cmdline)"
echo "GUEST: mode=$mode"
# Which disk is which: serial, size in sectors, read-only flag.
for v in vda vdb vdc vdd; do
    echo "GUEST: $v=$(cat /sys/block/$v/serial 2>/dev/null)/$(cat /sys/block/$v/size 2>/dev/null)/$(cat /sys/block/$v/ro 2>/dev/null)"
done
echo "GUEST: vda_queues=$(ls /sys/block/vda/mq 2>/dev/null | wc -l)"
echo "GUEST: vdb_queues=$(ls /sys/block/vdb/mq 2>/dev/null | wc -l)"
# Which vCPUs submit to which hardware queue: the I/O below is pinned to each in turn.
echo "GUEST: vda_cpu_lists=$(cat /sys/block/vda/mq/*/cpu_list 2>/dev/null | tr '\n' ' ')"

# region_is DEV OFFSET SEED LEN [CPUMASK]: the LEN bytes at OFFSET of DEV, read with
# O_DIRECT (from the page cache nothing would be learnt), are the pattern SEED.
region_is() {{
    [ "$(taskset "${{5:-1}}" dd if=/dev/$1 bs=65536 skip=$2 count=$4 iflag=skip_bytes,count_bytes,direct 2>/dev/null | sum)" = "$(pat $3 $4 | sum)" ]
}}
# write_at DEV OFFSET SEED LEN CPUMASK: the pattern SEED at OFFSET, O_DIRECT and fsync.
write_at() {{
    pat $3 $4 >/tmp/w.$1.$3
    taskset $5 dd if=/tmp/w.$1.$3 of=/dev/$1 bs=65536 seek=$2 oflag=seek_bytes,direct conv=notrunc,fsync 2>/tmp/dd.$1.$3 ||
        echo "GUEST: error=write of $4 bytes at $2 on $1: $(tr '\n' ' ' </tmp/dd.$1.$3)"
}}
# check_writes DEV FIRST_CPUMASK: every write read back, alternating vCPUs; prints ok or
# the offsets that differ.
check_writes() {{
    dev=$1 cpu=$2 bad=''
    for w in $WRITES; do
        set -- $(echo $w | tr ':' ' ')
        region_is $dev $1 $2 $3 $cpu || bad="$bad $1"
        cpu=$((3 - cpu))
    done
    echo "${{bad:-ok}}"
}}

if [ "$mode" = write ]; then
    region_is vda 0 {raw_seed} {raw_len} && r=ok || r=bad
    echo "GUEST: raw_host_pattern=$r"
    region_is vdd 0 {ro_seed} {ro_len} && r=ok || r=bad
    echo "GUEST: ro_read=$r"
    region_is vdc 0 {base_seed} {base_len} && r=ok || r=bad
    echo "GUEST: cow_backing=$r"

    # Every write in parallel, on both vCPUs, on both disks.
    cpu=1
    for w in $WRITES; do
        set -- $(echo $w | tr ':' ' ')
        write_at vda $1 $2 $3 $cpu &
        write_at vdb $1 $2 $3 $((3 - cpu)) &
        cpu=$((3 - cpu))
    done
    wait
    for v in vda vdb; do blockdev --flushbufs /dev/$v; done
    echo "GUEST: vda_readback=$(check_writes vda 2)"
    echo "GUEST: vdb_readback=$(check_writes vdb 1)"

    # The cow disk takes writes over its backing file's data and reads them back; the
    # data around them is still the backing file's.
    write_at vdc {cow_offset} {cow_seed} {cow_len} 2
    region_is vdc {cow_offset} {cow_seed} {cow_len} 1 && region_is vdc 0 {base_seed} 65536 2 && r=ok || r=bad
    echo "GUEST: cow_readback=$r"

    # The kernel knows the disk is read-only and refuses to open it for writing.
    pat 1 4096 >/tmp/ro
    if dd if=/tmp/ro of=/dev/vdd bs=4096 oflag=direct conv=notrunc,fsync 2>/dev/null; then
        echo "GUEST: ro_write=accepted"
    else
        echo "GUEST: ro_write=refused"
    fi
    region_is vdd 0 {ro_seed} {ro_len} && r=ok || r=bad
    echo "GUEST: ro_after=$r"

    # Requests per hardware queue, when the kernel has blk-mq debugfs.
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    runs=''
    for h in /sys/kernel/debug/block/vda/hctx*; do
        [ -r $h/run ] && runs="$runs $(cat $h/run)"
    done
    echo "GUEST: vda_hctx_runs=$runs"
else
    echo "GUEST: vda_persisted=$(check_writes vda 1)"
    echo "GUEST: vdb_persisted=$(check_writes vdb 2)"
    # The first boot's cow write is gone: the backing file's data shows again.
    region_is vdc 0 {base_seed} {base_len} && r=ok || r=bad
    echo "GUEST: cow_fresh=$r"
    # Never written, so zero.
    [ "$(dd if=/dev/vdb bs=65536 skip=100 count=1 iflag=direct 2>/dev/null | sum)" = "$(head -c 65536 /dev/zero | sum)" ] && r=ok || r=bad
    echo "GUEST: vdb_unwritten_zero=$r"
fi
echo "GUEST: finished=$mode"
"#
    )
}

/// L1 commands after a run: what the image files hold.
fn l1_checks(when: &str) -> String {
    let writes = writes_list();
    format!(
        r#"{SHELL_HELPERS}
sha256sum /disks/cow.qcow2 /disks/base.raw /disks/ro.raw | while read -r hash file; do
    echo "{L1_PREFIX}{when} sha $file=$hash"
done
qemu-img check /disks/q.qcow2 >/tmp/check 2>&1
echo "{L1_PREFIX}{when} check=$?"
sed 's/^/{L1_PREFIX}{when} check: /' /tmp/check
qemu-img compare -f qcow2 -F raw /disks/q.qcow2 /disks/raw.img >/tmp/compare 2>&1
echo "{L1_PREFIX}{when} compare=$?"
sed 's/^/{L1_PREFIX}{when} compare: /' /tmp/compare
bad=''
for w in {writes}; do
    set -- $(echo $w | tr ':' ' ')
    [ "$(dd if=/disks/raw.img bs=512 skip=$(($1 / 512)) count=$(($3 / 512)) 2>/dev/null | sum)" = "$(pat $2 $3 | sum)" ] || bad="$bad $1"
done
echo "{L1_PREFIX}{when} raw_file=${{bad:-ok}}""#
    )
}

fn sha_before() -> String {
    format!(
        "sha256sum /disks/cow.qcow2 /disks/base.raw /disks/ro.raw | while read -r hash file; do echo \"{L1_PREFIX}before sha $file=$hash\"; done"
    )
}

/// The host files behind /disks in L1.
struct Images {
    dir: PathBuf,
}

impl Images {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn make() -> Images {
        let dir = lab_dir().join("work").join("disk-images");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let images = Images { dir };
        let size = |bytes: u64| bytes.to_string();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "raw",
            &images.arg("raw.img"),
            &size(RAW_SIZE),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &images.arg("q.qcow2"),
            &size(QCOW2_SIZE),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "raw",
            &images.arg("base.raw"),
            &size(COW_SIZE),
        ]);
        // The backing file is named relative to the overlay, as bulkhead resolves it.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            &images.arg("cow.qcow2"),
            &size(COW_SIZE),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "raw",
            &images.arg("ro.raw"),
            &size(RO_SIZE),
        ]);
        images.put_pattern("raw.img", RAW_HOST_PATTERN);
        images.put_pattern("base.raw", COW_BASE_PATTERN);
        images.put_pattern("ro.raw", RO_PATTERN);
        images
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    fn put_pattern(&self, name: &str, (seed, len): (u64, u64)) {
        let path = self.path(name);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|file| file.write_all_at(&pattern(seed, len), 0))
            .unwrap_or_else(|e| panic!("writing a pattern into {}: {e}", path.display()));
    }
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img (qemu-utils) is needed: {e}"));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn disk_run(label: &str, mode: &str, token: &str) -> Run {
    let cmdline = format!("console=ttyS0 panic=-1 bulkhead.disk={mode} bulkhead.token={token}");
    let args = [
        "run",
        "--kernel",
        "/vmlinux",
        "--initrd",
        GUEST_IMAGE,
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--disk",
        "/disks/raw.img,format=raw",
        "--disk",
        "/disks/q.qcow2,format=qcow2",
        "--disk",
        "/disks/cow.qcow2,cow",
        "--disk",
        "/disks/ro.raw,format=raw,ro",
        "--cmdline",
        &cmdline,
    ];
    Run::new(label, args)
        .timeout(RUN_TIMEOUT)
        .then_in_l1(&l1_checks(label))
}

/// `L1-DISK <when> <key>=<value>` lines.
fn l1_values(report: &LabReport) -> HashMap<String, String> {
    report
        .lines
        .iter()
        .filter_map(|line| line.text.split_once(L1_PREFIX).map(|(_, rest)| rest.trim()))
        .filter(|rest| !rest.contains(" check: ") && !rest.contains(" compare: "))
        .filter_map(|rest| rest.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// Every problem found, not just the first: a lab boot is too dear to learn one at a time.
fn problems(report: &LabReport, token: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let l1 = l1_values(report);
    let mut expect_l1 = |key: &str, want: &str| match l1.get(key) {
        Some(value) if value == want => {}
        other => problems.push(format!("L1: {key} is {other:?}, expected {want:?}")),
    };
    for run in ["write", "reread"] {
        expect_l1(&format!("{run} check"), "0");
        expect_l1(&format!("{run} compare"), "0");
        expect_l1(&format!("{run} raw_file"), "ok");
    }
    for file in ["/disks/cow.qcow2", "/disks/base.raw", "/disks/ro.raw"] {
        let before = l1.get(&format!("before sha {file}"));
        for run in ["write", "reread"] {
            let after = l1.get(&format!("{run} sha {file}"));
            if before.is_none() || before != after {
                problems.push(format!(
                    "{file} changed: before {before:?}, after the {run} run {after:?}"
                ));
            }
        }
    }

    let disks = [
        ("vda", RAW_SIZE, 0),
        ("vdb", QCOW2_SIZE, 0),
        ("vdc", COW_SIZE, 0),
        ("vdd", RO_SIZE, 1),
    ];
    for (label, mode) in [("write", "write"), ("reread", "reread")] {
        let Some(run) = report.run(label) else {
            problems.push(format!("the {label} run never started"));
            continue;
        };
        let mut expect = |key: &str, want: &str| match run.guest(key) {
            Some(value) if value == want => {}
            other => problems.push(format!(
                "{label} run: {key} is {other:?}, expected {want:?}"
            )),
        };
        expect("token", token);
        expect("finished", mode);
        for (index, (disk, size, ro)) in disks.iter().enumerate() {
            expect(disk, &format!("bulkhead-disk{index}/{}/{ro}", size / 512));
        }
        // One hardware queue per vCPU.
        expect("vda_queues", "2");
        expect("vdb_queues", "2");
        expect("vda_cpu_lists", "0 1");
        if mode == "write" {
            for key in [
                "raw_host_pattern",
                "ro_read",
                "cow_backing",
                "vda_readback",
                "vdb_readback",
                "cow_readback",
                "ro_after",
            ] {
                expect(key, "ok");
            }
            expect("ro_write", "refused");
            // Present when the guest kernel has blk-mq debugfs: both queues carried I/O.
            if let Some(runs) = run.guest("vda_hctx_runs").filter(|r| !r.is_empty()) {
                let counts: Vec<u64> = runs
                    .split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect();
                if counts.len() != 2 || counts.contains(&0) {
                    problems.push(format!("vda's hardware queues ran {runs:?} times"));
                }
            }
        } else {
            for key in [
                "vda_persisted",
                "vdb_persisted",
                "cow_fresh",
                "vdb_unwritten_zero",
            ] {
                expect(key, "ok");
            }
        }
        if let Some(error) = run.guest("error") {
            problems.push(format!("{label} run: guest error {error:?}"));
        }
        if run.exit != Some(0) {
            problems.push(format!("{label} run: bulkhead exited with {:?}", run.exit));
        }
    }
    problems
}

#[test]
fn disks_serve_a_linux_guest_and_qemu_img_agrees() {
    let images = Images::make();
    let token = random_token().unwrap_or_else(|e| panic!("{e}"));
    let mut scenario = Scenario::new("disk")
        .guest(Guest::new(GUEST_IMAGE, &guest_init()).modules(&["virtio_mmio", "virtio_blk"]))
        .l1_program(Path::new("/usr/bin/qemu-img"))
        .l1_setup(&sha_before())
        .run(disk_run("write", "write", &token))
        .run(disk_run("reread", "reread", &token));
    for name in ["raw.img", "q.qcow2", "base.raw", "cow.qcow2", "ro.raw"] {
        scenario = scenario.l1_file(&format!("/disks/{name}"), &images.path(name));
    }
    let report = boot_scenario(&scenario);
    let problems = problems(&report, &token);
    report.assert_no_problems(&problems);
}

#[test]
fn the_pattern_is_what_busybox_seq_prints() {
    assert_eq!(pattern(3, 12), b"3\n10\n17\n24\n3");
    assert_eq!(pattern(5, 0), b"");
}
