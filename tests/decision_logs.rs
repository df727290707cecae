//! Decision logs over OpenTelemetry (`[telemetry] decision_logs`), as an
//! operator runs them: the `portcullis serve` binary exports to an OTLP/gRPC
//! collector served by the test itself (LogsService and TraceService on one
//! loopback port). Each audit record arrives as a log record with the audit
//! line's fields and the ids of the request's exported `portcullis.check`
//! span; masked fields arrive as "masked"; a collector that is down or slow
//! never fails a request in `drop` mode (the losses are counted), and `block`
//! mode refuses what it cannot queue.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::otlp::{Collector as TraceCollector, attribute};
use common::served::Served;
use common::*;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use serde_json::{Value, json};

/// The logs half of the in-test collector: keeps every export.
#[derive(Clone, Default)]
struct LogsCollector {
    requests: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
}

#[tonic::async_trait]
impl LogsService for LogsCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

impl LogsCollector {
    fn records(&self) -> Vec<LogRecord> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_logs)
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| s.log_records.clone())
            .collect()
    }

    /// The resource attributes of every export, as text.
    fn resource_attributes(&self) -> Vec<(String, String)> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_logs)
            .filter_map(|r| r.resource.as_ref())
            .flat_map(|r| &r.attributes)
            .map(|kv| (kv.key.clone(), common::otlp::any_text(kv.value.as_ref())))
            .collect()
    }

    fn dump(&self) -> String {
        format!("{:?}", self.requests.lock().unwrap())
    }
}

/// One collector for traces and logs, on a loopback port.
async fn start_collector() -> (TraceCollector, LogsCollector, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let traces = TraceCollector::default();
    let logs = LogsCollector::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(traces.clone()))
            .add_service(LogsServiceServer::new(logs.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (traces, logs, addr)
}

/// A loopback address nothing listens on: a collector that is down.
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A fixture exporting to `endpoint` with decision logs on, plus `extra`
/// lines in `[telemetry]`.
fn fixture(endpoint: SocketAddr, extra: &str) -> Fixture {
    let fx = Fixture::new();
    fx.append_config(&format!(
        "\n[audit]\nfile = \"audit.log\"\n\n[telemetry]\notlp_endpoint = \"http://{endpoint}\"\n\
         metrics_listen = \"127.0.0.1:0\"\ndecision_logs = true\n{extra}\n"
    ));
    fx
}

fn check_with_traceparent(request: CheckRequest, trace_id: &str) -> tonic::Request<CheckRequest> {
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    request
}

/// A log record's attribute as JSON (what the audit line holds).
fn json_of(value: Option<&AnyValue>) -> Value {
    match value.and_then(|v| v.value.as_ref()) {
        None => Value::Null,
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(|v| json_of(Some(v))).collect())
        }
        Some(any_value::Value::KvlistValue(l)) => Value::Object(
            l.values
                .iter()
                .map(|kv| (kv.key.clone(), json_of(kv.value.as_ref())))
                .collect(),
        ),
        Some(other) => panic!("unexpected value {other:?}"),
    }
}

/// The record's attributes as one JSON object.
fn fields_of(record: &LogRecord) -> serde_json::Map<String, Value> {
    record
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), json_of(kv.value.as_ref())))
        .collect()
}

fn record_of<'a>(records: &'a [LogRecord], decision_id: &str) -> &'a LogRecord {
    records
        .iter()
        .find(|r| fields_of(r)["decision_id"] == decision_id)
        .unwrap_or_else(|| panic!("no log record for {decision_id}"))
}

/// The value of the sample `name` (no labels) on the metrics endpoint.
async fn metric(served: &Served, name: &str) -> f64 {
    let text = scrape_metrics(served.metrics.expect("metrics endpoint")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

async fn wait_for_metric(served: &Served, name: &str, expected: f64) {
    for _ in 0..300 {
        if metric(served, name).await == expected {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "{name} stayed {} (expected {expected})",
        metric(served, name).await
    );
}

/// An allow and a policy deny, each joined to a caller's trace, and an allow
/// without a caller: each arrives as one log record whose fields are the
/// audit line's (null ones left out), whose trace and span ids are those of
/// the exported `portcullis.check` span of the same decision, under the spans'
/// resource; no token anywhere.
#[tokio::test]
async fn decision_logs_carry_the_audit_fields_and_join_the_check_spans() {
    let (traces, logs, addr) = start_collector().await;
    let fx = fixture(addr, "service_name = \"orders-authz\"");
    let served = Served::start(
        &fx,
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;
    let alice = fx.es256().token("alice", &["orders:read"], &[]);
    let allowed = served
        .check(check_with_traceparent(
            envoy_request("GET", "/orders/7", Some(&alice)),
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ))
        .await;
    assert_eq!(allowed.http_status, 200);
    let denied = served
        .check(check_with_traceparent(
            envoy_request("POST", "/orders", Some(&alice)),
            "0af7651916cd43dd8448eb211c80319c",
        ))
        .await;
    assert_eq!(denied.http_status, 403);
    let untraced = served
        .check(tonic::Request::new(envoy_request(
            "GET",
            "/orders/8",
            Some(&alice),
        )))
        .await;
    assert_eq!(untraced.http_status, 200);
    let ids = [&allowed, &denied, &untraced].map(|o| o.decision_id.clone());

    wait_for("three decision log records", || logs.records().len() >= 3).await;
    wait_for("three check spans", || {
        traces
            .spans()
            .iter()
            .filter(|s| s.name == "portcullis.check")
            .count()
            >= 3
    })
    .await;
    wait_for_metric(&served, "portcullis_decision_logs_exported_total", 3.0).await;
    assert_eq!(
        metric(&served, "portcullis_decision_logs_dropped_total").await,
        0.0
    );
    assert_eq!(
        metric(&served, "portcullis_decision_logs_export_failures_total").await,
        0.0
    );
    let records = logs.records();
    assert_eq!(records.len(), 3, "one record per decision");
    let spans = traces.spans();
    for id in &ids {
        let record = record_of(&records, id);
        // The same fields as the audit line, with the same values.
        let line = fx.audit_line(id);
        let expected: serde_json::Map<String, Value> = line
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(fields_of(record), expected, "record of {id}");
        assert_eq!(record.severity_text, "INFO");
        assert_eq!(record.severity_number, 9, "SEVERITY_NUMBER_INFO");
        assert_eq!(
            record.time_unix_nano,
            line["ts_ms"].as_u64().unwrap() * 1_000_000
        );
        // Joined to the exported span of the same request.
        let span = spans
            .iter()
            .find(|s| {
                s.name == "portcullis.check" && attribute(s, "decision_id").as_deref() == Some(id)
            })
            .unwrap_or_else(|| panic!("no check span for {id}"));
        assert_eq!(record.trace_id, span.trace_id, "trace id of {id}");
        assert_eq!(record.span_id, span.span_id, "span id of {id}");
        assert_eq!(record.span_id.len(), 8);
    }
    // The callers' traces are the records' traces.
    assert_eq!(
        hex::encode(&record_of(&records, &ids[0]).trace_id),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        fields_of(record_of(&records, &ids[1]))["reason"],
        "policy_denied"
    );
    assert_eq!(fields_of(record_of(&records, &ids[0]))["outcome"], "allow");
    // The spans' resource.
    let resource = logs.resource_attributes();
    assert!(resource.contains(&("service.name".into(), "orders-authz".into())));
    assert!(resource.iter().any(|(k, _)| k == "service.version"));
    // No token material.
    let dump = logs.dump();
    assert!(!dump.contains(&alice));
    assert!(!dump.contains(alice.rsplit('.').next().unwrap()));
    served.stop().await;
}

/// Masked fields arrive as "masked" (the audit line keeps them); the real
/// values appear nowhere in what was exported as logs.
#[tokio::test]
async fn masked_fields_arrive_as_masked() {
    let (_traces, logs, addr) = start_collector().await;
    let fx = fixture(
        addr,
        "decision_log_mask = [\"principal\", \"path\", \"jti\"]",
    );
    let served = Served::start(&fx, &[("OTEL_BLRP_SCHEDULE_DELAY", "50")]).await;
    let token = fx.es256().token("mallory-7c1e", &["orders:read"], &[]);
    let out = served
        .check(tonic::Request::new(envoy_request(
            "GET",
            "/orders/90817",
            Some(&token),
        )))
        .await;
    assert_eq!(out.http_status, 200);
    wait_for("the log record", || !logs.records().is_empty()).await;
    let records = logs.records();
    let fields = fields_of(record_of(&records, &out.decision_id));
    assert_eq!(fields["principal"], "masked");
    assert_eq!(fields["path"], "masked");
    // The test issuer's jti names the subject.
    assert_eq!(fields["jti"], "masked");
    assert_eq!(fields["method"], "GET", "unmasked fields are sent");
    let line = fx.audit_line(&out.decision_id);
    assert_eq!(line["principal"], "User::\"mallory-7c1e\"");
    assert_eq!(line["path"], "/orders/90817");
    let dump = logs.dump();
    assert!(!dump.contains("mallory-7c1e"), "{dump}");
    assert!(!dump.contains("/orders/90817"), "{dump}");
    served.stop().await;
}

/// A collector that is down: every check is still answered, health stays
/// SERVING, and each record is counted as given up once its batch has
/// failed every attempt; nothing counts as exported.
#[tokio::test]
async fn with_the_collector_down_checks_are_answered_and_failures_counted() {
    let fx = fixture(closed_port(), "");
    let served = Served::start(&fx, &[("OTEL_BLRP_SCHEDULE_DELAY", "50")]).await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    for i in 0..4 {
        let out = served
            .check(tonic::Request::new(envoy_request(
                "GET",
                &format!("/orders/{i}"),
                Some(&token),
            )))
            .await;
        assert_eq!(out.http_status, 200);
    }
    wait_for_metric(
        &served,
        "portcullis_decision_logs_export_failures_total",
        4.0,
    )
    .await;
    assert_eq!(
        metric(&served, "portcullis_decision_logs_exported_total").await,
        0.0
    );
    assert_eq!(
        served.health().await,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_eq!(fx.audit_lines().len(), 4, "the audit trail is complete");
    served.stop().await;
}

/// `drop` mode with a queue of 3 and a batch delay longer than the test:
/// the records beyond the queue are dropped and counted while every check is
/// answered, and shutdown exports the three queued.
#[tokio::test]
async fn a_full_queue_drops_and_counts_and_shutdown_exports_the_rest() {
    let (_traces, logs, addr) = start_collector().await;
    let fx = fixture(
        addr,
        "decision_log_queue = 3\ndecision_log_overflow = \"drop\"",
    );
    let served = Served::start(&fx, &[("OTEL_BLRP_SCHEDULE_DELAY", "600000")]).await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let mut ids = Vec::new();
    for i in 0..7 {
        let out = served
            .check(tonic::Request::new(envoy_request(
                "GET",
                &format!("/orders/{i}"),
                Some(&token),
            )))
            .await;
        assert_eq!(out.http_status, 200);
        ids.push(out.decision_id);
    }
    assert_eq!(
        metric(&served, "portcullis_decision_logs_dropped_total").await,
        4.0
    );
    assert_eq!(
        metric(&served, "portcullis_decision_logs_queued").await,
        3.0
    );
    assert!(logs.records().is_empty(), "exported before the batch delay");
    served.stop().await;
    let exported: Vec<Value> = logs
        .records()
        .iter()
        .map(|r| fields_of(r)["decision_id"].clone())
        .collect();
    assert_eq!(exported, ids[..3], "the first three, flushed at shutdown");
}

/// `block` mode: with the queue full (batch delay longer than the test), a
/// request waits for room, then is refused (UNAVAILABLE, audit_unavailable)
/// rather than decided without its record; shutdown exports the queued two.
#[tokio::test]
async fn block_mode_refuses_what_it_cannot_queue() {
    let (_traces, logs, addr) = start_collector().await;
    let fx = fixture(
        addr,
        "decision_log_queue = 2\ndecision_log_overflow = \"block\"",
    );
    let served = Served::start(&fx, &[("OTEL_BLRP_SCHEDULE_DELAY", "600000")]).await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    for i in 0..2 {
        let out = served
            .check(tonic::Request::new(envoy_request(
                "GET",
                &format!("/orders/{i}"),
                Some(&token),
            )))
            .await;
        assert_eq!(out.http_status, 200);
    }
    let refused = AuthorizationClient::new(served.channel.clone())
        .check(envoy_request("GET", "/orders/3", Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("audit_unavailable"),
        "{}",
        refused.message()
    );
    assert_eq!(metric(&served, "portcullis_audit_refused_total").await, 1.0);
    assert_eq!(
        metric(&served, "portcullis_decision_logs_dropped_total").await,
        0.0
    );
    assert_eq!(fx.audit_lines().len(), 2, "no decision was made");
    served.stop().await;
    assert_eq!(logs.records().len(), 2);
}

/// Decision logs need an endpoint, and a mask names audit fields only: both
/// are refused when the configuration loads.
#[test]
fn decision_logs_without_an_endpoint_or_with_an_unknown_mask_field_are_refused() {
    for (telemetry, expected) in [
        (
            "decision_logs = true\n",
            "telemetry.decision_logs needs telemetry.otlp_endpoint",
        ),
        (
            "otlp_endpoint = \"http://127.0.0.1:4317\"\ndecision_logs = true\ndecision_log_mask = [\"principal\", \"subject\"]\n",
            "\"subject\" is not an audit line field",
        ),
    ] {
        let fx = Fixture::new();
        fx.append_config(&format!("\n[telemetry]\n{telemetry}"));
        let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "accepted: {telemetry}");
        assert!(
            stderr.contains(expected) || stdout.contains(expected),
            "{expected} not in:\n{stderr}{stdout}"
        );
    }
}
