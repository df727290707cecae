//! The server started in-process through the library's `serve` function, as
//! `portcullis serve` starts it: listeners bound by the caller, stopped by a
//! cancellation token instead of a signal.

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::serve::{self, ServeError};
use tonic::transport::Channel;

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn serve_answers_checks_then_drains_and_stops_on_request() {
    let fx = Fixture::new();
    fx.append_config(&format!(
        "\n[audit]\nfile = \"{}\"\n\n[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n",
        fx.audit_path().display()
    ));
    let mut config = fx.config();
    config.server.drain_period = Duration::from_secs(600);
    let (addresses, shutdown, task) = serve::spawn(config).await.unwrap();
    let channel = channel(addresses.grpc).await;
    wait_for_health(&channel, SERVING).await;

    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let mut client = AuthorizationClient::new(channel.clone());
    let allowed = outcome(
        &client
            .check(envoy_request("GET", "/orders/7", Some(&token)))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(allowed.http_status, 200);
    let denied = outcome(
        &client
            .check(envoy_request("DELETE", "/orders/7", Some(&token)))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(denied.http_status, 403);
    let metrics = addresses.metrics.expect("a metrics listener");
    let scrape = scrape_metrics(metrics).await;
    assert!(scrape.contains("portcullis_decisions_total"), "{scrape}");

    // The first request drains: NOT_SERVING, checks still answered.
    shutdown.request();
    wait_for_health(&channel, NOT_SERVING).await;
    let during_drain = outcome(
        &client
            .check(envoy_request("GET", "/orders/7", Some(&token)))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(during_drain.http_status, 200);
    assert!(!task.is_finished(), "a 600 s drain is still running");
    // The second cuts the drain short; serve returns with the audit flushed.
    shutdown.request();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("serve returns once asked twice")
        .unwrap()
        .unwrap();
    for decision in [&allowed, &denied, &during_drain] {
        fx.audit_line(&decision.decision_id);
    }
    assert!(
        tokio::net::TcpStream::connect(addresses.grpc)
            .await
            .is_err(),
        "the gRPC listener is closed"
    );
}

#[tokio::test]
async fn a_stop_while_waiting_for_keys_ends_serve_cleanly() {
    // An issuer whose keys never arrive: its IdP is down.
    let idp = idp::TestIdp::start().await;
    let fx = Fixture::new();
    waiting_for_keys(&fx, &idp);
    let (addresses, shutdown, task) = serve::spawn(fx.config()).await.unwrap();
    let channel = channel(addresses.grpc).await;
    assert_eq!(health_of(&channel, "").await, NOT_SERVING);
    shutdown.request();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("serve returns while still waiting for keys")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_broken_configuration_is_refused_with_every_problem() {
    let fx = Fixture::new();
    std::fs::write(
        fx.path("policies/broken.cedar"),
        "permit (principal, action",
    )
    .unwrap();
    let (addresses, _shutdown, task) = serve::spawn(fx.config()).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("serve gives up")
        .unwrap()
        .unwrap_err();
    match &error {
        ServeError::Config(problems) => {
            assert!(
                problems.iter().any(|p| p.contains("broken.cedar")),
                "{error}"
            )
        }
        other => panic!("expected a configuration error, got {other}"),
    }
    assert!(
        tokio::net::TcpStream::connect(addresses.grpc)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_admin_listener_may_not_share_the_grpc_address() {
    let fx = Fixture::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    drop(taken);
    fx.append_config(&format!(
        "\n[admin]\nlisten = \"{addr}\"\ntoken = \"0123456789abcdef0123456789abcdef\"\n"
    ));
    let with_admin = fx.config();
    let error = serve::Listeners::bind(&with_admin, Some(addr))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("[admin] listen must differ"),
        "{error}"
    );
}
