//! The audit log: one JSON object per line for every worker lifecycle event, for
//! auditors and for tools that watch a VM's devices.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_protocol::audit::{AuditEvent, AuditRecord};
use thiserror::Error;

#[derive(Debug, Error)]
#[error("cannot open audit log {path}")]
pub struct AuditLogError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Where events go; without `--audit-log` they still reach the tracing log.
#[derive(Default)]
pub struct AuditLog {
    file: Option<Mutex<File>>,
}

impl AuditLog {
    /// Appends to `path`, creating it (mode 0600) if needed.
    pub fn open(path: &Path) -> Result<Self, AuditLogError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| AuditLogError {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file: Some(Mutex::new(file)),
        })
    }

    pub fn record(&self, event: AuditEvent) {
        tracing::info!(?event, "audit");
        let Some(file) = &self.file else { return };
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let record = AuditRecord { time_ms, event };
        let line = match serde_json::to_string(&record) {
            Ok(line) => line + "\n",
            Err(e) => {
                tracing::error!("cannot encode audit record: {e}");
                return;
            }
        };
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        // One write per line, so lines from several threads never interleave.
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!("cannot write the audit log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::WorkerKind;

    #[test]
    fn writes_json_lines() {
        let path = std::env::temp_dir().join(format!("bulkhead-audit-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AuditLog::open(&path).unwrap();
        log.record(AuditEvent::Spawn {
            device: "rng0".into(),
            kind: WorkerKind::Rng,
            pid: 7,
        });
        log.record(AuditEvent::GiveUp {
            device: "rng0".into(),
            attempts: 5,
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert!(matches!(lines[0].event, AuditEvent::Spawn { pid: 7, .. }));
        assert!(text.contains(r#""event":"give_up""#));
        let _ = std::fs::remove_file(&path);
    }
}
