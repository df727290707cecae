//! Telemetry: application logs (standard error, plain or JSON), trace export
//! over OTLP with the caller's trace context ([`traces`]), decision logs over
//! OTLP ([`decision_logs`]), and the Prometheus endpoint ([`metrics`]).
//!
//! Decisions are not logged here: they go to the audit sink ([`crate::audit`]).
//! One global subscriber carries both the log layer and, when `[telemetry]
//! otlp_endpoint` is set, the OpenTelemetry layer; so `main` builds it once the
//! configuration of `serve` is known (see [`init`]).

pub mod decision_logs;
pub mod metrics;
pub mod traces;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry};

use crate::cli::LogFormat;
use crate::config::TelemetryConfig;
use traces::{TraceError, TraceExport};

/// Installs the global subscriber, logs only; `RUST_LOG` overrides the default
/// `info` level.
pub fn init_logging(format: LogFormat) {
    let _ = init(format, None);
}

/// Installs the global subscriber: the application log in `format`, and span
/// export as `telemetry` says (none without it, or without an endpoint). Flush
/// what it returns with [`TraceExport::shutdown`] before exiting. Must run
/// inside the Tokio runtime when an endpoint is set.
///
/// `RUST_LOG` sets the log level (default `info`); it does not change which
/// spans are exported (Portcullis' own, down to `debug`).
pub fn init(
    format: LogFormat,
    telemetry: Option<&TelemetryConfig>,
) -> Result<TraceExport, TraceError> {
    let (export, otel) = match telemetry {
        Some(config) => TraceExport::build(config)?,
        None => (TraceExport::none(), None),
    };
    if subscriber(format, otel).try_init().is_err() {
        // A subscriber is already installed (tests, a library user): it is
        // kept, and there is nothing to export to.
        export.shutdown();
        return Ok(TraceExport::none());
    }
    export.log_started();
    Ok(export)
}

/// The global subscriber: the log layer in `format`, plus `otel` when spans
/// are exported.
fn subscriber(
    format: LogFormat,
    otel: Option<traces::OtelLayer>,
) -> impl tracing::Subscriber + Send + Sync {
    // By default the per-request span is not kept for the log layer: it only
    // serves trace export (which has its own filter), and formatting its
    // fields for logs would cost every request a few allocations.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,portcullis::request=off"));
    // Only Portcullis' own spans are exported: not those of h2, hyper or tonic.
    // Without export there is no layer, so the engine's `debug` spans stay off.
    // A list rather than an `Option` layer: a `None` layer would keep every
    // span alive (the request span included), for nothing.
    let mut layers = Vec::new();
    if let Some(otel) = otel {
        layers.push(otel.with_filter(traces::exported_spans()).boxed());
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in files or log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    layers.push(match format {
        LogFormat::Plain => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    });
    Registry::default().with(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use traces::RequestSpan;

    // One test, so the two subscribers are never live at once (callsite
    // interest is global).
    #[test]
    fn the_request_span_is_recorded_only_for_export() {
        tracing::subscriber::with_default(subscriber(LogFormat::Plain, None), || {
            let span = RequestSpan::start("portcullis.check", None);
            assert!(span.span().is_disabled(), "no layer wants the request span");
            assert!(tracing::debug_span!("evaluate_policies").is_disabled());
            // Logs still work.
            assert!(tracing::enabled!(tracing::Level::INFO));
        });

        use opentelemetry::trace::TracerProvider as _;
        let tracer = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .build()
            .tracer("test");
        let otel = tracing_opentelemetry::layer().with_tracer(tracer);
        tracing::subscriber::with_default(subscriber(LogFormat::Plain, Some(otel)), || {
            let span = RequestSpan::start("portcullis.check", None);
            assert!(!span.span().is_disabled());
            assert!(!tracing::debug_span!("evaluate_policies").is_disabled());
            // Other crates' debug spans are neither exported nor logged.
            assert!(tracing::debug_span!(target: "h2", "frame").is_disabled());
        });
    }
}
