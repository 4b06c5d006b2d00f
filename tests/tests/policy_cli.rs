//! `bulkhead policy KIND`: what an auditor reads about a worker's sandbox.

use anyhow::Result;
use bulkhead_tests::micro::BulkheadCommand;

#[test]
fn prints_the_rng_workers_policy() -> Result<()> {
    let outcome = BulkheadCommand::new().args(["policy", "rng"]).run()?;
    assert!(outcome.status.success(), "{outcome}");
    let text = &outcome.stdout;
    let digest = text
        .lines()
        .find_map(|line| line.strip_prefix("digest sha256:"))
        .unwrap_or_else(|| panic!("no digest line:\n{text}"));
    assert_eq!(digest.len(), 64, "{digest}");
    assert!(text.contains("kills the worker with SIGSYS"), "{text}");
    // The device's entropy source is allowed; starting programs and opening files are not.
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("getrandom")),
        "{text}"
    );
    for forbidden in ["execve", "openat ", "socket "] {
        assert!(
            !text.lines().any(|l| l.trim_start().starts_with(forbidden)),
            "{forbidden} must not be allowed:\n{text}"
        );
    }
    assert!(text.to_lowercase().contains("landlock"), "{text}");
    Ok(())
}

#[test]
fn the_digest_is_stable_between_runs() -> Result<()> {
    let first = BulkheadCommand::new().args(["policy", "rng"]).run()?;
    let second = BulkheadCommand::new().args(["policy", "rng"]).run()?;
    assert_eq!(first.stdout, second.stdout);
    Ok(())
}

#[test]
fn unknown_kinds_are_refused() -> Result<()> {
    let outcome = BulkheadCommand::new().args(["policy", "floppy"]).run()?;
    outcome.assert_error_mentioning(&["unknown worker kind"]);
    Ok(())
}

#[test]
fn prints_the_net_workers_policy() -> Result<()> {
    let outcome = BulkheadCommand::new().args(["policy", "net"]).run()?;
    assert!(outcome.status.success(), "{outcome}");
    let text = &outcome.stdout;
    // The TAP's offloads are the one ioctl beyond FIONBIO; the worker reaches the network
    // only through the TAP it was given.
    assert!(text.contains("TUNSETOFFLOAD"), "{text}");
    for forbidden in ["execve", "openat ", "socket ", "connect "] {
        assert!(
            !text.lines().any(|l| l.trim_start().starts_with(forbidden)),
            "{forbidden} must not be allowed:\n{text}"
        );
    }
    Ok(())
}
