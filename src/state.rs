//! What the front ends share while serving: the engine in force (swapped
//! atomically by reloads), the audit log, the request-path metrics, the reload
//! statistics and health.
//!
//! The adapters ([`crate::ext_authz`], [`crate::authorizer`], [`crate::admin`])
//! and the listeners ([`crate::server`], the metrics endpoint) receive an
//! `Arc<ServerState>`; this module knows none of them, nor any wire type.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::audit::{AuditLog, AuditUnavailable};
use crate::decision::Decision;
use crate::engine::Engine;
use crate::reload::{EngineSlot, ReloadStats};
use crate::telemetry::metrics::{Metrics, MetricsSource};
use crate::telemetry::traces::RequestSpan;

/// State shared by the services: the current engine, the audit log, metrics
/// and health.
#[derive(Debug)]
pub struct ServerState {
    engine: ArcSwapOption<Engine>,
    audit: AuditLog,
    health: HealthReporter,
    reloads: ReloadStats,
    /// The services health reports on (`""` is the server as a whole).
    health_services: &'static [&'static str],
    metrics: Metrics,
    /// Set by a drain or shutdown: health stays NOT_SERVING from then on.
    draining: std::sync::atomic::AtomicBool,
}

impl ServerState {
    /// A state with no engine yet, reporting to `health` on `health_services`
    /// (call [`Self::set_health`] or [`Self::install`] to report).
    pub fn new(
        audit: AuditLog,
        health: HealthReporter,
        health_services: &'static [&'static str],
    ) -> ServerState {
        ServerState {
            engine: ArcSwapOption::empty(),
            audit,
            health,
            reloads: ReloadStats::default(),
            metrics: Metrics::default(),
            health_services,
            draining: Default::default(),
        }
    }

    /// The engine in force, or `None` before one is installed.
    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.engine.load_full()
    }

    /// What policy reloads have done.
    pub fn reload_stats(&self) -> &ReloadStats {
        &self.reloads
    }

    /// The decision log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The metrics counted on the request path.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Accounts for a final decision, in one place for every front end (ext_authz
    /// `Check` and any other service deciding with the engine): the audit line
    /// (with the trace ids), the metrics, and the request span's attributes are
    /// all derived from the same `decision`, so they cannot disagree.
    pub fn account(&self, decision: &Decision, http_status: u16, span: &RequestSpan) {
        self.audit.record_traced(decision, http_status, &span.ids());
        self.metrics.record_decision(decision);
        span.record_decision(decision, http_status);
    }

    /// [`Self::account`] inside the request's span, plus the debug log line
    /// every door writes; `door` names it (`check`, `http_authz`, ...).
    /// `http_status` is what the caller got (a response profile may change a
    /// deny's status).
    pub fn account_in_span(
        &self,
        decision: &Decision,
        http_status: u16,
        span: &RequestSpan,
        door: &'static str,
    ) {
        span.span().in_scope(|| {
            self.account(decision, http_status, span);
            tracing::debug!(
                decision_id = %decision.id,
                outcome = decision.verdict.class(),
                principal = decision.principal.as_deref().unwrap_or(""),
                action = decision.action.as_deref().unwrap_or(""),
                method = %decision.method,
                door,
                "decision"
            );
        });
    }

    /// Publishes `engine` to new checks and reports SERVING (unless the audit
    /// log cannot take decisions, see [`ServerState::audit_ready`]).
    pub async fn install(&self, engine: Engine) {
        self.engine.store(Some(Arc::new(engine)));
        self.refresh_health().await;
    }

    /// Fails closed when the audit log cannot record the decision about to be
    /// made (its writer stopped, its sink is failing, or it is too far behind
    /// after a bounded, asynchronous wait): the front end answers
    /// `UNAVAILABLE` with `audit_unavailable` and no decision is made. Awaited
    /// by every front end before it decides.
    pub async fn audit_ready(&self) -> Result<(), AuditUnavailable> {
        self.audit.ready().await
    }

    /// The OpenMetrics text of every metric, now.
    pub fn render_metrics(&self) -> String {
        self.metrics
            .render(self.engine().as_deref(), &self.audit, &self.reloads)
    }

    /// SERVING when an engine is installed, the server is not draining and
    /// the audit writer is up; NOT_SERVING otherwise.
    pub(crate) async fn refresh_health(&self) {
        let serving = self.engine.load().is_some()
            && !self.draining.load(std::sync::atomic::Ordering::SeqCst)
            && self.audit.stats().writer_up;
        self.set_health(if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        })
        .await;
    }

    /// Stops reporting SERVING for good (drain, shutdown).
    pub(crate) async fn stop_serving(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.set_health(ServingStatus::NotServing).await;
    }

    /// Publishes a reloaded engine atomically: new checks use it, checks in
    /// flight finish on the engine they started with. Health is unchanged.
    pub fn replace_engine(&self, engine: Engine) {
        if let Some(previous) = self.engine.swap(Some(Arc::new(engine))) {
            // Its caches go with it; their counters stay in the totals.
            self.metrics.retire_engine(&previous);
        }
    }

    pub(crate) async fn set_health(&self, status: ServingStatus) {
        for service in self.health_services {
            self.health.set_service_status(service, status).await;
        }
    }
}

impl EngineSlot for ServerState {
    fn current(&self) -> Option<Arc<Engine>> {
        self.engine()
    }

    fn replace(&self, engine: Engine) {
        self.replace_engine(engine);
    }

    fn reload_stats(&self) -> &ReloadStats {
        &self.reloads
    }
}

impl MetricsSource for ServerState {
    fn render_metrics(&self) -> String {
        ServerState::render_metrics(self)
    }
}
