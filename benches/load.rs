//! Load benchmark: Portcullis against a no-op ext_authz server, in one run.
//!
//! Both servers run in this process on one Tokio runtime, behind the same tonic
//! stack and the same kind of loopback listener. The no-op server allows
//! everything without looking at the request; Portcullis is the real server
//! (`portcullis::server::start`) with an engine loaded from the quickstart
//! configuration, generated ES256 keys and an audit log written to a temporary
//! file (batched, as `serve` does by default). A load generator on its own Tokio runtime (its own worker threads)
//! drives each server with the same concurrent gRPC load: several HTTP/2
//! connections with many requests in flight on each. Requests are Envoy-like
//! `CheckRequest`s, encoded once before the timed phase so the client spends as
//! little of the shared CPU as possible.
//!
//! Scenarios (each reports req/s, p50/p99/p99.9, Portcullis / no-op, and the CPU
//! time the server threads spent per response):
//! - *hot*: 4 tokens, `GET /orders/7` over and over;
//! - *warm*: 1,000 tokens, `GET /orders` and `GET /orders/{id}` with ids 1..100;
//! - *cold*: a different token, of a different principal, on every request;
//!   also reported as a fraction of the machine's raw ES256 verification
//!   ceiling, measured in this run on all cores with aws-lc;
//! - *hot at half load*: hot again, paced at half of Portcullis' hot peak
//!   (and, last, at a quarter of it);
//! - *warm with a large policy set*: warm again, against a second Portcullis
//!   whose policies are the quickstart's plus a per-user template linked for
//!   100,000 users (`PORTCULLIS_BENCH_LARGE_POLICY_USERS`), the warm subjects
//!   among them;
//! - *warm, id read*: warm again, against a third Portcullis whose policies
//!   also read `context.path_params.id`, so the decision cache cannot share a
//!   decision across ids (the decision-cache-miss path);
//! - *cold, known users*: a different token on every request, each of one of
//!   the warm run's 1,000 users (a fresh login or refresh: a new signature to
//!   verify, a principal already seen).
//!
//! Every Portcullis response must be an allow; any deny or gRPC error makes the
//! run invalid (exit code 1).
//!
//! Run: `cargo bench --bench load`. Durations and load shape can be overridden
//! with `PORTCULLIS_BENCH_SECS` (measured seconds per scenario, default 5),
//! `PORTCULLIS_BENCH_WARMUP_SECS` (default 1), `PORTCULLIS_BENCH_CHANNELS`
//! (connections, default 8), `PORTCULLIS_BENCH_CONCURRENCY` (requests in
//! flight in total, default 64), `PORTCULLIS_BENCH_CLIENT_THREADS` and
//! `PORTCULLIS_BENCH_SERVER_THREADS` (default: the number of cores each),
//! `PORTCULLIS_BENCH_COLD_MAX_TOKENS` (default 200,000),
//! `PORTCULLIS_BENCH_PROFILE=hot|warm|warm-ids|cold|cold-known` (with
//! `PORTCULLIS_BENCH_RATE` to pace it; drive Portcullis alone with that
//! scenario and print its line only, for running under a profiler) and
//! `PORTCULLIS_BENCH_NOOP_NODELAY=0` (leave Nagle's algorithm on for the no-op
//! server's accepted sockets; by default it sets `TCP_NODELAY`, as
//! `portcullis::server::start` does).
//!
//! Without `--bench` in its arguments (that is how `cargo test --benches` runs
//! it) it does a short smoke run, so CI exercises it in a few seconds.

mod common;

use common::{Noop, cores, cpu_model, env_f64, env_usize, load_average, verdict};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use bytes::{BufMut, Bytes};
use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address as EnvoyAddress, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use hdrhistogram::Histogram;
use jsonwebtoken::Algorithm;
use portcullis::audit::AuditLog;
use portcullis::authn::mint::{SigningKey, pkcs8_pem};
use portcullis::config::Config;
use portcullis::engine::Engine;
use portcullis::server::{self, RunningServer};
use prost::Message;
use serde_json::json;
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;

/// The allocator of the `portcullis` binary (`src/main.rs`), so Portcullis here
/// allocates as the real one does. A global allocator is one per process: the
/// no-op server and the load generator use it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/policy_gen.rs"]
mod policy_gen;

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
const ISSUER: &str = "https://auth.example.test";
const AUDIENCE: &str = "orders-api";

// ---------------------------------------------------------------------------
// Settings

struct Settings {
    smoke: bool,
    warmup: Duration,
    measure: Duration,
    channels: usize,
    concurrency: usize,
    client_threads: usize,
    server_threads: usize,
    warm_tokens: usize,
    warm_requests: usize,
    large_policy_users: usize,
    cold_max_tokens: usize,
    ceiling_time: Duration,
    noop_nodelay: bool,
}

impl Settings {
    fn from_env() -> Settings {
        // `cargo bench` passes `--bench`; `cargo test --benches` does not.
        let smoke = !std::env::args().any(|a| a == "--bench");
        let cores = cores();
        let (warmup, measure, warm_tokens, warm_requests, cold_max, ceiling, large) = if smoke {
            (0.05, 0.2, 20, 2_000, 5_000, 0.1, 1_000)
        } else {
            (1.0, 5.0, 1_000, 100_000, 200_000, 2.0, 100_000)
        };
        Settings {
            smoke,
            warmup: Duration::from_secs_f64(
                env_f64("PORTCULLIS_BENCH_WARMUP_SECS").unwrap_or(warmup),
            ),
            measure: Duration::from_secs_f64(env_f64("PORTCULLIS_BENCH_SECS").unwrap_or(measure)),
            channels: env_usize("PORTCULLIS_BENCH_CHANNELS").unwrap_or(8).max(1),
            concurrency: env_usize("PORTCULLIS_BENCH_CONCURRENCY")
                .unwrap_or(64)
                .max(1),
            client_threads: env_usize("PORTCULLIS_BENCH_CLIENT_THREADS")
                .unwrap_or(cores)
                .max(1),
            server_threads: env_usize("PORTCULLIS_BENCH_SERVER_THREADS")
                .unwrap_or(cores)
                .max(1),
            warm_tokens,
            warm_requests,
            large_policy_users: env_usize("PORTCULLIS_BENCH_LARGE_POLICY_USERS").unwrap_or(large),
            cold_max_tokens: env_usize("PORTCULLIS_BENCH_COLD_MAX_TOKENS").unwrap_or(cold_max),
            ceiling_time: Duration::from_secs_f64(ceiling),
            noop_nodelay: env_usize("PORTCULLIS_BENCH_NOOP_NODELAY").unwrap_or(1) != 0,
        }
    }

    /// Policies of the large set: the quickstart's 4 plus one template link
    /// per user.
    fn large_policies(&self) -> usize {
        self.large_policy_users + 4
    }
}

// ---------------------------------------------------------------------------
// The no-op server

/// Same listener and transport as `portcullis::server::start`: a bound
/// `TcpListener` handed to tonic as accepted connections with `TCP_NODELAY`
/// (unless `nodelay` is false, to show what Nagle's algorithm costs).
async fn start_noop(nodelay: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = TcpIncoming::from(listener).with_nodelay(nodelay.then_some(true));
    let router = tonic::transport::Server::builder().add_service(AuthorizationServer::new(Noop));
    tokio::spawn(router.serve_with_incoming(incoming));
    addr
}

// ---------------------------------------------------------------------------
// Portcullis, keys and tokens

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The quickstart deployment with a generated ES256 key, in a temporary folder.
struct Deployment {
    dir: tempfile::TempDir,
    key: SigningKey,
    config: Config,
}

fn deployment() -> Deployment {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .unwrap();
    let key =
        SigningKey::from_pem(pkcs8_pem(doc.as_ref()).as_bytes(), Algorithm::ES256, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = json!({ "keys": [serde_json::to_value(&key.public_jwks().keys[0]).unwrap()] });
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    let text = std::fs::read_to_string(root.join("portcullis.toml"))
        .unwrap()
        .replace(
            "dir = \"policies\"",
            &format!("dir = {:?}", root.join("policies").display().to_string()),
        );
    let config = Config::from_toml(&text, Path::new("load-bench.toml"), dir.path()).unwrap();
    Deployment { dir, key, config }
}

async fn start_portcullis(deployment: &Deployment, config: &Config, audit: &str) -> RunningServer {
    // As `portcullis serve` opens it: batched as the configuration says.
    let audit = AuditLog::file(&deployment.dir.path().join(audit))
        .unwrap()
        .batched(config.audit.flush_interval())
        .unwrap();
    let running = server::start("127.0.0.1:0".parse().unwrap(), audit)
        .await
        .unwrap();
    let engine = Engine::from_config(config).unwrap();
    running.state().install(engine).await;
    running
}

/// The quickstart policies plus a per-user template linked for `users` users
/// (the warm scenario's subjects first), `users + 4` policies in all.
fn large_policy_config(deployment: &Deployment, users: usize) -> Config {
    let dir = deployment.dir.path().join("large-policies");
    policy_gen::quickstart_with_user_links(&dir, (0..users).map(|i| format!("warm-{i}")));
    let mut config = deployment.config.clone();
    config.policies.dir = dir;
    config
}

/// The quickstart policies plus one that reads the order id (a forbid for id
/// `0`, which no request here uses): each (token, id) then has a decision of
/// its own, as with policies that look at path parameters.
fn id_reading_config(deployment: &Deployment) -> Config {
    let dir = deployment.dir.path().join("id-reading-policies");
    policy_gen::quickstart_with_user_links(&dir, std::iter::empty());
    std::fs::write(
        dir.join("order-zero.cedar"),
        "@id(\"no-order-zero\")\nforbid(principal, action == Action::\"get /orders/{id}\", resource)\nwhen { context.path_params.id == \"0\" };\n",
    )
    .unwrap();
    let mut config = deployment.config.clone();
    config.policies.dir = dir;
    config
}

/// Signs one `orders:read` token per subject, on all cores.
/// One token per `(subject, jti)`.
fn mint(key: &SigningKey, subjects: impl Iterator<Item = (String, String)>) -> Vec<String> {
    let subjects: Vec<(String, String)> = subjects.collect();
    let iat = now();
    let chunk = subjects.len().div_ceil(cores()).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = subjects
            .chunks(chunk)
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(sub, jti)| {
                            let claims = json!({
                                "iss": ISSUER, "aud": AUDIENCE, "sub": sub,
                                "iat": iat, "exp": iat + 3000, "jti": jti,
                                "scope": "orders:read",
                            });
                            key.sign_claims(&claims).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// A request as Envoy builds it, encoded once.
fn envoy_request(method: &str, path: &str, token: &str, n: usize) -> Bytes {
    let request_id = format!("5c7e1a52-0000-4000-8000-{n:012}");
    let headers = [
        (":method", method.to_owned()),
        (":path", path.to_owned()),
        (":authority", "orders.example.test".to_owned()),
        (":scheme", "https".to_owned()),
        ("authorization", format!("Bearer {token}")),
        ("accept", "application/json".to_owned()),
        ("user-agent", "load-bench/1.0".to_owned()),
        ("x-forwarded-proto", "https".to_owned()),
        ("x-request-id", request_id.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let peer = |ip: &str, port: u32| Peer {
        address: Some(EnvoyAddress {
            address: Some(Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.1.2.3", 40000 + (n % 20000) as u32)),
            destination: Some(peer("10.9.8.7", 8443)),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: request_id,
                    method: method.into(),
                    path: path.into(),
                    host: "orders.example.test".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
    .encode_to_vec()
    .into()
}

/// A small deterministic generator (xorshift64*), so every run sends the same mix.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

// ---------------------------------------------------------------------------
// The verification ceiling

/// Raw ES256 verifications per second on all cores (aws-lc, no JWT parsing): the
/// most a server that verifies every request could ever do on this machine.
fn es256_ceiling(time: Duration) -> f64 {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let message = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9";
    let signature = pair.sign(&rng, message).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    let started = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cores())
            .map(|_| {
                let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public.clone());
                let signature = signature.as_ref();
                s.spawn(move || {
                    let mut n = 0u64;
                    while started.elapsed() < time {
                        for _ in 0..32 {
                            public
                                .verify(std::hint::black_box(message), signature)
                                .unwrap();
                        }
                        n += 32;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------
// The load generator

/// Sends pre-encoded `CheckRequest` bytes and decodes the `CheckResponse`.
#[derive(Clone, Copy, Default)]
struct RawCheckCodec;

struct RawEncoder;
struct ResponseDecoder;

impl Codec for RawCheckCodec {
    type Encode = Bytes;
    type Decode = CheckResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = CheckResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<CheckResponse>, tonic::Status> {
        CheckResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// Where requests come from.
#[derive(Clone)]
enum Source {
    /// Round and round the list (each worker from its own offset).
    Cycle(Arc<Vec<Bytes>>),
    /// Each request once, shared by all workers; the run stops when they run out.
    Once(Arc<Vec<Bytes>>, Arc<AtomicUsize>),
}

impl Source {
    fn once(requests: Arc<Vec<Bytes>>) -> Source {
        Source::Once(requests, Arc::new(AtomicUsize::new(0)))
    }
}

#[derive(Clone, Copy)]
struct Plan {
    warmup: Duration,
    measure: Duration,
    /// Requests per second in total, or `None` for as fast as responses come.
    rate: Option<f64>,
}

struct Stats {
    latency_ns: Histogram<u64>,
    /// Responses received, warm-up included.
    completed: u64,
    measured: u64,
    allowed: u64,
    denied: u64,
    errors: u64,
    first_problem: Option<String>,
    exhausted: bool,
    last_done: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap(),
            completed: 0,
            measured: 0,
            allowed: 0,
            denied: 0,
            errors: 0,
            first_problem: None,
            exhausted: false,
            last_done: None,
        }
    }

    fn merge(&mut self, other: Stats) {
        self.latency_ns.add(&other.latency_ns).unwrap();
        self.completed += other.completed;
        self.measured += other.measured;
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.errors += other.errors;
        self.first_problem = self.first_problem.take().or(other.first_problem);
        self.exhausted |= other.exhausted;
        self.last_done = self.last_done.max(other.last_done);
    }
}

fn is_allow(response: &CheckResponse) -> bool {
    response.status.as_ref().is_some_and(|s| s.code == 0)
        && matches!(response.http_response, Some(HttpResponse::OkResponse(_)))
}

/// Opens `n` HTTP/2 connections to `addr`.
async fn connect(addr: SocketAddr, n: usize) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        channels.push(channel);
    }
    channels
}

struct Measured {
    throughput: f64,
    stats: Stats,
    window: Duration,
    /// CPU time the server runtime's threads used per response, warm-up included.
    server_cpu_per_request: Duration,
}

/// CPU time used so far by the server runtime's threads (named `bench-server`)
/// and Portcullis' audit writer thread, from the scheduler's per-thread
/// nanosecond counters.
fn server_cpu() -> Duration {
    let mut total = 0u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("bench-server") && !comm.starts_with("audit-writer") {
            continue;
        }
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(total)
}

/// A no-op / Portcullis pair of rows: where they are in the report, and the
/// throughput ratio.
struct Paired {
    ratio: f64,
    noop: usize,
    portcullis: usize,
}

/// Drives the server behind `channels` with `concurrency` workers spread over
/// the connections.
async fn drive(channels: &[Channel], concurrency: usize, source: Source, plan: Plan) -> Measured {
    let cpu_before = server_cpu();
    let start = Instant::now();
    let measure_start = start + plan.warmup;
    let end = measure_start + plan.measure;
    let mut tasks = tokio::task::JoinSet::new();
    // Paced: a thread of its own releases one request every 1/rate seconds,
    // and whichever worker is free sends it. Tokio's timer has a 1 ms
    // resolution, so pacing each worker with it sent the requests in bursts,
    // one per millisecond tick; a thread's sleep is good to about 0.1 ms.
    let pacer = plan.rate.map(|rate| {
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        let released = permits.clone();
        let interval = Duration::from_secs_f64(1.0 / rate);
        let thread = std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                let mut next = start;
                while next < end {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    released.add_permits(1);
                    next += interval;
                }
                released.close();
            })
            .unwrap();
        (permits, thread)
    });
    for w in 0..concurrency {
        let channel = channels[w % channels.len()].clone();
        let source = source.clone();
        let permits = pacer.as_ref().map(|(permits, _)| permits.clone());
        tasks.spawn(async move {
            let mut stats = Stats::new();
            let mut grpc = tonic::client::Grpc::new(channel);
            let mut cursor = match &source {
                Source::Cycle(list) => w * list.len() / concurrency,
                Source::Once(..) => 0,
            };
            loop {
                if let Some(permits) = &permits {
                    match permits.acquire().await {
                        Ok(permit) => permit.forget(),
                        // Closed: the pacer is past the end.
                        Err(_) => break,
                    }
                }
                let body = match &source {
                    Source::Cycle(list) => {
                        cursor = (cursor + 1) % list.len();
                        list[cursor].clone()
                    }
                    Source::Once(list, next) => {
                        match list.get(next.fetch_add(1, Ordering::Relaxed)) {
                            Some(body) => body.clone(),
                            None => {
                                stats.exhausted = true;
                                break;
                            }
                        }
                    }
                };
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result = match grpc.ready().await {
                    Ok(()) => {
                        let path = PathAndQuery::from_static(CHECK_PATH);
                        grpc.unary(tonic::Request::new(body), path, RawCheckCodec)
                            .await
                    }
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                let done = Instant::now();
                stats.completed += 1;
                match result {
                    Ok(response) if is_allow(response.get_ref()) => stats.allowed += 1,
                    Ok(response) => {
                        stats.denied += 1;
                        stats
                            .first_problem
                            .get_or_insert_with(|| format!("deny: {:?}", response.get_ref()));
                    }
                    Err(status) => {
                        stats.errors += 1;
                        stats
                            .first_problem
                            .get_or_insert_with(|| format!("gRPC error: {status}"));
                    }
                }
                if sent >= measure_start {
                    stats.measured += 1;
                    let ns = (done - sent).as_nanos().max(1) as u64;
                    stats.latency_ns.saturating_record(ns);
                    stats.last_done = Some(done);
                }
            }
            stats
        });
    }
    let mut stats = Stats::new();
    while let Some(worker) = tasks.join_next().await {
        stats.merge(worker.unwrap());
    }
    if let Some((_, thread)) = pacer {
        thread.join().unwrap();
    }
    let server_cpu_per_request = (server_cpu() - cpu_before) / stats.completed.max(1) as u32;
    // When the requests ran out early, the window is what was actually used.
    let window = if stats.exhausted {
        stats
            .last_done
            .map(|t| t.saturating_duration_since(measure_start))
            .unwrap_or_default()
    } else {
        plan.measure
    };
    let throughput = if window.is_zero() {
        0.0
    } else {
        stats.measured as f64 / window.as_secs_f64()
    };
    Measured {
        throughput,
        stats,
        window,
        server_cpu_per_request,
    }
}

// ---------------------------------------------------------------------------
// Reporting

struct Row {
    scenario: String,
    server: &'static str,
    result: Measured,
    ratio: Option<f64>,
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn print_line(cells: [&str; 9]) {
    println!(
        "| {:<18} | {:<10} | {:>9} | {:>8} | {:>8} | {:>8} | {:>9} | {:>12} | {:>15} |",
        cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7], cells[8]
    );
}

fn print_row(row: &Row) {
    let h = &row.result.stats.latency_ns;
    let s = &row.result.stats;
    print_line([
        &row.scenario,
        row.server,
        &format!("{:.0}", row.result.throughput),
        &format!("{:.0}", us(h, 0.50)),
        &format!("{:.0}", us(h, 0.99)),
        &format!("{:.0}", us(h, 0.999)),
        &row.ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
        &format!(
            "{:.1}",
            row.result.server_cpu_per_request.as_secs_f64() * 1e6
        ),
        &format!("{} / {}", s.denied, s.errors),
    ]);
}

fn print_header() {
    print_line([
        "scenario",
        "server",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "/ no-op",
        "server CPU µs",
        "denies / errors",
    ]);
    print_line([
        "------------------",
        "----------",
        "--------:",
        "-------:",
        "-------:",
        "-------:",
        "--------:",
        "-----------:",
        "--------------:",
    ]);
}

fn progress(row: &Row) {
    let h = &row.result.stats.latency_ns;
    eprintln!(
        "  {:<18} {:<10} {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs  p99.9 {:>6.0} µs  server CPU {:>5.1} µs/req  ({} measured in {:.2} s{})",
        row.scenario,
        row.server,
        row.result.throughput,
        us(h, 0.50),
        us(h, 0.99),
        us(h, 0.999),
        row.result.server_cpu_per_request.as_secs_f64() * 1e6,
        row.result.stats.measured,
        row.result.window.as_secs_f64(),
        if row.result.stats.exhausted {
            ", requests ran out"
        } else {
            ""
        }
    );
}

// ---------------------------------------------------------------------------
// Setup

/// Prints what the run will do.
fn announce(settings: &Settings, cores: usize) {
    eprintln!(
        "load benchmark{}: {} cores, {} connections, {} in flight, {:?} warm-up + {:?} per scenario",
        if settings.smoke {
            " (smoke run: pass --bench, as `cargo bench` does, for the real one)"
        } else {
            ""
        },
        cores,
        settings.channels,
        settings.concurrency,
        settings.warmup,
        settings.measure,
    );
}

/// The raw ES256 verification ceiling, measured first, with every server idle.
fn measure_ceiling(settings: &Settings, cores: usize) -> f64 {
    let ceiling = es256_ceiling(settings.ceiling_time);
    eprintln!("  raw ES256 verification ceiling: {ceiling:.0} verifications/s on {cores} cores");
    ceiling
}

/// The servers under test on their runtime, the load generator's runtime, and
/// its connections to each server. The fields are dropped in the order they
/// are listed (connections, servers, client runtime, server runtime).
struct Bench {
    real_ids: Vec<Channel>,
    real_large: Vec<Channel>,
    real: Vec<Channel>,
    noop: Vec<Channel>,
    portcullis_ids: RunningServer,
    portcullis_large: RunningServer,
    portcullis: RunningServer,
    client_rt: tokio::runtime::Runtime,
    server_rt: tokio::runtime::Runtime,
    concurrency: usize,
}

/// Starts the no-op server and the three Portcullis servers (quickstart, large
/// policy set, id-reading policy) and connects to each.
fn setup(settings: &Settings, deployment: &Deployment) -> Bench {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.server_threads)
        .thread_name("bench-server")
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    let noop_addr = server_rt.block_on(start_noop(settings.noop_nodelay));
    let portcullis = server_rt.block_on(start_portcullis(
        deployment,
        &deployment.config,
        "audit.log",
    ));
    // The same, with a large policy set (loading takes seconds).
    let loading = Instant::now();
    let large_config = large_policy_config(deployment, settings.large_policy_users);
    let portcullis_large = server_rt.block_on(start_portcullis(
        deployment,
        &large_config,
        "large.audit.log",
    ));
    eprintln!(
        "  loaded, validated and indexed {} policies in {:.1} s",
        settings.large_policies(),
        loading.elapsed().as_secs_f64()
    );
    // And with a policy that reads the order id.
    let portcullis_ids = server_rt.block_on(start_portcullis(
        deployment,
        &id_reading_config(deployment),
        "ids.audit.log",
    ));
    let (noop, real, real_large, real_ids) = client_rt.block_on(async {
        (
            connect(noop_addr, settings.channels).await,
            connect(portcullis.local_addr(), settings.channels).await,
            connect(portcullis_large.local_addr(), settings.channels).await,
            connect(portcullis_ids.local_addr(), settings.channels).await,
        )
    });
    Bench {
        real_ids,
        real_large,
        real,
        noop,
        portcullis_ids,
        portcullis_large,
        portcullis,
        client_rt,
        server_rt,
        concurrency: settings.concurrency,
    }
}

/// The requests of every scenario, all encoded before anything is timed.
struct Requests {
    /// 4 tokens, `GET /orders/7`.
    hot: Arc<Vec<Bytes>>,
    /// The warm tokens over `GET /orders` and `GET /orders/{1..100}`.
    warm: Arc<Vec<Bytes>>,
    /// A new principal with every token.
    cold: Arc<Vec<Bytes>>,
    /// A new token of one of the warm run's users each time.
    cold_known: Arc<Vec<Bytes>>,
}

fn encode_requests(settings: &Settings, deployment: &Deployment, ceiling: f64) -> Requests {
    let one_each = |prefix: &'static str| {
        move |i: usize| (format!("{prefix}-{i}"), format!("jti-{prefix}-{i}"))
    };
    let hot_tokens = mint(&deployment.key, (0..4).map(one_each("hot")));
    let hot: Arc<Vec<Bytes>> = Arc::new(
        hot_tokens
            .iter()
            .enumerate()
            .map(|(n, t)| envoy_request("GET", "/orders/7", t, n))
            .collect(),
    );
    let warm_tokens = mint(
        &deployment.key,
        (0..settings.warm_tokens).map(one_each("warm")),
    );
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let warm: Arc<Vec<Bytes>> = Arc::new(
        (0..settings.warm_requests)
            .map(|n| {
                let token = &warm_tokens[rng.below(warm_tokens.len())];
                // GET /orders or GET /orders/{1..100}, uniformly over the 101 paths.
                match rng.below(101) {
                    0 => envoy_request("GET", "/orders", token, n),
                    id => envoy_request("GET", &format!("/orders/{id}"), token, n),
                }
            })
            .collect(),
    );
    // No run can verify faster than the ceiling: that many tokens (with a margin)
    // always last the whole cold run, unless capped.
    let cold_needed = (ceiling * (settings.warmup + settings.measure).as_secs_f64() * 1.2) as usize;
    let cold_count = cold_needed.min(settings.cold_max_tokens);
    let minting = Instant::now();
    let encode_cold = |tokens: Vec<String>| -> Arc<Vec<Bytes>> {
        Arc::new(
            tokens
                .iter()
                .enumerate()
                .map(|(n, t)| envoy_request("GET", "/orders/7", t, n))
                .collect(),
        )
    };
    // A new principal with every token: nothing about the caller is known.
    let cold = encode_cold(mint(&deployment.key, (0..cold_count).map(one_each("cold"))));
    // A new token of one of the warm run's users each time (a fresh login or
    // refresh): the signature is new, the principal is not.
    let cold_known = encode_cold(mint(
        &deployment.key,
        (0..cold_count).map(|i| {
            (
                format!("warm-{}", i % settings.warm_tokens),
                format!("jti-refresh-{i}"),
            )
        }),
    ));
    eprintln!(
        "  minted and encoded 2 × {cold_count} cold tokens in {:.1} s (enough for {:.1} s at the ceiling)",
        minting.elapsed().as_secs_f64(),
        cold_count as f64 / ceiling
    );
    Requests {
        hot,
        warm,
        cold,
        cold_known,
    }
}

impl Bench {
    /// Drives the server behind `channels` from the load generator's runtime.
    fn run(&self, channels: &[Channel], source: Source, plan: Plan) -> Measured {
        self.client_rt
            .block_on(drive(channels, self.concurrency, source, plan))
    }

    /// Runs a scenario against the no-op server, then against the Portcullis
    /// behind `real`, and adds both rows.
    fn pair(
        &self,
        rows: &mut Vec<Row>,
        real: &[Channel],
        name: &str,
        noop_source: Source,
        real_source: Source,
        plan: Plan,
    ) -> Paired {
        let base = self.run(&self.noop, noop_source, plan);
        let measured = self.run(real, real_source, plan);
        let ratio = measured.throughput / base.throughput;
        for row in [
            Row {
                scenario: name.to_owned(),
                server: "no-op",
                result: base,
                ratio: None,
            },
            Row {
                scenario: name.to_owned(),
                server: "portcullis",
                result: measured,
                // At a fixed offered rate, a throughput ratio says nothing.
                ratio: plan.rate.is_none().then_some(ratio),
            },
        ] {
            progress(&row);
            rows.push(row);
        }
        Paired {
            ratio,
            noop: rows.len() - 2,
            portcullis: rows.len() - 1,
        }
    }

    /// Closes the connections and the load generator's runtime, then shuts the
    /// Portcullis servers down. Returns the server runtime, to be kept until
    /// the end of the run.
    fn stop(self) -> tokio::runtime::Runtime {
        let Bench {
            real_ids,
            real_large,
            real,
            noop,
            portcullis_ids,
            portcullis_large,
            portcullis,
            client_rt,
            server_rt,
            concurrency: _,
        } = self;
        drop(noop);
        drop(real);
        drop(real_large);
        drop(real_ids);
        drop(client_rt);
        server_rt.block_on(async {
            portcullis.shutdown(Duration::from_secs(2)).await.unwrap();
            portcullis_large
                .shutdown(Duration::from_secs(2))
                .await
                .unwrap();
            portcullis_ids
                .shutdown(Duration::from_secs(2))
                .await
                .unwrap();
        });
        server_rt
    }
}

// ---------------------------------------------------------------------------
// Scenarios

/// For profiling (`PORTCULLIS_BENCH_PROFILE`): drives Portcullis alone with
/// one scenario and prints its line.
fn profile(bench: &Bench, requests: &Requests, only: String, plan: Plan) {
    let (server, source) = match only.as_str() {
        "hot" => (&bench.real, Source::Cycle(requests.hot.clone())),
        "warm" => (&bench.real, Source::Cycle(requests.warm.clone())),
        "warm-ids" => (&bench.real_ids, Source::Cycle(requests.warm.clone())),
        "cold" => (&bench.real, Source::once(requests.cold.clone())),
        "cold-known" => (&bench.real, Source::once(requests.cold_known.clone())),
        other => panic!(
            "PORTCULLIS_BENCH_PROFILE={other:?}: expected hot, warm, warm-ids, cold or cold-known"
        ),
    };
    // `PORTCULLIS_BENCH_RATE`: offer that many requests a second (paced).
    let plan = Plan {
        rate: env_f64("PORTCULLIS_BENCH_RATE"),
        ..plan
    };
    let row = Row {
        scenario: only,
        server: "portcullis",
        result: bench.run(server, source, plan),
        ratio: None,
    };
    progress(&row);
}

/// Hot: 4 tokens, `GET /orders/7` over and over.
fn hot(bench: &Bench, rows: &mut Vec<Row>, requests: &Requests, plan: Plan) -> Paired {
    bench.pair(
        rows,
        &bench.real,
        "hot",
        Source::Cycle(requests.hot.clone()),
        Source::Cycle(requests.hot.clone()),
        plan,
    )
}

/// Warm: the warm tokens over `GET /orders` and `GET /orders/{1..100}`.
fn warm(bench: &Bench, rows: &mut Vec<Row>, requests: &Requests, plan: Plan) -> Paired {
    bench.pair(
        rows,
        &bench.real,
        "warm",
        Source::Cycle(requests.warm.clone()),
        Source::Cycle(requests.warm.clone()),
        plan,
    )
}

/// Cold: a different token, of a different principal, on every request.
fn cold(bench: &Bench, rows: &mut Vec<Row>, requests: &Requests, plan: Plan) -> Paired {
    // The no-op server does not care whether tokens repeat; it cycles the same list.
    bench.pair(
        rows,
        &bench.real,
        "cold",
        Source::Cycle(requests.cold.clone()),
        Source::once(requests.cold.clone()),
        plan,
    )
}

/// Hot again, paced at `rate` requests a second.
fn hot_paced(
    bench: &Bench,
    rows: &mut Vec<Row>,
    requests: &Requests,
    plan: Plan,
    rate: f64,
) -> Paired {
    let paced = Plan {
        rate: Some(rate),
        ..plan
    };
    bench.pair(
        rows,
        &bench.real,
        &format!("hot @ {rate:.0}/s"),
        Source::Cycle(requests.hot.clone()),
        Source::Cycle(requests.hot.clone()),
        paced,
    )
}

/// Warm again, against the large policy set.
fn warm_large_policy_set(
    bench: &Bench,
    rows: &mut Vec<Row>,
    requests: &Requests,
    plan: Plan,
    large_policies: usize,
) -> Paired {
    bench.pair(
        rows,
        &bench.real_large,
        &format!("warm, {large_policies} pol."),
        Source::Cycle(requests.warm.clone()),
        Source::Cycle(requests.warm.clone()),
        plan,
    )
}

/// Warm again, where a policy reads the order id.
fn warm_id_read(bench: &Bench, rows: &mut Vec<Row>, requests: &Requests, plan: Plan) -> Paired {
    bench.pair(
        rows,
        &bench.real_ids,
        "warm, id read",
        Source::Cycle(requests.warm.clone()),
        Source::Cycle(requests.warm.clone()),
        plan,
    )
}

/// Cold again, but each token belongs to one of the warm run's users.
fn cold_known_users(bench: &Bench, rows: &mut Vec<Row>, requests: &Requests, plan: Plan) -> Paired {
    bench.pair(
        rows,
        &bench.real,
        "cold, known users",
        Source::Cycle(requests.cold_known.clone()),
        Source::once(requests.cold_known.clone()),
        plan,
    )
}

/// Every row of the full run, and the pairs the summary refers to.
struct Results {
    rows: Vec<Row>,
    hot: Paired,
    warm: Paired,
    cold: Paired,
    half: Paired,
    warm_large: Paired,
    warm_ids: Paired,
    cold_known: Paired,
    quarter: Paired,
    /// Portcullis' hot throughput, which the paced rows are fractions of.
    hot_peak: f64,
}

/// Runs every scenario, in the report's order.
fn run_scenarios(bench: &Bench, requests: &Requests, plan: Plan, large_policies: usize) -> Results {
    let mut rows: Vec<Row> = Vec::new();
    let hot = hot(bench, &mut rows, requests, plan);
    let warm = warm(bench, &mut rows, requests, plan);
    let cold = cold(bench, &mut rows, requests, plan);
    let hot_peak = rows[hot.portcullis].result.throughput;
    let half = hot_paced(bench, &mut rows, requests, plan, hot_peak / 2.0);
    let warm_large = warm_large_policy_set(bench, &mut rows, requests, plan, large_policies);
    let warm_ids = warm_id_read(bench, &mut rows, requests, plan);
    let cold_known = cold_known_users(bench, &mut rows, requests, plan);
    // Hot again at a quarter of the peak: where the tail stands with more idle CPU.
    let quarter = hot_paced(bench, &mut rows, requests, plan, hot_peak / 4.0);
    Results {
        rows,
        hot,
        warm,
        cold,
        half,
        warm_large,
        warm_ids,
        cold_known,
        quarter,
        hot_peak,
    }
}

// ---------------------------------------------------------------------------
// The report

/// What the report says about the machine and the run, besides the rows.
struct Context<'a> {
    settings: &'a Settings,
    cores: usize,
    ceiling: f64,
    load_before: String,
    load_after: String,
}

fn print_report(results: &Results, context: &Context<'_>) {
    let Results { rows, hot_peak, .. } = results;
    let hot_peak = *hot_peak;
    let (settings, cores, ceiling) = (context.settings, context.cores, context.ceiling);
    let large_policies = settings.large_policies();
    let cold_throughput = rows[results.cold.portcullis].result.throughput;
    let cold_known_throughput = rows[results.cold_known.portcullis].result.throughput;
    let warm_large_vs_small = rows[results.warm_large.portcullis].result.throughput
        / rows[results.warm.portcullis].result.throughput;
    let half_p99_us = us(&rows[results.half.portcullis].result.stats.latency_ns, 0.99);
    let quarter_p99_us = us(
        &rows[results.quarter.portcullis].result.stats.latency_ns,
        0.99,
    );
    let quarter_noop_p99_us = us(&rows[results.quarter.noop].result.stats.latency_ns, 0.99);
    let (cold_ratio, cold_known_ratio) = (results.cold.ratio, results.cold_known.ratio);
    let (warm_large_ratio, warm_ids_ratio) = (results.warm_large.ratio, results.warm_ids.ratio);

    println!();
    println!("## Load benchmark: Portcullis vs a no-op ext_authz server (same run)");
    println!();
    print_header();
    for row in rows {
        print_row(row);
    }
    println!();
    let fraction = cold_throughput / ceiling;
    println!(
        "- hot: Portcullis / no-op = {:.3} (target ≥ 0.85: {})",
        results.hot.ratio,
        verdict(results.hot.ratio >= 0.85)
    );
    println!(
        "- warm: Portcullis / no-op = {:.2} (target ≥ 0.5: {})",
        results.warm.ratio,
        verdict(results.warm.ratio >= 0.5)
    );
    println!(
        "- cold: {cold_throughput:.0} req/s = {fraction:.2} of the raw ES256 verification ceiling of {ceiling:.0}/s on {cores} cores (target ≥ 0.9: {}); Portcullis / no-op = {cold_ratio:.2}",
        verdict(fraction >= 0.9)
    );
    // The ceiling above leaves the cores to verification alone; here the load
    // generator and the gRPC stack share them. A server that did the no-op's
    // work plus one raw verification per request would reach 1 / (1/no-op +
    // 1/ceiling) on this machine: the part of the gap that is Portcullis' own.
    let noop_cold = rows[results.cold.noop].result.throughput;
    let stack_ceiling = 1.0 / (1.0 / noop_cold + 1.0 / ceiling);
    println!(
        "  (with the load generator and the gRPC stack on the same cores, the ceiling is 1 / (1/{noop_cold:.0} + 1/{ceiling:.0}) = {stack_ceiling:.0} req/s; cold reaches {:.2} of that)",
        cold_throughput / stack_ceiling
    );
    let noop_cold_known = rows[results.cold_known.noop].result.throughput;
    let stack_ceiling_known = 1.0 / (1.0 / noop_cold_known + 1.0 / ceiling);
    println!(
        "- cold, each token a new one of a known user: {cold_known_throughput:.0} req/s = {:.2} of the raw ceiling, {:.2} of the ceiling with the stack; Portcullis / no-op = {cold_known_ratio:.2}",
        cold_known_throughput / ceiling,
        cold_known_throughput / stack_ceiling_known
    );
    println!(
        "- warm with {large_policies} policies: Portcullis / no-op = {warm_large_ratio:.2}; throughput {warm_large_vs_small:.2}× that with the quickstart's 4 policies (p50 {:.0} µs vs {:.0} µs)",
        us(
            &rows[results.warm_large.portcullis].result.stats.latency_ns,
            0.50
        ),
        us(&rows[results.warm.portcullis].result.stats.latency_ns, 0.50),
    );
    println!(
        "- warm where a policy reads the order id (a decision per token and id, mostly decision-cache misses): Portcullis / no-op = {warm_ids_ratio:.2}"
    );
    println!(
        "- hot at half of Portcullis' peak ({:.0} req/s offered): p99 = {half_p99_us:.0} µs, no-op {:.0} µs (target < 1000 µs: {})",
        hot_peak / 2.0,
        us(&rows[results.half.noop].result.stats.latency_ns, 0.99),
        verdict(half_p99_us < 1000.0)
    );
    println!(
        "  at a quarter of the peak ({:.0} req/s offered): p99 = {quarter_p99_us:.0} µs (no-op {quarter_noop_p99_us:.0} µs)",
        hot_peak / 4.0
    );
    println!();
    println!(
        "Machine: {cores} cores, {}; load average {} before, {} after.",
        cpu_model(),
        context.load_before,
        context.load_after
    );
    println!(
        "Client and servers share these cores: the load generator ({} Tokio worker threads) and both servers ({} worker threads, one runtime) run in one process; only one server is under load at a time.",
        settings.client_threads, settings.server_threads
    );
    println!(
        "Load: {} HTTP/2 connections, {} requests in flight (closed loop; the half-load row is open loop, one request released every 1/rate s by a pacing thread, latency measured from the actual send), {:?} warm-up + {:?} measured per row. Latency is the client-side round trip of the gRPC Check call on loopback.",
        settings.channels, settings.concurrency, settings.warmup, settings.measure
    );
    println!("Reproduce: cargo bench --bench load");
}

/// Any deny, gRPC error or empty row makes the run invalid: they are listed
/// and the process exits with code 1.
fn exit_if_invalid(rows: &[Row]) {
    let invalid: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.result.stats.denied + r.result.stats.errors > 0 || r.result.stats.measured == 0
        })
        .collect();
    if !invalid.is_empty() {
        println!();
        for row in &invalid {
            println!(
                "INVALID: {} / {}: {} denies, {} errors, {} measured; first: {}",
                row.scenario,
                row.server,
                row.result.stats.denied,
                row.result.stats.errors,
                row.result.stats.measured,
                row.result.stats.first_problem.as_deref().unwrap_or("-")
            );
        }
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------

fn main() {
    // The logging `portcullis serve` installs (default filter, plain format),
    // so spans and log filtering cost here what they cost in production.
    portcullis::telemetry::init_logging(portcullis::cli::LogFormat::Plain);
    let settings = Settings::from_env();
    let cores = cores();
    let load_before = load_average();
    announce(&settings, cores);
    let ceiling = measure_ceiling(&settings, cores);

    let deployment = deployment();
    let bench = setup(&settings, &deployment);
    let requests = encode_requests(&settings, &deployment, ceiling);
    let plan = Plan {
        warmup: settings.warmup,
        measure: settings.measure,
        rate: None,
    };
    if let Ok(only) = std::env::var("PORTCULLIS_BENCH_PROFILE") {
        profile(&bench, &requests, only, plan);
        return;
    }
    let results = run_scenarios(&bench, &requests, plan, settings.large_policies());
    let load_after = load_average();
    // The server runtime is dropped at the end of the run, after the report.
    let _server_rt = bench.stop();

    print_report(
        &results,
        &Context {
            settings: &settings,
            cores,
            ceiling,
            load_before,
            load_after,
        },
    );
    exit_if_invalid(&results.rows);
}
