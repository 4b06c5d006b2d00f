//! virtio-net in a real Linux guest, inside the nested lab: one L1 boot, one L2 boot with
//! `--cpus 2 --net tap,ifname=bh0`, whose worker L1 kills in the middle of a transfer.
//!
//! L1 loads `tun`; bulkhead creates TAP bh0 and hands it to the net worker. With
//! `BULKHEAD_LAB_NET_QUEUES=2` the TAP is multiqueue and the device has two queue pairs:
//! the guest's driver takes both (one per CPU, enabled through the control queue: the
//! worker logs it) and shows them in sysfs; .ci/run runs that variant too. The guest
//! brings up eth0 with 169.254.10.2/16 and says so; on that marker L1 starts two busybox
//! `nc` listeners (one receives, one serves 20 MiB L1 made before the run) and gives bh0
//! 169.254.10.1/16. The guest pings L1 until it answers, sends its own 20 MiB to L1 and
//! announces the half-way point on the console; on that marker L1 kills the worker with
//! SIGKILL. The supervisor restarts it on the same TAP, TCP retransmits what was lost,
//! and the guest then fetches L1's 20 MiB. Both sides print sha256sums, which must match;
//! the audit log must show exactly one crash and one restart.
//!
//! Run with `flock /tmp/lab.lock cargo test --release -p bulkhead-tests --test lab_net --
//! --nocapture` after `cargo build --release --workspace`.

use std::time::Duration;

use bulkhead_tests::lab::{
    boot_scenario, AuditRecords, Guest, LabReport, Run, RunReport, Scenario,
};
use bulkhead_workers::net::mac_from_name;

const IMAGE: &str = "/net.cpio";
const AUDIT_LOG: &str = "/tmp/audit.jsonl";
const AUDIT_PREFIX: &str = "LAB: audit ";
/// What L1 prints about the transfers, `LAB: net key=value`.
const L1_PREFIX: &str = "LAB: net ";
const VM_NAME: &str = "netlab";
const TAP: &str = "bh0";
const HOST_IP: &str = "169.254.10.1";
const GUEST_IP: &str = "169.254.10.2";
const TO_L1_PORT: u16 = 5001;
const FROM_L1_PORT: u16 = 5002;
const MIB: u32 = 1 << 20;
/// Bytes each way.
const TRANSFER: u32 = 20 * MIB;
/// A boot takes about a minute in the lab; the transfers' speed under two levels of
/// nesting is what this leaves room for.
const RUN_TIMEOUT: Duration = Duration::from_secs(480);

/// The L2 /init body. A busybox `nc` exits when its peer closes the connection, and
/// closes its sending half when its stdin ends, so the receiving end of each transfer
/// reads stdin from a FIFO that never ends (opened read-write): an `nc` with an empty
/// stdin would close its half at once and the peer, seeing that, would stop sending.
fn guest_init() -> String {
    let half = TRANSFER / MIB / 2;
    format!(
        r#"
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_IP}/16 dev eth0
echo "GUEST: driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)")"
echo "GUEST: mac=$(cat /sys/class/net/eth0/address)"
echo "GUEST: carrier=$(cat /sys/class/net/eth0/carrier)"
echo "GUEST: queues=$(echo $(ls /sys/class/net/eth0/queues))"
head -c {TRANSFER} /dev/urandom >/tmp/tx
echo "GUEST: tx_sha=$(sha256sum </tmp/tx | cut -d' ' -f1)"
echo "GUEST: net-ready"
reached=0
for i in $(seq 1 60); do
    if ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1; then reached=1; break; fi
done
echo "GUEST: reached=$reached"
echo "GUEST: pings=$(ping -c 5 -W 2 -q {HOST_IP} | grep -o '[0-9]* packets received' | cut -d' ' -f1)"
start=$(date +%s)
{{
    dd if=/tmp/tx bs=1M count={half} 2>/dev/null
    echo "GUEST: midway" >&2
    dd if=/tmp/tx bs=1M skip={half} 2>/dev/null
}} | nc {HOST_IP} {TO_L1_PORT} >/dev/null
echo "GUEST: sent=$? in $(($(date +%s) - start)) s"
mkfifo /tmp/hold
exec 3<>/tmp/hold
start=$(date +%s)
nc {HOST_IP} {FROM_L1_PORT} <&3 >/tmp/rx
echo "GUEST: received=$? in $(($(date +%s) - start)) s"
echo "GUEST: rx_bytes=$(wc -c </tmp/rx)"
echo "GUEST: rx_sha=$(sha256sum </tmp/rx | cut -d' ' -f1)"
echo "GUEST: irq=$(grep virtio /proc/interrupts | tr -s ' ' | tr '\n' ';')"
poweroff -f
"#
    )
}

/// L1, before the run: the 20 MiB it serves, and the FIFO its receiver reads stdin from.
fn l1_setup() -> Vec<String> {
    vec![
        format!("head -c {TRANSFER} /dev/urandom >/tmp/l1tx"),
        format!("echo \"{L1_PREFIX}tx_sha=$(sha256sum </tmp/l1tx | cut -d' ' -f1)\""),
        "mkfifo /tmp/l1hold".to_owned(),
    ]
}

/// L1, when the guest's interface is up: the listeners first (in the background, as
/// they must not hold up the console), then the address that lets the guest's ping
/// through, so that a guest that reached L1 finds them listening.
fn l1_host_end() -> String {
    let receiver = format!(
        "(exec 3<>/tmp/l1hold; nc -l -p {TO_L1_PORT} <&3 >/tmp/l1rx; \
         echo \"{L1_PREFIX}rx_status=$?\"; \
         echo \"{L1_PREFIX}rx_bytes=$(wc -c </tmp/l1rx)\"; \
         echo \"{L1_PREFIX}rx_sha=$(sha256sum </tmp/l1rx | cut -d' ' -f1)\") </dev/null &"
    );
    let sender = format!(
        "(nc -l -p {FROM_L1_PORT} </tmp/l1tx >/dev/null; \
         echo \"{L1_PREFIX}tx_status=$?\") </dev/null &"
    );
    format!(
        "{receiver} {sender} ip addr add {HOST_IP}/16 dev {TAP}; ip link set {TAP} up; \
         echo \"{L1_PREFIX}tap=$(cat /sys/class/net/{TAP}/tun_flags)\""
    )
}

/// Queue pairs: `BULKHEAD_LAB_NET_QUEUES` (1 to 16), 1 when unset; another value is a mistake to
/// say, not to run the default scenario under.
fn queue_pairs() -> u32 {
    match std::env::var("BULKHEAD_LAB_NET_QUEUES") {
        Err(_) => 1,
        Ok(v) => match v.parse() {
            Ok(pairs @ 1..=16) => pairs,
            _ => panic!("BULKHEAD_LAB_NET_QUEUES={v:?}: give a number of queue pairs, 1 to 16"),
        },
    }
}

fn net_run() -> Run {
    let net = format!("tap,ifname={TAP},queues={}", queue_pairs());
    let args = [
        "run",
        "--name",
        VM_NAME,
        "--kernel",
        "/vmlinux",
        "--initrd",
        IMAGE,
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--net",
        &net,
        "--audit-log",
        AUDIT_LOG,
        "--cmdline",
        "console=ttyS0 panic=-1",
    ];
    Run::new("net", args)
        .timeout(RUN_TIMEOUT)
        .when_output_contains("GUEST: net-ready", &l1_host_end())
        .when_output_contains("GUEST: midway", "killall -9 bulkhead-worker")
        .then_in_l1(&format!("sed 's/^/{AUDIT_PREFIX}/' {AUDIT_LOG}"))
}

/// The last `LAB: net key=value` L1 printed.
fn l1_value<'a>(report: &'a LabReport, key: &str) -> Option<&'a str> {
    let prefix = format!("{L1_PREFIX}{key}=");
    report
        .lines
        .iter()
        .rev()
        .find_map(|line| line.text.split_once(&prefix).map(|(_, value)| value.trim()))
}

fn check_guest(run: &RunReport, report: &LabReport) -> Result<(), String> {
    if run.exit != Some(0) {
        return Err(format!("bulkhead exited with {:?}", run.exit));
    }
    let expect = |key: &str, want: &str| match run.guest(key) {
        Some(value) if value == want => Ok(()),
        other => Err(format!("guest {key} is {other:?}, expected {want:?}")),
    };
    expect("driver", "virtio_net")?;
    let mac = mac_from_name(VM_NAME).map(|b| format!("{b:02x}")).join(":");
    expect("mac", &mac)?;
    expect("carrier", "1")?;
    let pairs = queue_pairs();
    let queues: Vec<String> = (0..pairs)
        .map(|q| format!("rx-{q}"))
        .chain((0..pairs).map(|q| format!("tx-{q}")))
        .collect();
    expect("queues", &queues.join(" "))?;
    // With several pairs the driver enables them through the control queue (the worker
    // logs it).
    let enabled = format!("{pairs} queue pairs enabled");
    if pairs > 1 && !report.lines.iter().any(|line| line.text.contains(&enabled)) {
        return Err(format!("the worker never saw VQ_PAIRS_SET {pairs}"));
    }
    expect("reached", "1")?;
    expect("pings", "5")?;
    let sent = run.guest("sent").unwrap_or_default();
    if !sent.starts_with("0 ") {
        return Err(format!("the guest's send ended with {sent:?}"));
    }
    let received = run.guest("received").unwrap_or_default();
    if !received.starts_with("0 ") {
        return Err(format!("the guest's receive ended with {received:?}"));
    }
    expect("rx_bytes", &TRANSFER.to_string())?;
    let l1 = |key: &str| l1_value(report, key).unwrap_or_default().to_owned();
    if l1("rx_bytes") != TRANSFER.to_string() {
        return Err(format!("L1 received {:?} bytes", l1("rx_bytes")));
    }
    let guest_tx = run.guest("tx_sha").unwrap_or_default();
    if guest_tx.len() != 64 || l1("rx_sha") != guest_tx {
        return Err(format!(
            "guest to L1: sent sha256 {guest_tx:?}, L1 received {:?}",
            l1("rx_sha")
        ));
    }
    let l1_tx = l1("tx_sha");
    if l1_tx.len() != 64 || run.guest("rx_sha") != Some(l1_tx.as_str()) {
        return Err(format!(
            "L1 to guest: sent sha256 {l1_tx:?}, the guest received {:?}",
            run.guest("rx_sha")
        ));
    }
    Ok(())
}

/// L1 must have killed the worker after the guest's send began and before it ended.
fn check_kill_during_transfer(report: &LabReport) -> Result<(), String> {
    let position = |needle: &str| report.lines.iter().position(|l| l.text.contains(needle));
    match (
        position("GUEST: reached="),
        position("LAB: run net: triggered 2"),
        position("GUEST: sent="),
    ) {
        (Some(started), Some(killed), Some(sent)) if started < killed && killed < sent => Ok(()),
        (started, killed, sent) => Err(format!(
            "the worker was not killed during the transfer (send started at line {started:?}, \
             kill at {killed:?}, send done at {sent:?})"
        )),
    }
}

fn check_audit(report: &LabReport) -> Result<(), String> {
    let audit = AuditRecords::of(report, AUDIT_PREFIX);
    audit.spawned("net0")?;
    audit.one_kill_one_restart("net0")
}

#[test]
fn net_worker_carries_tcp_both_ways_through_a_kill() {
    let mut scenario = Scenario::new("net")
        .l1_modules(&["tun"])
        .guest(Guest::new(IMAGE, &guest_init()).modules(&["virtio_mmio", "virtio_net"]))
        .run(net_run());
    for line in l1_setup() {
        scenario = scenario.l1_setup(&line);
    }
    let report = boot_scenario(&scenario);
    let run = report.started_run("net");
    check_guest(run, &report)
        .and_then(|()| check_kill_during_transfer(&report))
        .and_then(|()| check_audit(&report))
        .unwrap_or_else(|problem| panic!("{}", report.explain(&problem)));
}
