//! `bulkhead-lab demo [--direct]`: boots the demo guest with bulkhead (see tests/lab/demo.sh).
//!
//! --direct  run `bulkhead` on this host's /dev/kvm (hardware virtualization)
//! default   run it inside the nested lab (QEMU TCG with emulated SVM), for hosts without
//!
//! When stdin and stdout are a terminal the guest gives a shell; otherwise it prints its
//! banner and powers off.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bulkhead_tests::lab::demo::{demo_cmdline, demo_guest, DEMO_IMAGE};
use bulkhead_tests::lab::{images, lab_dir, Assets, Lab, Run, Scenario};

/// How long a non-interactive demo boot may take inside the lab.
const BATCH_TIMEOUT: Duration = Duration::from_secs(240);
/// An interactive session inside the lab ends after this, at the latest.
const INTERACTIVE_TIMEOUT: Duration = Duration::from_secs(3600);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args[..] {
        ["demo"] => demo_in_lab(),
        ["demo", "--direct"] => demo_direct(),
        _ => Err(anyhow::anyhow!("usage: bulkhead-lab demo [--direct]")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bulkhead-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// `BULKHEAD_BIN`, or the `bulkhead` next to this binary (both are in `target/<profile>/`).
fn bulkhead() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BULKHEAD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating bulkhead-lab")?;
    Ok(exe.with_file_name("bulkhead"))
}

fn guest_args(kernel: &str, initrd: &str, cmdline: &str) -> Vec<String> {
    let args = [
        "run", "--kernel", kernel, "--initrd", initrd, "--cpus", "2", "--memory", "512M",
    ];
    args.iter()
        .chain(&["--cmdline", cmdline])
        .map(|s| s.to_string())
        .collect()
}

fn demo_direct() -> Result<ExitCode> {
    let assets = Assets::locate(&lab_dir().join("assets"))?;
    let work = lab_dir().join("work").join("demo");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let image = work.join("demo.cpio");
    images::build_guest(&assets, &demo_guest(), &image)?;

    let kernel = path_str(&assets.vmlinux)?;
    let args = guest_args(kernel, path_str(&image)?, &demo_cmdline(interactive()));
    let bulkhead = bulkhead()?;
    let status = Command::new(&bulkhead)
        .args(&args)
        .status()
        .with_context(|| format!("running {}", bulkhead.display()))?;
    Ok(exit_code(status.code()))
}

fn demo_in_lab() -> Result<ExitCode> {
    let interactive = interactive();
    let args = guest_args("/vmlinux", DEMO_IMAGE, &demo_cmdline(interactive));
    let run = Run::new("demo", args);
    let run = if interactive {
        run.timeout(INTERACTIVE_TIMEOUT).console_input()
    } else {
        run.timeout(BATCH_TIMEOUT)
    };
    let scenario = Scenario::new("demo").guest(demo_guest()).run(run);
    let lab = Lab::new()?.echo_console();
    if interactive {
        let status = lab.run_interactive(&scenario, &bulkhead()?)?;
        return Ok(exit_code(status.code()));
    }
    let report = lab.run(&scenario, &bulkhead()?)?;
    eprintln!("{}", report.timings());
    eprintln!("console log: {}", report.log_path.display());
    match report.run("demo").and_then(|run| run.exit) {
        Some(0) => Ok(ExitCode::SUCCESS),
        Some(status) => bail!("bulkhead exited with status {status} inside the lab"),
        None => bail!(
            "the demo run never finished; see {}",
            report.log_path.display()
        ),
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

fn exit_code(code: Option<i32>) -> ExitCode {
    match code {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}
