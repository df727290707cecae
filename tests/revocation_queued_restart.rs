//! Regression (found by the soak, tests/soak.rs): a revocation queued while
//! Redis was down, on an instance that then restarted before Redis came back,
//! was written back to Redis' snapshot only (`ZADD`), not to the log nor
//! published, so an instance that stayed up and resumed from its log position
//! never enforced it (until a full sync of its own, e.g. its own restart).

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::instance::AdminInstance;
use common::*;
use portcullis::admin::pb::{self, target::Kind};
use redis_harness::RedisServer;

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// An instance configuration sharing revocations through `redis_url`, with
/// its own journal, waiting for Redis at start.
fn instance_config(fx: &Fixture, name: &str, redis_url: &str) -> PathBuf {
    let base = std::fs::read_to_string(fx.config_path()).unwrap();
    let text = format!(
        "{base}\n[revocation]\ndata_dir = \"data-{name}\"\nredis_url = \"{redis_url}\"\n\
         startup = \"wait\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n"
    );
    let path = fx.path(&format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

async fn start(config: &Path) -> AdminInstance {
    AdminInstance::start(config, config.with_extension("audit.log")).await
}

async fn status(instance: &AdminInstance) -> pb::StatusResponse {
    instance
        .admin()
        .await
        .status(with_bearer(pb::StatusRequest {}, ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner()
}

async fn http_status(instance: &AdminInstance, token: &str) -> i32 {
    let response = instance
        .server
        .check(envoy_request("GET", "/orders/1", Some(token)))
        .await;
    outcome(&response).http_status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_queued_by_an_instance_that_restarts_reaches_the_others() {
    let mut redis = RedisServer::start();
    let fx = Fixture::new();
    let a_config = instance_config(&fx, "a", &redis.url());
    let b_config = instance_config(&fx, "b", &redis.url());
    let a = start(&a_config).await;
    let b = start(&b_config).await;
    let mut claims = claims("alice", &["orders:read"], &[]);
    claims["jti"] = "queued-then-restarted".into();
    let token = fx.es256().sign(&claims);
    assert_eq!(http_status(&b, &token).await, 200);

    // Redis goes away; A revokes (queued, in its journal) and restarts
    // before Redis is back.
    redis.stop();
    wait_for_both_disconnected(&a, &b).await;
    let revoked = a
        .admin()
        .await
        .revoke(with_bearer(
            pb::RevokeRequest {
                target: Some(pb::Target {
                    kind: Some(Kind::Token(pb::TokenTarget {
                        jti: "queued-then-restarted".into(),
                        issuer: String::new(),
                        expires_at: None,
                    })),
                }),
                reason: "test".into(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!revoked.synced, "queued while Redis is down");
    a.stop().await;

    // Redis returns (same data: append-only file); A starts again from its
    // journal. B, which stayed up, resumes from its log position and must
    // learn the revocation (generous deadline: a wait, not a timing goal).
    redis.restart();
    let a = start(&a_config).await;
    assert_eq!(http_status(&a, &token).await, 401, "A keeps it (journal)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_status(&b, &token).await != 401 {
        assert!(
            Instant::now() < deadline,
            "B never enforced the revocation A queued before restarting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
    b.stop().await;
}

async fn wait_for_both_disconnected(a: &AdminInstance, b: &AdminInstance) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(a).await.redis == "connected" || status(b).await.redis == "connected" {
        assert!(Instant::now() < deadline, "Redis never seen down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
