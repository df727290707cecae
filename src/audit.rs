//! The decision log: one JSON line per decision, to standard output or a file.
//!
//! Derived from the same [`Decision`] as the response, so they cannot disagree.
//! It never holds a token, a signature or a key: only the claims named below.

use std::fs::OpenOptions;
use std::io::{ErrorKind, LineWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch};

use crate::decision::Decision;
use crate::telemetry::decision_logs::{DecisionLogStats, DecisionLogs};
use crate::telemetry::traces::TraceIds;

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
/// What batched mode guarantees (`docs/reference/audit-line.md` says the same):
/// - deciding threads never wait on the sink: [`AuditLog::record_traced`]
///   only appends to memory. Back-pressure is [`AuditLog::ready`], awaited
///   (asynchronously, at most [`MAX_READY_WAIT`]) *before* a request is
///   decided: when the writer is [`MAX_PENDING_BYTES`] behind, the request
///   waits for room, then is refused ([`AuditUnavailable`]);
/// - a failed write loses nothing: the bytes the sink did not take stay
///   pending and are retried (backoff up to [`MAX_RETRY_BACKOFF`]), every
///   failure is counted, and while the sink fails [`AuditLog::ready`] refuses
///   new requests (fail closed: no decision is made that cannot be logged);
/// - a writer thread that died (a panicking sink) is detected the same way:
///   [`AuditLog::ready`] refuses, [`AuditLog::writer_up`] turns false and the
///   server reports NOT_SERVING;
/// - [`AuditLog::flush`] (called by the server's shutdown) and dropping the
///   log write everything appended before, unless the sink still fails after
///   [`STOP_ATTEMPTS`] more attempts: then the lines left are counted as
///   dropped and reported on the application log.
///
/// Not guaranteed: a crash (or `SIGKILL`) loses the lines not yet written
/// (normally those of the last interval; everything pending while the sink
/// was failing); a dying writer loses the batch it held; lines of requests
/// already past [`AuditLog::ready`] when the writer died, or beyond
/// twice [`MAX_PENDING_BYTES`], are dropped and counted.
pub struct AuditLog {
    mode: Mode,
    health: Arc<Health>,
    /// Each line also queued for export as an OTLP log record, when
    /// `[telemetry] decision_logs` is on.
    decision_logs: Option<DecisionLogs>,
}

enum Mode {
    WriteThrough(Mutex<Box<dyn Write + Send>>),
    Batched(BatchWriter),
}

/// The buffer and the writer thread of a batched log.
struct BatchWriter {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    /// How long [`AuditLog::ready`] waits for room ([`MAX_READY_WAIT`]).
    ready_wait: Duration,
}

/// Pending bytes at which new requests wait for the writer (back-pressure
/// instead of unbounded memory or dropped lines), in [`AuditLog::ready`].
pub const MAX_PENDING_BYTES: usize = 8 << 20;

/// Pending bytes beyond which a line is dropped (and counted) rather than
/// kept: only reachable by requests already past [`AuditLog::ready`].
const HARD_PENDING_BYTES: usize = 2 * MAX_PENDING_BYTES;

/// Longest [`AuditLog::ready`] waits for a writer that is behind before the
/// request is refused.
pub const MAX_READY_WAIT: Duration = Duration::from_secs(2);

/// Longest delay between two attempts to write to a failing sink.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// First delay before writing again to a failing sink.
const MIN_RETRY_BACKOFF: Duration = Duration::from_millis(10);

/// Attempts to write to a failing sink once the log is stopping (or a flush
/// waits), before the lines left are given up.
pub const STOP_ATTEMPTS: u64 = 3;

/// Pending bytes at which the writer stops gathering and writes at once.
const WRITE_NOW_BYTES: usize = 256 << 10;

/// Why the audit log cannot take a new decision now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuditUnavailable {
    /// The writer thread has stopped (a sink panicked).
    #[error("audit_unavailable: the audit writer has stopped")]
    WriterDead,
    /// The last write to the sink failed; it is being retried.
    #[error("audit_unavailable: the audit sink is failing writes (retrying)")]
    SinkFailing,
    /// The decision-log export queue (`decision_log_overflow = "block"`)
    /// stayed full for [`MAX_READY_WAIT`].
    #[error("audit_unavailable: the decision log export queue is full")]
    DecisionLogsFull,
    /// The writer is [`MAX_PENDING_BYTES`] behind and made no room in time.
    #[error("audit_unavailable: the audit writer is too far behind")]
    Behind,
}

/// Counters and the writer's state, shared with the writer thread.
#[derive(Debug)]
struct Health {
    /// True while the writer runs and its last write succeeded.
    up: watch::Sender<bool>,
    /// The same, read without a lock on the request path; `up` follows it.
    up_flag: AtomicBool,
    /// Failed writes (each attempt counts).
    write_failures: AtomicU64,
    /// Lines lost (see [`AuditLog`]).
    lines_dropped: AtomicU64,
    /// Requests refused by [`AuditLog::ready`].
    refused: AtomicU64,
    /// Wakes requests waiting in [`AuditLog::ready`]: room made, or the
    /// writer's state changed.
    room: Notify,
}

impl Health {
    fn new() -> Health {
        Health {
            up: watch::channel(true).0,
            up_flag: AtomicBool::new(true),
            write_failures: AtomicU64::new(0),
            lines_dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            room: Notify::new(),
        }
    }

    /// Called on every write: costs an atomic swap unless the state changes.
    fn set_up(&self, up: bool) {
        if self.up_flag.swap(up, Ordering::SeqCst) != up {
            // Under the channel's lock, copy the flag as it is now: the last
            // of two racing changes wins in both places.
            self.up.send_if_modified(|now| {
                let current = self.up_flag.load(Ordering::SeqCst);
                std::mem::replace(now, current) != current
            });
        }
    }

    fn dropped(&self, lines: u64) {
        let before = self.lines_dropped.fetch_add(lines, Ordering::Relaxed);
        // Loud, but not once per line.
        if before == 0 || before / 1000 != (before + lines) / 1000 {
            tracing::error!(
                lines_dropped_total = before + lines,
                "audit lines dropped (see portcullis_audit_lines_dropped_total)"
            );
        }
    }
}

/// What the audit log has counted, for the metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditStats {
    /// True while the writer runs and its last write succeeded.
    pub writer_up: bool,
    /// Failed writes to the sink (every attempt; the lines are retried).
    pub write_failures: u64,
    /// Lines lost: a dead writer's, a sink still failing at shutdown, a
    /// failed write-through write.
    pub lines_dropped: u64,
    /// Requests refused because the log could not take them.
    pub refused: u64,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer: first line after idling, a full batch, a flush, stop.
    wake_writer: Condvar,
    /// Wakes threads waiting for lines to be written (flush).
    progress: Condvar,
    health: Arc<Health>,
    /// `pending.bytes.len()`, for the request path's lock-free look.
    pending_len: AtomicUsize,
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
    /// The writer thread has ended without being stopped (a panic).
    writer_dead: bool,
    /// The last write failed; the bytes are held for a retry.
    failing: bool,
    /// Failed attempts since the start (the writer's own count).
    failures: u64,
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
            health: Arc::new(Health::new()),
            decision_logs: None,
        }
    }

    /// The same destination, batched: a writer thread writes the lines
    /// gathered over each `interval` at once. A zero interval keeps the log
    /// write-through.
    pub fn batched(self, interval: Duration) -> std::io::Result<AuditLog> {
        let AuditLog {
            mode,
            health,
            decision_logs,
        } = self;
        let sink = match mode {
            Mode::WriteThrough(sink) if !interval.is_zero() => {
                sink.into_inner().unwrap_or_else(|p| p.into_inner())
            }
            mode => {
                return Ok(AuditLog {
                    mode,
                    health,
                    decision_logs,
                });
            }
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake_writer: Condvar::new(),
            progress: Condvar::new(),
            health: health.clone(),
            pending_len: AtomicUsize::new(0),
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
                ready_wait: MAX_READY_WAIT,
            }),
            health,
            decision_logs,
        })
    }

    /// The same log, each line also queued for export as an OTLP log record
    /// (`[telemetry] decision_logs`). With `decision_log_overflow = "block"`,
    /// [`AuditLog::ready`] also waits for room in that queue.
    pub fn with_decision_logs(mut self, logs: DecisionLogs) -> AuditLog {
        self.decision_logs = Some(logs);
        self
    }

    /// What decision-log export has counted; `None` when it is off.
    pub fn decision_log_stats(&self) -> Option<DecisionLogStats> {
        self.decision_logs.as_ref().map(DecisionLogs::stats)
    }

    /// Whether the log can take the line of a new decision: awaited before a
    /// request is decided. Never blocks a thread: when the writer is
    /// [`MAX_PENDING_BYTES`] behind it waits (asynchronously) for room, at most
    /// [`MAX_READY_WAIT`]. Refuses at once when the writer has stopped or the
    /// sink is failing. Write-through logs are always ready. With decision logs in
    /// `block` mode, also waits (the same bounded time) for room in their queue.
    pub async fn ready(&self) -> Result<(), AuditUnavailable> {
        // `block` mode: no decision is made that its export queue cannot take
        // (an immediate yes in `drop` mode or with room).
        if let Some(logs) = &self.decision_logs
            && !logs.ready(MAX_READY_WAIT).await
        {
            return Err(self.refuse(AuditUnavailable::DecisionLogsFull));
        }
        let Mode::Batched(batch) = &self.mode else {
            return Ok(());
        };
        // The usual case, without a lock: the writer is up and there is room.
        // (A writer that dies right after this look loses this request's line
        // and counts it; see "What is guaranteed".)
        if self.health.up_flag.load(Ordering::SeqCst)
            && batch.shared.pending_len.load(Ordering::Relaxed) < MAX_PENDING_BYTES
        {
            return Ok(());
        }
        match batch.state() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(self.refuse(e)),
        }
        let deadline = tokio::time::Instant::now() + batch.ready_wait;
        loop {
            // Registered before the state is read, so no wake-up is missed.
            let room = self.health.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match batch.state() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.refuse(e)),
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return match batch.state() {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(self.refuse(AuditUnavailable::Behind)),
                    Err(e) => Err(self.refuse(e)),
                };
            }
        }
    }

    fn refuse(&self, why: AuditUnavailable) -> AuditUnavailable {
        self.health.refused.fetch_add(1, Ordering::Relaxed);
        why
    }

    /// Follows the writer's state: true while it runs and its last write
    /// succeeded (for health reporting).
    pub fn writer_up(&self) -> watch::Receiver<bool> {
        self.health.up.subscribe()
    }

    /// The counters, for the metrics endpoint.
    pub fn stats(&self) -> AuditStats {
        let writer_up = match &self.mode {
            Mode::Batched(batch) => batch.state().is_ok(),
            Mode::WriteThrough(_) => *self.health.up.borrow(),
        };
        AuditStats {
            writer_up,
            write_failures: self.health.write_failures.load(Ordering::Relaxed),
            lines_dropped: self.health.lines_dropped.load(Ordering::Relaxed),
            refused: self.health.refused.load(Ordering::Relaxed),
        }
    }

    /// Writes the line for `decision`, tied to its trace by `trace`. Never
    /// waits for the sink (see [`AuditLog::ready`] for back-pressure). A
    /// failing sink is reported on the application log and in the counters;
    /// it never changes the decision.
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
            self.health.dropped(1);
            return;
        }
        // The same bytes as the audit line: the exported record cannot differ.
        if let Some(logs) = &self.decision_logs {
            logs.push(line);
        }
        line.push(b'\n');
        match &self.mode {
            Mode::WriteThrough(sink) => {
                let written = match sink.lock() {
                    Ok(mut sink) => sink.write_all(line),
                    Err(poisoned) => poisoned.into_inner().write_all(line),
                };
                match written {
                    Ok(()) => self.health.set_up(true),
                    Err(e) => {
                        tracing::error!(error = %e, decision_id = %decision.id, "cannot write audit line");
                        self.health.write_failures.fetch_add(1, Ordering::Relaxed);
                        self.health.set_up(false);
                        self.health.dropped(1);
                    }
                }
            }
            Mode::Batched(BatchWriter { shared, .. }) => {
                let mut pending = shared.lock();
                if pending.writer_dead || pending.bytes.len() >= HARD_PENDING_BYTES {
                    drop(pending);
                    self.health.dropped(1);
                    return;
                }
                pending.bytes.extend_from_slice(line);
                pending.appended += 1;
                shared
                    .pending_len
                    .store(pending.bytes.len(), Ordering::Relaxed);
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
    /// sink (and, for standard output, flushed). Gives up when the writer has
    /// stopped, or when the sink failed [`STOP_ATTEMPTS`] more times during
    /// the wait: the lines stay pending (and are still retried).
    pub fn flush(&self) -> Result<(), AuditUnavailable> {
        match &self.mode {
            Mode::WriteThrough(sink) => {
                let flushed = match sink.lock() {
                    Ok(mut sink) => sink.flush(),
                    Err(poisoned) => poisoned.into_inner().flush(),
                };
                if let Err(e) = flushed {
                    tracing::error!(error = %e, "cannot flush the audit log");
                    self.health.write_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(AuditUnavailable::SinkFailing);
                }
                Ok(())
            }
            Mode::Batched(batch) => {
                let shared = &batch.shared;
                let mut pending = shared.lock();
                let target = pending.appended;
                let failures_before = pending.failures;
                pending.flush_to = pending.flush_to.max(target);
                shared.wake_writer.notify_one();
                while pending.written < target {
                    if pending.writer_dead || batch.writer_finished() {
                        return Err(AuditUnavailable::WriterDead);
                    }
                    if pending.failures >= failures_before + STOP_ATTEMPTS {
                        return Err(AuditUnavailable::SinkFailing);
                    }
                    pending = shared
                        .progress
                        .wait_timeout(pending, Duration::from_millis(100))
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                Ok(())
            }
        }
    }
}

impl BatchWriter {
    fn writer_finished(&self) -> bool {
        self.writer.as_ref().is_none_or(|w| w.is_finished())
    }

    /// Room for a line (`Ok(true)`), behind (`Ok(false)`), or unavailable.
    fn state(&self) -> Result<bool, AuditUnavailable> {
        let pending = self.shared.lock();
        if pending.writer_dead || (!pending.stop && self.writer_finished()) {
            Err(AuditUnavailable::WriterDead)
        } else if pending.failing {
            Err(AuditUnavailable::SinkFailing)
        } else {
            Ok(pending.bytes.len() < MAX_PENDING_BYTES)
        }
    }
}

impl Drop for BatchWriter {
    /// Stops the writer after it has written everything appended (or given up
    /// on a failing sink after [`STOP_ATTEMPTS`]).
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake_writer.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Marks the writer dead if it ends by a panic (or any way but a stop), and
/// wakes everyone waiting on it.
struct WriterExit<'a>(&'a Shared);

impl Drop for WriterExit<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        let mut pending = shared.lock();
        if std::thread::panicking() || !pending.stop {
            pending.writer_dead = true;
            let lost = pending.appended.saturating_sub(pending.written);
            pending.bytes = Vec::new();
            drop(pending);
            tracing::error!(
                lines_lost = lost,
                "the audit writer stopped; new requests are refused (audit_unavailable)"
            );
            shared.health.dropped(lost);
            shared.health.set_up(false);
        } else {
            drop(pending);
        }
        shared.progress.notify_all();
        shared.health.room.notify_waiters();
    }
}

/// Writes `batch` to `sink`; returns how many bytes it took and the error
/// that stopped it, if any. Bytes not taken stay for a retry.
fn write_some(sink: &mut dyn Write, batch: &[u8]) -> (usize, std::io::Result<()>) {
    let mut done = 0;
    while done < batch.len() {
        match sink.write(&batch[done..]) {
            Ok(0) => return (done, Err(ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (done, Err(e)),
        }
    }
    (done, sink.flush())
}

/// The writer thread: sleeps until a line arrives, lets lines gather for
/// `interval` (unless a flush, a full batch or stop wants them now), then
/// writes them in one call. A failed write keeps what the sink did not take
/// and retries it, with backoff. Ends after writing everything once stopped
/// (or after [`STOP_ATTEMPTS`] failed attempts once stopped).
fn write_batches(shared: &Shared, mut sink: Box<dyn Write + Send>, interval: Duration) {
    let _exit = WriterExit(shared);
    // Bytes taken from `pending` and not yet accepted by the sink.
    let mut batch: Vec<u8> = Vec::new();
    // Lines up to this one are in `batch` or written.
    let mut upto = 0;
    // The last attempt failed (bytes held, or the sink's flush failed).
    let mut retry = false;
    let mut backoff = MIN_RETRY_BACKOFF;
    let mut stop_attempts = 0;
    loop {
        let mut pending = shared.lock();
        if retry {
            if pending.stop {
                stop_attempts += 1;
                if stop_attempts > STOP_ATTEMPTS {
                    let lost = pending.appended.saturating_sub(pending.written);
                    drop(pending);
                    tracing::error!(
                        lines_lost = lost,
                        "audit sink still failing at shutdown; giving up its pending lines"
                    );
                    shared.health.dropped(lost);
                    return;
                }
            }
            // Wait before the retry; only a stop cuts it short.
            pending = shared
                .wake_writer
                .wait_timeout_while(pending, backoff, |p| !p.stop)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        } else {
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
        }
        if batch.is_empty() {
            std::mem::swap(&mut batch, &mut pending.bytes);
        } else {
            batch.extend_from_slice(&pending.bytes);
            pending.bytes.clear();
        }
        shared.pending_len.store(0, Ordering::Relaxed);
        upto = upto.max(pending.appended);
        drop(pending);
        // The buffer is empty again: requests waiting for room may go on.
        shared.health.room.notify_waiters();

        let (taken, result) = write_some(&mut *sink, &batch);
        batch.drain(..taken);
        let mut pending = shared.lock();
        match result {
            Ok(()) => {
                retry = false;
                backoff = MIN_RETRY_BACKOFF;
                pending.written = upto;
                if pending.failing {
                    pending.failing = false;
                    tracing::info!("audit sink writes again; pending lines written");
                }
                drop(pending);
                shared.health.set_up(true);
            }
            Err(e) => {
                retry = true;
                pending.failures += 1;
                let was_failing = std::mem::replace(&mut pending.failing, true);
                let held = pending.appended.saturating_sub(pending.written);
                drop(pending);
                shared.health.write_failures.fetch_add(1, Ordering::Relaxed);
                shared.health.set_up(false);
                if !was_failing {
                    tracing::error!(error = %e, lines_held = held, "cannot write audit lines; kept and retried, new requests refused meanwhile");
                }
                backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
            }
        }
        shared.progress.notify_all();
        shared.health.room.notify_waiters();
    }
}

/// The audit record of a decision (every field is listed in
/// `docs/reference/audit-line.md`), borrowed from the decision and serialized straight to the
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
    binding: Option<&'static str>,
    response: Option<ResponseNames<'a>>,
    inputs: Option<&'a crate::decision::DecisionInputs>,
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

/// What response profiles changed, by name only (values may carry claims).
#[derive(serde::Serialize)]
struct ResponseNames<'a> {
    profiles: &'a [String],
    upstream_headers_set: Vec<&'a str>,
    upstream_headers_removed: &'a [String],
    query_set: Vec<&'a str>,
    query_removed: &'a [String],
    client_headers: Vec<&'a str>,
    deny_status: Option<u16>,
}

impl<'a> ResponseNames<'a> {
    fn of(shaping: &'a crate::decision::Shaping) -> ResponseNames<'a> {
        let names = |pairs: &'a [(String, String)]| pairs.iter().map(|(n, _)| n.as_str()).collect();
        ResponseNames {
            profiles: &shaping.profiles,
            upstream_headers_set: names(&shaping.upstream_headers),
            upstream_headers_removed: &shaping.remove_upstream_headers,
            query_set: names(&shaping.set_query),
            query_removed: &shaping.remove_query,
            client_headers: names(&shaping.client_headers),
            deny_status: shaping.deny.as_ref().map(|d| d.status),
        }
    }
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
            failed_check: decision.failed_check(),
            principal: decision.principal.as_deref(),
            action: decision.action.as_deref(),
            resource: decision.resource.as_deref(),
            policies: &decision.policies,
            errors: &decision.errors,
            issuer: decision.issuer.as_deref(),
            jti: decision.jti.as_deref(),
            credential: decision.credential,
            binding: decision.binding,
            response: decision.shaping.as_deref().map(ResponseNames::of),
            inputs: decision.inputs.as_deref(),
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
        log.flush().unwrap();
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

    fn batched(sink: impl Write + Send + 'static) -> AuditLog {
        AuditLog::write_through(Box::new(sink))
            .batched(Duration::from_millis(1))
            .unwrap()
    }

    /// Deciding threads used to wait on a Condvar (blocking a Tokio worker)
    /// for as long as the sink was stuck. Now recording never waits; new
    /// requests wait asynchronously for room, a bounded time, then are refused.
    #[tokio::test]
    async fn a_stuck_sink_never_blocks_recording_and_refuses_new_requests_after_a_bounded_wait() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let (open, gate) = std::sync::mpsc::channel();
        let sink = Gated {
            gate: Mutex::new(Some(gate)),
            out: out.clone(),
        };
        let mut log = batched(sink);
        if let Mode::Batched(writer) = &mut log.mode {
            writer.ready_wait = Duration::from_millis(50);
        }
        // More than MAX_PENDING_BYTES of lines while the first write is stuck,
        // recorded on another thread: it would never finish if it waited for
        // the sink.
        let long_path = format!("/{}", "p".repeat(400));
        let lines = 2 * MAX_PENDING_BYTES / 500;
        let (done, finished) = std::sync::mpsc::channel();
        let log = Arc::new(log);
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for _ in 0..lines {
                    record(&log, &long_path);
                }
                let _ = done.send(());
            });
        }
        let recorded = finished.recv_timeout(Duration::from_secs(120));
        let behind = log.ready().await;
        // Opened before asserting, so a failure cannot leave the writer stuck.
        open.send(()).unwrap();
        assert!(recorded.is_ok(), "recording waited for the stuck sink");
        assert_eq!(behind, Err(AuditUnavailable::Behind));
        assert_eq!(log.stats().refused, 1);
        // Once the writer catches up, requests are taken again.
        log.flush().unwrap();
        assert_eq!(log.ready().await, Ok(()));
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let kept = text.lines().count() as u64;
        assert_eq!(kept + log.stats().lines_dropped, lines as u64);
        assert!(
            text.len() >= MAX_PENDING_BYTES,
            "kept at least up to the cap"
        );
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        );
    }

    /// A sink that fails while `failing` is set (after taking `take` bytes of
    /// the write that fails, to cut a line), and counts its failures.
    struct Flaky {
        failing: Arc<std::sync::atomic::AtomicBool>,
        take: usize,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.failing.load(Ordering::SeqCst) {
                if self.take > 0 && buf.len() > self.take {
                    let n = std::mem::take(&mut self.take);
                    self.out.lock().unwrap().extend_from_slice(&buf[..n]);
                    return Ok(n);
                }
                return Err(std::io::Error::other("disk full"));
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A failed write used to drop its whole batch. Now the bytes the sink did
    /// not take are retried: every line arrives, whole, once; meanwhile the
    /// writer reports down, new requests are refused, failures are counted.
    #[tokio::test]
    async fn a_failing_sink_keeps_its_lines_refuses_requests_and_recovers() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let log = batched(Flaky {
            failing: failing.clone(),
            take: 30,
            out: out.clone(),
        });
        let mut up = log.writer_up();
        let ids: Vec<String> = (0..5).map(|i| record(&log, &format!("/{i}"))).collect();
        // The writer's failure is seen: down, and requests refused.
        up.wait_for(|up| !*up).await.unwrap();
        assert_eq!(log.ready().await, Err(AuditUnavailable::SinkFailing));
        assert!(log.stats().write_failures >= 1);
        assert!(!log.stats().writer_up);
        assert_eq!(log.flush(), Err(AuditUnavailable::SinkFailing));

        failing.store(false, Ordering::SeqCst);
        up.wait_for(|up| *up).await.unwrap();
        log.flush().unwrap();
        assert_eq!(log.ready().await, Ok(()));
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let written: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["decision_id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(written, ids, "every line, whole, once, in order");
        assert_eq!(log.stats().lines_dropped, 0);
        assert!(log.stats().writer_up);
    }

    /// A sink that panics: the writer thread dies with it.
    struct Panicking;

    impl Write for Panicking {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            panic!("the sink broke");
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A dead writer used to go unnoticed: lines piled up, then deciding
    /// threads waited forever. Now it is detected: down, requests refused at
    /// once, flush returns, and the lost lines are counted.
    #[tokio::test]
    async fn a_dead_writer_is_detected_and_nothing_waits_for_it() {
        let log = batched(Panicking);
        let mut up = log.writer_up();
        record(&log, "/first");
        up.wait_for(|up| !*up).await.unwrap();
        assert_eq!(log.ready().await, Err(AuditUnavailable::WriterDead));
        assert_eq!(log.flush(), Err(AuditUnavailable::WriterDead));
        record(&log, "/after");
        let stats = log.stats();
        assert!(!stats.writer_up);
        assert_eq!(stats.lines_dropped, 2, "the held line and the late one");
        assert_eq!(stats.refused, 1);
        drop(log);
    }

    /// A sink still failing at shutdown cannot hold the process: the log
    /// gives up after a few attempts and counts what it lost.
    #[test]
    fn dropping_a_log_whose_sink_keeps_failing_returns_and_counts_the_lost_lines() {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let log = batched(Flaky {
            failing,
            take: 0,
            out: Arc::default(),
        });
        let health = log.health.clone();
        record(&log, "/a");
        record(&log, "/b");
        drop(log);
        assert_eq!(health.lines_dropped.load(Ordering::Relaxed), 2);
        assert!(health.write_failures.load(Ordering::Relaxed) >= STOP_ATTEMPTS);
    }

    /// `[telemetry] decision_log_mask` accepts every field an audit line has
    /// (config.rs keeps its own list: config names no other module), and
    /// refuses a name that is not one.
    #[test]
    fn every_audit_field_can_be_masked_and_nothing_else() {
        let decision = Decision::new("GET", "/orders/7");
        let line =
            serde_json::to_value(AuditRecord::new(&decision, 200, &TraceIds::default())).unwrap();
        let fields: Vec<&String> = line.as_object().unwrap().keys().collect();
        assert!(fields.len() > 20, "{fields:?}");
        let config = |mask: &str| {
            let text = format!(
                "[policies]\ndir = \"policies\"\n[application]\nname = \"orders\"\n\
                 [[issuers]]\nissuer = \"https://idp.test\"\naudiences = [\"a\"]\n\
                 jwks_file = \"jwks.json\"\nmax_token_lifetime = \"15m\"\n\
                 [[routes]]\nmethod = \"GET\"\npath = \"/orders/{{id}}\"\n\
                 [telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\n\
                 decision_logs = true\ndecision_log_mask = {mask}\n"
            );
            crate::config::Config::from_toml(&text, Path::new("t.toml"), Path::new("/etc/p"))
        };
        let all = serde_json::to_string(&fields).unwrap();
        if let Err(e) = config(&all) {
            panic!("{e}");
        }
        let refused = config(r#"["principal", "subject"]"#)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("\"subject\" is not an audit line field"),
            "{refused}"
        );
    }
}
