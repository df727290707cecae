//! Revocation on a breach day: three instances sharing one real `redis-server`
//! with up to 1,000,000 revocations in force.
//!
//! `cargo bench --bench revocation_breach` starts Redis (`appendfsync
//! everysec`, its default) and three in-process instances, A, B and C, each
//! started as `portcullis serve` starts (`serve::spawn`, admin API, journal in
//! its own folder); C reaches Redis through a TCP proxy that can be cut. It
//! fills the shared set to 1,000, 100,000 and 1,000,000 entries (admin
//! `RevokeBatch` calls on A) and at each size measures, against the same
//! measures at the first size:
//!
//! - the insert rate: single-target `Revoke` calls on A, 8 in flight;
//! - propagation: from the start of a `Revoke` on A until a `Check` on B
//!   denies the token (polled), p50 and p99;
//! - `Check` latency on B for a token not revoked, against the same with an
//!   empty set (measured before the fill).
//!
//! Then, with 1,000,000 in force:
//!
//! - mass revocation: `portcullis revoke --from-file` of 100,000 `jti`s against
//!   A, timed until every instance enforces all of them;
//! - resync after a 5-second outage: C is cut off, 100 revocations are made on
//!   A meanwhile, C is reconnected; time until C enforces them, and the bytes
//!   Redis sent and received meanwhile (`INFO stats`), against a new instance,
//!   D, loading the whole snapshot;
//! - startup with 1,000,000 in force: `portcullis serve` (embedded mode) on a
//!   copy of B's journal, time until SERVING and resident memory, against the
//!   same on an empty journal.
//!
//! `PORTCULLIS_BENCH_REDIS_CONFIG="name value"` sets a Redis parameter first
//! (`CONFIG SET`), e.g. `auto-aof-rewrite-percentage 0` to see what Redis'
//! append-only-file rewrites cost.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs sizes of
//! 100 and 1,000, a mass revocation of 1,000 and a 1-second outage, as a smoke
//! test.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/redis.rs"]
mod redis_harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::instance::AdminInstance;
use common::*;
use portcullis::admin::pb::admin_client::AdminClient;
use portcullis::admin::pb::{self, target::Kind};
use redis_harness::{RedisServer, TcpProxy};
use serde_json::Value;
use tonic::transport::Channel;

/// The allocator `portcullis serve` runs with (src/main.rs), so that the
/// instances allocate as the real ones do; one per process, so the bench's
/// clients use it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
/// Targets per fill `RevokeBatch` (the admin API's limit).
const FILL_BATCH: usize = 10_000;
const IN_FORCE: &str = "portcullis_revocations_in_force";

/// What one run measures; `--bench` runs the full sizes.
struct Plan {
    sizes: Vec<usize>,
    inserts: usize,
    propagation_samples: usize,
    checks: usize,
    mass: usize,
    outage: Duration,
}

impl Plan {
    fn from_args() -> Plan {
        if std::env::args().any(|a| a == "--bench") {
            Plan {
                sizes: vec![1_000, 100_000, 1_000_000],
                inserts: 2_000,
                propagation_samples: 200,
                checks: 2_000,
                mass: 100_000,
                outage: Duration::from_secs(5),
            }
        } else {
            Plan {
                sizes: vec![100, 1_000],
                inserts: 50,
                propagation_samples: 10,
                checks: 50,
                mass: 1_000,
                outage: Duration::from_secs(1),
            }
        }
    }
}

/// A config for instance `name` sharing revocations through `redis_url`.
fn config(fx: &Fixture, name: &str, redis_url: &str) -> PathBuf {
    let base = std::fs::read_to_string(fx.config_path()).unwrap();
    let path = fx.path(&format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "{base}\n[revocation]\ndata_dir = \"data-{name}\"\nredis_url = \"{redis_url}\"\n\
             max_entries = 3000000\nmax_pending_writes = 200000\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n"
        ),
    )
    .unwrap();
    path
}

async fn start(fx: &Fixture, name: &str, redis_url: &str) -> AdminInstance {
    AdminInstance::start(
        &config(fx, name, redis_url),
        fx.path(&format!("{name}.audit.log")),
    )
    .await
}

fn jti_target(jti: String) -> pb::Target {
    pb::Target {
        kind: Some(Kind::Token(pb::TokenTarget {
            jti,
            issuer: String::new(),
            expires_at: None,
        })),
    }
}

async fn revoke(admin: &mut AdminClient<Channel>, jti: String) {
    let request = with_bearer(
        pb::RevokeRequest {
            target: Some(jti_target(jti)),
            reason: String::new(),
        },
        ADMIN_TOKEN,
    );
    admin.revoke(request).await.expect("revoke");
}

async fn revoke_batch(admin: &mut AdminClient<Channel>, jtis: impl Iterator<Item = String>) {
    let request = with_bearer(
        pb::RevokeBatchRequest {
            targets: jtis.map(jti_target).collect(),
            reason: "bench".into(),
        },
        ADMIN_TOKEN,
    );
    admin.revoke_batch(request).await.expect("revoke batch");
}

/// Waits until every instance has at least `n` entries in force; returns
/// how long that took.
async fn until_in_force(instances: &[&AdminInstance], n: usize) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(900);
    for inst in instances {
        while (inst.metric(IN_FORCE).await as usize) < n {
            assert!(Instant::now() < deadline, "{n} entries never in force");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One size's figures.
struct AtSize {
    size: usize,
    inserts_per_s: f64,
    propagation_p50: Duration,
    propagation_p99: Duration,
    check_p50: Duration,
    check_mean: Duration,
}

/// `n` sequential Checks on `inst` with `token`: (p50, mean).
async fn check_latency(inst: &AdminInstance, token: &str, n: usize) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let out = outcome(
            &inst
                .server
                .check(envoy_request("GET", "/orders/1", Some(token)))
                .await,
        );
        times.push(started.elapsed());
        assert_eq!(out.http_status, 200, "a token not revoked is allowed");
    }
    let mean = times.iter().sum::<Duration>() / n as u32;
    times.sort();
    (percentile(&times, 50.0), mean)
}

/// A token with `jti`.
fn token_with_jti(fx: &Fixture, jti: &str) -> String {
    let mut claims = claims("alice", &["orders:read"], &[]);
    claims["jti"] = Value::from(jti);
    fx.es256().sign(&claims)
}

/// Redis' `total_net_input_bytes` and `total_net_output_bytes`.
fn redis_bytes(redis: &RedisServer) -> (u64, u64) {
    let info = redis.command(&["INFO", "stats"]).expect("INFO stats");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .unwrap_or(0)
    };
    (
        field("total_net_input_bytes"),
        field("total_net_output_bytes"),
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

async fn measure_size(
    fx: &Fixture,
    plan: &Plan,
    size: usize,
    a: &AdminInstance,
    b: &AdminInstance,
    allowed: &str,
) -> AtSize {
    // Insert rate: 8 callers, single-target Revoke each.
    let started = Instant::now();
    let per_task = plan.inserts / 8;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut admin = a.admin().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                revoke(&mut admin, format!("insert-{size}-{t}-{i}")).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let inserts_per_s = (per_task * 8) as f64 / started.elapsed().as_secs_f64();

    // Propagation A -> B.
    let mut propagation = Vec::with_capacity(plan.propagation_samples);
    for i in 0..plan.propagation_samples {
        let jti = format!("propagation-{size}-{i}");
        let token = token_with_jti(fx, &jti);
        let mut admin = a.admin().await;
        let started = Instant::now();
        let call = tokio::spawn(async move { revoke(&mut admin, jti).await });
        loop {
            let out = outcome(
                &b.server
                    .check(envoy_request("GET", "/orders/1", Some(&token)))
                    .await,
            );
            if out.http_status == 401 {
                propagation.push(started.elapsed());
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "B never denied"
            );
        }
        call.await.unwrap();
    }
    propagation.sort();
    let (check_p50, check_mean) = check_latency(b, allowed, plan.checks).await;
    AtSize {
        size,
        inserts_per_s,
        propagation_p50: percentile(&propagation, 50.0),
        propagation_p99: percentile(&propagation, 99.0),
        check_p50,
        check_mean,
    }
}

/// `portcullis serve` (embedded mode) on `data_dir`: time until SERVING and
/// resident memory then (kB).
async fn startup(fx: &Fixture, name: &str, data_dir: &Path) -> (Duration, u64) {
    let base = std::fs::read_to_string(fx.config_path()).unwrap();
    let path = fx.path(&format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "{base}\n[revocation]\ndata_dir = \"{}\"\nmax_entries = 3000000\n",
            data_dir.display()
        ),
    )
    .unwrap();
    let listen = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().to_string()
    };
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--config", &path_arg(&path), "--listen", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
            && health_of(&channel, "").await == 1
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "serve never became SERVING"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    (took, rss)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

async fn run(plan: Plan) {
    let redis = RedisServer::start_with_appendfsync("everysec");
    // For diagnosis: `PORTCULLIS_BENCH_REDIS_CONFIG="auto-aof-rewrite-percentage 0"`
    // (a parameter and its value, given to `CONFIG SET`).
    if let Ok(setting) = std::env::var("PORTCULLIS_BENCH_REDIS_CONFIG") {
        let mut args = vec!["CONFIG", "SET"];
        args.extend(setting.split_whitespace());
        let reply = redis.command(&args).unwrap_or_default();
        assert!(reply.starts_with("+OK"), "CONFIG SET {setting}: {reply}");
        eprintln!("redis: CONFIG SET {setting}");
    }
    let proxy = TcpProxy::start(redis.port).await;
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let a = start(&fx, "a", &redis.url()).await;
    let b = start(&fx, "b", &redis.url()).await;
    let c = start(&fx, "c", &proxy.url()).await;
    let everyone = [&a, &b, &c];
    let allowed = fx.es256().token("alice", &["orders:read"], &[]);

    let (empty_p50, empty_mean) = check_latency(&b, &allowed, plan.checks).await;
    let mut admin = a.admin().await;
    let mut filled = 0usize;
    let mut made = 0usize; // entries made outside the fill (inserts, samples)
    let mut figures = Vec::new();
    for &size in &plan.sizes {
        let fill_started = Instant::now();
        while filled < size {
            let n = FILL_BATCH.min(size - filled);
            revoke_batch(
                &mut admin,
                (filled..filled + n).map(|i| format!("fill-{i}")),
            )
            .await;
            filled += n;
        }
        let expected = filled + made;
        until_in_force(&everyone, expected).await;
        eprintln!(
            "{size} in force on every instance ({:.1} s to fill)",
            fill_started.elapsed().as_secs_f64()
        );
        figures.push(measure_size(&fx, &plan, size, &a, &b, &allowed).await);
        made += plan.inserts / 8 * 8 + plan.propagation_samples;
    }

    // Mass revocation through the CLI.
    let list = fx.path("mass.txt");
    let text: String = (0..plan.mass).map(|i| format!("jti mass-{i}\n")).collect();
    std::fs::write(&list, text).unwrap();
    let expected = filled + made + plan.mass;
    let started = Instant::now();
    let cli = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "revoke",
            "--from-file",
            &path_arg(&list),
            "--admin",
            &a.admin_addr.to_string(),
        ])
        .env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let cli_took = started.elapsed();
    assert!(cli.success(), "revoke --from-file failed");
    until_in_force(&everyone, expected).await;
    let mass_took = started.elapsed();

    // Resync after an outage.
    let resyncs = "portcullis_revocation_resyncs_total{kind=\"incremental\"}";
    let incremental_before = c.metric(resyncs).await;
    let full_resyncs = "portcullis_revocation_resyncs_total{kind=\"full\"}";
    let full_before = c.metric(full_resyncs).await;
    proxy.cut();
    tokio::time::sleep(plan.outage / 2).await;
    revoke_batch(&mut admin, (0..100).map(|i| format!("outage-{i}"))).await;
    tokio::time::sleep(plan.outage / 2).await;
    let expected = expected + 100;
    let bytes_before = redis_bytes(&redis);
    let restored = Instant::now();
    proxy.restore();
    until_in_force(&[&c], expected).await;
    let resync_took = restored.elapsed();
    // The resync is counted once it has also repaired Redis (after it
    // enforced what it read).
    let counted = Instant::now();
    while c.metric(resyncs).await == incremental_before
        && c.metric(full_resyncs).await == full_before
        && counted.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bytes_after = redis_bytes(&redis);
    let incremental = c.metric(resyncs).await - incremental_before;
    let full = c.metric(full_resyncs).await - full_before;

    // A new instance loads the snapshot.
    let bytes_before_full = redis_bytes(&redis);
    let started = Instant::now();
    let d = start(&fx, "d", &redis.url()).await;
    let full_took = started.elapsed();
    let bytes_after_full = redis_bytes(&redis);
    assert!(d.metric(IN_FORCE).await as usize >= expected);

    // What else ran meanwhile (background work that competes for the cores).
    let mut compactions = Vec::new();
    for inst in [&a, &b, &c, &d] {
        compactions.push(
            inst.metric("portcullis_revocation_journal_compactions_total")
                .await,
        );
    }
    let persistence = redis.command(&["INFO", "persistence"]).unwrap_or_default();
    let aof_rewrites = persistence
        .lines()
        .find_map(|l| l.strip_prefix("aof_rewrites:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    for inst in [a, b, c, d] {
        inst.stop().await;
    }
    let copy = fx.path("startup-full");
    copy_dir(&fx.path("data-b"), &copy);
    let empty = fx.path("startup-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (empty_start, empty_rss) = startup(&fx, "start-empty", &empty).await;
    let (full_start, full_rss) = startup(&fx, "start-full", &copy).await;

    // Report.
    println!("revocation at breach scale: 3 instances, one redis-server (everysec), loopback");
    let first = &figures[0];
    println!(
        "  {:>10} {:>14} {:>8} {:>14} {:>14} {:>12} {:>8}",
        "in force",
        "inserts/s",
        "ratio",
        "prop. p50 ms",
        "prop. p99 ms",
        "Check p50 ms",
        "vs empty"
    );
    for f in &figures {
        println!(
            "  {:>10} {:>14.0} {:>8.2} {:>14.2} {:>14.2} {:>12.3} {:>8.2}",
            f.size,
            f.inserts_per_s,
            f.inserts_per_s / first.inserts_per_s,
            ms(f.propagation_p50),
            ms(f.propagation_p99),
            ms(f.check_p50),
            f.check_p50.as_secs_f64() / empty_p50.as_secs_f64()
        );
    }
    println!(
        "  Check on B with an empty set: p50 {:.3} ms, mean {:.3} ms; with {} in force: mean {:.3} ms ({:.2}x)",
        ms(empty_p50),
        ms(empty_mean),
        figures.last().map_or(0, |f| f.size),
        figures.last().map_or(0.0, |f| ms(f.check_mean)),
        figures.last().map_or(0.0, |f| f.check_mean.as_secs_f64()
            / empty_mean.as_secs_f64())
    );
    println!(
        "  mass revocation of {} jtis (revoke --from-file on A): CLI done in {:.2} s, enforced by all 3 in {:.2} s",
        plan.mass,
        cli_took.as_secs_f64(),
        mass_took.as_secs_f64()
    );
    println!(
        "  resync after a {:.0} s outage (100 made meanwhile, {} in force): C enforces them {:.0} ms after Redis is back; \
         Redis sent {}, received {} until it had also repaired Redis; resyncs: {incremental} incremental, {full} full",
        plan.outage.as_secs_f64(),
        expected,
        ms(resync_took),
        mib(bytes_after.1 - bytes_before.1),
        mib(bytes_after.0 - bytes_before.0),
    );
    println!(
        "  a new instance loading the snapshot: {:.2} s until SERVING; Redis sent {}, received {}",
        full_took.as_secs_f64(),
        mib(bytes_after_full.1 - bytes_before_full.1),
        mib(bytes_after_full.0 - bytes_before_full.0),
    );
    println!(
        "  background work during the run: journal compactions per instance (A, B, C, D) {compactions:?}; Redis AOF rewrites {aof_rewrites}"
    );
    println!(
        "  startup (embedded, B's journal copied): empty {:.2} s / {} MiB RSS; {} entries {:.2} s / {} MiB RSS",
        empty_start.as_secs_f64(),
        empty_rss / 1024,
        expected,
        full_start.as_secs_f64(),
        full_rss / 1024
    );
}

fn main() {
    let plan = Plan::from_args();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(plan));
}
