//! Observability as an operator sees it: spans exported to an OTLP collector
//! (one running inside the test), joined to the caller's trace; the Prometheus
//! endpoint scraped over HTTP; the audit line of each kind of decision.
//!
//! Trace and metrics tests run the `portcullis serve` binary (tracing setup is
//! process-wide, and this is what users run); audit tests run the server
//! in-process.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use common::idp::TestIdp;
use common::otlp::{Collector, attribute};
use common::served::Served;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::Value;

/// A `traceparent` as Envoy's ext_authz client span sends it.
fn traceparent(trace_id: &str, parent_span_id: &str) -> String {
    format!("00-{trace_id}-{parent_span_id}-01")
}

fn with_metadata(
    request: CheckRequest,
    key: &'static str,
    value: &str,
) -> tonic::Request<CheckRequest> {
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert(key, value.parse().unwrap());
    request
}

fn audit_lines_of(fx: &Fixture) -> Vec<Value> {
    fx.audit_lines()
}

// ---------------------------------------------------------------------------
// Traces.

/// Envoy's ext_authz span context in the gRPC metadata: the Check span is its
/// child, the engine's spans are the Check span's children, the audit line
/// names the same trace and span, and spans still queued are flushed when the
/// server stops (the batch delay here is far longer than the test).
#[tokio::test]
async fn check_span_joins_the_trace_in_grpc_metadata_and_is_flushed_on_shutdown() {
    let (collector, addr) = Collector::start().await;
    let fx = Fixture::new();
    fx.append_config(&format!(
        "\n[audit]\nfile = \"audit.log\"\n\n[telemetry]\notlp_endpoint = \"http://{addr}\"\nservice_name = \"orders-authz\"\nresource_attributes = {{ \"deployment.environment\" = \"test\" }}\n"
    ));
    let served = Served::start(&fx, &[("OTEL_BSP_SCHEDULE_DELAY", "600000")]).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let out = served
        .check(with_metadata(
            envoy_request("GET", "/orders/7", Some(&token)),
            "traceparent",
            &traceparent(trace_id, parent),
        ))
        .await;
    assert_eq!(out.http_status, 200);
    // Nothing is sent before shutdown with a 10-minute batch delay...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        collector.spans().is_empty(),
        "exported before the batch delay"
    );
    served.stop().await;
    // ... and everything is sent at shutdown.
    let check = &exported_span(&collector, "portcullis.check").await;
    let spans = collector.spans();
    assert_eq!(hex::encode(&check.trace_id), trace_id);
    assert_eq!(hex::encode(&check.parent_span_id), parent);
    assert_eq!(attribute(check, "decision").as_deref(), Some("allow"));
    assert_eq!(attribute(check, "reason").as_deref(), Some("allowed"));
    assert_eq!(
        attribute(check, "principal").as_deref(),
        Some("User::\"alice\"")
    );
    assert_eq!(
        attribute(check, "action").as_deref(),
        Some("Action::\"get /orders/{id}\"")
    );
    assert_eq!(attribute(check, "policies").as_deref(), Some("orders-read"));
    assert_eq!(
        attribute(check, "issuer").as_deref(),
        Some("https://auth.example.test")
    );
    assert_eq!(
        attribute(check, "token_cache_hit").as_deref(),
        Some("false")
    );
    assert_eq!(attribute(check, "decision_id").unwrap(), out.decision_id);

    // The engine's work, as children of the Check span, in the same trace.
    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == check.span_id)
        .collect();
    let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    for expected in ["cache_lookup", "verify_token", "evaluate_policies"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(children.iter().all(|s| s.trace_id == check.trace_id));
    let token_lookup = children
        .iter()
        .find(|s| s.name == "cache_lookup" && attribute(s, "cache").as_deref() == Some("token"))
        .expect("a token cache lookup");
    assert_eq!(attribute(token_lookup, "hit").as_deref(), Some("false"));

    // Service name and resource attributes as configured.
    let resource = collector.resource_attributes();
    assert_eq!(resource["service.name"], "orders-authz");
    assert_eq!(resource["deployment.environment"], "test");

    // No token material anywhere in what was exported.
    let dump = collector.dump();
    let signature = token.rsplit('.').next().unwrap();
    assert!(!dump.contains(&token));
    assert!(!dump.contains(signature));

    // The audit line points at the same trace and at the Check span.
    let line = fx.audit_line(&out.decision_id);
    assert_eq!(line["trace_id"], trace_id);
    assert_eq!(line["span_id"], hex::encode(&check.span_id));
}

/// No trace context in the gRPC metadata: the `traceparent` of the HTTP request
/// Envoy forwards in the CheckRequest is the parent. Exported in the background
/// (short batch delay), while the server keeps running.
#[tokio::test]
async fn check_span_falls_back_to_the_request_headers_traceparent() {
    let (collector, addr) = Collector::start().await;
    let fx = Fixture::new();
    fx.append_config(&format!(
        "\n[audit]\nfile = \"audit.log\"\n\n[telemetry]\notlp_endpoint = \"http://{addr}\"\n"
    ));
    let served = Served::start(&fx, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let token = fx.es256().token("bob", &["orders:read"], &[]);
    // A policy deny: read-only token, POST.
    let mut request = envoy_request("POST", "/orders", Some(&token));
    http_mut(&mut request)
        .headers
        .insert("traceparent".into(), traceparent(trace_id, parent));
    let out = served.check(tonic::Request::new(request)).await;
    assert_eq!(out.http_status, 403);

    let check = &exported_span(&collector, "portcullis.check").await;
    assert_eq!(hex::encode(&check.trace_id), trace_id);
    assert_eq!(hex::encode(&check.parent_span_id), parent);
    assert_eq!(attribute(check, "decision").as_deref(), Some("deny"));
    assert_eq!(attribute(check, "reason").as_deref(), Some("policy_denied"));
    assert_eq!(
        attribute(check, "failed_check").as_deref(),
        Some("policy:no_permit")
    );
    assert_eq!(
        attribute(check, "principal").as_deref(),
        Some("User::\"bob\"")
    );
    assert_eq!(resource_name(&collector), "portcullis");
    assert!(!collector.dump().contains(&token));
    let line = fx.audit_line(&out.decision_id);
    assert_eq!(line["trace_id"], trace_id);
    served.stop().await;
}

fn resource_name(collector: &Collector) -> String {
    collector.resource_attributes()["service.name"].clone()
}

/// No endpoint configured: checks are decided, nothing is exported (not even
/// to an endpoint named by the OpenTelemetry environment variables), the audit
/// line still carries the caller's trace id, and the server stops cleanly.
#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_and_nothing_fails() {
    let (collector, addr) = Collector::start().await;
    let fx = Fixture::new();
    fx.append_config("\n[audit]\nfile = \"audit.log\"\n");
    let endpoint = format!("http://{addr}");
    let served = Served::start(
        &fx,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;
    let trace_id = "11112222333344445555666677778888";
    let parent = "1234567890abcdef";
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let mut ids = Vec::new();
    for path in ["/orders", "/orders/1"] {
        let out = served
            .check(with_metadata(
                envoy_request("GET", path, Some(&token)),
                "traceparent",
                &traceparent(trace_id, parent),
            ))
            .await;
        assert_eq!(out.http_status, 200);
        ids.push(out.decision_id);
    }
    let denied = served
        .check(tonic::Request::new(envoy_request("GET", "/orders", None)))
        .await;
    assert_eq!(denied.http_status, 401);
    let logs = served.logs.clone();
    served.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(collector.requests.lock().unwrap().is_empty());
    for id in &ids {
        let line = fx.audit_line(id);
        assert_eq!(line["trace_id"], trace_id);
        // No span of ours is recorded: the caller's span is the one to find.
        assert_eq!(line["span_id"], parent);
    }
    assert_eq!(fx.audit_line(&denied.decision_id)["trace_id"], Value::Null);
    let logs = logs.lock().unwrap();
    assert!(
        !logs.iter().any(|l| l["level"] == "ERROR"),
        "errors logged: {logs:?}"
    );
    assert!(
        !logs.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("OTLP"))),
        "trace export started without an endpoint"
    );
}

// ---------------------------------------------------------------------------
// Metrics.

/// One scrape: `name{labels}` → value, parsed line by line.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value of {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("closing brace");
                    let labels = rest
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            assert!(
                samples.insert((name, labels), value).is_none(),
                "duplicate series {line:?}"
            );
        }
        Scrape {
            samples,
            text: text.to_owned(),
        }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    Scrape::parse(&response.text().await.unwrap())
}

#[tokio::test]
async fn metrics_endpoint_counts_decisions_and_reports_health() {
    let fx = Fixture::new();
    fx.append_config(
        "\n[audit]\nfile = \"audit.log\"\n\n[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n",
    );
    let served = Served::start(&fx, &[]).await;
    let addr = served.metrics.expect("the metrics address is logged");

    let before = scrape(addr).await;
    assert_eq!(before.get("portcullis_ready", &[]), Some(1.0));
    assert_eq!(before.get("portcullis_policy_generation", &[]), Some(1.0));
    assert_eq!(
        before.get("portcullis_policy_reload_failures_total", &[]),
        Some(0.0)
    );
    for cache in ["token", "decision"] {
        assert!(
            before
                .get("portcullis_cache_hits_total", &[("cache", cache)])
                .is_some()
        );
        assert!(
            before
                .get("portcullis_cache_misses_total", &[("cache", cache)])
                .is_some()
        );
    }

    let token = fx.es256().token("alice", &["orders:read"], &[]);
    for _ in 0..2 {
        let out = served
            .check(tonic::Request::new(envoy_request(
                "GET",
                "/orders/7",
                Some(&token),
            )))
            .await;
        assert_eq!(out.http_status, 200);
    }
    let unauthenticated = served
        .check(tonic::Request::new(envoy_request("GET", "/orders", None)))
        .await;
    assert_eq!(unauthenticated.http_status, 401);
    let forbidden = served
        .check(tonic::Request::new(envoy_request(
            "POST",
            "/orders",
            Some(&token),
        )))
        .await;
    assert_eq!(forbidden.http_status, 403);

    let after = scrape(addr).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    let allowed = [("outcome", "allow"), ("reason", "allowed")];
    assert_eq!(
        moved("portcullis_decisions_total", &allowed),
        2.0,
        "{}",
        after.text
    );
    assert_eq!(
        moved(
            "portcullis_decisions_total",
            &[("outcome", "deny"), ("reason", "missing_token")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "portcullis_decisions_total",
            &[("outcome", "deny"), ("reason", "policy_denied")]
        ),
        1.0
    );
    assert_eq!(moved("portcullis_check_duration_seconds_count", &[]), 4.0);
    assert!(moved("portcullis_check_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(
        after.value(
            "portcullis_check_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        after.value("portcullis_check_duration_seconds_count", &[])
    );
    // The same token three times: verified once, then served from the cache.
    assert_eq!(
        moved("portcullis_cache_misses_total", &[("cache", "token")]),
        1.0
    );
    assert_eq!(
        moved("portcullis_cache_hits_total", &[("cache", "token")]),
        2.0
    );
    // The same request twice: evaluated once, then the cached decision.
    assert_eq!(
        moved("portcullis_cache_hits_total", &[("cache", "decision")]),
        1.0
    );
    assert_eq!(after.get("portcullis_revocations_in_force", &[]), Some(0.0));
    assert_eq!(
        after.get(
            "portcullis_revocations_applied_total",
            &[("source", "local")]
        ),
        Some(0.0)
    );
    assert!(after.text.ends_with("# EOF\n"));
    assert!(!after.text.contains(&token));

    let missing = reqwest::get(format!("http://{addr}/other")).await.unwrap();
    assert_eq!(missing.status(), 404);
    served.stop().await;
}

// ---------------------------------------------------------------------------
// Audit trail.

// Every key of an audit line, as documented in `docs/reference/audit-line.md`.
use portcullis::config::AUDIT_FIELDS;

#[test]
fn every_audit_field_is_documented_in_the_reference() {
    let reference =
        std::fs::read_to_string(repo_root().join("docs/reference/audit-line.md")).unwrap();
    for field in AUDIT_FIELDS {
        assert!(
            reference.contains(&format!("| `{field}` |")),
            "audit field {field} is not in docs/reference/audit-line.md's table"
        );
    }
}

#[tokio::test]
async fn audit_line_of_an_allow_and_of_each_deny_class() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let key = fx.es256();
    let token = key.token("alice", &["orders:read"], &[]);
    let (head, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", "A".repeat(86));

    struct Case {
        name: &'static str,
        request: CheckRequest,
        status: i32,
        reason: &'static str,
        failed_check: Value,
        policies: Value,
    }
    let mut forbidden_net = envoy_request("GET", "/orders", Some(&token));
    forbidden_net.attributes.as_mut().unwrap().source = Some(peer("203.0.113.9"));
    let mut no_attributes = envoy_request("GET", "/orders", Some(&token));
    no_attributes.attributes.as_mut().unwrap().request = None;
    let cases = vec![
        Case {
            name: "allow",
            request: envoy_request("GET", "/orders/7", Some(&token)),
            status: 200,
            reason: "allowed",
            failed_check: Value::Null,
            policies: serde_json::json!(["orders-read"]),
        },
        Case {
            name: "no token",
            request: envoy_request("GET", "/orders", None),
            status: 401,
            reason: "missing_token",
            failed_check: "token:missing_token".into(),
            policies: serde_json::json!([]),
        },
        Case {
            name: "bad token",
            request: envoy_request("GET", "/orders", Some(&forged)),
            status: 401,
            reason: "bad_signature",
            failed_check: "token:bad_signature".into(),
            policies: serde_json::json!([]),
        },
        Case {
            name: "no permit",
            request: envoy_request("POST", "/orders", Some(&token)),
            status: 403,
            reason: "policy_denied",
            failed_check: "policy:no_permit".into(),
            policies: serde_json::json!([]),
        },
        Case {
            name: "forbid",
            request: forbidden_net,
            status: 403,
            reason: "policy_denied",
            failed_check: "policy:forbid".into(),
            policies: serde_json::json!(["block-test-net-3"]),
        },
        Case {
            name: "no route",
            request: envoy_request("GET", "/invoices", Some(&token)),
            status: 403,
            reason: "no_route",
            failed_check: "route".into(),
            policies: serde_json::json!([]),
        },
        Case {
            name: "bad request",
            request: envoy_request("GET", "/orders/../admin", Some(&token)),
            status: 400,
            reason: "non_canonical_path",
            failed_check: "bad_request:non_canonical_path".into(),
            policies: serde_json::json!([]),
        },
        Case {
            name: "no HTTP attributes",
            request: no_attributes,
            status: 400,
            reason: "missing_http_attributes",
            failed_check: "bad_request:missing_http_attributes".into(),
            policies: serde_json::json!([]),
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let trace_id = format!("{:032x}", 0xabc000 + i);
        let parent = format!("{:016x}", 0x5000 + i);
        let out = outcome(
            &server
                .client
                .clone()
                .check(with_metadata(
                    case.request,
                    "traceparent",
                    &traceparent(&trace_id, &parent),
                ))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(out.http_status, case.status, "{}", case.name);
        let line = fx.audit_line(&out.decision_id);
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected: Vec<&str> = AUDIT_FIELDS.to_vec();
        expected.sort();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort();
        assert_eq!(keys_sorted, expected, "{}", case.name);
        assert_eq!(line["type"], "decision");
        assert_eq!(line["status"], case.status, "{}", case.name);
        assert_eq!(line["reason"], case.reason, "{}", case.name);
        assert_eq!(line["failed_check"], case.failed_check, "{}", case.name);
        assert_eq!(line["policies"], case.policies, "{}", case.name);
        let expected_outcome = if case.status == 200 { "allow" } else { "deny" };
        assert_eq!(line["outcome"], expected_outcome, "{}", case.name);
        assert_eq!(line["trace_id"], trace_id.as_str(), "{}", case.name);
        assert_eq!(line["span_id"], parent.as_str(), "{}", case.name);
    }
    let text = std::fs::read_to_string(fx.audit_path()).unwrap();
    assert_eq!(audit_lines_of(&fx).len(), 8);
    assert!(!text.contains(&token));
    assert!(
        !text.contains(head.rsplit('.').next().unwrap()),
        "token claims in the audit log"
    );
    assert!(
        !text.contains(&"A".repeat(86)),
        "forged signature in the audit log"
    );
}

/// Shared revocations: the revoking instance counts a local revocation, the
/// other one a revocation received from Redis with its propagation lag, and
/// both report the Redis link, which drops to 0 when Redis goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_redis_metrics() {
    const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
    let mut redis = redis_harness::RedisServer::start();
    let fx = Fixture::new();
    let base = std::fs::read_to_string(fx.config_path()).unwrap();
    let mut instances = Vec::new();
    for name in ["a", "b"] {
        let path = fx.path(&format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "{base}\n[audit]\nfile = \"{name}.audit.log\"\n\n[revocation]\ndata_dir = \"data-{name}\"\nredis_url = \"{}\"\nstartup = \"wait\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\n[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n",
                redis.url()
            ),
        )
        .unwrap();
        instances.push(Served::start_config(&path, &[]).await);
    }
    let (a, b) = (&instances[0], &instances[1]);
    let (a_metrics, b_metrics) = (a.metrics.unwrap(), b.metrics.unwrap());
    let before = scrape(b_metrics).await;
    assert_eq!(before.get("portcullis_redis_connected", &[]), Some(1.0));
    assert_eq!(
        before.get("portcullis_revocations_in_force", &[]),
        Some(0.0)
    );
    assert_eq!(
        before.get(
            "portcullis_revocations_applied_total",
            &[("source", "redis")]
        ),
        Some(0.0)
    );

    let revoked = portcullis(&[
        "revoke",
        "--admin",
        &a.admin.unwrap().to_string(),
        "--admin-token",
        ADMIN_TOKEN,
        "--jti",
        "jti-stolen",
    ]);
    assert!(revoked.status.success(), "{revoked:?}");

    let mut arrived = None;
    for _ in 0..200 {
        let now = scrape(b_metrics).await;
        if now.value("portcullis_revocations_in_force", &[]) == 1.0 {
            arrived = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_b = arrived.expect("the revocation reaches the other instance");
    assert_eq!(
        at_b.value(
            "portcullis_revocations_applied_total",
            &[("source", "redis")]
        ),
        1.0
    );
    assert_eq!(
        at_b.value(
            "portcullis_revocations_applied_total",
            &[("source", "local")]
        ),
        0.0
    );
    assert_eq!(
        at_b.value("portcullis_revocation_propagation_lag_seconds_count", &[]),
        1.0
    );
    // `created_at` has whole seconds: the lag is under 2 s on one machine.
    assert!(at_b.value("portcullis_revocation_propagation_lag_seconds_sum", &[]) < 2.0);
    let at_a = scrape(a_metrics).await;
    assert_eq!(
        at_a.value(
            "portcullis_revocations_applied_total",
            &[("source", "local")]
        ),
        1.0
    );
    assert_eq!(
        at_a.value("portcullis_revocation_propagation_lag_seconds_count", &[]),
        0.0
    );

    redis.stop();
    let mut disconnected = false;
    for _ in 0..200 {
        if scrape(b_metrics)
            .await
            .get("portcullis_redis_connected", &[])
            == Some(0.0)
        {
            disconnected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(disconnected, "redis_connected never dropped to 0");
    for instance in instances {
        instance.stop().await;
    }
}

/// A token signed by a key the issuer just published: the key fetch it
/// triggers is a `jwks_fetch` span under `verify_token` under the Check span,
/// and the per-issuer key counters move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_key_fetch_is_traced_and_counted_per_issuer() {
    let idp = TestIdp::start().await;
    let (old, new) = (TestKey::es256(), TestKey::es256());
    let jwks = |keys: &[&TestKey]| serde_json::json!({ "keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() });
    idp.set_jwks(jwks(&[&old]));
    let (collector, addr) = Collector::start().await;
    let fx = Fixture::new();
    fx.append_config(&format!(
        r#"
[[issuers]]
issuer = "{}"
audiences = ["orders-api"]
discovery = true
[issuers.remote]
ca_file = "{}"
refresh = "1h"
refresh_min = "30s"

[audit]
file = "audit.log"

[telemetry]
otlp_endpoint = "http://{addr}"
metrics_listen = "127.0.0.1:0"
"#,
        idp.issuer(),
        idp.ca_file().display()
    ));
    let served = Served::start(&fx, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]).await;
    let metrics = served.metrics.unwrap();
    let issuer = idp.issuer();
    let before = scrape(metrics).await;
    let labels = [("issuer", issuer.as_str())];
    assert!(before.value("portcullis_jwks_refreshes_total", &labels) >= 1.0);
    assert_eq!(
        before.get("portcullis_jwks_unknown_kid_refreshes_total", &labels),
        Some(0.0)
    );

    idp.set_jwks(jwks(&[&old, &new]));
    let mut claims = claims("alice", &["orders:read"], &[]);
    claims["iss"] = Value::from(issuer.clone());
    let token = new.sign(&claims);
    let trace_id = "5ce0e9a56015fec5aadfa328ae398115";
    let out = served
        .check(with_metadata(
            envoy_request("GET", "/orders/7", Some(&token)),
            "traceparent",
            &traceparent(trace_id, "ab3a2a3b4c5d6e7f"),
        ))
        .await;
    assert_eq!(out.http_status, 200);

    wait_for("the key fetch span", || {
        collector
            .spans()
            .iter()
            .any(|s| s.name == "jwks_fetch" && hex::encode(&s.trace_id) == trace_id)
    })
    .await;
    wait_for("the Check span", || {
        collector
            .spans()
            .iter()
            .any(|s| s.name == "portcullis.check" && hex::encode(&s.trace_id) == trace_id)
    })
    .await;
    let spans = collector.spans();
    let in_trace = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && hex::encode(&s.trace_id) == trace_id)
            .unwrap_or_else(|| panic!("no {name} span in the trace"))
    };
    let (check, verify, fetch) = (
        in_trace("portcullis.check"),
        in_trace("verify_token"),
        in_trace("jwks_fetch"),
    );
    assert_eq!(verify.parent_span_id, check.span_id);
    assert_eq!(fetch.parent_span_id, verify.span_id);
    assert_eq!(attribute(fetch, "issuer").as_deref(), Some(issuer.as_str()));
    assert_eq!(attribute(fetch, "ok").as_deref(), Some("true"));
    assert!(!collector.dump().contains(&token));

    let after = scrape(metrics).await;
    assert_eq!(
        after.value("portcullis_jwks_unknown_kid_refreshes_total", &labels),
        1.0
    );
    assert_eq!(
        after.value("portcullis_jwks_refreshes_total", &labels)
            - before.value("portcullis_jwks_refreshes_total", &labels),
        1.0
    );
    assert_eq!(
        after.value("portcullis_jwks_refresh_failures_total", &labels),
        0.0
    );
    served.stop().await;
}

/// Waits for the exported span named `name` and returns it.
async fn exported_span(collector: &Collector, name: &str) -> Span {
    wait_for(name, || collector.spans().iter().any(|s| s.name == name)).await;
    collector
        .spans()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

/// `IsAuthorized` and `BatchIsAuthorized` are traced like `Check`: their spans
/// join the caller's trace from the gRPC metadata, carry the decision, and a
/// batch has one span with a child per decision; the audit lines name the trace.
#[tokio::test]
async fn is_authorized_spans_join_the_callers_trace() {
    use portcullis::authorizer::pb::{
        self, AuthorizationRequest, BatchIsAuthorizedRequest, Credential, Entity,
        IsAuthorizedRequest, authorization_request, authorizer_client::AuthorizerClient,
        credential, is_authorized_request,
    };
    use serde_json::json;
    let (collector, addr) = Collector::start().await;
    let fx = Fixture::new();
    fx.append_config(&format!(
        "\n[audit]\nfile = \"audit.log\"\n\n[telemetry]\notlp_endpoint = \"http://{addr}\"\n"
    ));
    let served = Served::start(&fx, &[("OTEL_BSP_SCHEDULE_DELAY", "50")]).await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let credential = Some(Credential {
        kind: Some(credential::Kind::AccessToken(token.clone())),
    });
    let resource = Some(Entity {
        r#type: "Application".into(),
        id: "orders".into(),
        ..Default::default()
    });
    let context = |method: &str, path: &str, id: Option<&str>| {
        json!({
            "http": {"method": method, "path": path, "host": "orders.example.test", "scheme": "https"},
            "path_params": id.map_or(json!({}), |id| json!({"id": id})),
        })
        .to_string()
    };
    let mut client = AuthorizerClient::new(served.channel.clone());

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let mut single = tonic::Request::new(IsAuthorizedRequest {
        credential: credential.clone(),
        action: "get /orders/{id}".into(),
        resource: resource.clone(),
        context_kind: Some(is_authorized_request::ContextKind::ContextJson(context(
            "GET",
            "/orders/42",
            Some("42"),
        ))),
        entities: vec![],
    });
    single.metadata_mut().insert(
        "traceparent",
        traceparent(trace_id, parent).parse().unwrap(),
    );
    let answer = client.is_authorized(single).await.unwrap().into_inner();
    assert_eq!(answer.decision, pb::Decision::Allow as i32);

    let span = exported_span(&collector, "portcullis.is_authorized").await;
    assert_eq!(hex::encode(&span.trace_id), trace_id);
    assert_eq!(hex::encode(&span.parent_span_id), parent);
    assert_eq!(attribute(&span, "decision").as_deref(), Some("allow"));
    assert_eq!(
        attribute(&span, "principal").as_deref(),
        Some("User::\"alice\"")
    );
    assert_eq!(
        attribute(&span, "decision_id").as_deref(),
        Some(answer.decision_id.as_str())
    );
    let line = fx.audit_line(&answer.decision_id);
    assert_eq!(line["trace_id"], trace_id);

    // A batch: one span for the call, one child per decision.
    let batch_trace = "1bf92f3577b34da6a3ce929d0e0e4736";
    let mut batch = tonic::Request::new(BatchIsAuthorizedRequest {
        credential,
        requests: [
            ("get /orders", "GET", "/orders", None),
            ("post /orders", "POST", "/orders", None),
        ]
        .into_iter()
        .map(|(action, method, path, id)| AuthorizationRequest {
            action: action.into(),
            resource: resource.clone(),
            context_kind: Some(authorization_request::ContextKind::ContextJson(context(
                method, path, id,
            ))),
            entities: vec![],
        })
        .collect(),
    });
    batch.metadata_mut().insert(
        "traceparent",
        traceparent(batch_trace, parent).parse().unwrap(),
    );
    let answers = client
        .batch_is_authorized(batch)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answers.results.len(), 2);
    let call = exported_span(&collector, "portcullis.batch_is_authorized").await;
    assert_eq!(hex::encode(&call.trace_id), batch_trace);
    assert_eq!(hex::encode(&call.parent_span_id), parent);
    wait_for("a span per decision of the batch", || {
        collector
            .spans()
            .iter()
            .filter(|s| s.name == "portcullis.is_authorized" && s.parent_span_id == call.span_id)
            .count()
            == 2
    })
    .await;
    let children: Vec<Span> = collector
        .spans()
        .into_iter()
        .filter(|s| s.parent_span_id == call.span_id && s.name == "portcullis.is_authorized")
        .collect();
    let mut decisions: Vec<String> = children
        .iter()
        .filter_map(|s| attribute(s, "decision"))
        .collect();
    decisions.sort();
    assert_eq!(decisions, ["allow", "deny"]);
    assert!(!collector.dump().contains(&token));
    served.stop().await;
}
