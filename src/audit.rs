//! The decision log: one JSON line per decision, to standard output or a file.
//!
//! Derived from the same [`Decision`] as the response, so they cannot disagree.
//! It never holds a token, a signature or a key: only the claims named below.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

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

    /// Writes the line for `decision`, tied to its trace by `trace`. A failing
    /// sink is reported on the application log; it never changes the decision.
    pub fn record_traced(&self, decision: &Decision, http_status: u16, trace: &TraceIds) {
        let mut line = Vec::with_capacity(640);
        let result =
            serde_json::to_writer(&mut line, &AuditRecord::new(decision, http_status, trace))
                .map_err(std::io::Error::from)
                .and_then(|()| {
                    line.push(b'\n');
                    match self.sink.lock() {
                        Ok(mut sink) => sink.write_all(&line),
                        Err(poisoned) => poisoned.into_inner().write_all(&line),
                    }
                });
        if let Err(e) = result {
            tracing::error!(error = %e, decision_id = %decision.id, "cannot write audit line");
        }
    }
}

/// The audit record of a decision (every field is listed in the README,
/// "Observability"), borrowed from the decision and serialized straight to the
/// sink: no intermediate JSON tree on the request path.
#[derive(serde::Serialize)]
struct AuditRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ms: u64,
    decision_id: &'a str,
    outcome: &'static str,
    dry_run: bool,
    would: Option<&'static str>,
    status: u16,
    reason: &'static str,
    failed_check: Option<String>,
    principal: Option<&'a str>,
    action: Option<&'a str>,
    resource: Option<&'a str>,
    policies: &'a [String],
    errors: &'a [String],
    issuer: Option<&'a str>,
    jti: Option<&'a str>,
    credential: Option<&'static str>,
    api_key_id: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    policy_generation: u64,
    policy_digest: Option<&'a str>,
    latency_us: u64,
    trace_id: Option<&'a str>,
    span_id: Option<&'a str>,
}

impl<'a> AuditRecord<'a> {
    fn new(decision: &'a Decision, http_status: u16, trace: &'a TraceIds) -> AuditRecord<'a> {
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        AuditRecord {
            kind: "decision",
            ts_ms,
            decision_id: &decision.id,
            outcome: if decision.effective_verdict().is_allow() {
                "allow"
            } else {
                "deny"
            },
            dry_run: decision.dry_run,
            would: decision.dry_run.then_some("deny"),
            status: http_status,
            reason: decision.verdict.class(),
            failed_check: failed_check(decision),
            principal: decision.principal.as_deref(),
            action: decision.action.as_deref(),
            resource: decision.resource.as_deref(),
            policies: &decision.policies,
            errors: &decision.errors,
            issuer: decision.issuer.as_deref(),
            jti: decision.jti.as_deref(),
            credential: decision.credential,
            api_key_id: decision.api_key_id.as_deref(),
            method: &decision.method,
            path: &decision.path,
            policy_generation: decision.policy_generation,
            policy_digest: decision.policy_digest.as_deref(),
            latency_us: decision.elapsed.as_micros() as u64,
            trace_id: trace.trace_id.as_deref(),
            span_id: trace.span_id.as_deref(),
        }
    }
}
