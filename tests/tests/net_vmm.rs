//! `bulkhead run --net tap,...`: the VMM creates or attaches to the TAP before the guest
//! starts and hands it to a net worker; every way that can fail is a clear error first.
//!
//! Each run happens in a network namespace made for the test (`ip netns exec`), so TAPs
//! come and go there and never on the host. Needs root (namespaces, /dev/net/tun) and
//! the release binaries: `cargo build --release --workspace` first.

use std::path::Path;

use anyhow::Result;
use bulkhead_tests::micro::{BulkheadCommand, MicroGuest, RunOutcome, ScratchDir};
use bulkhead_tests::net::{Netns, TAP_NAME};
use bulkhead_workers::net::mac_from_name;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A kernel that powers off at once: whatever goes wrong comes from the --net options.
fn power_off_kernel(dir: &ScratchDir) -> Result<std::path::PathBuf> {
    let mut guest = MicroGuest::new()?;
    guest.power_off()?;
    Ok(dir.write("kernel", &guest.build()?)?)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// `[wrapper...] bulkhead run --kernel <power-off kernel> <args>` inside `netns`.
fn run_in(netns: &Netns, wrapper: &[&str], args: &[&str]) -> Result<RunOutcome> {
    let dir = ScratchDir::new("net-vmm")?;
    let kernel = power_off_kernel(&dir)?;
    let mut wrapped = vec!["ip", "netns", "exec", netns.name()];
    wrapped.extend_from_slice(wrapper);
    Ok(BulkheadCommand::new()
        .wrapped_in(wrapped)
        .env("BULKHEAD_LOG", "info")
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(args)
        .run()?)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[test]
fn taps_are_created_and_their_workers_audited() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace and /dev/net/tun");
        return Ok(());
    }
    let netns = Netns::new()?;
    let dir = ScratchDir::new("net-vmm")?;
    let log = dir.path().join("audit.jsonl");
    let outcome = run_in(
        &netns,
        &[],
        &[
            "--name",
            "netcli",
            "--net",
            "tap,ifname=bhvm0",
            "--net",
            "tap,mac=52:54:00:aa:bb:cc",
            "--audit-log",
            path_str(&log),
        ],
    )?;
    outcome.assert_clean_exit();
    // The first gets the MAC derived from the VM's name; the second, no name given, a
    // TAP the kernel names.
    let first = format!("net0: TAP bhvm0, MAC {}", mac_text(mac_from_name("netcli")));
    assert!(outcome.stderr.contains(&first), "{outcome}");
    assert!(
        outcome
            .stderr
            .contains("net1: TAP tap0, MAC 52:54:00:aa:bb:cc"),
        "{outcome}"
    );
    let audit = std::fs::read_to_string(&log)?;
    for device in ["net0", "net1"] {
        let spawn = format!(r#""event":"spawn","device":"{device}","kind":"net""#);
        assert!(audit.contains(&spawn), "{audit}");
    }
    assert!(!audit.contains(r#""event":"crash""#), "{audit}");
    Ok(())
}

#[test]
fn an_existing_persistent_tap_is_attached() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace and /dev/net/tun");
        return Ok(());
    }
    let netns = Netns::new()?;
    netns.ip(&["tuntap", "add", "dev", "bhpersist", "mode", "tap"])?;
    let outcome = run_in(&netns, &[], &["--net", "tap,ifname=bhpersist"])?;
    outcome.assert_clean_exit();
    assert!(outcome.stderr.contains("net0: TAP bhpersist"), "{outcome}");
    Ok(())
}

/// `queues=N` opens N queues of one multiqueue TAP and hands them all to the worker; a
/// persistent TAP made without multi_queue cannot give more than one, and says so.
#[test]
fn queues_open_a_multiqueue_tap() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace and /dev/net/tun");
        return Ok(());
    }
    let netns = Netns::new()?;
    let outcome = run_in(&netns, &[], &["--net", "tap,ifname=bhmq0,queues=3"])?;
    outcome.assert_clean_exit();
    assert!(
        outcome.stderr.contains("TAP bhmq0, 3 queue pair(s)"),
        "the worker did not get 3 queues:\n{outcome}"
    );

    netns.ip(&[
        "tuntap",
        "add",
        "dev",
        "bhpmq",
        "mode",
        "tap",
        "multi_queue",
    ])?;
    let outcome = run_in(&netns, &[], &["--net", "tap,ifname=bhpmq,queues=2"])?;
    outcome.assert_clean_exit();
    assert!(
        outcome.stderr.contains("TAP bhpmq, 2 queue pair(s)"),
        "{outcome}"
    );

    netns.ip(&["tuntap", "add", "dev", "bhsingle", "mode", "tap"])?;
    let outcome = run_in(&netns, &[], &["--net", "tap,ifname=bhsingle,queues=2"])?;
    outcome.assert_error_mentioning(&["bhsingle"]);
    outcome.assert_error_mentioning(&["multi_queue"]);
    assert!(outcome.stdout.is_empty(), "the guest ran:\n{outcome}");
    Ok(())
}

#[test]
fn a_busy_tap_is_a_clear_error() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace and /dev/net/tun");
        return Ok(());
    }
    let netns = Netns::new()?;
    // This process holds the TAP, as another VMM would.
    let _held = netns.host_tap()?;
    let net = format!("tap,ifname={TAP_NAME}");
    let outcome = run_in(&netns, &[], &["--net", &net])?;
    outcome.assert_error_mentioning(&["busy"]);
    outcome.assert_error_mentioning(&[TAP_NAME]);
    assert!(outcome.stdout.is_empty(), "the guest ran:\n{outcome}");
    Ok(())
}

#[test]
fn a_device_that_is_not_a_tap_is_refused() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace and /dev/net/tun");
        return Ok(());
    }
    let netns = Netns::new()?;
    let outcome = run_in(&netns, &[], &["--net", "tap,ifname=lo"])?;
    outcome.assert_error_mentioning(&["is not a TAP"]);
    Ok(())
}

#[test]
fn without_cap_net_admin_a_tap_cannot_be_created() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root to drop a capability");
        return Ok(());
    }
    let netns = Netns::new()?;
    // Still root, so /dev/kvm and /dev/net/tun open; only creating the TAP is refused.
    let drop_net_admin = [
        "setpriv",
        "--inh-caps=-net_admin",
        "--bounding-set=-net_admin",
    ];
    let outcome = run_in(&netns, &drop_net_admin, &["--net", "tap,ifname=bhnoperm"])?;
    outcome.assert_error_mentioning(&["no permission"]);
    outcome.assert_error_mentioning(&["CAP_NET_ADMIN"]);
    Ok(())
}

#[test]
fn bad_net_options_are_usage_errors() -> Result<()> {
    let dir = ScratchDir::new("net-vmm")?;
    let kernel = power_off_kernel(&dir)?;
    let cases = [
        ("user", "only tap"),
        ("tap,bogus", "bogus"),
        ("tap,ifname=", "invalid TAP name"),
        ("tap,ifname=much-too-long-name", "invalid TAP name"),
        ("tap,mac=01:00:5e:00:00:01", "multicast"),
        ("tap,mac=52:54:00", "not a MAC address"),
        ("tap,queues=0", "queues"),
        ("tap,queues=17", "at most 16 queue pairs"),
    ];
    for (bad, mention) in cases {
        let outcome = BulkheadCommand::new()
            .args(["run", "--kernel"])
            .arg(&kernel)
            .args(["--net", bad])
            .run()?;
        outcome.assert_error_mentioning(&["invalid --net"]);
        outcome.assert_error_mentioning(&[mention]);
    }
    Ok(())
}
