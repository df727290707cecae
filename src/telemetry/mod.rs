//! Telemetry: application logs (standard error, plain or JSON), trace export
//! over OTLP with the caller's trace context ([`traces`]), and the Prometheus
//! endpoint ([`metrics`]).
//!
//! Decisions are not logged here: they go to the audit sink ([`crate::audit`]).
//! One global subscriber carries both the log layer and, when `[telemetry]
//! otlp_endpoint` is set, the OpenTelemetry layer; so `main` builds it once the
//! configuration of `serve` is known (see [`init`]).

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
    // By default the per-request span is not kept for the log layer: it only
    // serves trace export (which has its own filter), and formatting its
    // fields for logs would cost every request a few allocations.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,portcullis::request=off"));
    // Only Portcullis' own spans are exported: not those of h2, hyper or tonic.
    // Without export there is no layer, so the engine's `debug` spans stay off.
    let otel = otel.map(|layer| layer.with_filter(traces::exported_spans()));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in files or log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Plain => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    if Registry::default().with(otel).with(fmt).try_init().is_err() {
        // A subscriber is already installed (tests, a library user): it is
        // kept, and there is nothing to export to.
        export.shutdown();
        return Ok(TraceExport::none());
    }
    export.log_started();
    Ok(export)
}
