//! The `bulkhead` binary: parses the command line, runs the VM or talks to a running one,
//! and turns how it ended into an exit status. Errors become one `error: ...` line on
//! stderr.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bulkhead_protocol::control::{Answer, Command as Request};
use bulkhead_vmm::cli::{Cli, Command, RunArgs};
use bulkhead_vmm::config::VmName;
use bulkhead_vmm::console::RawTerminal;
use bulkhead_vmm::control::{self, format, ControlSocket};
use bulkhead_vmm::exit::{ExitSignal, VmExit};
use bulkhead_vmm::vm::Vm;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

/// Extra time `bulkhead stop` waits past the guest's timeout for the VMM to exit.
const STOP_GRACE: Duration = Duration::from_secs(10);

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The signals that end a VM cleanly (socket removed, terminal restored).
fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// Turns the (blocked) termination signals into a VM exit, on a thread of its own.
fn watch_termination_signals(exit: Arc<ExitSignal>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || match termination_signals().wait() {
            Ok(signal) => exit.request(VmExit::Signal {
                signal: signal as i32,
            }),
            Err(e) => tracing::error!("cannot wait for termination signals: {e}"),
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn run_vm(args: RunArgs) -> anyhow::Result<i32> {
    let config = args.to_config()?;
    // Blocked before any thread starts, so that every thread inherits the mask and only
    // the signal thread takes them (worker processes start with a clean mask).
    termination_signals()
        .thread_block()
        .context("blocking termination signals")?;
    let name = config.name.as_str();
    // Bound before the VM is built, so that a name clash costs nothing.
    let socket = ControlSocket::bind(name, &control::socket_path(name))?;
    let mut vm = Vm::new(&config, Box::new(std::io::stdout())).context("cannot start the VM")?;
    socket.serve(vm.control_context(name))?;
    watch_termination_signals(vm.exit_signal())?;
    tracing::info!(name, socket = %socket.path().display(), "VM control socket ready");
    let mut terminal = RawTerminal::enable();
    let exit = vm.run(&terminal);
    terminal.restore();
    socket.remove();
    let exit = exit?;
    let _ = std::io::stdout().flush();
    if exit.status() == 0 {
        tracing::info!("{}", exit.describe());
    } else {
        eprintln!("error: {}", exit.describe());
    }
    // Exit right here: vCPU threads may still be blocked in KVM_RUN, and the VM
    // (still in scope) must not be torn down under them.
    std::process::exit(exit.status());
}

fn request(name: &VmName, command: Request) -> anyhow::Result<Answer> {
    Ok(control::send(name.as_str(), command)?)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn unexpected(answer: Answer) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the VM: {answer:?}")
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => run_vm(*args),
        Command::Policy { kind } => {
            print!("{}", bulkhead_seccomp::policy_for(kind).describe());
            Ok(0)
        }
        Command::List { json } => {
            let vms = control::list();
            if json {
                print_json(&vms)?;
            } else {
                print!("{}", format::list(&vms));
            }
            Ok(0)
        }
        Command::Status { name, json } => match request(&name, Request::Status)? {
            Answer::Status(status) if json => print_json(&status).map(|()| 0),
            Answer::Status(status) => {
                print!("{}", format::status(&status));
                Ok(0)
            }
            other => Err(unexpected(other)),
        },
        Command::Debug { name, json } => match request(&name, Request::Debug)? {
            Answer::Registers { vcpus } if json => print_json(&vcpus).map(|()| 0),
            Answer::Registers { vcpus } => {
                print!("{}", format::registers(&vcpus));
                Ok(0)
            }
            other => Err(unexpected(other)),
        },
        Command::Stop { name, timeout } => {
            request(
                &name,
                Request::Stop {
                    timeout_secs: timeout,
                },
            )?;
            let wait = Duration::from_secs(timeout).saturating_add(STOP_GRACE);
            if !control::wait_until_gone(name.as_str(), wait) {
                bail!(
                    "VM {name:?} is still running {} s after the stop request",
                    wait.as_secs()
                );
            }
            Ok(0)
        }
        Command::Kill { name } => {
            request(&name, Request::Kill)?;
            if !control::wait_until_gone(name.as_str(), STOP_GRACE) {
                bail!("VM {name:?} is still running after the kill request");
            }
            Ok(0)
        }
        Command::Pause { name } => request(&name, Request::Pause).map(|_| 0),
        Command::Resume { name } => request(&name, Request::Resume).map(|_| 0),
        Command::RestartWorker { name, device } => {
            request(&name, Request::RestartWorker { device }).map(|_| 0)
        }
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(status) => ExitCode::from(status as u8),
        Err(e) => {
            // `{:#}` joins the context chain into one line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
