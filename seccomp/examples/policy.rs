//! Prints a worker kind's sandbox policy, as `bulkhead policy <kind>` does:
//! `cargo run -p bulkhead-seccomp --example policy -- rng`.

use std::process::ExitCode;

use bulkhead_protocol::WorkerKind;

fn main() -> ExitCode {
    let Some(name) = std::env::args().nth(1) else {
        eprintln!("usage: policy <kind>");
        return ExitCode::FAILURE;
    };
    match name.parse::<WorkerKind>() {
        Ok(kind) => {
            print!("{}", bulkhead_seccomp::policy_for(kind).describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
