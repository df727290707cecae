//! Revocation propagation between two instances sharing one Redis.
//!
//! `cargo bench --bench revocation_propagation` starts a real `redis-server` and
//! two in-process instances (A and B) on loopback, makes 1000 revocations on A
//! through its admin API (one at a time, each a `jti` of a distinct token), and
//! for each measures the time from the start of the `Revoke` call on A until a
//! `Check` on B denies that token (B is polled in a tight loop). It prints p50,
//! p99 and max, the `Revoke` acknowledgement latency on A, and as the baseline
//! the latency of one `Check` on B (the polling resolution). Redis runs with its
//! default `appendfsync everysec`.
//!
//! Then catch-up after an outage: two more instances reach Redis through a
//! proxy that is cut for 5 seconds; a revocation made on one of them meanwhile
//! is queued; the clock runs from the moment Redis is reachable again until the
//! other instance denies the token (5 rounds).
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs 20
//! revocations and one 1.5-second outage as a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/redis.rs"]
mod redis_harness;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use portcullis::admin::pb::admin_client::AdminClient;
use portcullis::admin::pb::{self, target::Kind};
use portcullis::admin::{self as admin_api, RunningAdmin};
use portcullis::audit::AuditLog;
use portcullis::config::Config;
use portcullis::engine::Engine;
use portcullis::revocation::RevocationStore;
use portcullis::server;
use redis_harness::{RedisServer, TcpProxy};
use serde_json::Value;
use tonic::transport::Channel;

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

struct Instance {
    server: TestServer,
    admin: RunningAdmin,
    store: Arc<RevocationStore>,
}

async fn start(config_path: &Path) -> Instance {
    let config = Config::load(config_path).expect("config");
    let store = RevocationStore::open(&config.revocation, config.token_lifetimes())
        .await
        .expect("revocation store");
    let audit = AuditLog::file(&config_path.with_extension("audit.log")).expect("audit");
    let running = server::start("127.0.0.1:0".parse().unwrap(), audit)
        .await
        .expect("server");
    let engine = Engine::from_config(&config)
        .expect("engine")
        .with_revocations(store.clone());
    running.state().install(engine).await;
    let admin_config = config.admin.as_ref().expect("[admin]");
    let admin = admin_api::start(
        admin_config.listen,
        &admin_config.resolve_token().expect("token"),
        store.clone(),
        running.state().clone(),
        config.clone(),
    )
    .await
    .expect("admin");
    Instance {
        server: TestServer::connect(running).await,
        admin,
        store,
    }
}

fn config(fx: &Fixture, name: &str, redis_url: &str) -> std::path::PathBuf {
    let base = std::fs::read_to_string(fx.config_path()).unwrap();
    let path = fx.path(&format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "{base}\n[revocation]\ndata_dir = \"data-{name}\"\nredis_url = \"{redis_url}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n"
        ),
    )
    .unwrap();
    path
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

async fn run(n: usize) {
    // Redis's default durability (AOF fsync once a second), as most deployments run it.
    let redis = RedisServer::start_with_appendfsync("everysec");
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let a = start(&config(&fx, "a", &redis.url())).await;
    let b = start(&config(&fx, "b", &redis.url())).await;
    let admin_channel = Channel::from_shared(format!("http://{}", a.admin.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let admin = AdminClient::new(admin_channel);

    let tokens: Vec<(String, String)> = (0..n)
        .map(|i| {
            let mut claims = claims("alice", &["orders:read"], &[]);
            let jti = format!("bench-{i}");
            claims["jti"] = Value::from(jti.clone());
            (fx.es256().sign(&claims), jti)
        })
        .collect();

    // Baseline: one Check on B, the resolution of the polling below.
    let mut checks = Vec::with_capacity(n);
    for (token, _) in &tokens {
        let started = Instant::now();
        let out = outcome(
            &b.server
                .check(envoy_request("GET", "/orders/1", Some(token)))
                .await,
        );
        checks.push(started.elapsed());
        assert_eq!(out.http_status, 200, "allowed before revocation");
    }

    let mut propagation = Vec::with_capacity(n);
    let mut acks = Vec::with_capacity(n);
    for (token, jti) in &tokens {
        let request = revoke_jti(jti);
        let started = Instant::now();
        // The Revoke call runs on its own task while this one polls B.
        let mut client = admin.clone();
        let revoke = tokio::spawn(async move {
            let result = client.revoke(request).await;
            (result, started.elapsed())
        });
        let deadline = started + Duration::from_secs(30);
        loop {
            let out = outcome(
                &b.server
                    .check(envoy_request("GET", "/orders/1", Some(token)))
                    .await,
            );
            if out.http_status == 401 {
                propagation.push(started.elapsed());
                break;
            }
            assert!(Instant::now() < deadline, "B never denied {jti}");
        }
        let (result, ack) = revoke.await.expect("revoke task");
        assert!(
            result.expect("revoke").into_inner().synced,
            "written to Redis"
        );
        acks.push(ack);
    }

    for v in [&mut propagation, &mut acks, &mut checks] {
        v.sort();
    }
    println!("revocation propagation, A -> Redis -> B, {n} revocations (loopback):");
    for (name, v) in [
        ("propagation (Revoke on A starts -> B denies)", &propagation),
        ("Revoke acknowledged on A (journal fsync + Redis)", &acks),
        ("baseline: one Check on B", &checks),
    ] {
        println!(
            "  {name:<50} p50 {:>10}  p99 {:>10}  max {:>10}",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0)),
            ms(*v.last().unwrap())
        );
    }
    let base = percentile(&checks, 50.0).as_secs_f64();
    println!(
        "  propagation p50 = {:.1} x baseline Check p50",
        percentile(&propagation, 50.0).as_secs_f64() / base
    );

    for inst in [a, b] {
        inst.admin.shutdown(Duration::from_secs(5)).await.ok();
        inst.server
            .running
            .shutdown(Duration::from_secs(5))
            .await
            .ok();
        inst.store.shutdown().await;
    }
}

/// An authorized admin `Revoke` of the token with `jti`.
fn revoke_jti(jti: &str) -> tonic::Request<pb::RevokeRequest> {
    with_bearer(
        pb::RevokeRequest {
            target: Some(pb::Target {
                kind: Some(Kind::Token(pb::TokenTarget {
                    jti: jti.to_owned(),
                    issuer: String::new(),
                    expires_at: None,
                })),
            }),
            reason: String::new(),
        },
        ADMIN_TOKEN,
    )
}

/// The HTTP status `inst` answers for `GET /orders/1` with `token`.
async fn status_of(inst: &Instance, token: &str) -> i32 {
    outcome(
        &inst
            .server
            .check(envoy_request("GET", "/orders/1", Some(token)))
            .await,
    )
    .http_status
}

/// Catch-up after an outage: C and D reach Redis through a proxy that is cut
/// for `outage`; a revocation made on C meanwhile is enforced there and
/// queued; the clock runs from the proxy's restore until D denies the token.
async fn catch_up(rounds: usize, outage: Duration) {
    let redis = RedisServer::start_with_appendfsync("everysec");
    let proxy = TcpProxy::start(redis.port).await;
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let c = start(&config(&fx, "c", &proxy.url())).await;
    let d = start(&config(&fx, "d", &proxy.url())).await;
    let mut admin = AdminClient::new(
        Channel::from_shared(format!("http://{}", c.admin.local_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut catch_up = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let mut claims = claims("alice", &["orders:read"], &[]);
        let jti = format!("outage-{round}");
        claims["jti"] = Value::from(jti.clone());
        let token = fx.es256().sign(&claims);
        assert_eq!(
            status_of(&d, &token).await,
            200,
            "allowed before revocation"
        );

        proxy.cut();
        let cut_at = Instant::now();
        let request = revoke_jti(&jti);
        let revoked = admin.revoke(request).await.expect("revoke").into_inner();
        assert!(!revoked.synced, "Redis was cut: the revocation is queued");
        assert_eq!(status_of(&c, &token).await, 401, "enforced on C at once");
        tokio::time::sleep(outage.saturating_sub(cut_at.elapsed())).await;
        assert_eq!(
            status_of(&d, &token).await,
            200,
            "D cannot know it during the outage"
        );

        proxy.restore();
        let restored = Instant::now();
        let deadline = restored + Duration::from_secs(30);
        while status_of(&d, &token).await != 401 {
            assert!(Instant::now() < deadline, "D never denied {jti}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        catch_up.push(restored.elapsed());
        // Both back in sync before the next round.
        while c.store.status().pending_writes > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!(
        "catch-up after a {:.1} s Redis outage (revoked on C during it; Redis back -> D denies), {rounds} rounds:",
        outage.as_secs_f64()
    );
    let line: Vec<String> = catch_up.iter().map(|d| ms(*d)).collect();
    println!("  {}", line.join(", "));
    catch_up.sort();
    println!(
        "  median {}, max {}",
        ms(percentile(&catch_up, 50.0)),
        ms(*catch_up.last().unwrap())
    );
    for inst in [c, d] {
        inst.admin.shutdown(Duration::from_secs(5)).await.ok();
        inst.server
            .running
            .shutdown(Duration::from_secs(5))
            .await
            .ok();
        inst.store.shutdown().await;
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (n, rounds, outage) = if bench {
        (1000, 5, Duration::from_secs(5))
    } else {
        (20, 1, Duration::from_millis(1500))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(n));
    runtime.block_on(catch_up(rounds, outage));
}
