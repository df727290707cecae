//! Traces: a span per request joined to the caller's trace, and OTLP export.
//!
//! The caller's context comes from the W3C `traceparent`/`tracestate` headers,
//! read through the global text-map propagator (W3C Trace Context). Spans are
//! `tracing` spans; when `[telemetry] otlp_endpoint` is set, the
//! `tracing-opentelemetry` layer turns Portcullis' own spans into OpenTelemetry
//! spans and a batch processor exports them over OTLP/gRPC. Without an endpoint
//! the spans exist for the logs only and nothing is exported.
//!
//! No token material is ever recorded: span fields are the decision's outcome,
//! reason, principal, action, policy ids, issuer and cache use.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tracing::Level;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Registry;
use tracing_subscriber::filter::FilterFn;

use crate::config::TelemetryConfig;
use crate::decision::Decision;

/// The layer that turns `tracing` spans into OpenTelemetry spans.
pub type OtelLayer = tracing_opentelemetry::OpenTelemetryLayer<Registry, SdkTracer>;

/// What the OpenTelemetry layer sees: Portcullis' own spans, down to `debug`
/// (the engine's stages are `debug` spans, so without export they cost
/// nothing), and its events at `info` and above (they become span events).
pub fn exported_spans() -> FilterFn {
    tracing_subscriber::filter::filter_fn(|meta| {
        meta.target().starts_with("portcullis")
            && if meta.is_span() {
                *meta.level() <= Level::DEBUG
            } else {
                *meta.level() <= Level::INFO
            }
    })
}

/// Errors starting trace export.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The OTLP exporter could not be built (an unusable endpoint).
    #[error("cannot export traces to telemetry.otlp_endpoint {endpoint:?}: {reason}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
}

/// Trace export as configured; [`TraceExport::shutdown`] flushes it.
#[derive(Debug)]
pub struct TraceExport {
    provider: Option<SdkTracerProvider>,
    /// Endpoint, service name and sampling ratio, for the log.
    endpoint: Option<(String, String, f64)>,
}

impl TraceExport {
    /// No export.
    pub fn none() -> TraceExport {
        TraceExport {
            provider: None,
            endpoint: None,
        }
    }

    /// Sets the W3C propagator and, when `otlp_endpoint` is set, builds the
    /// exporter and the layer that feeds it (to put in the subscriber). Must
    /// run inside the Tokio runtime (the gRPC channel is created on it).
    pub fn build(config: &TelemetryConfig) -> Result<(TraceExport, Option<OtelLayer>), TraceError> {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok((TraceExport::none(), None));
        };
        let exporter_error = |reason: String| TraceError::Exporter {
            endpoint: endpoint.clone(),
            reason,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| exporter_error(e.to_string()))?;
        let resource = resource(config);
        // Parent-based: a caller's sampled (or not sampled) flag is followed, so a
        // trace is either whole or absent; the ratio applies to new traces only.
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("portcullis"))
            .with_threads(false);
        Ok((
            TraceExport {
                provider: Some(provider),
                endpoint: Some((
                    endpoint.clone(),
                    config.service_name.clone(),
                    config.sampling_ratio,
                )),
            },
            Some(layer),
        ))
    }

    /// Logs where spans go (once the subscriber is installed).
    pub(crate) fn log_started(&self) {
        if let Some((endpoint, service_name, sampling_ratio)) = &self.endpoint {
            tracing::info!(
                endpoint = %endpoint,
                service_name = %service_name,
                sampling_ratio = *sampling_ratio,
                "exporting traces over OTLP/gRPC"
            );
        }
    }

    /// True when spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still queued and stops exporting (blocks up to the
    /// exporter's timeout; call it off the async threads).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "trace export did not flush cleanly");
        }
    }
}

/// The resource exported spans (and decision logs) describe: `service.name`,
/// `service.version`, the configured `resource_attributes`, and what the SDK
/// detects (`telemetry.sdk.*`, `OTEL_RESOURCE_ATTRIBUTES`).
pub(crate) fn resource(config: &TelemetryConfig) -> Resource {
    Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attributes(
            config
                .resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build()
}

/// The two W3C trace headers, as found.
struct Headers<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = Vec::new();
        if self.traceparent.is_some() {
            keys.push("traceparent");
        }
        if self.tracestate.is_some() {
            keys.push("tracestate");
        }
        keys
    }
}

/// The caller's trace context from `traceparent`/`tracestate` looked up with
/// `get`; `None` when absent or malformed. Always W3C Trace Context (what Envoy
/// sends), whether or not [`TraceExport::build`] ran: the audit line carries
/// the caller's trace id even when no span is exported.
pub fn remote_parent<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Context> {
    let headers = Headers {
        traceparent: get("traceparent"),
        tracestate: get("tracestate"),
    };
    let cx = TraceContextPropagator::new().extract(&headers);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The ids that tie an audit line to its trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceIds {
    /// W3C trace id (32 hex digits).
    pub trace_id: Option<String>,
    /// The request span's id (16 hex digits) when spans are recorded, else the
    /// caller's span id.
    pub span_id: Option<String>,
}

/// The span of one authorization request (an ext_authz `Check`, or any other
/// front end deciding with the engine), joined to the caller's trace.
///
/// Enter it (or instrument the decision future with it) while deciding, so the
/// engine's spans (token verification, cache lookups, policy evaluation,
/// introspection, key fetches) become its children.
#[derive(Debug, Clone)]
pub struct RequestSpan {
    span: tracing::Span,
    parent: Option<Context>,
}

impl RequestSpan {
    /// Starts the span for `operation` (its OpenTelemetry name, e.g.
    /// `portcullis.check`) under `parent`, the caller's context.
    pub fn start(operation: &str, parent: Option<Context>) -> RequestSpan {
        let span = tracing::info_span!(
            target: "portcullis::request",
            "request",
            otel.name = operation,
            otel.kind = "server",
            decision = Empty,
            reason = Empty,
            failed_check = Empty,
            principal = Empty,
            action = Empty,
            policies = Empty,
            issuer = Empty,
            credential = Empty,
            token_cache_hit = Empty,
            decision_cache_hit = Empty,
            decision_id = Empty,
            http.response.status_code = Empty,
            policy_generation = Empty,
            dry_run = Empty,
        );
        if let Some(parent) = &parent {
            // Fails only when no OpenTelemetry layer is installed: nothing to join.
            let _ = span.set_parent(parent.clone());
        }
        RequestSpan { span, parent }
    }

    /// The `tracing` span, to enter or instrument a future with.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The trace and span ids for the audit line: the exported span's when
    /// spans are recorded, else the caller's.
    pub fn ids(&self) -> TraceIds {
        let own = self.span.context();
        let own = own.span().span_context().clone();
        if own.is_valid() {
            return TraceIds {
                trace_id: Some(own.trace_id().to_string()),
                span_id: Some(own.span_id().to_string()),
            };
        }
        match &self.parent {
            Some(parent) => {
                let caller = parent.span().span_context().clone();
                TraceIds {
                    trace_id: Some(caller.trace_id().to_string()),
                    span_id: Some(caller.span_id().to_string()),
                }
            }
            None => TraceIds::default(),
        }
    }

    /// Records the decision's attributes on the span (never a token).
    pub fn record_decision(&self, decision: &Decision, http_status: u16) {
        let span = &self.span;
        // Nothing records a disabled span (no exporter, logs filtered): skip
        // building the attribute strings.
        if span.is_disabled() {
            return;
        }
        span.record("decision", decision.outcome());
        span.record("reason", decision.verdict.class());
        if let Some(failed) = decision.failed_check() {
            span.record("failed_check", failed.as_str());
        }
        if let Some(principal) = &decision.principal {
            span.record("principal", principal.as_str());
        }
        if let Some(action) = &decision.action {
            span.record("action", action.as_str());
        }
        if !decision.policies.is_empty() {
            span.record("policies", decision.policies.join(",").as_str());
        }
        if let Some(issuer) = &decision.issuer {
            span.record("issuer", issuer.as_str());
        }
        if let Some(credential) = decision.credential {
            span.record("credential", credential);
        }
        span.record("decision_id", decision.id.as_str());
        span.record("http.response.status_code", i64::from(http_status));
        // An integer attribute (a u64 would be exported as a string).
        span.record(
            "policy_generation",
            i64::try_from(decision.policy_generation).unwrap_or(i64::MAX),
        );
        span.record("dry_run", decision.dry_run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_extracted_and_garbage_is_not() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote_parent(|k| (k == "traceparent").then_some(header)).unwrap();
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(remote_parent(|k| (k == "traceparent").then_some("00-zz-yy-01")).is_none());
        assert!(remote_parent(|_| None).is_none());
    }
}
