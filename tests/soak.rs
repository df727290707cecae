//! Soak under faults (issue 19). Two Portcullis instances share one real
//! `redis-server`; each sits behind its own real Envoy (`failure_mode_allow:
//! false`, `status_on_error: 503`), verifies ES256 JWTs against a JWKS the
//! test serves over HTTPS, and hot-reloads the same policy folder. Traffic at
//! a fixed rate goes through both Envoys: valid and allowed, policy-dependent,
//! unauthorized, expired, wrongly signed, `alg`-confused (HS256 keyed with the
//! public key, `none`), oversized, revoked (by `jti`, by subject) and signed by
//! a removed key. Meanwhile a fault script, in cycles:
//! - kills Redis (`SIGKILL`) and restarts it, and pauses it (`SIGSTOP`) past
//!   the instances' Redis timeouts, revoking tokens and subjects through either
//!   instance's admin API during each outage and with Redis up;
//! - rotates the issuer's key (publish new + old, sign with new, remove old)
//!   and takes the JWKS endpoint down and up;
//! - rewrites the policy file every few seconds, in place or by rename,
//!   sometimes with a broken change first;
//! - restarts one instance at a time on the same ports and data.
//!
//! Each answer is checked against the decision expected from what was in
//! force both when the request was sent and when it was answered. What it
//! proves: no wrong decision; no error (5xx, reset, timeout) except on an
//! instance inside its own restart window; every acknowledged revocation
//! enforced by both instances within 5 s of Redis being back; every broken
//! policy change refused. A request is "in transition" only inside these
//! windows: a valid policy change written but not yet applied by that
//! instance (seen through its admin `Status`), a removed key not yet refused
//! by that instance (seen by probing it), a revocation acknowledged by the
//! other instance but not yet enforced by this one (probed), or a request in
//! flight while one of those changed. Tokens that are bad in themselves have
//! one expected answer whatever is in transition: allowing one is always a
//! wrong decision.
//!
//! `PORTCULLIS_SOAK_SECS` (default 75) is the traffic duration and
//! `PORTCULLIS_SOAK_RATE` (default 150) the requests per second. `scripts/soak
//! --secs N` runs a long one in release. The report is printed and written to
//! `target/soak-report.json`; see docs/operations/soak.md.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::envoy::{Envoy, EnvoySetup};
use common::idp::TestIdp;
use common::instance::AdminInstance;
use common::{TestKey, envoy_request, jwks_of, outcome, repo_root, with_bearer};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::admin::pb::{self, admin_client::AdminClient, target::Kind as Target};
use redis_harness::RedisServer;
use serde_json::{Value, json};
use tokio::sync::Mutex as AsyncMutex;
use tonic::transport::Channel;

const ADMIN_TOKEN: &str = "soak-admin-token-0123456789";
const AUDIENCE: &str = "orders-api";

/// An acknowledged revocation must be enforced by both instances this long
/// after Redis is back (or after the acknowledgement, if Redis was up).
const REVOCATION_BOUND: Duration = Duration::from_secs(5);
/// A policy change must be applied (or refused, if broken) by each instance
/// within this long of being written.
const RELOAD_BOUND: Duration = Duration::from_secs(10);
/// A key removed from the JWKS must be refused by each instance within this
/// long (key refresh every 1 s).
const KEY_REMOVAL_BOUND: Duration = Duration::from_secs(5);
/// A newly published key must be accepted by each instance within this long;
/// tokens are signed with it only then.
const KEY_PUBLISH_BOUND: Duration = Duration::from_secs(10);
/// A request not answered within this long counts as an error (timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests in flight at most; beyond it a tick is skipped (and counted).
const MAX_IN_FLIGHT: usize = 400;

/// Readers (scope `orders:read`) read every order.
const POLICY_OPEN: &str = r#"// Soak policy set OPEN: readers read every order.
@id("orders-read")
permit (
  principal,
  action in [Action::"get /orders", Action::"get /orders/{id}"],
  resource == Application::"orders"
)
when { context.token.scopes.contains("orders:read") };
"#;

/// OPEN, and order 42 is frozen: nobody reads it.
const POLICY_FROZEN: &str = r#"// Soak policy set FROZEN: readers read every order but 42.
@id("orders-read")
permit (
  principal,
  action in [Action::"get /orders", Action::"get /orders/{id}"],
  resource == Application::"orders"
)
when { context.token.scopes.contains("orders:read") };

@id("freeze-order-42")
forbid (principal, action == Action::"get /orders/{id}", resource)
when { context.path_params.id == "42" };
"#;

/// A syntax error (missing comma).
const BROKEN_SYNTAX: &str = r#"@id("orders-read")
permit (principal, action == Action::"get /orders/{id}" resource)
when { context.token.scopes.contains("orders:read") };
"#;

/// Parses, fails strict validation (no such context attribute).
const BROKEN_INVALID: &str = r#"@id("orders-read")
permit (principal, action == Action::"get /orders/{id}", resource)
when { context.token.colour == "red" };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_under_faults() {
    let secs: u64 = env_number("PORTCULLIS_SOAK_SECS", 75);
    let rate: u64 = env_number("PORTCULLIS_SOAK_RATE", 150);
    let soak = Soak::set_up().await;
    println!(
        "soak: set up in {:.1} s; {secs} s of traffic at {rate} req/s",
        soak.start.elapsed().as_secs_f64()
    );

    let traffic_start = Instant::now();
    let faults = vec![
        tokio::spawn(redis_revocation_and_restart_faults(soak.clone())),
        tokio::spawn(key_and_jwks_faults(soak.clone())),
        tokio::spawn(policy_reload_faults(soak.clone())),
    ];
    let traffic = tokio::spawn(send_traffic(soak.clone(), rate, Duration::from_secs(secs)));
    let traffic_time = traffic.await.expect("the load generator");
    soak.running.store(false, Ordering::SeqCst);
    for fault in faults {
        fault.await.expect("a fault loop");
    }
    let total_time = traffic_start.elapsed();

    soak.verify_every_revocation_still_enforced().await;
    let report = soak.report(traffic_time, total_time, rate);
    soak.tear_down().await;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("report JSON")
    );
    let path = repo_root().join("target/soak-report.json");
    std::fs::create_dir_all(path.parent().expect("target/")).expect("target/");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("JSON"))
        .expect("write the report");
    println!("soak: report written to {}", path.display());
    assert_report_passes(&report);
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// What is in force: keys, policy sets, revocations, restarts, fault phases.
// ---------------------------------------------------------------------------

/// The kinds of request the load generator sends, with their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A reader's token on `GET /orders/7`: allowed by both policy sets.
    Valid,
    /// A reader's token on `GET /orders/42`: allowed by OPEN, 403 by FROZEN.
    PolicyToggle,
    /// A token without `orders:read`: 403 by every set.
    Unauthorized,
    Expired,
    /// Signed by another key claiming the issuer's `kid`.
    WrongSignature,
    /// Signed by a key never published (its own `kid`): the instance looks
    /// for it at the JWKS endpoint (rate-limited), also while that is down.
    UnknownKey,
    /// `alg: HS256`, keyed with the issuer's public key.
    AlgHs256,
    /// `alg: none`, no signature.
    AlgNone,
    /// A validly signed token over 16 KiB (Portcullis refuses it).
    OversizedToken,
    /// A 70 KiB `authorization` header (Envoy refuses it, 431).
    OversizedHeader,
    RevokedJti,
    RevokedSubject,
    /// A reader's token signed by the previous key: allowed while the key is
    /// published, refused once removed.
    RemovedKey,
}

const MIX: &[(Kind, u64)] = &[
    (Kind::Valid, 26),
    (Kind::PolicyToggle, 10),
    (Kind::Unauthorized, 8),
    (Kind::Expired, 6),
    (Kind::WrongSignature, 6),
    (Kind::UnknownKey, 4),
    (Kind::AlgHs256, 5),
    (Kind::AlgNone, 5),
    (Kind::OversizedToken, 4),
    (Kind::OversizedHeader, 2),
    (Kind::RevokedJti, 8),
    (Kind::RevokedSubject, 8),
    (Kind::RemovedKey, 8),
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Valid => "valid",
            Kind::PolicyToggle => "policy-toggle",
            Kind::Unauthorized => "unauthorized",
            Kind::Expired => "expired",
            Kind::WrongSignature => "wrong-signature",
            Kind::UnknownKey => "unknown-key",
            Kind::AlgHs256 => "alg-hs256",
            Kind::AlgNone => "alg-none",
            Kind::OversizedToken => "oversized-token",
            Kind::OversizedHeader => "oversized-header",
            Kind::RevokedJti => "revoked-jti",
            Kind::RevokedSubject => "revoked-subject",
            Kind::RemovedKey => "removed-key",
        }
    }
}

/// The fault phases latency is reported for (steady: none active).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    RedisKilled,
    RedisPaused,
    JwksDown,
    KeyRotation,
    Reload,
    InstanceRestart,
}

const PHASES: [Phase; 6] = [
    Phase::RedisKilled,
    Phase::RedisPaused,
    Phase::JwksDown,
    Phase::KeyRotation,
    Phase::Reload,
    Phase::InstanceRestart,
];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::RedisKilled => "redis-killed",
            Phase::RedisPaused => "redis-paused",
            Phase::JwksDown => "jwks-down",
            Phase::KeyRotation => "key-rotation",
            Phase::Reload => "reload",
            Phase::InstanceRestart => "instance-restart",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

fn phase_names(mask: u8) -> Vec<&'static str> {
    let names: Vec<_> = PHASES
        .iter()
        .filter(|p| mask & p.bit() != 0)
        .map(|p| p.name())
        .collect();
    if names.is_empty() {
        vec!["steady"]
    } else {
        names
    }
}

/// Whether an instance refuses the tokens of one key generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    Published,
    /// Removed from the JWKS, not yet seen refused by this instance.
    Removing,
    Removed,
}

/// One signing key and the tokens it signed (whole `authorization` values).
struct KeyGen {
    key: TestKey,
    readers: Vec<Arc<str>>,
    unauthorized: Vec<Arc<str>>,
    expired: Arc<str>,
    wrong_signature: Arc<str>,
    unknown_key: Arc<str>,
    hs256: Vec<Arc<str>>,
    alg_none: Arc<str>,
    oversized: Arc<str>,
    state: [KeyState; 2],
}

/// The policy set an instance serves, and the one being written, if any.
#[derive(Debug, Clone, Copy)]
struct PolicyState {
    frozen: bool,
    pending: Option<bool>,
}

/// An acknowledged revocation and the token it refuses.
struct Revoked {
    kind: Kind,
    auth: Arc<str>,
    /// Known enforced by each instance: the acknowledging one from its answer,
    /// the other once a probe saw it refused.
    enforced: [bool; 2],
}

/// Everything the expected decision of a request depends on.
struct Truth {
    /// Every key generation; the last one signs.
    keys: Vec<KeyGen>,
    policy: [PolicyState; 2],
    revoked: Vec<Revoked>,
    /// Odd while the instance restarts; a request whose send and answer see
    /// different or odd values overlapped a restart window.
    restart_epoch: [u32; 2],
    /// Fault phases active now (a count each, as they may nest).
    phases: [u32; 6],
}

impl Truth {
    fn phase_mask(&self) -> u8 {
        PHASES
            .iter()
            .zip(self.phases)
            .filter(|(_, n)| *n > 0)
            .fold(0, |mask, (p, _)| mask | p.bit())
    }
}

/// One request of the load generator: which token, where, and what it
/// depends on (never printed: it holds the token).
struct Request {
    kind: Kind,
    instance: usize,
    path: &'static str,
    auth: Arc<str>,
    key_gen: Option<usize>,
    revoked: Option<usize>,
}

/// The answers acceptable for a request, and why there is more than one.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    statuses: Vec<u16>,
    why: Option<&'static str>,
}

impl Expected {
    fn one(status: u16) -> Expected {
        Expected {
            statuses: vec![status],
            why: None,
        }
    }

    fn also(&mut self, status: u16, why: &'static str) {
        if !self.statuses.contains(&status) {
            self.statuses.push(status);
            self.why.get_or_insert(why);
        }
    }

    /// What was acceptable at send time or at answer time.
    fn union(mut self, later: Expected) -> Expected {
        for status in later.statuses {
            self.also(status, later.why.unwrap_or("changed while in flight"));
        }
        self
    }

    fn firm(&self) -> bool {
        self.statuses.len() == 1
    }
}

/// The decision `request` must get with `truth` in force.
fn expected(truth: &Truth, request: &Request) -> Expected {
    let i = request.instance;
    let mut expected = match request.kind {
        Kind::Valid | Kind::RemovedKey | Kind::RevokedJti | Kind::RevokedSubject => {
            Expected::one(200)
        }
        Kind::PolicyToggle => {
            let state = truth.policy[i];
            let status = |frozen: bool| if frozen { 403 } else { 200 };
            let mut e = Expected::one(status(state.frozen));
            if let Some(next) = state.pending {
                e.also(status(next), "policy change not yet applied");
            }
            e
        }
        Kind::Unauthorized => Expected::one(403),
        Kind::Expired
        | Kind::WrongSignature
        | Kind::UnknownKey
        | Kind::AlgHs256
        | Kind::AlgNone
        | Kind::OversizedToken => Expected::one(401),
        Kind::OversizedHeader => Expected::one(431),
    };
    if let Some(r) = request.revoked {
        if truth.revoked[r].enforced[i] {
            expected = Expected::one(401);
        } else {
            expected.also(401, "revocation not yet propagated");
        }
    }
    if let Some(g) = request.key_gen {
        match truth.keys[g].state[i] {
            KeyState::Published => {}
            KeyState::Removing => expected.also(401, "removed key not yet refreshed"),
            KeyState::Removed => expected = Expected::one(401),
        }
    }
    expected
}

// ---------------------------------------------------------------------------
// The deployment and its bookkeeping.
// ---------------------------------------------------------------------------

/// One Portcullis instance: fixed ports (kept across restarts), its
/// configuration, and a direct ext_authz client for probes.
struct Slot {
    name: &'static str,
    config: PathBuf,
    audit: PathBuf,
    grpc: SocketAddr,
    admin: SocketAddr,
    running: AsyncMutex<Option<AdminInstance>>,
    direct: AuthorizationClient<Channel>,
}

#[derive(Default)]
struct KindCounts {
    sent: u64,
    allowed: u64,
    denied: u64,
    errors: u64,
    in_transition: u64,
}

#[derive(Default)]
struct Stats {
    by_kind: BTreeMap<&'static str, KindCounts>,
    wrong: u64,
    wrong_examples: Vec<Value>,
    errors_outside_restart: u64,
    error_examples: Vec<Value>,
    errors_in_restart: u64,
    in_transition: BTreeMap<&'static str, u64>,
    /// Microseconds, per phase name.
    latency: BTreeMap<&'static str, Vec<u32>>,
    skipped_ticks: u64,
    oversized_header_reset_by_envoy: u64,
}

#[derive(Default)]
struct RevocationStats {
    made_redis_up: u64,
    made_redis_down: u64,
    queued: u64,
    lost: u64,
    lost_examples: Vec<Value>,
    /// Milliseconds from Redis back (or acknowledgement) to enforced by both.
    propagation_ms: Vec<u64>,
}

struct Soak {
    start: Instant,
    running: AtomicBool,
    truth: Mutex<Truth>,
    stats: Mutex<Stats>,
    revocations: Mutex<RevocationStats>,
    faults: Mutex<BTreeMap<&'static str, u64>>,
    /// Bounds missed and other failures of the fault script (the test fails).
    anomalies: Mutex<Vec<String>>,
    slots: [Slot; 2],
    envoys: Mutex<Vec<Envoy>>,
    redis: Arc<Mutex<RedisServer>>,
    idp: TestIdp,
    issuer: String,
    /// A second key of the issuer, published throughout: it signs the revoked
    /// tokens, so that only their revocation refuses them.
    stable_key: TestKey,
    policy_file: PathBuf,
    /// Held while the policy folder may be broken or in change, and by a restart.
    disk: AsyncMutex<()>,
    /// Held while the JWKS changes or is down, and by a restart.
    jwks: AsyncMutex<()>,
    next_id: AtomicU64,
    in_flight: AtomicUsize,
    _upstream: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
}

impl Soak {
    /// Redis, the IdP, the policy folder, two instances, an upstream, two Envoys.
    async fn set_up() -> Arc<Soak> {
        let start = Instant::now();
        let dir = tempfile::tempdir().expect("temp dir");
        let redis = RedisServer::start();
        let idp = TestIdp::start().await;
        idp.set_max_age(Some(1));
        let first_key = TestKey::es256();
        let stable_key = TestKey::es256();
        idp.set_jwks(jwks_of(&[&stable_key, &first_key]));
        let issuer = idp.issuer();

        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).expect("policies/");
        std::fs::copy(
            repo_root().join("examples/quickstart/policies/orders.cedarschema"),
            policies.join("orders.cedarschema"),
        )
        .expect("copy the schema");
        let policy_file = policies.join("orders.cedar");
        std::fs::write(&policy_file, POLICY_OPEN).expect("write the policy");

        let mut slots = Vec::new();
        for name in ["a", "b"] {
            let grpc = free_addr();
            let admin = free_addr();
            let config = write_instance_config(dir.path(), name, grpc, admin, &idp, &redis.url());
            let direct = AuthorizationClient::new(
                Channel::from_shared(format!("http://{grpc}"))
                    .expect("URI")
                    .timeout(Duration::from_secs(3))
                    .connect_lazy(),
            );
            slots.push(Slot {
                name,
                audit: dir.path().join(format!("{name}.audit.log")),
                config,
                grpc,
                admin,
                running: AsyncMutex::new(None),
                direct,
            });
        }
        for slot in &slots {
            let instance = AdminInstance::start(&slot.config, slot.audit.clone()).await;
            *slot.running.lock().await = Some(instance);
        }

        let (upstream_addr, upstream) = start_upstream().await;
        let mut envoys = Vec::new();
        for slot in &slots {
            let setup = EnvoySetup {
                status_on_error: Some(503),
                ..EnvoySetup::new(slot.grpc, upstream_addr)
            };
            envoys.push(Envoy::start(&setup).await);
        }

        let key_gen = KeyGen::mint(first_key, &issuer, 0);
        let slots: [Slot; 2] = slots.try_into().unwrap_or_else(|_| unreachable!());
        Arc::new(Soak {
            start,
            running: AtomicBool::new(true),
            truth: Mutex::new(Truth {
                keys: vec![key_gen],
                policy: [PolicyState {
                    frozen: false,
                    pending: None,
                }; 2],
                revoked: Vec::new(),
                restart_epoch: [0; 2],
                phases: [0; 6],
            }),
            stats: Mutex::new(Stats::default()),
            revocations: Mutex::new(RevocationStats::default()),
            faults: Mutex::new(BTreeMap::new()),
            anomalies: Mutex::new(Vec::new()),
            slots,
            envoys: Mutex::new(envoys),
            redis: Arc::new(Mutex::new(redis)),
            idp,
            issuer,
            stable_key,
            policy_file,
            disk: AsyncMutex::new(()),
            jwks: AsyncMutex::new(()),
            next_id: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            _upstream: upstream,
            _dir: dir,
        })
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    fn t(&self) -> f64 {
        (self.start.elapsed().as_millis() as f64) / 1000.0
    }

    fn fault(&self, name: &'static str) {
        *lock(&self.faults).entry(name).or_default() += 1;
        println!("soak: t={:.1}s fault {name}", self.t());
    }

    fn anomaly(&self, text: String) {
        println!("soak: t={:.1}s ANOMALY {text}", self.t());
        lock(&self.anomalies).push(format!("t={:.1}s {text}", self.t()));
    }

    /// Marks `phase` active until the guard drops.
    fn phase(self: &Arc<Self>, phase: Phase) -> PhaseGuard {
        lock(&self.truth).phases[phase as usize] += 1;
        PhaseGuard {
            soak: self.clone(),
            phase,
        }
    }

    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }

    async fn tear_down(&self) {
        lock(&self.envoys).clear();
        for slot in &self.slots {
            if let Some(instance) = slot.running.lock().await.take() {
                instance.stop().await;
            }
        }
        lock(&self.redis).stop();
    }
}

struct PhaseGuard {
    soak: Arc<Soak>,
    phase: Phase,
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        lock(&self.soak.truth).phases[self.phase as usize] -= 1;
    }
}

/// The configuration of instance `name`: fixed listeners, the shared policy
/// folder watched every 250 ms, the IdP's JWKS refreshed every second, its own
/// journal, revocations shared through Redis (waiting for it at start).
fn write_instance_config(
    dir: &Path,
    name: &str,
    grpc: SocketAddr,
    admin: SocketAddr,
    idp: &TestIdp,
    redis_url: &str,
) -> PathBuf {
    let routes: String = [
        ("GET", "/orders"),
        ("GET", "/orders/{id}"),
        ("POST", "/orders"),
        ("DELETE", "/orders/{id}"),
    ]
    .iter()
    .map(|(m, p)| format!("[[routes]]\nmethod = \"{m}\"\npath = \"{p}\"\n\n"))
    .collect();
    let text = format!(
        r#"# Soak instance {name}.
[server]
listen = "{grpc}"
drain_period = "0s"

[policies]
dir = "policies"
watch = true
watch_interval = "250ms"

[application]
name = "orders"

[[issuers]]
issuer = "{issuer}"
audiences = ["{AUDIENCE}"]
jwks_uri = "{jwks_uri}"
max_token_lifetime = "1h"
leeway = "30s"

[issuers.remote]
ca_file = "{ca}"
refresh = "1s"
refresh_min = "1s"

{routes}[revocation]
data_dir = "data-{name}"
redis_url = "{redis_url}"
startup = "wait"

[admin]
listen = "{admin}"
token = "{ADMIN_TOKEN}"
"#,
        issuer = idp.issuer(),
        jwks_uri = idp.jwks_uri(),
        ca = idp.ca_file().display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write the instance configuration");
    path
}

/// The application behind Envoy: answers every request `200 upstream`,
/// records nothing (a long soak would pile up requests).
async fn start_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;
    let app = axum::Router::new().fallback(|| async { "upstream" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream");
    let addr = listener.local_addr().expect("upstream address");
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, server)
}

// ---------------------------------------------------------------------------
// Tokens.
// ---------------------------------------------------------------------------

fn unix_now() -> i64 {
    common::now()
}

/// Claims of a token of `issuer` for `sub`, issued two seconds ago, valid for
/// 50 minutes.
fn claims_for(issuer: &str, sub: &str, jti: &str, scope: &str) -> Value {
    let now = unix_now();
    json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now - 2,
        "exp": now + 3000,
        "jti": jti,
        "scope": scope,
    })
}

fn bearer(token: &str) -> Arc<str> {
    Arc::from(format!("Bearer {token}"))
}

/// A JWT with `header` and `claims`, signed with HMAC-SHA256 keyed by `secret`
/// (empty `secret`: no signature, as `alg: none` has).
fn hand_made_jwt(header: &Value, claims: &Value, secret: Option<&[u8]>) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = match secret {
        Some(secret) => {
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
            URL_SAFE_NO_PAD.encode(aws_lc_rs::hmac::sign(&key, signing_input.as_bytes()))
        }
        None => String::new(),
    };
    format!("{signing_input}.{signature}")
}

impl KeyGen {
    /// `key` and the tokens of each kind it (or an attacker naming it) signs.
    fn mint(key: TestKey, issuer: &str, generation: usize) -> KeyGen {
        let id = |what: &str, n: usize| format!("soak-g{generation}-{what}-{n}");
        let readers = (0..8)
            .map(|n| {
                let c = claims_for(issuer, &format!("user-{n}"), &id("r", n), "orders:read");
                bearer(&key.sign(&c))
            })
            .collect();
        let unauthorized = (0..4)
            .map(|n| {
                let c = claims_for(issuer, &format!("guest-{n}"), &id("u", n), "profile");
                bearer(&key.sign(&c))
            })
            .collect();
        let mut expired = claims_for(issuer, "user-0", &id("e", 0), "orders:read");
        expired["iat"] = json!(unix_now() - 900);
        expired["exp"] = json!(unix_now() - 300);
        let valid = claims_for(issuer, "user-0", &id("x", 0), "orders:read");
        let wrong_signature = bearer(&key.impostor_of().sign(&valid));
        let unknown_key = bearer(&TestKey::es256().sign(&valid));
        let jwk = key.public_jwk();
        let point: Vec<u8> = [&[4u8][..], &decode(&jwk["x"]), &decode(&jwk["y"])].concat();
        let hs_header = json!({"alg": "HS256", "typ": "JWT", "kid": key.kid()});
        let hs256 = vec![
            bearer(&hand_made_jwt(&hs_header, &valid, Some(&point))),
            bearer(&hand_made_jwt(
                &hs_header,
                &valid,
                Some(jwk.to_string().as_bytes()),
            )),
        ];
        let none_header = json!({"alg": "none", "typ": "JWT", "kid": key.kid()});
        let alg_none = bearer(&hand_made_jwt(&none_header, &valid, None));
        let mut big = claims_for(issuer, "user-0", &id("o", 0), "orders:read");
        big["padding"] = json!("p".repeat(20 * 1024));
        let oversized = bearer(&key.sign(&big));
        KeyGen {
            expired: bearer(&key.sign(&expired)),
            key,
            readers,
            unauthorized,
            wrong_signature,
            unknown_key,
            hs256,
            alg_none,
            oversized,
            state: [KeyState::Published; 2],
        }
    }
}

fn decode(v: &Value) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(v.as_str().expect("a base64url JWK member"))
        .expect("base64url")
}

// ---------------------------------------------------------------------------
// The load generator.
// ---------------------------------------------------------------------------

/// xorshift64: enough to pick kinds and tokens reproducibly.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn pick_kind(rng: &mut Rng) -> Kind {
    let total: u64 = MIX.iter().map(|(_, w)| w).sum();
    let mut n = rng.below(total);
    for (kind, weight) in MIX {
        if n < *weight {
            return *kind;
        }
        n -= weight;
    }
    Kind::Valid
}

/// The request of `kind` for `instance`, with what is in force now (`Valid`
/// when the kind has nothing to send yet: no revocation, no removed key).
fn build_request(truth: &Truth, kind: Kind, instance: usize, rng: &mut Rng) -> Request {
    let current = truth.keys.len() - 1;
    let g = &truth.keys[current];
    let signed = |kind, path, auth: &Arc<str>| Request {
        kind,
        instance,
        path,
        auth: auth.clone(),
        key_gen: Some(current),
        revoked: None,
    };
    match kind {
        Kind::Valid => signed(kind, "/orders/7", rng.pick(&g.readers)),
        Kind::PolicyToggle => signed(kind, "/orders/42", rng.pick(&g.readers)),
        Kind::Unauthorized => signed(kind, "/orders/7", rng.pick(&g.unauthorized)),
        Kind::Expired => signed(kind, "/orders/7", &g.expired),
        Kind::WrongSignature => signed(kind, "/orders/7", &g.wrong_signature),
        Kind::UnknownKey => signed(kind, "/orders/7", &g.unknown_key),
        Kind::AlgHs256 => signed(kind, "/orders/7", rng.pick(&g.hs256)),
        Kind::AlgNone => signed(kind, "/orders/7", &g.alg_none),
        Kind::OversizedToken => signed(kind, "/orders/7", &g.oversized),
        Kind::OversizedHeader => Request {
            kind,
            instance,
            path: "/orders/7",
            auth: Arc::from(format!("Bearer {}", "h".repeat(70 * 1024))),
            key_gen: None,
            revoked: None,
        },
        Kind::RevokedJti | Kind::RevokedSubject => {
            let of_kind: Vec<usize> = (0..truth.revoked.len())
                .filter(|&r| truth.revoked[r].kind == kind)
                .collect();
            if of_kind.is_empty() {
                return build_request(truth, Kind::Valid, instance, rng);
            }
            let r = *rng.pick(&of_kind);
            Request {
                kind,
                instance,
                path: "/orders/7",
                auth: truth.revoked[r].auth.clone(),
                // Signed by the issuer's stable key, never removed.
                key_gen: None,
                revoked: Some(r),
            }
        }
        Kind::RemovedKey => {
            if current == 0 {
                return build_request(truth, Kind::Valid, instance, rng);
            }
            Request {
                key_gen: Some(current - 1),
                ..signed(
                    kind,
                    "/orders/7",
                    rng.pick(&truth.keys[current - 1].readers),
                )
            }
        }
    }
}

/// What the client got.
enum Answer {
    Status(u16, bool),
    Failed(String),
}

/// Sends `rate` requests a second through the two Envoys (alternately) for
/// `duration`, each checked when its answer arrives.
async fn send_traffic(soak: Arc<Soak>, rate: u64, duration: Duration) -> Duration {
    let started = Instant::now();
    let listeners: Vec<SocketAddr> = lock(&soak.envoys).iter().map(|e| e.listener).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = Instant::now() + duration;
    let mut n: u64 = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < end {
        ticker.tick().await;
        while tasks.try_join_next().is_some() {}
        if soak.in_flight.load(Ordering::SeqCst) >= MAX_IN_FLIGHT {
            lock(&soak.stats).skipped_ticks += 1;
            continue;
        }
        n += 1;
        let instance = (n % 2) as usize;
        let kind = pick_kind(&mut rng);
        let (request, at_send, mask, epoch) = {
            let truth = lock(&soak.truth);
            let request = build_request(&truth, kind, instance, &mut rng);
            let e = expected(&truth, &request);
            (
                request,
                e,
                truth.phase_mask(),
                truth.restart_epoch[instance],
            )
        };
        let soak = soak.clone();
        let listener = listeners[instance];
        soak.in_flight.fetch_add(1, Ordering::SeqCst);
        tasks.spawn(async move {
            let sent = Instant::now();
            let answer = send_through_envoy(listener, &request).await;
            let latency = sent.elapsed();
            soak.check_answer(&request, at_send, mask, epoch, answer, latency);
            soak.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    while tasks.join_next().await.is_some() {}
    started.elapsed()
}

async fn send_through_envoy(listener: SocketAddr, request: &Request) -> Answer {
    let headers = [("authorization", &*request.auth)];
    match tokio::time::timeout(
        REQUEST_TIMEOUT,
        common::envoy::send(listener, "GET", request.path, &headers),
    )
    .await
    {
        Ok(Ok(reply)) => Answer::Status(reply.status, reply.body == "upstream"),
        Ok(Err(e)) => Answer::Failed(e.to_string()),
        Err(_) => Answer::Failed(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

impl Soak {
    /// Classifies one answer: correct, in transition, wrong, or an error
    /// (inside or outside the instance's restart window).
    fn check_answer(
        &self,
        request: &Request,
        at_send: Expected,
        mask: u8,
        epoch_at_send: u32,
        answer: Answer,
        latency: Duration,
    ) {
        let (at_answer, mask, restart_window) = {
            let truth = lock(&self.truth);
            let epoch = truth.restart_epoch[request.instance];
            (
                expected(&truth, request),
                mask | truth.phase_mask(),
                epoch != epoch_at_send || epoch % 2 == 1,
            )
        };
        let expected = at_send.union(at_answer);
        let t = self.t();
        let mut stats = lock(&self.stats);
        let name = request.kind.name();
        stats.by_kind.entry(name).or_default().sent += 1;
        let example = |got: Value| {
            json!({
                "t_s": t,
                "kind": name,
                "instance": self.slots[request.instance].name,
                "expected": expected.statuses,
                "got": got,
                "phases": phase_names(mask),
            })
        };
        let status = match answer {
            Answer::Failed(error)
                if request.kind == Kind::OversizedHeader && error.contains("reset") =>
            {
                // Envoy refuses the 70 KiB header itself (431) and closes with
                // part of the request unread: TCP may reset before the client
                // reads the 431. Never reaches Portcullis; counted apart.
                stats.oversized_header_reset_by_envoy += 1;
                return;
            }
            Answer::Failed(error) => {
                self.count_error(&mut stats, name, restart_window, || example(json!(error)));
                return;
            }
            Answer::Status(status, upstream) => {
                // Envoy answers the 431 itself and then holds the connection
                // for its 1 s delayed close: not the authorization path.
                let timed = request.kind != Kind::OversizedHeader;
                for phase in phase_names(mask).into_iter().filter(|_| timed) {
                    let micros = latency.as_micros().min(u32::MAX as u128) as u32;
                    stats.latency.entry(phase).or_default().push(micros);
                }
                if status == 200 && !upstream {
                    // A 200 that did not come from the application.
                    999
                } else {
                    status
                }
            }
        };
        if status >= 500 && status != 999 {
            self.count_error(&mut stats, name, restart_window, || example(json!(status)));
            return;
        }
        if !expected.statuses.contains(&status) {
            stats.wrong += 1;
            if stats.wrong_examples.len() < 10 {
                stats.wrong_examples.push(example(json!(status)));
            }
            return;
        }
        let counts = stats.by_kind.entry(name).or_default();
        if !expected.firm() {
            counts.in_transition += 1;
            let why = expected.why.unwrap_or("changed while in flight");
            *stats.in_transition.entry(why).or_default() += 1;
        } else if status == 200 {
            counts.allowed += 1;
        } else {
            counts.denied += 1;
        }
    }

    fn count_error(
        &self,
        stats: &mut Stats,
        kind: &'static str,
        restart_window: bool,
        example: impl FnOnce() -> Value,
    ) {
        stats.by_kind.entry(kind).or_default().errors += 1;
        if restart_window {
            stats.errors_in_restart += 1;
        } else {
            stats.errors_outside_restart += 1;
            if stats.error_examples.len() < 10 {
                stats.error_examples.push(example());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Instances: admin calls and direct probes.
// ---------------------------------------------------------------------------

async fn admin_client(addr: SocketAddr) -> Result<AdminClient<Channel>, String> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("connect to the admin API: {e}"))?;
    Ok(AdminClient::new(channel))
}

impl Slot {
    async fn status(&self) -> Result<pb::StatusResponse, String> {
        let mut admin = admin_client(self.admin).await?;
        admin
            .status(with_bearer(pb::StatusRequest {}, ADMIN_TOKEN))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| format!("Status: {e}"))
    }

    async fn revoke(&self, target: Target) -> Result<pb::RevokeResponse, String> {
        let mut admin = admin_client(self.admin).await?;
        let request = pb::RevokeRequest {
            target: Some(pb::Target { kind: Some(target) }),
            reason: "soak".into(),
        };
        admin
            .revoke(with_bearer(request, ADMIN_TOKEN))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| format!("Revoke: {e}"))
    }

    /// The HTTP status and reason this instance answers for `auth` on
    /// `GET /orders/7`, straight over gRPC (not through Envoy).
    async fn check_directly(&self, auth: &str) -> Option<(i32, String)> {
        let token = auth.strip_prefix("Bearer ").unwrap_or(auth);
        let response = self
            .direct
            .clone()
            .check(envoy_request("GET", "/orders/7", Some(token)))
            .await
            .ok()?
            .into_inner();
        let out = outcome(&response);
        let reason = out.metadata["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Some((out.http_status, reason))
    }
}

/// Polls until `done` holds for every instance (each marked by `mark` when it
/// does) or `bound` passes; returns the instances that never got there.
async fn until_each_instance<F, Fut>(soak: &Soak, bound: Duration, mut done: F) -> Vec<usize>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    let mut pending: Vec<usize> = (0..soak.slots.len()).collect();
    loop {
        let mut still = Vec::new();
        for i in pending {
            if !done(i).await {
                still.push(i);
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() >= deadline {
            return pending;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Fault script: Redis, revocations, instance restarts.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum RevokeBy {
    Jti,
    Subject,
}

/// In a cycle: revocations with Redis up; Redis killed (-9), revocations
/// during the outage, Redis restarted; Redis paused (SIGSTOP) past the
/// instances' 3 s timeouts, revocations during the pause, SIGCONT; one
/// instance restarted. After each outage every acknowledged revocation must be
/// enforced by both instances within [`REVOCATION_BOUND`].
async fn redis_revocation_and_restart_faults(soak: Arc<Soak>) {
    let mut round = 0usize;
    let nap = |secs| tokio::time::sleep(Duration::from_secs(secs));
    while soak.running() {
        let via = round % 2;
        let made = vec![
            revoke_fresh(&soak, via, RevokeBy::Jti, false).await,
            revoke_fresh(&soak, via, RevokeBy::Subject, false).await,
        ];
        await_enforced_on_both(&soak, made, Instant::now()).await;
        nap(3).await;
        if !soak.running() {
            break;
        }

        let made = {
            // In odd rounds the instance holding the queued revocations is
            // also restarted before Redis is back: its journal must keep them
            // and its reconnection must write them.
            let restart_too = round % 2 == 1;
            let _locks = if restart_too {
                Some((soak.disk.lock().await, soak.jwks.lock().await))
            } else {
                None
            };
            let _phase = soak.phase(Phase::RedisKilled);
            soak.fault("redis_kill_9");
            lock(&soak.redis).stop();
            await_redis_link_down(&soak, "redis_kill_seen_by_both", Duration::from_secs(5)).await;
            nap(1).await;
            let made = vec![
                revoke_fresh(&soak, 1 - via, RevokeBy::Jti, true).await,
                revoke_fresh(&soak, 1 - via, RevokeBy::Subject, true).await,
            ];
            let _restart_phase = restart_too.then(|| soak.phase(Phase::InstanceRestart));
            if restart_too {
                soak.fault("instance_restart_during_redis_outage");
                stop_instance(&soak, 1 - via).await;
            }
            nap(2).await;
            let redis = soak.redis.clone();
            tokio::task::spawn_blocking(move || lock(&redis).restart())
                .await
                .expect("restart redis-server");
            if restart_too {
                start_instance(&soak, 1 - via).await;
            }
            made
        };
        await_enforced_on_both(&soak, made, Instant::now()).await;
        nap(3).await;
        if !soak.running() {
            break;
        }

        let made = {
            let _phase = soak.phase(Phase::RedisPaused);
            soak.fault("redis_sigstop");
            let pid = redis_pid(&lock(&soak.redis));
            let paused_at = Instant::now();
            signal(pid, "-STOP");
            nap(1).await;
            let made = vec![
                revoke_fresh(&soak, via, RevokeBy::Jti, true).await,
                revoke_fresh(&soak, via, RevokeBy::Subject, true).await,
            ];
            // Past the 3 s command timeout and a 2 s liveness tick: both
            // instances must notice, then it stays paused for 7 s at least.
            let bound = Duration::from_secs(9).saturating_sub(paused_at.elapsed());
            await_redis_link_down(&soak, "redis_pause_tripped_timeouts", bound).await;
            let paused_for = Duration::from_secs(7);
            if let Some(rest) = paused_for.checked_sub(paused_at.elapsed()) {
                tokio::time::sleep(rest).await;
            }
            signal(pid, "-CONT");
            made
        };
        await_enforced_on_both(&soak, made, Instant::now()).await;
        nap(3).await;
        if !soak.running() {
            break;
        }

        restart_instance(&soak, round % 2).await;
        nap(3).await;
        round += 1;
    }
}

/// Polls both instances' admin `Status` until each reports its Redis link
/// down (anything but `connected`), within `bound`: evidence that the fault
/// reached them, counted as `seen`; an anomaly otherwise.
async fn await_redis_link_down(soak: &Soak, seen: &'static str, bound: Duration) {
    let missing = until_each_instance(soak, bound, |i| async move {
        soak.slots[i]
            .status()
            .await
            .is_ok_and(|s| s.redis != "connected")
    })
    .await;
    if missing.is_empty() {
        soak.fault(seen);
    } else {
        soak.anomaly(format!(
            "{seen}: instance(s) {missing:?} still report Redis connected after {bound:?}"
        ));
    }
}

/// The `process_id` Redis reports.
fn redis_pid(redis: &RedisServer) -> u32 {
    let info = redis
        .command(&["INFO", "server"])
        .expect("redis-server answers INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .expect("process_id in INFO server")
}

fn signal(pid: u32, which: &str) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid} failed");
}

/// Mints a token of a fresh subject (signed with the issuer's stable key, so
/// that no key rotation refuses it for another reason), revokes it (by `jti` or subject) through
/// instance `via`, and once acknowledged adds it to the revoked tokens.
async fn revoke_fresh(soak: &Soak, via: usize, by: RevokeBy, outage: bool) -> Option<usize> {
    let n = soak.fresh_id();
    let (auth, target, kind) = {
        let key = &soak.stable_key;
        match by {
            RevokeBy::Jti => {
                let jti = format!("soak-revoked-{n}");
                let c = claims_for(&soak.issuer, &format!("rev-jti-{n}"), &jti, "orders:read");
                let target = Target::Token(pb::TokenTarget {
                    jti,
                    issuer: soak.issuer.clone(),
                    expires_at: None,
                });
                (bearer(&key.sign(&c)), target, Kind::RevokedJti)
            }
            RevokeBy::Subject => {
                let sub = format!("rev-sub-{n}");
                let c = claims_for(&soak.issuer, &sub, &format!("soak-sub-{n}"), "orders:read");
                let target = Target::Subject(pb::SubjectTarget {
                    sub,
                    issued_before: None,
                });
                (bearer(&key.sign(&c)), target, Kind::RevokedSubject)
            }
        }
    };
    let answer = soak.slots[via].revoke(target).await;
    let response = match answer {
        Ok(response) => response,
        Err(e) => {
            soak.anomaly(format!(
                "{} via instance {} refused (Redis {}): {e}",
                kind.name(),
                soak.slots[via].name,
                if outage { "down" } else { "up" }
            ));
            return None;
        }
    };
    {
        let mut stats = lock(&soak.revocations);
        if outage {
            stats.made_redis_down += 1;
        } else {
            stats.made_redis_up += 1;
        }
        if !response.synced {
            stats.queued += 1;
        }
    }
    soak.fault(if outage {
        "revocation_redis_down"
    } else {
        "revocation_redis_up"
    });
    let mut truth = lock(&soak.truth);
    let mut enforced = [false; 2];
    enforced[via] = true;
    truth.revoked.push(Revoked {
        kind,
        auth,
        enforced,
    });
    Some(truth.revoked.len() - 1)
}

/// Probes both instances directly until each refuses every revocation in
/// `made` as revoked; one still allowed [`REVOCATION_BOUND`] after `since`
/// (Redis back, or acknowledged with Redis up) is lost.
async fn await_enforced_on_both(soak: &Soak, made: Vec<Option<usize>>, since: Instant) {
    let deadline = since + REVOCATION_BOUND;
    let mut pending: Vec<(usize, usize)> = made
        .into_iter()
        .flatten()
        .flat_map(|r| [(r, 0), (r, 1)])
        .collect();
    let revocations: Vec<usize> = {
        let mut r: Vec<usize> = pending.iter().map(|(r, _)| *r).collect();
        r.dedup();
        r
    };
    loop {
        let mut still = Vec::new();
        for (r, i) in pending {
            let auth = lock(&soak.truth).revoked[r].auth.clone();
            match soak.slots[i].check_directly(&auth).await {
                Some((401, reason)) if reason == "revoked" => {
                    lock(&soak.truth).revoked[r].enforced[i] = true;
                }
                _ => still.push((r, i)),
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = since.elapsed().as_millis() as u64;
    let mut stats = lock(&soak.revocations);
    for r in revocations {
        let missing: Vec<&str> = pending
            .iter()
            .filter(|(p, _)| *p == r)
            .map(|(_, i)| soak.slots[*i].name)
            .collect();
        if missing.is_empty() {
            stats.propagation_ms.push(elapsed);
        } else {
            stats.lost += 1;
            if stats.lost_examples.len() < 10 {
                let kind = lock(&soak.truth).revoked[r].kind.name();
                stats.lost_examples.push(json!({
                    "t_s": soak.t(),
                    "kind": kind,
                    "not_enforced_by": missing,
                }));
            }
        }
    }
}

/// Stops instance `i` (as SIGTERM twice does) and starts it again on the same
/// ports, configuration and journal; requests to it meanwhile may fail.
async fn restart_instance(soak: &Arc<Soak>, i: usize) {
    let _disk = soak.disk.lock().await;
    let _jwks = soak.jwks.lock().await;
    let _phase = soak.phase(Phase::InstanceRestart);
    soak.fault("instance_restart");
    stop_instance(soak, i).await;
    start_instance(soak, i).await;
}

/// Stops instance `i`, opening its restart window (the caller holds the disk
/// and JWKS locks, so that it starts again on a valid folder and stable keys).
async fn stop_instance(soak: &Soak, i: usize) {
    lock(&soak.truth).restart_epoch[i] += 1;
    let old = soak.slots[i].running.lock().await.take();
    if let Some(old) = old {
        old.stop().await;
    }
}

/// Starts instance `i` again and, once it serves, closes its restart window.
async fn start_instance(soak: &Soak, i: usize) {
    let slot = &soak.slots[i];
    let started = AdminInstance::start(&slot.config, slot.audit.clone()).await;
    *slot.running.lock().await = Some(started);
    lock(&soak.truth).restart_epoch[i] += 1;
}

// ---------------------------------------------------------------------------
// Fault script: keys and the JWKS endpoint.
// ---------------------------------------------------------------------------

/// In a cycle: a key rotation, then the JWKS endpoint down for 5 s.
async fn key_and_jwks_faults(soak: Arc<Soak>) {
    while soak.running() {
        tokio::time::sleep(Duration::from_secs(4)).await;
        if !soak.running() {
            break;
        }
        rotate_signing_key(&soak).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        if !soak.running() {
            break;
        }
        let _jwks = soak.jwks.lock().await;
        let _phase = soak.phase(Phase::JwksDown);
        soak.fault("jwks_down");
        soak.idp.set_down(true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        soak.idp.set_down(false);
    }
}

/// Publishes a new key next to the current one; once both instances accept
/// it, signs with it; 3 s later removes the old key from the JWKS, after which
/// each instance must refuse the old key's tokens within [`KEY_REMOVAL_BOUND`].
async fn rotate_signing_key(soak: &Arc<Soak>) {
    let _jwks = soak.jwks.lock().await;
    let _phase = soak.phase(Phase::KeyRotation);
    soak.fault("key_rotation");
    let new_key = TestKey::es256();
    let (old, jwks_both) = {
        let truth = lock(&soak.truth);
        let old = truth.keys.len() - 1;
        (
            old,
            jwks_of(&[&soak.stable_key, &truth.keys[old].key, &new_key]),
        )
    };
    let new_gen = KeyGen::mint(new_key, &soak.issuer, old + 1);
    let probe = new_gen.readers[0].clone();
    soak.idp.set_jwks(jwks_both);
    let missing = until_each_instance(soak, KEY_PUBLISH_BOUND, |i| {
        let probe = probe.clone();
        async move { matches!(soak.slots[i].check_directly(&probe).await, Some((200, _))) }
    })
    .await;
    if !missing.is_empty() {
        soak.anomaly(format!(
            "a published key was not accepted within {KEY_PUBLISH_BOUND:?} by instance(s) {missing:?}"
        ));
    }
    let jwks_new = jwks_of(&[&soak.stable_key, &new_gen.key]);
    lock(&soak.truth).keys.push(new_gen);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let old_probe = lock(&soak.truth).keys[old].readers[0].clone();
    soak.idp.set_jwks(jwks_new);
    lock(&soak.truth).keys[old].state = [KeyState::Removing; 2];
    let missing = until_each_instance(soak, KEY_REMOVAL_BOUND, |i| {
        let old_probe = old_probe.clone();
        async move {
            let refused = matches!(
                soak.slots[i].check_directly(&old_probe).await,
                Some((401, _))
            );
            if refused {
                lock(&soak.truth).keys[old].state[i] = KeyState::Removed;
            }
            refused
        }
    })
    .await;
    if !missing.is_empty() {
        soak.anomaly(format!(
            "a removed key was still accepted after {KEY_REMOVAL_BOUND:?} by instance(s) {missing:?}"
        ));
        // Its tokens stay "in transition" on those instances: the anomaly fails the test.
    }
}

// ---------------------------------------------------------------------------
// Fault script: policy reloads.
// ---------------------------------------------------------------------------

/// Every 3 s: the other valid set (OPEN and FROZEN alternately), written in
/// place or by rename alternately; every third time a broken change first,
/// which both instances must refuse, keeping their set.
async fn policy_reload_faults(soak: Arc<Soak>) {
    let mut step = 0usize;
    while soak.running() {
        tokio::time::sleep(Duration::from_secs(3)).await;
        if !soak.running() {
            break;
        }
        let _disk = soak.disk.lock().await;
        let _phase = soak.phase(Phase::Reload);
        let in_place = step.is_multiple_of(2);
        let Some(before) = both_statuses(&soak).await else {
            soak.anomaly("Status failed before a policy change".into());
            continue;
        };
        if step % 3 == 2 {
            let broken = if (step / 3).is_multiple_of(2) {
                BROKEN_SYNTAX
            } else {
                BROKEN_INVALID
            };
            write_policy(&soak.policy_file, broken, in_place).await;
            soak.fault("policy_reload_broken");
            let missing = until_each_instance(&soak, RELOAD_BOUND, |i| {
                let before = &before[i];
                let soak = &soak;
                async move {
                    soak.slots[i]
                        .status()
                        .await
                        .is_ok_and(|s| s.reload_failures > before.reload_failures)
                }
            })
            .await;
            if !missing.is_empty() {
                soak.anomaly(format!(
                    "a broken policy change was not refused within {RELOAD_BOUND:?} by {missing:?}"
                ));
            }
            if let Some(now) = both_statuses(&soak).await {
                for i in 0..2 {
                    if now[i].policy_generation != before[i].policy_generation {
                        soak.anomaly(format!(
                            "instance {} swapped in a broken policy change (generation {} -> {})",
                            soak.slots[i].name,
                            before[i].policy_generation,
                            now[i].policy_generation
                        ));
                    }
                }
            }
        }
        let Some(before) = both_statuses(&soak).await else {
            soak.anomaly("Status failed before a policy change".into());
            continue;
        };
        let next_frozen = !lock(&soak.truth).policy[0].frozen;
        for state in &mut lock(&soak.truth).policy {
            state.pending = Some(next_frozen);
        }
        let text = if next_frozen {
            POLICY_FROZEN
        } else {
            POLICY_OPEN
        };
        write_policy(&soak.policy_file, text, in_place).await;
        soak.fault("policy_reload_valid");
        let missing = until_each_instance(&soak, RELOAD_BOUND, |i| {
            let before = &before[i];
            let soak = &soak;
            async move {
                let Ok(status) = soak.slots[i].status().await else {
                    return false;
                };
                if status.policy_generation <= before.policy_generation {
                    return false;
                }
                if status.reload_failures != before.reload_failures {
                    soak.anomaly(format!(
                        "instance {} refused a valid change (a partly written file read?): {}",
                        soak.slots[i].name, status.last_reload_error
                    ));
                }
                if status.policy_generation != before.policy_generation + 1 {
                    soak.anomaly(format!(
                        "instance {} made {} reloads of one change (a partly written file loaded?)",
                        soak.slots[i].name,
                        status.policy_generation - before.policy_generation
                    ));
                }
                let mut truth = lock(&soak.truth);
                truth.policy[i] = PolicyState {
                    frozen: next_frozen,
                    pending: None,
                };
                true
            }
        })
        .await;
        if !missing.is_empty() {
            soak.anomaly(format!(
                "a valid policy change was not applied within {RELOAD_BOUND:?} by {missing:?}"
            ));
        }
        step += 1;
    }
}

async fn both_statuses(soak: &Soak) -> Option<[pb::StatusResponse; 2]> {
    let a = soak.slots[0].status().await.ok()?;
    let b = soak.slots[1].status().await.ok()?;
    Some([a, b])
}

/// Writes the policy file: in place (truncated, half written, a 30 ms pause,
/// the rest: the watcher must wait for it to settle) or atomically (a
/// temporary file outside the folder, renamed over it).
async fn write_policy(file: &Path, text: &str, in_place: bool) {
    use std::io::Write;
    if in_place {
        let (first, rest) = text.as_bytes().split_at(text.len() / 2);
        let mut f = std::fs::File::create(file).expect("open the policy file");
        f.write_all(first).expect("write");
        f.flush().expect("flush");
        tokio::time::sleep(Duration::from_millis(30)).await;
        f.write_all(rest).expect("write");
        f.flush().expect("flush");
    } else {
        let folder = file.parent().expect("the policy folder");
        let temp = folder
            .parent()
            .expect("its parent")
            .join("orders.cedar.next");
        std::fs::write(&temp, text).expect("write the temporary file");
        std::fs::rename(&temp, file).expect("rename over the policy file");
    }
}

// ---------------------------------------------------------------------------
// The final sweep and the report.
// ---------------------------------------------------------------------------

impl Soak {
    /// After the faults: every revocation ever acknowledged is still refused
    /// by both instances (restarts and Redis restarts lost none).
    async fn verify_every_revocation_still_enforced(&self) {
        let all: Vec<(Kind, Arc<str>)> = lock(&self.truth)
            .revoked
            .iter()
            .map(|r| (r.kind, r.auth.clone()))
            .collect();
        for (kind, auth) in all {
            for slot in &self.slots {
                let answer = slot.check_directly(&auth).await;
                let refused = matches!(&answer, Some((401, reason)) if reason == "revoked");
                if !refused {
                    self.anomaly(format!(
                        "final sweep: a {} token is not refused by instance {} ({:?})",
                        kind.name(),
                        slot.name,
                        answer
                    ));
                }
            }
        }
    }

    fn report(&self, duration: Duration, total: Duration, rate: u64) -> Value {
        let stats = lock(&self.stats);
        let revocations = lock(&self.revocations);
        let by_kind: serde_json::Map<String, Value> = stats
            .by_kind
            .iter()
            .map(|(k, c)| {
                (
                    (*k).to_owned(),
                    json!({
                        "sent": c.sent,
                        "allowed": c.allowed,
                        "denied": c.denied,
                        "in_transition": c.in_transition,
                        "errors": c.errors,
                    }),
                )
            })
            .collect();
        let sent: u64 = stats.by_kind.values().map(|c| c.sent).sum();
        let latency: serde_json::Map<String, Value> = std::iter::once("steady")
            .chain(PHASES.iter().map(|p| p.name()))
            .map(|phase| {
                let mut micros = stats.latency.get(phase).cloned().unwrap_or_default();
                micros.sort_unstable();
                let at = |q: f64| {
                    micros
                        .get(
                            ((micros.len() as f64 * q) as usize)
                                .min(micros.len().saturating_sub(1)),
                        )
                        .map(|m| (*m as f64 / 1000.0 * 100.0).round() / 100.0)
                };
                (
                    phase.to_owned(),
                    json!({"answers": micros.len(), "p50_ms": at(0.50), "p99_ms": at(0.99)}),
                )
            })
            .collect();
        let mut propagation = revocations.propagation_ms.clone();
        propagation.sort_unstable();
        json!({
            "machine": format!("{} cores (std::thread::available_parallelism)",
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "duration_s": (duration.as_secs_f64() * 10.0).round() / 10.0,
            "faults_settled_after_s": (total.as_secs_f64() * 10.0).round() / 10.0,
            "target_rate_per_s": rate,
            "requests_sent": sent,
            "achieved_rate_per_s": (sent as f64 / duration.as_secs_f64()).round(),
            "skipped_ticks": stats.skipped_ticks,
            "by_kind": by_kind,
            "wrong_decisions": stats.wrong,
            "wrong_decision_examples": stats.wrong_examples,
            "errors_outside_restart_window": stats.errors_outside_restart,
            "error_examples": stats.error_examples,
            "errors_inside_restart_window": stats.errors_in_restart,
            "oversized_header_reset_by_envoy": stats.oversized_header_reset_by_envoy,
            "in_transition": stats.in_transition,
            "revocations": {
                "made_redis_up": revocations.made_redis_up,
                "made_redis_down": revocations.made_redis_down,
                "acknowledged_queued": revocations.queued,
                "lost": revocations.lost,
                "lost_examples": revocations.lost_examples,
                "enforced_by_both_ms_max": propagation.last(),
                "enforced_by_both_ms_median": propagation.get(propagation.len() / 2),
            },
            "faults": *lock(&self.faults),
            "anomalies": *lock(&self.anomalies),
            "latency_by_phase": latency,
        })
    }
}

/// The soak's verdict, and proof it did not pass vacuously.
fn assert_report_passes(report: &Value) {
    let mut failures = Vec::new();
    let count = |v: &Value| v.as_u64().unwrap_or(0);
    if count(&report["wrong_decisions"]) != 0 {
        failures.push(format!(
            "{} wrong decisions, e.g. {}",
            report["wrong_decisions"], report["wrong_decision_examples"]
        ));
    }
    if count(&report["errors_outside_restart_window"]) != 0 {
        failures.push(format!(
            "{} errors outside a restart window, e.g. {}",
            report["errors_outside_restart_window"], report["error_examples"]
        ));
    }
    if count(&report["revocations"]["lost"]) != 0 {
        failures.push(format!(
            "{} lost revocations: {}",
            report["revocations"]["lost"], report["revocations"]["lost_examples"]
        ));
    }
    if let Some(anomalies) = report["anomalies"].as_array()
        && !anomalies.is_empty()
    {
        failures.push(format!("anomalies: {anomalies:?}"));
    }
    for fault in [
        "redis_kill_9",
        "redis_sigstop",
        "redis_kill_seen_by_both",
        "redis_pause_tripped_timeouts",
        "key_rotation",
        "jwks_down",
        "policy_reload_valid",
        "policy_reload_broken",
        "revocation_redis_up",
        "revocation_redis_down",
        "instance_restart",
        "instance_restart_during_redis_outage",
    ] {
        if count(&report["faults"][fault]) == 0 {
            failures.push(format!("fault {fault} was never injected"));
        }
    }
    let kinds = &report["by_kind"];
    for (kind, _) in MIX {
        let name = kind.name();
        let answered = match kind {
            Kind::Valid => count(&kinds[name]["allowed"]),
            Kind::PolicyToggle | Kind::RemovedKey => {
                count(&kinds[name]["allowed"]).min(count(&kinds[name]["denied"]))
            }
            _ => count(&kinds[name]["denied"]),
        };
        if answered == 0 {
            failures.push(format!(
                "no firm {} answer of the expected kind for {name}: {}",
                if matches!(kind, Kind::Valid) {
                    "allow"
                } else {
                    "allow and deny"
                },
                kinds[name]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "the soak failed:\n- {}",
        failures.join("\n- ")
    );
}
