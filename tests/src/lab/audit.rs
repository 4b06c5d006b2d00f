//! The audit log of a bulkhead run in L1, as the lab sees it: L1 prints the log's JSON
//! lines after the run with a prefix of the test's choosing (`sed 's/^/PREFIX/' LOG`, see
//! [`Run::then_in_l1`](super::Run::then_in_l1)), and the test reads them back here.

use std::fmt;

use super::LabReport;

/// The audit records printed with one prefix, in order.
pub struct AuditRecords<'r> {
    records: Vec<&'r str>,
}

impl<'r> AuditRecords<'r> {
    pub fn of(report: &'r LabReport, prefix: &str) -> Self {
        let records = report
            .lines
            .iter()
            .filter_map(|line| line.text.split_once(prefix).map(|(_, json)| json))
            .collect();
        AuditRecords { records }
    }

    /// The records of `event` (spawn, policy, crash, restart, give_up, ...).
    pub fn events(&self, event: &str) -> Vec<&'r str> {
        let tag = format!(r#""event":"{event}""#);
        self.records
            .iter()
            .copied()
            .filter(|record| record.contains(&tag))
            .collect()
    }

    /// Whether some `event` record contains `detail` (a JSON fragment).
    pub fn has(&self, event: &str, detail: &str) -> bool {
        self.events(event)
            .iter()
            .any(|record| record.contains(detail))
    }

    /// `device`'s worker was spawned with a policy digest on record.
    pub fn spawned(&self, device: &str) -> Result<(), String> {
        let device = format!(r#""device":"{device}""#);
        if self.has("spawn", &device) && self.has("policy", &device) {
            Ok(())
        } else {
            Err(format!(
                "the audit log lacks {device}'s spawn or policy record: {self:?}"
            ))
        }
    }

    /// Nothing crashed, restarted or was given up on.
    pub fn calm(&self) -> Result<(), String> {
        for event in ["crash", "restart", "give_up"] {
            if !self.events(event).is_empty() {
                return Err(format!("no worker should {event}: {self:?}"));
            }
        }
        Ok(())
    }

    /// The story of one kill from outside: `device`'s worker died once of SIGKILL (not a
    /// seccomp violation) and was restarted once, and nothing else crashed or was given up.
    pub fn one_kill_one_restart(&self, device: &str) -> Result<(), String> {
        let device = format!(r#""device":"{device}""#);
        let (crashes, restarts) = (self.events("crash"), self.events("restart"));
        let killed = matches!(crashes.as_slice(), [crash]
            if crash.contains(&device)
                && crash.contains(r#""signal":9"#)
                && crash.contains(r#""seccomp_violation":false"#));
        let restarted = matches!(restarts.as_slice(), [restart]
            if restart.contains(&device) && restart.contains(r#""attempt":1"#));
        if killed && restarted && self.events("give_up").is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the audit log should show {device}'s worker killed once (SIGKILL) and \
                 restarted once: {self:?}"
            ))
        }
    }
}

impl fmt::Debug for AuditRecords<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.records).finish()
    }
}
