//! The display in a real Linux guest, inside the nested lab: one L1 boot, one L2 boot with
//! `bulkhead run --display vnc=127.0.0.1:5900`.
//!
//! The guest loads virtio_gpu (its framebuffer console shows the kernel's messages and
//! what the guest writes to tty1) and virtio_input, starts a shell on tty1 and says it is
//! ready. L1 then runs `vnc-probe` (tests/src/bin), a small RFB client: it grabs the
//! screen, prints it as a base64 PNG, and types a shell command. The test checks that the
//! screen has lines of text, keeps it as `target/lab/display.png` for a person to look
//! at, and sees the typed command's output on the serial console: a value the command
//! computes, so that only running it can print it.
//!
//! Then L1 kills the display worker (`kill -9`, the input worker left alone). The
//! supervisor starts a replacement, which rebuilds the guest's framebuffer from the state
//! store and guest memory: a second `vnc-probe`, on the same address, must see the
//! console's text again before the guest writes anything more to it, and the command it
//! types must reach the guest's shell through the same input worker. The audit log shows
//! one kill and one restart of display0.
//!
//! Before powering off, the guest detaches fbcon from its virtual terminals. This 6.1
//! kernel breaks and resets virtio devices in its shutdown path, yet fbcon keeps drawing
//! the shutdown messages and the DRM damage worker keeps queueing virtio-gpu commands on the
//! broken queue: a `WARNING` at virtgpu_vq.c:354 in most boots, and once in six boots a
//! triple fault before the power-off (`-EIO` from the guest's own broken queue, nothing the
//! device sent). That race is the guest's, not what this test is about.
//!
//! The kernel command line puts `console=tty0` first and `console=ttyS0` last: the kernel
//! writes to both, and the last one is /dev/console, where the guest's init (and the
//! `GUEST:` lines this test reads) must go.

use std::time::Duration;

use bulkhead_tests::built_binary;
use bulkhead_tests::lab::{
    boot_scenario, lab_dir, random_token, AuditRecords, Guest, LabReport, Run, Scenario,
};
use bulkhead_tests::screenshot::{base64_decode, Screen};

const IMAGE: &str = "/display.cpio";
const VNC: &str = "127.0.0.1:5900";
const PNG_PREFIX: &str = "VNC-PNG: ";
/// What vnc-probe prints after each screenshot.
const PNG_DONE: &str = "VNC-PROBE: png done";
const AUDIT_LOG: &str = "/tmp/audit.jsonl";
const AUDIT_PREFIX: &str = "LAB: audit ";
/// Only the display worker (not the input worker beside it): the pid its spawn event in
/// the audit log gives.
const KILL_DISPLAY: &str = r#"pid=$(sed -n 's/.*"event":"spawn","device":"display0".*"pid":\([0-9]*\).*/\1/p' /tmp/audit.jsonl | tail -n 1); kill -9 "$pid"; echo "LAB: kill -9 display0 worker $pid: $?""#;
/// The L2 boot plus the DRM driver's start and the probe's screenshot, under nesting.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

const GUEST_INIT: &str = r#"
i=0
while [ ! -e /dev/fb0 ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
echo "GUEST: fb=$(cat /sys/class/graphics/fb0/name 2>/dev/null)"
echo "GUEST: inputs=$(cat /sys/class/input/input*/name 2>/dev/null | tr '\n' ',')"
setsid sh -c 'exec sh </dev/tty1 >/dev/tty1 2>&1' &
echo "bulkhead lab: this line was written to tty1 by the guest" >/dev/tty1
sleep 2
echo "GUEST: ready"
i=0
while [ ! -e /tmp/typed ] && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
echo "GUEST: typed_file=$([ -e /tmp/typed ] && echo yes || echo no)"
echo "GUEST: kill-display"
# The replacement starts after the supervisor's backoff; nothing is written to tty1 until
# the second probe has its screenshot and types.
sleep 5
echo "GUEST: after-kill"
i=0
while [ ! -e /tmp/typed2 ] && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
echo "GUEST: typed2_file=$([ -e /tmp/typed2 ] && echo yes || echo no)"
for vtcon in /sys/class/vtconsole/vtcon*; do
    grep -q "frame buffer" "$vtcon/name" && echo 0 >"$vtcon/bind"
done
echo "GUEST: fbcon_unbound"
"#;

fn typed_command(token: &str, n: u32, file: &str) -> String {
    format!("echo typed{n}-$((6*7))-{token} >/dev/ttyS0; touch {file}")
}

fn probe_command(token: &str, n: u32, file: &str) -> String {
    format!(
        "vnc-probe {VNC} --type '{}'",
        typed_command(token, n, file).replace('\'', r"'\''")
    )
}

/// The `index`th screenshot the probes printed (0: before the kill), kept as `name`.
fn screenshot(report: &LabReport, index: usize, name: &str) -> Result<Screen, String> {
    let mut shots = vec![String::new()];
    for line in &report.lines {
        if let Some((_, data)) = line.text.split_once(PNG_PREFIX) {
            if let Some(shot) = shots.last_mut() {
                shot.push_str(data.trim());
            }
        } else if line.text.contains(PNG_DONE) {
            shots.push(String::new());
        }
    }
    let base64 = shots.get(index).map(String::as_str).unwrap_or_default();
    if base64.is_empty() {
        return Err(format!(
            "the probe printed no screenshot number {}",
            index + 1
        ));
    }
    let png = base64_decode(base64)?;
    let path = lab_dir().join(name);
    std::fs::write(&path, &png).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("screenshot kept in {}", path.display());
    Screen::from_png(&png)
}

/// Text on a console: several bands of rows with ink, each as tall as a line of a
/// console font (8 to 32 pixels), and ink on well under half the screen.
fn check_text(screen: &Screen) -> Result<(), String> {
    if (screen.width, screen.height) != (1024, 768) {
        return Err(format!("screen {}x{}", screen.width, screen.height));
    }
    let ink = screen.foreground_pixels();
    let total = screen.pixels.len();
    let lines: Vec<_> = screen
        .text_rows()
        .into_iter()
        .filter(|&(_, height)| (6..=32).contains(&height))
        .collect();
    if lines.len() < 3 || ink < 1000 || ink > total / 2 {
        return Err(format!(
            "the screen does not look like text: {} text-high bands of ink {:?}, {ink} of {total} pixels inked",
            lines.len(),
            screen.text_rows()
        ));
    }
    Ok(())
}

#[test]
fn a_vnc_viewer_sees_the_console_and_types_into_it() {
    let token = random_token().unwrap_or_else(|e| panic!("{e}"));
    let cmdline = format!("console=tty0 console=ttyS0 panic=-1 bulkhead.token={token}");
    let display = format!("vnc={VNC}");
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
        "--display",
        &display,
        "--audit-log",
        AUDIT_LOG,
        "--cmdline",
        &cmdline,
    ];
    let run = Run::new("display", args)
        .timeout(RUN_TIMEOUT)
        .when_output_contains("GUEST: ready", &probe_command(&token, 1, "/tmp/typed"))
        .when_output_contains("GUEST: kill-display", KILL_DISPLAY)
        .when_output_contains(
            "GUEST: after-kill",
            &probe_command(&token, 2, "/tmp/typed2"),
        )
        .then_in_l1(&format!("sed 's/^/{AUDIT_PREFIX}/' {AUDIT_LOG}"));
    let scenario = Scenario::new("display")
        // L1's loopback starts down: bulkhead could bind 127.0.0.1, the probe not reach it.
        .l1_setup("ip link set lo up || ifconfig lo 127.0.0.1 up")
        .guest(Guest::new(IMAGE, GUEST_INIT).modules(&[
            "virtio_mmio",
            "virtio_gpu",
            "virtio_input",
        ]))
        .l1_program(&built_binary("vnc-probe", "BULKHEAD_VNC_PROBE"))
        .run(run);
    let report = boot_scenario(&scenario);
    let run = report.started_run("display");
    let typed = format!("typed1-42-{token}");
    let typed2 = format!("typed2-42-{token}");
    let result = (|| {
        let fb = run.guest("fb").unwrap_or_default();
        if !fb.contains("virtio") {
            return Err(format!(
                "the guest's framebuffer is {fb:?}, not virtio-gpu's"
            ));
        }
        let inputs = run.guest("inputs").unwrap_or_default();
        if !inputs.contains("bulkhead VNC keyboard and tablet") {
            return Err(format!("the guest's input devices are {inputs:?}"));
        }
        check_text(&screenshot(&report, 0, "display.png")?)?;
        if !report.lines.iter().any(|line| line.text.contains(&typed)) {
            return Err(format!(
                "the typed command's output {typed:?} never reached the serial console"
            ));
        }
        if run.guest("typed_file") != Some("yes") {
            return Err("the typed command did not finish (no /tmp/typed)".into());
        }
        let audit = AuditRecords::of(&report, AUDIT_PREFIX);
        audit.spawned("display0")?;
        audit.one_kill_one_restart("display0")?;
        check_text(&screenshot(&report, 1, "display-after-kill.png")?)
            .map_err(|e| format!("after the display worker's restart: {e}"))?;
        if !report.lines.iter().any(|line| line.text.contains(&typed2)) {
            return Err(format!(
                "after the restart, the typed command's output {typed2:?} never reached the \
                 serial console"
            ));
        }
        if run.guest("typed2_file") != Some("yes") {
            return Err("the second typed command did not finish (no /tmp/typed2)".into());
        }
        if run.exit != Some(0) {
            return Err(format!("bulkhead exited with {:?}", run.exit));
        }
        Ok(())
    })();
    result.unwrap_or_else(|problem| panic!("{}", report.explain(&problem)));
}
