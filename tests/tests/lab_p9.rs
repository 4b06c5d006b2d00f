//! A host directory shared with a real Linux guest over virtio-9p, inside the nested lab:
//! one L1 boot, one L2 boot with two `--9p` shares, one of them read-only.
//!
//! L1 fills both directories. The guest mounts them with `-t 9p -o
//! trans=virtio,version=9p2000.L,msize=524288`, reads the host's files, runs the issue's
//! workload on the writable share (create, write, read back, rename, mkdir, readdir,
//! symlink, hardlink, chmod, truncate, fsync, unlink, rmdir, rename and link across
//! directories, chmod of a directory, a modification time, a 50 MiB file written from a
//! deterministic pattern and read back after dropping its caches) and tries to change the
//! read-only share every way it can. After the run L1 prints what the host sees - every
//! entry's type, mode, link count, owner and size, file contents, the symlink's target, the
//! big file's SHA-256 and that of the pattern generated in L1 itself - and the test
//! compares both sides exactly. The read-only share must refuse each change (EROFS or
//! EACCES) and be byte for byte what it was.
//!
//! Last, with a file held open (`exec 3<`), L1 kills the writable share's worker. The
//! supervisor's replacement, handed the same directory and the share's session journal,
//! rebuilds the guest's fids: the same mount keeps working - files written before the
//! kill read back, new ones are written and read, the open file still reads - and it
//! unmounts cleanly; a new mount of the same tag works too. The audit log must show both
//! workers with the digests of the policies they apply, and exactly that one crash and
//! restart.

use std::collections::BTreeMap;
use std::time::Duration;

use bulkhead_tests::lab::{
    boot_scenario, AuditRecords, Guest, LabReport, Run, RunReport, Scenario,
};

const IMAGE: &str = "/p9.cpio";
const AUDIT_LOG: &str = "/tmp/audit.jsonl";
const AUDIT_PREFIX: &str = "LAB: audit ";
/// L1's lines about what the host sees: `P9HOST: key=value`.
const HOST_PREFIX: &str = "P9HOST: ";

const SHARE_DIR: &str = "/srv/share";
const SHARE_TAG: &str = "share";
const RO_DIR: &str = "/srv/ro";
const RO_TAG: &str = "ro-share";

const HOST_FILE: &str = "hello from the host";
const NESTED_FILE: &str = "nested on the host";
const RO_FILE: &str = "read only";
const FIRST_LINE: &str = "first line";
const SECOND_LINE: &str = "second line";
const TRUNCATED: &str = "0123";
const TRAVELLER: &str = "traveller";
const AFTER_CRASH: &str = "written after the crash";
/// The guest prints it once the workload is done; L1 then kills the writable share's
/// worker, and the guest waits this long before it uses the share again.
const KILL_MARKER: &str = "GUEST: kill_worker=now";
const KILL_PAUSE_SECONDS: u32 = 5;
/// A modification time the guest sets, as `touch -d` reads it (both levels run in UTC).
const MTIME_TEXT: &str = "2001-02-03 04:05:06";
const MTIME: u64 = 981_173_106;

/// 50 blocks of 1 MiB: a 131072-line count (every line a distinct 8-byte number, so no
/// block has a period a misplaced page could hide in) whose first line is replaced by the
/// block's number, so that no two blocks are alike. Generated in the guest and, for the
/// expected digest, in L1. A shell function body, writing to stdout.
const BIG_BLOCKS: u32 = 50;
const BIG_SIZE: u64 = (BIG_BLOCKS as u64) << 20;
const PATTERN: &str = r#"seq -w 1000000 1131071 >/tmp/base
for i in $(seq 0 49); do printf 'blk%04d\n' "$i"; tail -c +9 /tmp/base; done"#;

/// The guest and L1 L2 boots under the lab are slow, and 50 MiB crosses the nested
/// virtio path: leave room for a busy machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(420);

fn mount_options() -> &'static str {
    "trans=virtio,version=9p2000.L,msize=524288"
}

fn guest_init() -> String {
    format!(
        r#"
report() {{ echo "GUEST: $1=$2"; }}
# Runs a command line; reports its status and the first line it printed.
attempt() {{ key=$1; shift; out=$(sh -c "$*" 2>&1); status=$?; report "$key" "$status:$(echo "$out" | head -n 1)"; }}
pattern() {{
{PATTERN}
}}
mkdir -p /mnt /ro
attempt mount_rw "mount -t 9p -o {opts} {SHARE_TAG} /mnt"
attempt mount_ro "mount -t 9p -o {opts} {RO_TAG} /ro"
report tags "$(for t in /sys/bus/virtio/devices/*/mount_tag; do tr -d '\0\n' < "$t"; echo -n ' '; done)"
report mount_opts "$(grep ' /mnt 9p ' /proc/mounts)"
report host_file "$(cat /mnt/host.txt)"
report nested "$(cat /mnt/sub/nested.txt)"
cd /mnt || poweroff -f
echo '{FIRST_LINE}' > new.txt; report create $?
report readback "$(cat new.txt)"
echo '{SECOND_LINE}' >> new.txt; report append $?
mv new.txt renamed.txt; report rename $?
report renamed "$(cat renamed.txt | tr '\n' '|')"
[ -e new.txt ] && report old_name exists || report old_name gone
mkdir dir && mkdir dir/deeper; report mkdir $?
echo deep > dir/deeper/file; report nested_create $?
ln -s renamed.txt link; report symlink $?
report readlink "$(readlink link)"
report via_link "$(head -n 1 link)"
ln renamed.txt hard; report hardlink $?
report links "$(stat -c %h renamed.txt)"
chmod 640 renamed.txt; report chmod $?
report mode "$(stat -c %a hard)"
printf 0123456789 > trunc && truncate -s 4 trunc; report truncate $?
report trunc "$(cat trunc) $(stat -c %s trunc)"
sync renamed.txt; report fsync $?
echo doomed > doomed.txt && rm doomed.txt; report unlink $?
[ -e doomed.txt ] && report doomed exists || report doomed gone
mkdir empty && rmdir empty; report rmdir $?
echo {TRAVELLER} > dir/traveller && mv dir/traveller sub/traveller; report cross_rename $?
ln sub/traveller dir/deeper/twin; report cross_link $?
chmod 700 dir/deeper; report chmod_dir $?
report mode_dir "$(stat -c %a dir/deeper)"
touch -d '{MTIME_TEXT}' trunc; report touch $?
report mtime "$(stat -c %Y trunc)"
t0=$(date +%s)
pattern | dd of=big.bin bs=1M iflag=fullblock 2>/dev/null; report big_write $?
sync big.bin; report big_fsync $?
t1=$(date +%s)
echo 3 > /proc/sys/vm/drop_caches
report big_size "$(stat -c %s big.bin)"
report big_sha "$(dd if=big.bin bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)"
t2=$(date +%s)
report big_seconds "write $((t1 - t0)) read $((t2 - t1))"
report readdir "$(ls -a /mnt | tr '\n' ' ')"
report readdir_sub "$(ls -a /mnt/dir | tr '\n' ' ')"
report statfs "$(stat -f -c '%b %a' /mnt)"
cd /
report ro_read "$(cat /ro/file.txt)"
report ro_list "$(ls -a /ro | tr '\n' ' ')"
attempt ro_create "echo new > /ro/new.txt"
attempt ro_append "echo more >> /ro/file.txt"
attempt ro_unlink "rm -f /ro/file.txt"
attempt ro_mkdir "mkdir /ro/newdir"
attempt ro_rmdir "rmdir /ro/dir/empty"
attempt ro_rename "mv /ro/file.txt /ro/moved.txt"
attempt ro_chmod "chmod 600 /ro/file.txt"
attempt ro_symlink "ln -s file.txt /ro/link"
attempt ro_hardlink "ln /ro/file.txt /ro/hard"
attempt ro_truncate "truncate -s 0 /ro/file.txt"
attempt umount_ro "umount /ro"
exec 3< /mnt/renamed.txt
echo "{KILL_MARKER}"
sleep {KILL_PAUSE_SECONDS}
attempt after_crash "cat /mnt/host.txt"
report open_after "$(cat <&3 | tr '\n' '|')"
exec 3<&-
report before_after "$(cat /mnt/trunc) $(cat /mnt/sub/traveller) $(stat -c %s /mnt/big.bin)"
echo '{AFTER_CRASH}' > /mnt/after.txt; report write_after $?
report read_after "$(cat /mnt/after.txt)"
report readdir_after "$(ls /mnt/dir/deeper | tr '\n' ' ')"
attempt umount_rw "umount /mnt"
attempt remount "mount -t 9p -o {opts} {SHARE_TAG} /mnt"
report remount_read "$(cat /mnt/host.txt)"
echo '{AFTER_CRASH}' > /mnt/after.txt; report remount_write $?
attempt umount_remount "umount /mnt"
report done yes
"#,
        opts = mount_options()
    )
}

/// What L1 prepares before the run: both shares' files, and a record of the read-only one.
fn l1_setup() -> Vec<String> {
    vec![
        format!("mkdir -p {SHARE_DIR}/sub {RO_DIR}/dir/empty"),
        format!("echo '{HOST_FILE}' > {SHARE_DIR}/host.txt"),
        format!("echo '{NESTED_FILE}' > {SHARE_DIR}/sub/nested.txt"),
        format!("echo '{RO_FILE}' > {RO_DIR}/file.txt"),
        format!("echo inner > {RO_DIR}/dir/inner.txt"),
        // Every entry's type, mode, links, owner and size (directories' sizes depend on
        // the file system, not on the server), in a stable order.
        r#"p9_tree() { find . | sort | while read -r f; do
    if [ -d "$f" ] && [ ! -L "$f" ]; then stat -c '%n|%F|%a|%h|%u|%g' "$f";
    else stat -c '%n|%F|%a|%h|%u|%g|%s' "$f"; fi; done; }"#
            .to_owned(),
        format!("p9_ro_state() {{ cd {RO_DIR} && p9_tree && find . -type f | sort | xargs sha256sum; cd /; }}"),
        "p9_ro_state > /tmp/ro.before".to_owned(),
        format!("p9_pattern() {{\n{PATTERN}\n}}"),
    ]
}

/// What L1 prints after the run: the host's view of both shares, and the audit log.
fn l1_report() -> String {
    let contents = [
        "host.txt",
        "renamed.txt",
        "hard",
        "trunc",
        "dir/deeper/file",
        "sub/nested.txt",
        "sub/traveller",
        "after.txt",
    ]
    .iter()
    .map(|f| format!("echo \"{HOST_PREFIX}content {f}=$(tr '\\n' '|' < {f})\""))
    .collect::<Vec<_>>()
    .join("\n");
    format!(
        r#"cd {SHARE_DIR}
p9_tree | sed 's/^/{HOST_PREFIX}tree /'
{contents}
echo "{HOST_PREFIX}readlink=$(readlink link)"
echo "{HOST_PREFIX}same_inode=$(stat -c %i renamed.txt) $(stat -c %i hard)"
echo "{HOST_PREFIX}same_inode_across=$(stat -c %i sub/traveller) $(stat -c %i dir/deeper/twin)"
echo "{HOST_PREFIX}mtime=$(stat -c %Y trunc)"
echo "{HOST_PREFIX}big_sha=$(sha256sum big.bin | cut -d' ' -f1)"
echo "{HOST_PREFIX}pattern_sha=$(p9_pattern | sha256sum | cut -d' ' -f1)"
cd /
p9_ro_state > /tmp/ro.after
cmp -s /tmp/ro.before /tmp/ro.after && echo "{HOST_PREFIX}ro_unchanged=yes" || echo "{HOST_PREFIX}ro_unchanged=no"
sed 's/^/{HOST_PREFIX}ro_after /' /tmp/ro.after
ls -lnR /srv
sed 's/^/{AUDIT_PREFIX}/' {AUDIT_LOG}"#
    )
}

fn p9_run() -> Run {
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
        "--9p",
        SHARE_DIR,
        "--9p",
        &format!("{RO_DIR},tag={RO_TAG},ro"),
        "--audit-log",
        AUDIT_LOG,
        "--cmdline",
        "console=ttyS0 panic=-1",
    ];
    // The worker's pid from its spawn record: only 9p0's worker dies, 9p1's must not.
    let kill = format!(
        r#"kill -9 $(sed -n 's/.*"event":"spawn","device":"9p0","kind":"p9","pid":\([0-9]*\).*/\1/p' {AUDIT_LOG})"#
    );
    Run::new("p9", args)
        .timeout(RUN_TIMEOUT)
        .when_output_contains(KILL_MARKER, &kill)
        .then_in_l1(&l1_report())
}

/// L1's `P9HOST: ` lines: `key=value` ones as a map, `tree ...` ones as a list.
struct HostView {
    values: BTreeMap<String, String>,
    tree: Vec<String>,
}

impl HostView {
    fn parse(report: &LabReport) -> Self {
        let mut values = BTreeMap::new();
        let mut tree = Vec::new();
        for line in &report.lines {
            let Some((_, rest)) = line.text.split_once(HOST_PREFIX) else {
                continue;
            };
            if let Some(entry) = rest.strip_prefix("tree ") {
                tree.push(entry.to_owned());
            } else if let Some((key, value)) = rest.split_once('=') {
                values.insert(key.to_owned(), value.to_owned());
            }
        }
        tree.sort();
        Self { values, tree }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }
}

fn expect(what: &str, got: Option<&str>, want: &str) -> Result<(), String> {
    match got {
        Some(value) if value == want => Ok(()),
        other => Err(format!("{what} is {other:?}, expected {want:?}")),
    }
}

/// What the guest itself saw of its workload.
fn check_guest(run: &RunReport) -> Result<(), String> {
    if run.exit != Some(0) {
        return Err(format!("bulkhead exited with {:?}", run.exit));
    }
    let g = |key: &str| run.guest(key);
    expect("the guest's end marker", g("done"), "yes")?;
    for key in ["mount_rw", "mount_ro", "umount_ro"] {
        expect(key, g(key), "0:")?;
    }
    let mut tags: Vec<&str> = g("tags").unwrap_or_default().split_whitespace().collect();
    tags.sort_unstable();
    if tags != [RO_TAG, SHARE_TAG] {
        return Err(format!("the guest's 9p devices have the tags {tags:?}"));
    }
    let options = g("mount_opts").unwrap_or_default();
    let msize: u64 = options
        .split(',')
        .find_map(|option| option.strip_prefix("msize="))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    // Linux caps what it asks for at what its virtio buffers hold (500 KiB for 4 KiB pages).
    if msize < 256 << 10 {
        return Err(format!("the mount negotiated msize {msize}: {options:?}"));
    }
    expect("the host's file", g("host_file"), HOST_FILE)?;
    expect("the host's nested file", g("nested"), NESTED_FILE)?;
    for key in [
        "create",
        "append",
        "rename",
        "mkdir",
        "nested_create",
        "symlink",
        "hardlink",
        "chmod",
        "truncate",
        "fsync",
        "unlink",
        "rmdir",
        "big_write",
        "big_fsync",
        "cross_rename",
        "cross_link",
        "chmod_dir",
        "touch",
    ] {
        expect(key, g(key), "0")?;
    }
    expect("the read-back", g("readback"), FIRST_LINE)?;
    expect(
        "the renamed file",
        g("renamed"),
        &format!("{FIRST_LINE}|{SECOND_LINE}|"),
    )?;
    expect("the old name", g("old_name"), "gone")?;
    expect("the symlink", g("readlink"), "renamed.txt")?;
    expect("the file through the symlink", g("via_link"), FIRST_LINE)?;
    expect("the link count", g("links"), "2")?;
    expect("the mode through the hard link", g("mode"), "640")?;
    expect("the truncated file", g("trunc"), &format!("{TRUNCATED} 4"))?;
    expect("the unlinked file", g("doomed"), "gone")?;
    expect("the directory's mode", g("mode_dir"), "700")?;
    expect("the modification time", g("mtime"), &MTIME.to_string())?;
    expect("the big file's size", g("big_size"), &BIG_SIZE.to_string())?;
    expect(
        "the listing",
        g("readdir"),
        ". .. big.bin dir hard host.txt link renamed.txt sub trunc",
    )?;
    expect(
        "the subdirectory's listing",
        g("readdir_sub"),
        ". .. deeper",
    )?;
    let blocks = g("statfs")
        .and_then(|s| s.split(' ').next())
        .and_then(|b| b.parse::<u64>().ok());
    if blocks.is_none_or(|b| b == 0) {
        return Err(format!("statfs gave {:?}", g("statfs")));
    }
    Ok(())
}

/// After L1 killed 9p0's worker, the guest's mount carries on (the replacement rebuilt
/// its fids from the share's journal): reads of files written before, a file held open
/// across the kill, writes after; it unmounts, and a new mount of the same share works
/// too (Linux allows one mount per virtio-9p device at a time).
fn check_after_crash(run: &RunReport) -> Result<(), String> {
    expect(
        "a read through the mount after the kill",
        run.guest("after_crash"),
        &format!("0:{HOST_FILE}"),
    )?;
    expect(
        "the file held open across the kill",
        run.guest("open_after"),
        &format!("{FIRST_LINE}|{SECOND_LINE}|"),
    )?;
    expect(
        "files written before the kill",
        run.guest("before_after"),
        &format!("{TRUNCATED} {TRAVELLER} {BIG_SIZE}"),
    )?;
    expect("a write after the kill", run.guest("write_after"), "0")?;
    expect(
        "reading back a write after the kill",
        run.guest("read_after"),
        AFTER_CRASH,
    )?;
    expect(
        "a listing after the kill",
        run.guest("readdir_after").map(str::trim_end),
        "file twin",
    )?;
    expect(
        "unmounting the mount that survived",
        run.guest("umount_rw"),
        "0:",
    )?;
    expect("the new mount", run.guest("remount"), "0:")?;
    expect(
        "a read through the new mount",
        run.guest("remount_read"),
        HOST_FILE,
    )?;
    expect(
        "a write through the new mount",
        run.guest("remount_write"),
        "0",
    )?;
    expect(
        "unmounting the new mount",
        run.guest("umount_remount"),
        "0:",
    )
}

/// Every change to the read-only share fails with EROFS or EACCES; reading works.
fn check_read_only(run: &RunReport) -> Result<(), String> {
    expect("the read-only share's file", run.guest("ro_read"), RO_FILE)?;
    expect(
        "the read-only share's listing",
        run.guest("ro_list"),
        ". .. dir file.txt",
    )?;
    for op in [
        "create", "append", "unlink", "mkdir", "rmdir", "rename", "chmod", "symlink", "hardlink",
        "truncate",
    ] {
        let key = format!("ro_{op}");
        let value = run.guest(&key).unwrap_or_default();
        let refused = !value.starts_with("0:")
            && (value.contains("Read-only file system") || value.contains("Permission denied"));
        if !refused {
            return Err(format!(
                "{key}: the read-only share allowed it or failed oddly: {value:?}"
            ));
        }
    }
    Ok(())
}

/// What the host sees is exactly what the guest did.
fn check_host(run: &RunReport, host: &HostView) -> Result<(), String> {
    let file = |name: &str, mode: &str, links: u32, size: usize| {
        format!("./{name}|regular file|{mode}|{links}|0|0|{size}")
    };
    let dir = |name: &str, links: u32| format!("{name}|directory|755|{links}|0|0");
    let traveller = |name: &str| file(name, "644", 2, TRAVELLER.len() + 1);
    let renamed_size = FIRST_LINE.len() + SECOND_LINE.len() + 2;
    let mut want = vec![
        dir(".", 4),
        file("after.txt", "644", 1, AFTER_CRASH.len() + 1),
        file("big.bin", "644", 1, BIG_SIZE as usize),
        dir("./dir", 3),
        "./dir/deeper|directory|700|2|0|0".to_owned(),
        file("dir/deeper/file", "644", 1, "deep\n".len()),
        traveller("dir/deeper/twin"),
        file("hard", "640", 2, renamed_size),
        file("host.txt", "644", 1, HOST_FILE.len() + 1),
        format!("./link|symbolic link|777|1|0|0|{}", "renamed.txt".len()),
        file("renamed.txt", "640", 2, renamed_size),
        dir("./sub", 2),
        file("sub/nested.txt", "644", 1, NESTED_FILE.len() + 1),
        traveller("sub/traveller"),
        file("trunc", "644", 1, TRUNCATED.len()),
    ];
    want.sort();
    if host.tree != want {
        return Err(format!(
            "the host's tree differs from the guest's workload:\n host: {:#?}\n want: {want:#?}",
            host.tree
        ));
    }
    let content = |name: &str| host.get(&format!("content {name}"));
    expect(
        "host.txt on the host",
        content("host.txt"),
        &format!("{HOST_FILE}|"),
    )?;
    let renamed = format!("{FIRST_LINE}|{SECOND_LINE}|");
    expect("renamed.txt on the host", content("renamed.txt"), &renamed)?;
    expect("the hard link on the host", content("hard"), &renamed)?;
    expect("trunc on the host", content("trunc"), TRUNCATED)?;
    expect(
        "dir/deeper/file on the host",
        content("dir/deeper/file"),
        "deep|",
    )?;
    expect(
        "sub/traveller on the host",
        content("sub/traveller"),
        &format!("{TRAVELLER}|"),
    )?;
    expect(
        "after.txt on the host",
        content("after.txt"),
        &format!("{AFTER_CRASH}|"),
    )?;
    expect("readlink on the host", host.get("readlink"), "renamed.txt")?;
    for key in ["same_inode", "same_inode_across"] {
        match host.get(key).and_then(|s| s.split_once(' ')) {
            Some((a, b)) if a == b => {}
            other => {
                return Err(format!(
                    "{key}: the hard links are not one inode: {other:?}"
                ))
            }
        }
    }
    expect(
        "the modification time on the host",
        host.get("mtime"),
        &MTIME.to_string(),
    )?;
    let pattern = host.get("pattern_sha").unwrap_or_default();
    if pattern.len() != 64 {
        return Err(format!("L1 could not digest the pattern: {pattern:?}"));
    }
    expect(
        "the big file's digest on the host",
        host.get("big_sha"),
        pattern,
    )?;
    expect(
        "the big file's digest read back in the guest",
        run.guest("big_sha"),
        pattern,
    )?;
    expect(
        "the read-only share after the run",
        host.get("ro_unchanged"),
        "yes",
    )
}

fn check_audit(report: &LabReport) -> Result<(), String> {
    let audit = AuditRecords::of(report, AUDIT_PREFIX);
    for (device, read_only) in [("9p0", false), ("9p1", true)] {
        audit.spawned(device)?;
        let digest = bulkhead_seccomp::p9_policy(5, read_only).digest();
        let policy = format!(r#""device":"{device}","kind":"p9","digest":"{digest}""#);
        if !audit.has("policy", &policy) {
            return Err(format!("the audit log lacks {policy}: {audit:?}"));
        }
    }
    audit.one_kill_one_restart("9p0")
}

#[test]
fn a_linux_guest_works_in_a_shared_directory() {
    let mut scenario = Scenario::new("p9")
        .guest(Guest::new(IMAGE, &guest_init()).modules(&["virtio_mmio", "9pnet_virtio", "9p"]))
        .run(p9_run());
    for command in l1_setup() {
        scenario = scenario.l1_setup(&command);
    }
    let report = boot_scenario(&scenario);
    let run = report.started_run("p9");
    if let Some(seconds) = run.guest("big_seconds") {
        eprintln!("lab p9: 50 MiB through 9p: {seconds} (seconds)");
    }
    let host = HostView::parse(&report);
    check_guest(run)
        .and_then(|()| check_read_only(run))
        .and_then(|()| check_after_crash(run))
        .and_then(|()| check_host(run, &host))
        .and_then(|()| check_audit(&report))
        .unwrap_or_else(|problem| panic!("{}", report.explain(&problem)));
}
