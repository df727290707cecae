//! The audit log as the server meets it: a sink that fails (here a real
//! `/dev/full`, every write `ENOSPC`) turns health NOT_SERVING, counts the
//! failures, and checks fail closed with `audit_unavailable` instead of being
//! decided without a line; nothing waits for the sink forever, shutdown
//! included.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use portcullis::audit::AuditLog;
use portcullis::engine::Engine;
use portcullis::server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_audit_sink_turns_health_not_serving_and_checks_fail_closed() {
    let fx = Fixture::new();
    let audit = AuditLog::file(Path::new("/dev/full"))
        .unwrap()
        .batched(Duration::from_millis(2))
        .unwrap();
    let running = server::start("127.0.0.1:0".parse().unwrap(), audit)
        .await
        .unwrap();
    running
        .state()
        .install(Engine::from_config(&fx.config()).unwrap())
        .await;
    let server = TestServer::connect(running).await;
    assert_eq!(
        health_of(&server.channel, "").await,
        1,
        "SERVING before any write"
    );
    let token = fx.es256().token("alice", &["orders:read"], &[]);

    // The first check is taken (nothing failed yet); its line's write fails.
    let first = server
        .client
        .clone()
        .check(envoy_request("GET", "/orders/1", Some(&token)))
        .await;
    assert!(first.is_ok(), "{first:?}");

    // Health follows the writer (polled with a generous deadline: this waits
    // for an event, it does not time it).
    let deadline = Instant::now() + Duration::from_secs(30);
    while health_of(&server.channel, "").await != 2 {
        assert!(Instant::now() < deadline, "health never became NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for service in [
        server::AUTHORIZATION_SERVICE,
        portcullis::authorizer::AUTHORIZER_SERVICE,
    ] {
        assert_eq!(health_of(&server.channel, service).await, 2, "{service}");
    }

    // Checks now fail closed: no decision without its audit line.
    let refused = server
        .client
        .clone()
        .check(envoy_request("GET", "/orders/1", Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().starts_with("audit_unavailable"),
        "{}",
        refused.message()
    );

    let state = server.running.state().clone();
    let metrics = state.render_metrics();
    assert!(
        metrics.contains("portcullis_audit_writer_up 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("portcullis_audit_write_failures_total 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_audit_refused_total 1"),
        "{metrics}"
    );

    // Shutdown gives the failing sink up instead of waiting for it forever.
    server
        .running
        .shutdown(Duration::from_secs(1))
        .await
        .unwrap();
}
