//! A `,cow` disk whose worker is killed while a real Linux guest writes to it, inside the
//! nested lab: one L1 boot, one L2 boot.
//!
//! The host makes a raw image holding a known pattern. The guest writes patterns over it
//! with O_DIRECT (whole blocks and a run of sectors that only partly covers its first and
//! last 4 KiB blocks) and reads them back; then it announces a series of writes, which L1
//! answers by killing the blk worker with SIGKILL, and carries on writing through the kill.
//! Afterwards it reads everything back through the replacement worker: the writes the
//! killed worker completed, the ones it left in flight, and the image's own data where the
//! guest wrote nothing. The audit log must tell one crash and one restart, and L1 finds the
//! image file byte-identical to what the host made.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use bulkhead_tests::lab::{
    boot_scenario, lab_dir, random_token, AuditRecords, Guest, LabReport, Run, RunReport, Scenario,
};

const IMAGE: &str = "/cow.cpio";
const LABEL: &str = "cow-kill";
const DISK: &str = "/disks/cow.raw";
const DISK_SIZE: u64 = 8 << 20;
/// The host's pattern over the start of the image: (seed, bytes).
const BASE_PATTERN: (u64, u64) = (5, 4 << 20);
/// What L1 prints about the image and the audit log; must not contain `LAB: `.
const L1_PREFIX: &str = "L1-COW ";
const AUDIT_PREFIX: &str = "LAB-COW-AUDIT ";
const AUDIT_LOG: &str = "/tmp/cow.audit.jsonl";
/// Writes before the kill: (byte offset, seed, bytes). Whole blocks, then sectors that
/// begin and end inside 4 KiB blocks, so that the overlay copies those blocks up.
const BEFORE: [(u64, u64, u64); 2] = [(1 << 20, 11, 1 << 20), (3 * 512, 12, 20 * 512)];
/// Writes through the kill: this many of 64 KiB from 2 MiB on, seeds 100 and up.
const THROUGH: u64 = 24;
/// A boot takes about 40 s; the writes and reads a few more. Leave room for a busy host.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// What busybox prints for `seq SEED 7 999999999 | head -c LEN` (as in lab_disk).
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

fn guest_init() -> String {
    let before = BEFORE
        .iter()
        .map(|(offset, seed, len)| format!("{offset}:{seed}:{len}"))
        .collect::<Vec<_>>()
        .join(" ");
    let (base_seed, _) = BASE_PATTERN;
    format!(
        r#"
pat() {{ seq "$1" 7 999999999 | head -c "$2"; }}
sum() {{ sha256sum | cut -d' ' -f1; }}
# region_is OFFSET SEED LEN: vda's LEN bytes at OFFSET, read with O_DIRECT, are pattern SEED.
region_is() {{
    [ "$(dd if=/dev/vda bs=65536 skip=$1 count=$3 iflag=skip_bytes,count_bytes,direct 2>/dev/null | sum)" = "$(pat $2 $3 | sum)" ]
}}
# write_at OFFSET SEED LEN: pattern SEED at OFFSET, O_DIRECT and fsync.
write_at() {{
    pat $2 $3 >/tmp/w.$2
    dd if=/tmp/w.$2 of=/dev/vda bs=65536 seek=$1 oflag=seek_bytes,direct conv=notrunc,fsync 2>/tmp/dd.$2 ||
        echo "GUEST: error=write of $3 bytes at $1: $(tr '\n' ' ' </tmp/dd.$2)"
}}
# check LIST: every OFFSET:SEED:LEN of LIST reads back; ok or the offsets that do not.
check() {{
    bad=''
    for w in $1; do
        set -- $(echo $w | tr ':' ' ')
        region_is $1 $2 $3 || bad="$bad $1"
    done
    echo "${{bad:-ok}}"
}}
echo "GUEST: token=$(sed -n 's/.*bulkhead\.token=\([0-9a-f]*\).*/\1/p' /proc/cmdline)"
echo "GUEST: vda=$(cat /sys/block/vda/size)"
region_is 0 {base_seed} 65536 && r=ok || r=bad
echo "GUEST: base_before=$r"
BEFORE="{before}"
for w in $BEFORE; do
    set -- $(echo $w | tr ':' ' ')
    write_at $1 $2 $3
done
echo "GUEST: before_kill=$(check "$BEFORE")"
THROUGH=''
for i in $(seq 1 {THROUGH}); do
    THROUGH="$THROUGH $((2097152 + i * 65536)):$((100 + i)):65536"
done
echo "GUEST: writing"
for w in $THROUGH; do
    set -- $(echo $w | tr ':' ' ')
    write_at $1 $2 $3
done
echo "GUEST: written"
echo "GUEST: after_kill=$(check "$BEFORE")"
echo "GUEST: through_kill=$(check "$THROUGH")"
# The first 20 sectors' head, untouched by the guest, and what lies past its writes.
region_is 0 {base_seed} 1536 && r=ok || r=bad
echo "GUEST: base_head=$r"
[ "$(dd if=/dev/vda bs=65536 skip=$((4 * 1048576)) count=65536 iflag=skip_bytes,count_bytes,direct 2>/dev/null | sum)" = "$(head -c 65536 /dev/zero | sum)" ] && r=ok || r=bad
echo "GUEST: past_base=$r"
echo "GUEST: finished=yes"
"#
    )
}

fn cow_run(cmdline: &str) -> Run {
    let disk = format!("{DISK},format=raw,cow");
    let args = [
        "run",
        "--kernel",
        "/vmlinux",
        "--initrd",
        IMAGE,
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--disk",
        &disk,
        "--audit-log",
        AUDIT_LOG,
        "--cmdline",
        cmdline,
    ];
    Run::new(LABEL, args)
        .timeout(RUN_TIMEOUT)
        .when_output_contains("GUEST: writing", "killall -9 bulkhead-worker")
        .then_in_l1(&format!(
            "echo \"{L1_PREFIX}after=$(sha256sum {DISK} | cut -d' ' -f1)\"; sed 's/^/{AUDIT_PREFIX}/' {AUDIT_LOG}"
        ))
}

/// `L1-COW <key>=<value>`.
fn l1_value<'r>(report: &'r LabReport, key: &str) -> Option<&'r str> {
    report.lines.iter().rev().find_map(|line| {
        line.text
            .split_once(&format!("{L1_PREFIX}{key}="))
            .map(|(_, value)| value.trim())
    })
}

/// L1 must report the kill after the guest announced its writes and before it read them
/// back.
fn killed_mid_writes(report: &LabReport) -> Result<(), String> {
    let position = |needle: &str| report.lines.iter().position(|l| l.text.contains(needle));
    match (
        position("GUEST: writing"),
        position(&format!("LAB: run {LABEL}: triggered")),
        position("GUEST: after_kill="),
    ) {
        (Some(writing), Some(killed), Some(read)) if writing < killed && killed < read => Ok(()),
        (writing, killed, read) => Err(format!(
            "the kill did not land between the writes and the reads (writing at line \
             {writing:?}, kill at {killed:?}, reads at {read:?})"
        )),
    }
}

fn problems(report: &LabReport, run: &RunReport, token: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut expect = |key: &str, want: &str| match run.guest(key) {
        Some(value) if value == want => {}
        other => problems.push(format!("{key} is {other:?}, expected {want:?}")),
    };
    expect("token", token);
    expect("vda", &(DISK_SIZE / 512).to_string());
    for key in [
        "base_before",
        "before_kill",
        "after_kill",
        "through_kill",
        "base_head",
        "past_base",
    ] {
        expect(key, "ok");
    }
    expect("finished", "yes");
    if let Some(error) = run.guest("error") {
        problems.push(format!("guest error {error:?}"));
    }
    if run.exit != Some(0) {
        problems.push(format!("bulkhead exited with {:?}", run.exit));
    }
    if let Err(e) = killed_mid_writes(report) {
        problems.push(e);
    }
    let audit = AuditRecords::of(report, AUDIT_PREFIX);
    if let Err(e) = audit
        .spawned("blk0")
        .and_then(|()| audit.one_kill_one_restart("blk0"))
    {
        problems.push(format!("audit: {e}"));
    }
    match (l1_value(report, "before"), l1_value(report, "after")) {
        (Some(before), Some(after)) if before == after => {}
        (before, after) => problems.push(format!(
            "the image changed: sha256 {before:?} before, {after:?} after"
        )),
    }
    problems
}

#[test]
fn a_cow_disk_keeps_its_writes_through_a_worker_kill() {
    let dir = lab_dir().join("work").join("cow-image");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let image = dir.join("cow.raw");
    let (seed, len) = BASE_PATTERN;
    fs::File::create(&image)
        .and_then(|file| {
            file.set_len(DISK_SIZE)?;
            file.write_all_at(&pattern(seed, len), 0)
        })
        .unwrap_or_else(|e| panic!("making {}: {e}", image.display()));

    let token = random_token().unwrap_or_else(|e| panic!("{e}"));
    let cmdline = format!("console=ttyS0 panic=-1 bulkhead.token={token}");
    let scenario = Scenario::new("cow")
        .guest(Guest::new(IMAGE, &guest_init()).modules(&["virtio_mmio", "virtio_blk"]))
        .l1_file(DISK, Path::new(&image))
        .l1_setup(&format!(
            "echo \"{L1_PREFIX}before=$(sha256sum {DISK} | cut -d' ' -f1)\""
        ))
        .run(cow_run(&cmdline));
    let report = boot_scenario(&scenario);
    let run = report.started_run(LABEL);
    let problems = problems(&report, run, &token);
    report.assert_no_problems(&problems);
}

#[test]
fn the_pattern_is_what_busybox_seq_prints() {
    assert_eq!(pattern(3, 12), b"3\n10\n17\n24\n3");
}
