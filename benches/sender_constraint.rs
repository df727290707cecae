//! What a sender constraint and a status list add to one request (issue 20).
//!
//! Criterion, one thread (a current-thread Tokio runtime), every case through
//! the whole in-process pipeline (`Engine::decide`) for `GET /orders/7`:
//!
//! - `bearer_cached` (the baseline): a plain ES256 bearer token, the same one
//!   every iteration, so the verified-token and decision caches are warm;
//! - `dpop_memory`: a DPoP-bound token (`cnf.jkt`) presented with
//!   `Authorization: DPoP` and a new proof every iteration (a replayed proof
//!   is refused), the replay cache in memory. The proofs are signed outside
//!   the timed part (`iter_batched_ref`);
//! - `dpop_nonce`: `dpop_memory` with server nonces required
//!   (`[sender_constraint] dpop_nonce`): each proof carries the nonce, which
//!   is checked (one HMAC) and handed on in the answer (one more);
//! - `dpop_redis`: the same with the replay cache shared through a real
//!   `redis-server` (`[revocation] redis_url`, `appendfsync everysec`) started
//!   by the bench: one `SET NX` round trip more;
//! - `status_list_warm`: a token with a `status.status_list` claim whose list
//!   (served over HTTPS by a local identity provider) is already cached;
//! - `bearer_cached_list_issuer`: a plain token of the status list's issuer,
//!   so that the status-list case can also be read against its own issuer;
//! - `raw_es256_verify`: one raw ES256 verification with aws-lc, for scale
//!   (a proof costs one such verification and the rest of its checks).
//!
//! At the end the medians are read back from `target/criterion` and printed
//! as multiples of the baseline measured in this same run.
//!
//! Run: `cargo bench --bench sender_constraint`. Under `cargo test
//! --all-targets` (no `--bench` argument) each case runs once, Redis included
//! (the bench starts `redis-server` itself).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/redis.rs"]
mod redis_harness;

use std::hint::black_box;
use std::io::Write as _;
use std::path::PathBuf;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use base64::Engine as _;
use common::dpop::DpopKey;
use common::idp::TestIdp;
use common::{Fixture, TestKey, add_discovery_issuer, claims, jwks_of, now, wait_for};
use criterion::{BatchSize, Criterion, criterion_group};
use jsonwebtoken::{EncodingKey, Header};
use portcullis::attributes::HttpRequest;
use portcullis::config::Secret;
use portcullis::decision::Decision;
use portcullis::engine::Engine;
use redis_harness::RedisServer;
use serde_json::json;
use tokio::runtime::Runtime;

const GROUP: &str = "sender_constraint";
const HTU: &str = "https://orders.example.test/orders/7";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `GET /orders/7` on `orders.example.test` with `authorization` and,
/// when given, a `DPoP` header.
fn request(authorization: String, proof: Option<String>) -> HttpRequest {
    let mut http = HttpRequest {
        method: "GET".into(),
        path: "/orders/7".into(),
        host: "orders.example.test".into(),
        scheme: "https".into(),
        source_ip: Some([10, 0, 0, 1].into()),
        ..Default::default()
    };
    http.headers.insert("authorization".into(), authorization);
    if let Some(proof) = proof {
        http.headers.insert("dpop".into(), proof);
    }
    http
}

/// The `lst` of a list of `entries` one-bit statuses, all VALID (0):
/// zlib-compressed, base64url.
fn lst(entries: usize) -> String {
    let bytes = vec![0u8; entries.div_ceil(8)];
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&bytes).unwrap();
    b64(&encoder.finish().unwrap())
}

struct Setup {
    _fx: Fixture,
    idp: TestIdp,
    redis: RedisServer,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The fixture's configuration: the quickstart issuer (local JWKS) and
    /// the identity provider's (discovery, status lists), in-memory DPoP
    /// replay cache.
    engine: Engine,
    /// The same configuration with `[revocation] redis_url`: DPoP proofs are
    /// also recorded in Redis.
    shared: Engine,
    /// The fixture's configuration with `[sender_constraint] dpop_nonce`.
    nonced: Engine,
    bearer: String,
    bound: String,
    dpop: DpopKey,
    listed: String,
    list_issuer_bearer: String,
}

fn setup(rt: &Runtime) -> Setup {
    let fx = Fixture::new();
    let idp = rt.block_on(TestIdp::start());
    let idp_key = TestKey::es256();
    idp.set_jwks(jwks_of(&[&idp_key]));
    add_discovery_issuer(&fx, &idp, "refresh = \"1h\"\nrefresh_min = \"1s\"", "");
    fx.append_config("\n[status_list]\ndefault_ttl = \"1h\"\n");

    // One list of 1,024 entries, every one VALID, fresh for the whole run.
    let uri = idp.status_list_uri("bench");
    let mut header = Header::new(idp_key.algorithm);
    header.typ = Some("statuslist+jwt".into());
    header.kid = Some(idp_key.kid().to_owned());
    let list_claims = json!({
        "sub": uri, "iss": idp.issuer(), "iat": now(),
        "status_list": { "bits": 1, "lst": lst(1024) },
    });
    let list = jsonwebtoken::encode(
        &header,
        &list_claims,
        &EncodingKey::from_ec_pem(idp_key.pem.as_bytes()).unwrap(),
    )
    .unwrap();
    idp.set_status_list("bench", Some(list));

    let config = fx.config();
    let engine = Engine::from_config(&config).unwrap();
    let tasks = rt.block_on(async { engine.authenticator().spawn_background() });
    rt.block_on(wait_for("identity provider keys", || {
        engine.authenticator().is_ready()
    }));

    let mut nonced_config = config.clone();
    nonced_config.sender_constraint.dpop_nonce = true;
    nonced_config.sender_constraint.dpop_nonce_lifetime = std::time::Duration::from_secs(3600);
    let nonced = Engine::from_config(&nonced_config).unwrap();

    let redis = RedisServer::start_with_appendfsync("everysec");
    let mut shared_config = config;
    shared_config.revocation.redis_url = Some(Secret::new(redis.url()));
    shared_config.revocation.redis_prefix = "bench-sender-constraint".into();
    let shared = Engine::from_config(&shared_config).unwrap();

    let dpop = DpopKey::new();
    let mut bound_claims = claims("alice", &["orders:read"], &[]);
    bound_claims["cnf"] = json!({ "jkt": dpop.jkt() });
    let mut listed_claims = claims("alice", &["orders:read"], &[]);
    listed_claims["iss"] = json!(idp.issuer());
    listed_claims["status"] = json!({ "status_list": { "idx": 7, "uri": uri } });
    let mut list_issuer_claims = claims("alice", &["orders:read"], &[]);
    list_issuer_claims["iss"] = json!(idp.issuer());
    Setup {
        bearer: fx.es256().token("alice", &["orders:read"], &[]),
        bound: fx.es256().sign(&bound_claims),
        dpop,
        listed: idp_key.sign(&listed_claims),
        list_issuer_bearer: idp_key.sign(&list_issuer_claims),
        engine,
        shared,
        nonced,
        _fx: fx,
        idp,
        redis,
        _tasks: tasks,
    }
}

fn allowed(decision: Decision, case: &str) -> Decision {
    assert!(
        decision.verdict.is_allow(),
        "{case}: {:?} {:?}",
        decision.verdict,
        decision.errors
    );
    decision
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let setup = setup(&rt);
    let decide = |engine: &Engine, http: &HttpRequest| rt.block_on(engine.decide(http));
    let mut group = c.benchmark_group(GROUP);

    // For scale: one raw ES256 verification, as benches/decision.rs measures it.
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let message = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9";
    let signature = pair.sign(&rng, message).unwrap();
    let public = UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_FIXED,
        pair.public_key().as_ref().to_vec(),
    );
    group.bench_function("raw_es256_verify", |b| {
        b.iter(|| {
            public
                .verify(black_box(message), black_box(signature.as_ref()))
                .unwrap()
        })
    });

    // Every decide case runs through iter_batched_ref, so each pays the same
    // harness costs (the request built and the decision dropped untimed), and
    // builds the answer the caller gets (where a DPoP nonce is handed on).
    let repeated = |name: &str, authorization: String| {
        let http = request(authorization, None);
        allowed(decide(&setup.engine, &http), name); // warms the caches (and the list)
        (name.to_owned(), http)
    };
    for (name, http) in [
        repeated("bearer_cached", format!("Bearer {}", setup.bearer)),
        repeated("status_list_warm", format!("Bearer {}", setup.listed)),
        repeated(
            "bearer_cached_list_issuer",
            format!("Bearer {}", setup.list_issuer_bearer),
        ),
    ] {
        group.bench_function(&name, |b| {
            b.iter_batched_ref(
                || http.clone(),
                |http| {
                    let decision = allowed(decide(&setup.engine, black_box(http)), &name);
                    Engine::answer(Some(&setup.engine), &decision)
                },
                BatchSize::SmallInput,
            )
        });
    }

    // The nonce the nonced engine hands a client whose proof has none.
    let refused = decide(
        &setup.nonced,
        &request(
            format!("DPoP {}", setup.bound),
            Some(setup.dpop.proof("GET", HTU, &setup.bound)),
        ),
    );
    let nonce = Engine::answer(Some(&setup.nonced), &refused)
        .client_headers
        .into_iter()
        .find(|(name, _)| name == "dpop-nonce")
        .map(|(_, value)| value)
        .expect("a use_dpop_nonce answer carries DPoP-Nonce");
    for (name, engine, nonce) in [
        ("dpop_memory", &setup.engine, None),
        ("dpop_nonce", &setup.nonced, Some(nonce.as_str())),
        ("dpop_redis", &setup.shared, None),
    ] {
        let fresh = || {
            let proof = match nonce {
                Some(nonce) => setup.dpop.proof_with_nonce("GET", HTU, &setup.bound, nonce),
                None => setup.dpop.proof("GET", HTU, &setup.bound),
            };
            request(format!("DPoP {}", setup.bound), Some(proof))
        };
        // Token cache, decision cache and (for Redis) the connection warm.
        let warm = allowed(decide(engine, &fresh()), name);
        assert_eq!(warm.binding, Some("dpop"), "{name}: the proof was checked");
        // The answer is built in the timed part: the nonce is handed on there.
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                fresh,
                |http| {
                    let decision = allowed(decide(engine, black_box(http)), name);
                    Engine::answer(Some(engine), &decision)
                },
                BatchSize::SmallInput,
            )
        });
        if name == "dpop_redis" {
            let keys = setup.redis.command(&["DBSIZE"]).unwrap_or_default();
            let keys: u64 = keys.trim().trim_start_matches(':').parse().unwrap_or(0);
            assert!(keys >= 2, "the proofs were recorded in Redis ({keys} keys)");
        }
    }
    // The list was fetched once, before timing, and answered from the cache since.
    assert_eq!(setup.idp.status_list_fetches(), 1);
    group.finish();
}

criterion_group!(group, benches);

fn median_ns(case: &str) -> Option<f64> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/criterion")
        .join(GROUP)
        .join(case)
        .join("new/estimates.json");
    let estimates: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn main() {
    group();
    Criterion::default().configure_from_args().final_summary();
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test` runs each case once and saves no estimates.
    }
    let Some(baseline) = median_ns("bearer_cached") else {
        return;
    };
    println!(
        "\nmedian per request, as a multiple of a cached plain bearer decision ({:.2} µs in this run):",
        baseline / 1000.0
    );
    for case in [
        "bearer_cached",
        "dpop_memory",
        "dpop_nonce",
        "dpop_redis",
        "status_list_warm",
        "bearer_cached_list_issuer",
        "raw_es256_verify",
    ] {
        if let Some(ns) = median_ns(case) {
            println!(
                "  {case:<26} {:>9.2} µs   {:>7.2}x   (+{:.2} µs)",
                ns / 1000.0,
                ns / baseline,
                (ns - baseline) / 1000.0
            );
        }
    }
    if let (Some(dpop), Some(verify)) = (median_ns("dpop_memory"), median_ns("raw_es256_verify")) {
        println!(
            "\nDPoP (in-memory replay cache) adds {:.2} µs = {:.2} raw ES256 verifications",
            (dpop - baseline) / 1000.0,
            (dpop - baseline) / verify
        );
    }
}
