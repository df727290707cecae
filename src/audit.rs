//! The decision log: one JSON line per decision, to standard output or a file.
//!
//! Derived from the same [`Decision`] as the response, so they cannot disagree.
//! It never holds a token, a signature or a key: only the claims named below.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::decision::Decision;
use crate::telemetry::traces::{TraceIds, failed_check};

/// Where decision lines go.
pub struct AuditLog {
    sink: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Lines to standard output (application logs go to standard error).
    pub fn stdout() -> AuditLog {
        AuditLog {
            sink: Mutex::new(Box::new(LineWriter::new(std::io::stdout()))),
        }
    }

    /// Lines appended to `path`.
    pub fn file(path: &Path) -> std::io::Result<AuditLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            sink: Mutex::new(Box::new(LineWriter::new(file))),
        })
    }

    /// Writes the line for `decision`, without trace ids. A failing sink is
    /// reported on the application log; it never changes the decision.
    pub fn record(&self, decision: &Decision, http_status: u16) {
        self.record_traced(decision, http_status, &TraceIds::default());
    }

    /// Writes the line for `decision`, tied to its trace by `trace`.
    pub fn record_traced(&self, decision: &Decision, http_status: u16, trace: &TraceIds) {
        let mut line = audit_line(decision, http_status, trace).to_string();
        line.push('\n');
        let result = match self.sink.lock() {
            Ok(mut sink) => sink.write_all(line.as_bytes()),
            Err(poisoned) => poisoned.into_inner().write_all(line.as_bytes()),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, decision_id = %decision.id, "cannot write audit line");
        }
    }
}

/// The audit record of a decision (every field is listed in the README,
/// "Observability").
pub fn audit_line(decision: &Decision, http_status: u16, trace: &TraceIds) -> serde_json::Value {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    json!({
        "type": "decision",
        "ts_ms": ts,
        "decision_id": decision.id,
        "outcome": if decision.effective_verdict().is_allow() { "allow" } else { "deny" },
        "dry_run": decision.dry_run,
        "would": if decision.dry_run { Some("deny") } else { None },
        "status": http_status,
        "reason": decision.verdict.class(),
        "failed_check": failed_check(decision),
        "principal": decision.principal,
        "action": decision.action,
        "resource": decision.resource,
        "policies": decision.policies,
        "errors": decision.errors,
        "issuer": decision.issuer,
        "jti": decision.jti,
        "credential": decision.credential,
        "api_key_id": decision.api_key_id,
        "method": decision.method,
        "path": decision.path,
        "policy_generation": decision.policy_generation,
        "policy_digest": decision.policy_digest,
        "latency_us": decision.elapsed.as_micros() as u64,
        "trace_id": trace.trace_id,
        "span_id": trace.span_id,
    })
}
