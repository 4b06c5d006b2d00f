//! The `bulkhead` binary: parses the command line, runs the VM, and turns how it ended
//! into an exit status. Errors become one `error: ...` line on stderr.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use bulkhead_vmm::cli::{Cli, Command};
use bulkhead_vmm::console::RawTerminal;
use bulkhead_vmm::vm::Vm;
use clap::Parser;

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => {
            let config = args.to_config()?;
            let mut vm =
                Vm::new(&config, Box::new(std::io::stdout())).context("cannot start the VM")?;
            let mut terminal = RawTerminal::enable();
            let exit = vm.run(&terminal);
            terminal.restore();
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
        Command::Policy { kind } => {
            print!("{}", bulkhead_seccomp::policy_for(kind).describe());
            Ok(0)
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
