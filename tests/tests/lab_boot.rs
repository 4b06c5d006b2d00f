//! Boots a real Debian Linux guest with bulkhead, inside the nested lab (see
//! `bulkhead_tests::lab`): one L1 boot, two L2 boots of the same guest, one ending in
//! `poweroff -f` and one in `reboot -f`.
//!
//! Needs QEMU and the lab assets (`.ci/run` installs both); fails, naming the fix, without
//! them. Watch a run with `tail -f target/lab/logs/boot.log`.

use bulkhead_tests::lab::{
    boot_scenario, random_token, Guest, Lab, LabReport, Run, RunReport, Scenario,
};

/// The guest reports what it sees, then halts the way its command line asks.
const PROBE_INIT: &str = r#"
echo "GUEST: cpus=$(grep -c '^processor' /proc/cpuinfo)"
echo "GUEST: memtotal_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
for word in $(cat /proc/cmdline); do
    case "$word" in
        bulkhead.token=*) echo "GUEST: token=${word#bulkhead.token=}" ;;
    esac
done
case " $(cat /proc/cmdline) " in
    *" lab.halt=reboot "*) echo "GUEST: halting=reboot"; reboot -f ;;
    *) echo "GUEST: halting=poweroff"; poweroff -f ;;
esac
"#;

/// Where bulkhead finds the guest's initramfs inside L1.
const PROBE_IMAGE: &str = "/l2.cpio";

/// `panic=-1`: a guest kernel panic reboots at once, ending the run instead of hanging it.
fn probe_cmdline(token: &str) -> String {
    format!("console=ttyS0 panic=-1 bulkhead.token={token}")
}

fn bulkhead_run(label: &str, cmdline: &str) -> Run {
    let args = [
        "run",
        "--kernel",
        "/vmlinux",
        "--initrd",
        PROBE_IMAGE,
        "--cpus",
        "2",
    ];
    Run::new(
        label,
        args.into_iter()
            .chain(["--memory", "512M", "--cmdline", cmdline]),
    )
}

#[test]
fn bulkhead_boots_linux_and_stops_on_poweroff_and_reboot() {
    let token = random_token().unwrap_or_else(|e| panic!("{e}"));
    let cmdline = probe_cmdline(&token);
    let scenario = Scenario::new("boot")
        .guest(Guest::new(PROBE_IMAGE, PROBE_INIT))
        .run(bulkhead_run("poweroff", &cmdline))
        .run(bulkhead_run(
            "reboot",
            &format!("{cmdline} lab.halt=reboot"),
        ));

    let report = boot_scenario(&scenario);

    if report.marker_at("kvm ready").is_none() {
        let errors = report.errors();
        panic!(
            "{}",
            report.explain(&format!("L1 never got a /dev/kvm (L1 errors: {errors:?})"))
        );
    }
    let poweroff = expect_run(&report, "poweroff");
    if let Some(problem) = probe_problem(|key| poweroff.guest(key), &token, "poweroff") {
        panic!(
            "{}",
            report.explain(&format!("run \"poweroff\": {problem}"))
        );
    }
    let reboot = expect_run(&report, "reboot");
    if let Some(problem) = probe_problem(|key| reboot.guest(key), &token, "reboot") {
        panic!("{}", report.explain(&format!("run \"reboot\": {problem}")));
    }
    if report.marker_at("done").is_none() {
        panic!(
            "{}",
            report.explain("L1's init never finished its scenario")
        );
    }
}

/// The modules that later lab scenarios will give L2 guests (see fetch-assets.sh).
const L2_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "tun",
    "virtio_gpu",
];

/// The probe guest booted by QEMU instead of bulkhead: checks the harness (initramfs, init
/// script, kernel, modules, parsing) on its own, so that when the test above fails and this
/// one passes, the fault is bulkhead's. It also loads every L2 module the assets provide.
#[test]
fn the_probe_guest_boots_under_plain_qemu() {
    let token = random_token().unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::new().unwrap_or_else(|e| panic!("cannot start the nested lab: {e}"));
    let list_modules =
        "echo \"GUEST: modules=$(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ')\"\n";
    let guest = Guest::new(PROBE_IMAGE, &format!("{list_modules}{PROBE_INIT}")).modules(L2_MODULES);
    let cmdline = format!("{} lab.halt=reboot", probe_cmdline(&token));
    let report = lab
        .boot_guest_in_qemu("probe-in-qemu", &guest, &cmdline)
        .unwrap_or_else(|e| panic!("booting the probe guest under QEMU failed: {e}"));
    eprintln!("{}", report.timings());

    if let Some(error) = report.guest("error") {
        panic!(
            "{}",
            report.explain(&format!("the guest's /init failed: {error}"))
        );
    }
    let loaded: Vec<&str> = report
        .guest("modules")
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let missing: Vec<&&str> = L2_MODULES.iter().filter(|m| !loaded.contains(*m)).collect();
    if !missing.is_empty() {
        panic!(
            "{}",
            report.explain(&format!(
                "modules {missing:?} not loaded (loaded: {loaded:?})"
            ))
        );
    }
    if let Some(problem) = probe_problem(|key| report.guest(key), &token, "reboot") {
        panic!("{}", report.explain(&problem));
    }
}

/// The run `label`, which must have exited 0.
fn expect_run<'r>(report: &'r LabReport, label: &str) -> &'r RunReport {
    let run = report.started_run(label);
    if run.exit != Some(0) {
        let why = match run.exit {
            Some(137) => "was killed at its timeout (exit 137)".to_owned(),
            Some(status) => format!("exited with status {status}"),
            None => "never finished".to_owned(),
        };
        panic!(
            "{}",
            report.explain(&format!("bulkhead run {label:?} {why}, expected status 0"))
        );
    }
    run
}

/// What is wrong with the probe guest's report (given as a lookup of its `GUEST:` values),
/// if anything: it was started with `--cpus 2 --memory 512M` and a token on its command line.
fn probe_problem<'a>(
    guest: impl Fn(&str) -> Option<&'a str>,
    token: &str,
    halt: &str,
) -> Option<String> {
    match guest("cpus") {
        Some("2") => {}
        None => return Some("the guest never reported its CPU count: did it reach /init?".into()),
        Some(cpus) => return Some(format!("guest saw {cpus} CPUs, expected 2")),
    }
    // MemTotal is RAM minus what the kernel keeps for itself (its image, memmap, ...).
    let memtotal_mib = guest("memtotal_kib")
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib / 1024);
    if !memtotal_mib.is_some_and(|mib| (400..=512).contains(&mib)) {
        return Some(format!(
            "guest MemTotal {memtotal_mib:?} MiB is not plausible for 512M"
        ));
    }
    if guest("token") != Some(token) {
        return Some(format!(
            "guest read token {:?} from /proc/cmdline, expected {token:?}",
            guest("token")
        ));
    }
    if guest("halting") != Some(halt) {
        return Some(format!(
            "guest did not get to `{halt} -f` (halting={:?})",
            guest("halting")
        ));
    }
    None
}
