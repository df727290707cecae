//! The decision log: one JSON line per decision, to standard output or a file.
//!
//! Derived from the same [`Decision`] as the response, so they cannot disagree.
//! It never holds a token, a signature or a key: only the claims named below.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::decision::Decision;
use crate::telemetry::traces::{TraceIds, failed_check};

/// Where decision lines go, and when.
///
/// Two modes:
/// - *write-through* ([`AuditLog::stdout`], [`AuditLog::file`]): each line is
///   written by the thread that made the decision, before the response;
/// - *batched* ([`AuditLog::batched`], what `portcullis serve` uses unless
///   `[audit] flush_interval_ms = 0`): lines are appended to a buffer and a
///   writer thread writes everything gathered every `interval`, in one system
///   call. A write per decision was the largest cost of a cached `Check`.
///
/// Batched mode never drops a line: when the writer falls behind by
/// [`MAX_PENDING_BYTES`], deciding threads wait for it; [`AuditLog::flush`]
/// (called by the server's shutdown) and dropping the log write everything
/// appended before. Only a crash can lose the lines of the last interval.
pub struct AuditLog {
    mode: Mode,
}

enum Mode {
    WriteThrough(Mutex<Box<dyn Write + Send>>),
    Batched(BatchWriter),
}

/// The buffer and the writer thread of a batched log.
struct BatchWriter {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

/// Pending bytes at which deciding threads wait for the writer (back-pressure
/// instead of unbounded memory or dropped lines).
pub const MAX_PENDING_BYTES: usize = 8 << 20;

/// Pending bytes at which the writer stops gathering and writes at once.
const WRITE_NOW_BYTES: usize = 256 << 10;

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer: first line after idling, a full batch, a flush, stop.
    wake_writer: Condvar,
    /// Wakes threads waiting for lines to be written (flush, back-pressure).
    progress: Condvar,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Lines appended since the start.
    appended: u64,
    /// Lines handed to the sink since the start.
    written: u64,
    /// A flush wants everything up to this line written without gathering.
    flush_to: u64,
    writer_idle: bool,
    stop: bool,
    /// Times a deciding thread waited for the writer (back-pressure).
    waits: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A poisoned lock only means a thread panicked while appending; the
        // buffer is still a sequence of whole lines or a cut one, never unsafe.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Lines to standard output (application logs go to standard error),
    /// written through.
    pub fn stdout() -> AuditLog {
        AuditLog::write_through(Box::new(LineWriter::new(std::io::stdout())))
    }

    /// Lines appended to `path`, written through.
    pub fn file(path: &Path) -> std::io::Result<AuditLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog::write_through(Box::new(LineWriter::new(file))))
    }

    fn write_through(sink: Box<dyn Write + Send>) -> AuditLog {
        AuditLog {
            mode: Mode::WriteThrough(Mutex::new(sink)),
        }
    }

    /// The same destination, batched: a writer thread writes the lines
    /// gathered over each `interval` at once. A zero interval keeps the log
    /// write-through.
    pub fn batched(self, interval: Duration) -> std::io::Result<AuditLog> {
        let sink = match self.mode {
            Mode::WriteThrough(sink) if !interval.is_zero() => {
                sink.into_inner().unwrap_or_else(|p| p.into_inner())
            }
            mode => return Ok(AuditLog { mode }),
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake_writer: Condvar::new(),
            progress: Condvar::new(),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || write_batches(&shared, sink, interval))?
        };
        Ok(AuditLog {
            mode: Mode::Batched(BatchWriter {
                shared,
                writer: Some(writer),
            }),
        })
    }

    /// Writes the line for `decision`, tied to its trace by `trace`. A failing
    /// sink is reported on the application log; it never changes the decision.
    pub fn record_traced(&self, decision: &Decision, http_status: u16, trace: &TraceIds) {
        // Each thread serializes into its own buffer, kept between lines: no
        // allocation (or growth) per decision.
        thread_local! {
            static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
        }
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                self.encode_and_append(&mut line, decision, http_status, trace);
                // One huge line (thousands of policy errors) must not pin its
                // buffer for the thread's life.
                if line.capacity() > 64 * 1024 {
                    *line = Vec::with_capacity(1024);
                }
            }
            // Only reentrancy (a sink that audits) could get here.
            Err(_) => self.encode_and_append(&mut Vec::new(), decision, http_status, trace),
        });
    }

    fn encode_and_append(
        &self,
        line: &mut Vec<u8>,
        decision: &Decision,
        http_status: u16,
        trace: &TraceIds,
    ) {
        let result =
            serde_json::to_writer(&mut *line, &AuditRecord::new(decision, http_status, trace));
        if let Err(e) = result {
            tracing::error!(error = %e, decision_id = %decision.id, "cannot encode audit line");
            return;
        }
        line.push(b'\n');
        match &self.mode {
            Mode::WriteThrough(sink) => {
                let written = match sink.lock() {
                    Ok(mut sink) => sink.write_all(line),
                    Err(poisoned) => poisoned.into_inner().write_all(line),
                };
                if let Err(e) = written {
                    tracing::error!(error = %e, decision_id = %decision.id, "cannot write audit line");
                }
            }
            Mode::Batched(BatchWriter { shared, .. }) => {
                let mut pending = shared.lock();
                while pending.bytes.len() >= MAX_PENDING_BYTES && !pending.stop {
                    pending.waits += 1;
                    shared.wake_writer.notify_one();
                    pending = shared
                        .progress
                        .wait(pending)
                        .unwrap_or_else(|p| p.into_inner());
                }
                pending.bytes.extend_from_slice(line);
                pending.appended += 1;
                // Only an idle writer or a full batch costs a wake-up; otherwise
                // the writer finds the line when its interval ends.
                if pending.writer_idle || pending.bytes.len() >= WRITE_NOW_BYTES {
                    pending.writer_idle = false;
                    shared.wake_writer.notify_one();
                }
            }
        }
    }

    /// Returns once every line recorded before the call has been handed to the
    /// sink (and, for standard output, flushed).
    pub fn flush(&self) {
        match &self.mode {
            Mode::WriteThrough(sink) => {
                let flushed = match sink.lock() {
                    Ok(mut sink) => sink.flush(),
                    Err(poisoned) => poisoned.into_inner().flush(),
                };
                if let Err(e) = flushed {
                    tracing::error!(error = %e, "cannot flush the audit log");
                }
            }
            Mode::Batched(BatchWriter { shared, writer }) => {
                let mut pending = shared.lock();
                let target = pending.appended;
                pending.flush_to = pending.flush_to.max(target);
                shared.wake_writer.notify_one();
                while pending.written < target && writer.as_ref().is_some_and(|w| !w.is_finished())
                {
                    pending = shared
                        .progress
                        .wait_timeout(pending, Duration::from_millis(100))
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
    }
}

impl Drop for BatchWriter {
    /// Stops the writer after it has written everything appended.
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake_writer.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: sleeps until a line arrives, lets lines gather for
/// `interval` (unless a flush, a full batch or stop wants them now), then
/// writes them in one call. Ends after writing everything once stopped.
fn write_batches(shared: &Shared, mut sink: Box<dyn Write + Send>, interval: Duration) {
    let mut batch: Vec<u8> = Vec::new();
    loop {
        let mut pending = shared.lock();
        while pending.bytes.is_empty() && !pending.stop {
            pending.writer_idle = true;
            pending = shared
                .wake_writer
                .wait(pending)
                .unwrap_or_else(|p| p.into_inner());
        }
        pending.writer_idle = false;
        if pending.bytes.is_empty() && pending.stop {
            return;
        }
        let write_now =
            |p: &Pending| p.stop || p.flush_to > p.written || p.bytes.len() >= WRITE_NOW_BYTES;
        if !write_now(&pending) {
            pending = shared
                .wake_writer
                .wait_timeout_while(pending, interval, |p| !write_now(p))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        std::mem::swap(&mut batch, &mut pending.bytes);
        let upto = pending.appended;
        drop(pending);

        let result = sink.write_all(&batch).and_then(|()| sink.flush());
        if let Err(e) = result {
            let lines = batch.iter().filter(|b| **b == b'\n').count();
            tracing::error!(error = %e, lines, "cannot write audit lines");
        }
        batch.clear();

        shared.lock().written = upto;
        shared.progress.notify_all();
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
    caller: Option<&'a str>,
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
            caller: decision.caller.as_deref(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A log to a file in a fresh folder (kept alive by the returned guard),
    /// batched over `interval`.
    fn file_log(interval: Duration) -> (tempfile::TempDir, std::path::PathBuf, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::file(&path).unwrap().batched(interval).unwrap();
        (dir, path, log)
    }

    fn record(log: &AuditLog, path: &str) -> String {
        let decision = Decision::new("GET", path);
        log.record_traced(&decision, 403, &TraceIds::default());
        decision.id
    }

    #[test]
    fn batched_lines_from_many_threads_are_all_written_whole_by_flush() {
        let (_dir, path, log) = file_log(Duration::from_millis(2));
        let ids: HashSet<String> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|t| {
                    let log = &log;
                    s.spawn(move || {
                        (0..2_000)
                            .map(|i| record(log, &format!("/t{t}/{i}")))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        log.flush();
        let written = lines(&path);
        assert_eq!(written.len(), 16_000);
        let written_ids: HashSet<String> = written
            .iter()
            .map(|l| l["decision_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(written_ids, ids, "every line once, none lost");
    }

    #[test]
    fn batched_lines_are_written_when_the_log_is_dropped() {
        // A long interval: only the drop can have written the lines in time.
        let (_dir, path, log) = file_log(Duration::from_millis(1000));
        let ids: Vec<String> = (0..100).map(|i| record(&log, &format!("/{i}"))).collect();
        drop(log);
        let written: Vec<String> = lines(&path)
            .iter()
            .map(|l| l["decision_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(written, ids, "in order, all of them");
    }

    #[test]
    fn batched_lines_arrive_without_a_flush_after_the_interval() {
        let (_dir, path, log) = file_log(Duration::from_millis(2));
        let id = record(&log, "/one");
        // The writer thread writes on its own; wait for it (bounded), no flush.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lines(&path).is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(lines(&path)[0]["decision_id"], id.as_str());
    }

    #[test]
    fn a_zero_interval_keeps_the_log_write_through() {
        let (_dir, path, log) = file_log(Duration::ZERO);
        let id = record(&log, "/now");
        // Written before record_traced returned: no flush, no wait.
        assert_eq!(lines(&path)[0]["decision_id"], id.as_str());
        assert!(matches!(log.mode, Mode::WriteThrough(_)));
    }

    /// A sink whose first write blocks until the test opens the gate, so lines
    /// pile up behind it.
    struct Gated {
        gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(gate) = self.gate.lock().unwrap().take() {
                let _ = gate.recv();
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_sink_holds_deciding_threads_back_instead_of_losing_lines() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let (open, gate) = std::sync::mpsc::channel();
        let sink = Gated {
            gate: Mutex::new(Some(gate)),
            out: out.clone(),
        };
        let log = AuditLog::write_through(Box::new(sink))
            .batched(Duration::from_millis(1))
            .unwrap();
        let Mode::Batched(writer) = &log.mode else {
            panic!("batched")
        };
        // About 16 MiB of lines from 4 threads, while the first write is stuck:
        // more than MAX_PENDING_BYTES, so deciding threads must wait.
        let long_path = format!("/{}", "p".repeat(400));
        let per_thread = 6_000;
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..per_thread {
                        record(&log, &long_path);
                    }
                });
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while writer.shared.lock().waits == 0 {
                assert!(std::time::Instant::now() < deadline, "nobody waited");
                std::thread::sleep(Duration::from_millis(5));
            }
            let pending = writer.shared.lock().bytes.len();
            // Opened before asserting, so a failure cannot leave threads stuck.
            open.send(()).unwrap();
            assert!(pending >= MAX_PENDING_BYTES);
        });
        log.flush();
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 4 * per_thread, "no line lost");
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        );
    }

    /// A sink that fails its first write, then works.
    struct FailOnce {
        failed: bool,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for FailOnce {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.failed {
                self.failed = true;
                return Err(std::io::Error::other("disk full"));
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_write_loses_only_its_batch_and_the_writer_goes_on() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = FailOnce {
            failed: false,
            out: out.clone(),
        };
        let log = AuditLog::write_through(Box::new(sink))
            .batched(Duration::from_millis(1))
            .unwrap();
        record(&log, "/lost");
        log.flush();
        let kept = record(&log, "/kept");
        log.flush();
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains(&kept));
    }
}
