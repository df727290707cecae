//! Prometheus metrics: decisions and their latency, counted as they are made,
//! and the engine's health (caches, keys, policies, revocations, Redis), read
//! from the counters the engine keeps when `/metrics` is scraped.
//!
//! Served as OpenMetrics text on a plain HTTP listener (`[telemetry]
//! metrics_listen`): `GET /metrics`. Labels never hold a token, a key or a
//! principal: only outcome and reason classes, cache names, issuer URLs and
//! revocation sources.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::audit::AuditLog;
use crate::decision::Decision;
use crate::engine::Engine;
use crate::reload::ReloadStats;
use crate::revocation::RedisState;

/// The content type of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type DecisionLabels = [(&'static str, &'static str); 2];

/// The metrics counted on the request path; the rest is read at scrape time.
#[derive(Debug)]
pub struct Metrics {
    decisions: Family<DecisionLabels, Counter>,
    check_duration: Histogram,
    /// Decision-cache counters of engines replaced by a reload (hits,
    /// misses), so the totals never go back. (The token cache belongs to the
    /// credential stage, which reloaded engines share: its counters live on.)
    retired_decisions: [AtomicU64; 2],
    /// Shared Signals events received ([`crate::ssf`]), by event and outcome.
    ssf_events: Family<DecisionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            decisions: Family::default(),
            // 50 µs to ~1.6 s.
            check_duration: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            retired_decisions: Default::default(),
            ssf_events: Family::default(),
        }
    }
}

impl Metrics {
    /// Counts one decision (called once per decision, with the audit line).
    pub fn record_decision(&self, decision: &Decision) {
        let outcome = decision.outcome();
        self.decisions
            .get_or_create(&[("outcome", outcome), ("reason", decision.verdict.class())])
            .inc();
        self.check_duration.observe(decision.elapsed.as_secs_f64());
    }

    /// Counts one Shared Signals event: `event` is its short name
    /// (`session-revoked`, `verification`, `other`, `unverified`...),
    /// `outcome` `applied`, `ignored` or `refused`.
    pub fn record_ssf_event(&self, event: &'static str, outcome: &'static str) {
        self.ssf_events
            .get_or_create(&[("event", event), ("outcome", outcome)])
            .inc();
    }

    /// Keeps the decision-cache counters of an engine a reload replaced.
    pub fn retire_engine(&self, engine: &Engine) {
        let decisions = engine.evaluator().decision_cache();
        let counters = [&decisions.hits, &decisions.misses];
        for (total, counter) in self.retired_decisions.iter().zip(counters) {
            total.fetch_add(counter.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// The OpenMetrics text of every metric, now.
    pub fn render(
        &self,
        engine: Option<&Engine>,
        audit: &AuditLog,
        reloads: &ReloadStats,
    ) -> String {
        let mut registry = Registry::with_prefix("portcullis");
        registry.register(
            "decisions",
            "Decisions by outcome (allow, deny, would_deny: a dry-run deny answered as allow) and reason class",
            self.decisions.clone(),
        );
        registry.register_with_unit(
            "check_duration",
            "Time from the request's attributes to its decision",
            Unit::Seconds,
            self.check_duration.clone(),
        );
        registry.register(
            "ssf_events",
            "Shared Signals (CAEP, RISC) events received, by event type and outcome (applied: revocations made; ignored: acknowledged, nothing to revoke; refused: the SET was rejected)",
            self.ssf_events.clone(),
        );
        register_state(&mut registry, self, engine, audit, reloads);
        let mut text = String::new();
        if let Err(e) = encode(&mut text, &registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        text
    }
}

fn counter(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

fn gauge(value: i64) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value);
    gauge
}

/// The engine's own counters and states, as metrics.
fn register_state(
    registry: &mut Registry,
    metrics: &Metrics,
    engine: Option<&Engine>,
    audit: &AuditLog,
    reloads: &ReloadStats,
) {
    registry.register(
        "ready",
        "1 when policies and keys are loaded and checks are decided",
        gauge(i64::from(engine.is_some())),
    );
    // Only when `[telemetry] decision_logs` is on.
    if let Some(logs) = audit.decision_log_stats() {
        registry.register(
            "decision_logs_exported",
            "Decision log records the OTLP collector accepted",
            counter(logs.exported),
        );
        registry.register(
            "decision_logs_dropped",
            "Decision log records dropped: the export queue was full (overflow drop), or still queued when shutdown gave up",
            counter(logs.dropped),
        );
        registry.register(
            "decision_logs_export_failures",
            "Decision log records given up: their batch failed every export attempt, or the collector rejected them",
            counter(logs.export_failures),
        );
        registry.register(
            "decision_logs_queued",
            "Decision log records waiting for export",
            gauge(i64::try_from(logs.queued).unwrap_or(i64::MAX)),
        );
    }
    let audit = audit.stats();
    registry.register(
        "audit_writer_up",
        "1 while the audit writer runs and its last write succeeded; 0 while checks are refused with audit_unavailable",
        gauge(i64::from(audit.writer_up)),
    );
    registry.register(
        "audit_write_failures",
        "Failed writes to the audit sink (each attempt; the lines are kept and retried)",
        counter(audit.write_failures),
    );
    registry.register(
        "audit_lines_dropped",
        "Audit lines lost: held by a writer that died, still unwritten when a failing sink was given up at shutdown, or a failed write-through write",
        counter(audit.lines_dropped),
    );
    registry.register(
        "audit_refused",
        "Requests refused (UNAVAILABLE, audit_unavailable) because the audit log could not take their decision",
        counter(audit.refused),
    );
    registry.register(
        "policy_reloads",
        "Policy sets swapped in by a reload",
        counter(reloads.reloads.load(Ordering::Relaxed)),
    );
    registry.register(
        "policy_reload_failures",
        "Policy changes rejected (the previous set kept serving)",
        counter(reloads.failures.load(Ordering::Relaxed)),
    );
    let Some(engine) = engine else {
        return;
    };
    registry.register(
        "policy_generation",
        "Generation of the policy set in force (1 at start, one more per reload)",
        gauge(i64::try_from(engine.generation()).unwrap_or(i64::MAX)),
    );

    // Shared by an engine and the engines reloaded from it: process totals.
    let verifications = engine.authenticator().counters();
    registry.register(
        "credential_verifications",
        "Runs of the credential stage (one per Check or IsAuthorized call, one per BatchIsAuthorized call whatever its size)",
        counter(verifications.credentials.load(Ordering::Relaxed)),
    );
    registry.register(
        "signature_verifications",
        "JWT signatures verified (verified-token cache misses)",
        counter(verifications.signatures.load(Ordering::Relaxed)),
    );

    let tokens = engine.authenticator().token_cache();
    let decisions = engine.evaluator().decision_cache();
    let live = [
        tokens.hits.load(Ordering::Relaxed),
        tokens.misses.load(Ordering::Relaxed),
        decisions.hits.load(Ordering::Relaxed),
        decisions.misses.load(Ordering::Relaxed),
    ];
    let retired = [
        0,
        0,
        metrics.retired_decisions[0].load(Ordering::Relaxed),
        metrics.retired_decisions[1].load(Ordering::Relaxed),
    ];
    let total = |i: usize| live[i] + retired[i];
    let hits = Family::<[(&'static str, &'static str); 1], Counter>::default();
    let misses = Family::<[(&'static str, &'static str); 1], Counter>::default();
    hits.get_or_create(&[("cache", "token")]).inc_by(total(0));
    misses.get_or_create(&[("cache", "token")]).inc_by(total(1));
    hits.get_or_create(&[("cache", "decision")])
        .inc_by(total(2));
    misses
        .get_or_create(&[("cache", "decision")])
        .inc_by(total(3));
    registry.register("cache_hits", "Cache hits, per cache", hits);
    registry.register("cache_misses", "Cache misses, per cache", misses);

    let refreshes = Family::<[(&'static str, String); 1], Counter>::default();
    let failures = Family::<[(&'static str, String); 1], Counter>::default();
    let unknown_kid = Family::<[(&'static str, String); 1], Counter>::default();
    for issuer in engine
        .authenticator()
        .issuers()
        .iter()
        .filter(|i| i.keys.is_remote())
    {
        let labels = [("issuer", issuer.issuer.clone())];
        let keys = &issuer.keys.stats;
        refreshes
            .get_or_create(&labels)
            .inc_by(keys.refreshes.load(Ordering::Relaxed));
        failures
            .get_or_create(&labels)
            .inc_by(keys.failures.load(Ordering::Relaxed));
        unknown_kid
            .get_or_create(&labels)
            .inc_by(keys.unknown_kid_refreshes.load(Ordering::Relaxed));
    }
    registry.register(
        "jwks_refreshes",
        "Successful fetches of a remote issuer's keys, per issuer",
        refreshes,
    );
    registry.register(
        "jwks_refresh_failures",
        "Failed fetches of a remote issuer's keys, per issuer",
        failures,
    );
    registry.register(
        "jwks_unknown_kid_refreshes",
        "Key fetches triggered by a token with an unknown kid, per issuer",
        unknown_kid,
    );

    let lists = &engine.authenticator().status_lists.stats;
    let fetches = Family::<[(&'static str, &'static str); 1], Counter>::default();
    for (outcome, count) in [
        ("ok", &lists.ok),
        ("unreachable", &lists.unreachable),
        ("invalid", &lists.invalid),
    ] {
        fetches
            .get_or_create(&[("outcome", outcome)])
            .inc_by(count.load(Ordering::Relaxed));
    }
    registry.register(
        "status_list_fetches",
        "Fetches of Token Status Lists, by outcome: ok, unreachable (connection, timeout, non-2xx) or invalid (the list was refused)",
        fetches,
    );

    let Some(store) = engine.authenticator().revocations() else {
        return;
    };
    let status = store.status();
    let applied = Family::<[(&'static str, &'static str); 1], Counter>::default();
    applied
        .get_or_create(&[("source", "local")])
        .inc_by(store.stats.applied_local.load(Ordering::Relaxed));
    applied
        .get_or_create(&[("source", "redis")])
        .inc_by(store.stats.applied_remote.load(Ordering::Relaxed));
    registry.register(
        "revocations_applied",
        "Revocations put in force on this instance: by its admin API (local) or received from Redis",
        applied,
    );
    registry.register_with_unit(
        "revocation_propagation_lag",
        "From a revocation's creation (whole seconds, on the revoking instance) to its arrival here through Redis pub/sub",
        Unit::Seconds,
        store.stats.propagation_lag.clone(),
    );
    registry.register(
        "revocations_in_force",
        "Revocation entries in force",
        gauge(i64::try_from(status.revocations).unwrap_or(i64::MAX)),
    );
    registry.register(
        "revocation_max_entries",
        "[revocation] max_entries: local revocations beyond it are refused",
        gauge(i64::try_from(store.max_entries()).unwrap_or(i64::MAX)),
    );
    let refused = Family::<[(&'static str, &'static str); 1], Counter>::default();
    refused
        .get_or_create(&[("reason", "max_entries")])
        .inc_by(store.stats.refused_full.load(Ordering::Relaxed));
    refused
        .get_or_create(&[("reason", "max_pending_writes")])
        .inc_by(store.stats.refused_queue_full.load(Ordering::Relaxed));
    registry.register(
        "revocations_refused",
        "Local revocations refused, not applied (RESOURCE_EXHAUSTED), by the limit reached",
        refused,
    );
    registry.register(
        "revocations_accepted_over_cap",
        "Revocations from other instances (or the journal) enforced although [revocation] max_entries were in force",
        counter(store.stats.accepted_over_cap.load(Ordering::Relaxed)),
    );
    registry.register(
        "revocation_journal_compactions",
        "Compactions of the revocation journal while running (expired and repeated lines dropped)",
        counter(store.stats.journal_compactions.load(Ordering::Relaxed)),
    );
    registry.register(
        "revocation_pending_writes",
        "Local revocations not yet written to Redis",
        gauge(i64::try_from(status.pending_writes).unwrap_or(i64::MAX)),
    );
    if status.redis != RedisState::Disabled {
        registry.register(
            "redis_connected",
            "1 while subscribed to Redis and in sync, else 0",
            gauge(i64::from(status.redis == RedisState::Connected)),
        );
        let resyncs = Family::<[(&'static str, &'static str); 1], Counter>::default();
        resyncs
            .get_or_create(&[("kind", "full")])
            .inc_by(store.stats.resyncs_full.load(Ordering::Relaxed));
        resyncs
            .get_or_create(&[("kind", "incremental")])
            .inc_by(store.stats.resyncs_incremental.load(Ordering::Relaxed));
        registry.register(
            "revocation_resyncs",
            "Syncs with Redis: full (the whole snapshot read) or incremental (only the log after this instance's position)",
            resyncs,
        );
        registry.register(
            "revocation_resync_entries_read",
            "Entries read from Redis by syncs (snapshot members or log entries)",
            counter(store.stats.resync_entries_read.load(Ordering::Relaxed)),
        );
    }
}

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listen address could not be bound.
    #[error("cannot listen on telemetry.metrics_listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The running `/metrics` listener.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The bound address (useful when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting scrapes.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

/// Connections the metrics listener serves at once; more wait in the kernel's
/// accept queue. A scraper needs one or two.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a client may take to send a request head before the connection is
/// closed (a client that never finishes one would otherwise hold it forever).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head read; a larger one closes the connection. A
/// scrape's is a few hundred bytes.
pub const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;

/// What the metrics endpoint renders ([`crate::state::ServerState`] in the
/// server).
pub trait MetricsSource: Send + Sync {
    /// The OpenMetrics text of every metric, now.
    fn render_metrics(&self) -> String;
}

/// Serves `GET /metrics` for `state` on `addr` (HTTP/1.1, no TLS: bind it to
/// an address only the scraper reaches), within [`MAX_CONNECTIONS`],
/// [`HEADER_READ_TIMEOUT`] and [`MAX_REQUEST_HEAD_BYTES`].
pub async fn serve(
    addr: SocketAddr,
    state: Arc<dyn MetricsSource>,
) -> Result<MetricsServer, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    serve_on(listener, state)
}

/// [`serve`] on a listener the caller bound.
pub fn serve_on(
    listener: TcpListener,
    state: Arc<dyn MetricsSource>,
) -> Result<MetricsServer, MetricsError> {
    let local_addr = listener.local_addr().map_err(|source| MetricsError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let (tx, mut rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            // A free slot first: at the cap, new connections wait to be accepted.
            let slot = tokio::select! {
                _ = &mut rx => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                _ = &mut rx => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        continue;
                    }
                },
            };
            let state = state.clone();
            connections.spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&request, state.as_ref())) }
                });
                // A scraper that hangs up mid-response is not our problem.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_REQUEST_HEAD_BYTES)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            // Reap finished connections so the set does not grow.
            while connections.try_join_next().is_some() {}
        }
        connections.abort_all();
    });
    Ok(MetricsServer {
        local_addr,
        shutdown: Some(tx),
        task,
    })
}

fn respond<B>(request: &Request<B>, state: &dyn MetricsSource) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, state.render_metrics()),
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at /metrics\n".into(),
        ),
    }
}
