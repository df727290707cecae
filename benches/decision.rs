//! Cost of one decision, against the machine's own signature-verification cost.
//!
//! Criterion measures each case; at the end the medians are read back from
//! `target/criterion` and printed as ratios to the baseline measured in this same
//! run (raw ES256 verification with aws-lc, no JWT parsing), because absolute
//! times drift on shared machines.
//!
//! The second part measures policy evaluation alone over generated policy sets
//! of 10, 1,000, 10,000 and 100,000 policies (half of them template-linked
//! per-user policies), sliced (what the engine does) and full (every policy
//! given to Cedar), and prints each size's sliced median as a multiple of the
//! 10-policy one. Under `cargo test --benches` only the small sizes run.
//!
//! Run: `cargo bench --bench decision`

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair,
    Ed25519KeyPair, KeyPair, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
};
use cedar_policy::Authorizer;
use criterion::{Criterion, criterion_group};
use jsonwebtoken::Algorithm;
use portcullis::attributes::HttpRequest;
use portcullis::authn::mint::{SigningKey, pkcs8_pem};
use portcullis::authn::{CredentialKind, VerifiedToken};
use portcullis::authz::mapping::{CedarMapping, RequestFacts, SchemaCheck};
use portcullis::authz::policy_store::PolicyStore;
use portcullis::authz::{evaluate, evaluate_full};
use portcullis::config::Config;
use portcullis::engine::Engine;
use serde_json::json;

#[path = "../tests/common/policy_gen.rs"]
mod policy_gen;

/// Policy-set sizes measured; `cargo test --benches` (no `--bench` argument)
/// runs only the small ones, to keep the test suite quick.
fn policy_sizes() -> Vec<u64> {
    if std::env::args().any(|a| a == "--bench") {
        vec![10, 1_000, 10_000, 100_000]
    } else {
        vec![10, 1_000]
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Setup {
    _dir: tempfile::TempDir,
    /// Caches off: every decision verifies the token and evaluates the policies.
    engine: Engine,
    /// Caches on (the default): repeated requests hit the token and decision caches.
    cached: Engine,
    /// Caches off, the quickstart policies plus one template-linked grant per
    /// user for the largest size of [`policy_sizes`] users: the whole decision
    /// against a large policy set.
    large: Engine,
    /// The policy count of `large`.
    large_policies: usize,
    tokens: Vec<(&'static str, String)>,
    /// Each token's public key parsed once (aws-lc `ParsedPublicKey`): the
    /// crypto library's floor for verifying that token's signature.
    floors: Vec<(&'static str, ParsedPublicKey)>,
}

fn setup() -> Setup {
    let rng = SystemRandom::new();
    let es = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let ed = Ed25519KeyPair::generate_pkcs8v1(&rng).unwrap();
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let rsa_der: aws_lc_rs::encoding::Pkcs8V1Der = rsa.as_der().unwrap();
    let keys = [
        (
            "ES256",
            SigningKey::from_pem(pkcs8_pem(es.as_ref()).as_bytes(), Algorithm::ES256, None)
                .unwrap(),
        ),
        (
            "RS256",
            SigningKey::from_pem(
                pkcs8_pem(rsa_der.as_ref()).as_bytes(),
                Algorithm::RS256,
                None,
            )
            .unwrap(),
        ),
        (
            "EdDSA",
            SigningKey::from_pem(pkcs8_pem(ed.as_ref()).as_bytes(), Algorithm::EdDSA, None)
                .unwrap(),
        ),
    ];
    let floors = vec![
        (
            "ES256",
            ParsedPublicKey::new(
                &ECDSA_P256_SHA256_FIXED,
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, es.as_ref())
                    .unwrap()
                    .public_key()
                    .as_ref(),
            )
            .unwrap(),
        ),
        (
            "RS256",
            ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, rsa.public_key().as_ref()).unwrap(),
        ),
        (
            "EdDSA",
            ParsedPublicKey::new(
                &ED25519,
                Ed25519KeyPair::from_pkcs8(ed.as_ref())
                    .unwrap()
                    .public_key()
                    .as_ref(),
            )
            .unwrap(),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let jwks = json!({"keys": keys.iter().map(|(_, k)| serde_json::to_value(&k.public_jwks().keys[0]).unwrap()).collect::<Vec<_>>()});
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    let config_text = std::fs::read_to_string(root.join("portcullis.toml"))
        .unwrap()
        .replace(
            "dir = \"policies\"",
            &format!("dir = {:?}", root.join("policies").display().to_string()),
        );
    let config = Config::from_toml(&config_text, Path::new("bench.toml"), dir.path()).unwrap();
    let mut config = config;
    let cached = Engine::from_config(&config).unwrap();
    config.cache.tokens = false;
    config.cache.decisions = false;
    let engine = Engine::from_config(&config).unwrap();

    // The quickstart policies plus per-user links: alice's among them.
    let users = policy_sizes().into_iter().max().unwrap_or(10);
    let large_dir = dir.path().join("large-policies");
    policy_gen::quickstart_with_user_links(
        &large_dir,
        (0..users).map(|i| {
            if i == 0 {
                "alice".to_owned()
            } else {
                format!("user{i}")
            }
        }),
    );
    config.policies.dir = large_dir;
    let large = Engine::from_config(&config).unwrap();
    let large_policies = large.policies().index.len();
    let now = now();
    let tokens = keys
        .iter()
        .map(|(name, key)| {
            let claims = json!({
                "iss": "https://auth.example.test", "aud": "orders-api", "sub": "alice",
                "iat": now, "exp": now + 3000, "jti": "bench", "scope": "orders:read",
            });
            (*name, key.sign_claims(&claims).unwrap())
        })
        .collect();
    Setup {
        _dir: dir,
        engine,
        cached,
        large,
        large_policies,
        tokens,
        floors,
    }
}

fn request(token: Option<&str>) -> HttpRequest {
    let mut http = HttpRequest {
        method: "GET".into(),
        path: "/orders/7".into(),
        host: "orders.example.test".into(),
        scheme: "https".into(),
        source_ip: Some([10, 0, 0, 1].into()),
        ..Default::default()
    };
    if let Some(token) = token {
        http.headers
            .insert("authorization".into(), format!("Bearer {token}"));
    }
    http
}

fn benches(c: &mut Criterion) {
    let setup = setup();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();

    // Baseline: one raw ES256 verification, the floor of any cold token check.
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let message = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9";
    let signature = pair.sign(&rng, message).unwrap();
    let public = UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_FIXED,
        pair.public_key().as_ref().to_vec(),
    );
    c.bench_function("baseline_raw_es256_verify", |b| {
        b.iter(|| {
            public
                .verify(black_box(message), black_box(signature.as_ref()))
                .unwrap()
        })
    });

    // The floor of each token's verification: its signature checked with a key
    // parsed once, nothing else.
    for ((name, token), (_, key)) in setup.tokens.iter().zip(&setup.floors) {
        let (message, signature) = token.rsplit_once('.').unwrap();
        let signature =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, signature)
                .unwrap();
        c.bench_function(&format!("floor_verify_{name}"), |b| {
            b.iter(|| {
                key.verify_sig(black_box(message.as_bytes()), black_box(&signature))
                    .unwrap()
            })
        });
    }

    // Token verification alone (parse, key lookup, signature, claim rules).
    let now_s = now();
    for (name, token) in &setup.tokens {
        c.bench_function(&format!("verify_token_{name}"), |b| {
            b.iter(|| {
                rt.block_on(
                    setup
                        .engine
                        .authenticator()
                        .issuers()
                        .verify_with_window(black_box(token), now_s),
                )
                .unwrap()
            })
        });
    }

    // Request mapping alone: the Cedar request, entities and context built
    // for a verified token and a matched route (as on a decision-cache miss).
    let store = PolicyStore::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/policies"),
    )
    .unwrap();
    let mut mapping = CedarMapping::new("orders", ["User"]).unwrap();
    mapping.allow_shape("get /orders/{id}", "User", true);
    let identity = VerifiedToken {
        issuer: "https://auth.example.test".into(),
        subject: "alice".into(),
        principal_type: "User".into(),
        principal_id: "alice".into(),
        jti: Some("bench".into()),
        issued_at: now_s,
        expires_at: now_s + 300,
        scopes: vec!["orders:read".into()],
        roles: vec!["support".into()],
        client_id: None,
        key_id: "k1".into(),
        api_key_id: None,
        credential: CredentialKind::Jwt,
        binding: None,
        status: None,
        claims: Vec::new(),
    };
    let mapped = request(None);
    let params = vec![("id".to_owned(), "7".to_owned())];
    c.bench_function("map_request", |b| {
        b.iter(|| {
            let facts = RequestFacts {
                http: &mapped,
                action: "get /orders/{id}",
                path_params: &params,
                workload: None,
                caller: None,
            };
            mapping
                .build(&store, black_box(&identity), facts, SchemaCheck::TrustShape)
                .unwrap()
        })
    });

    for (name, token) in &setup.tokens {
        let http = request(Some(token));
        c.bench_function(&format!("decide_allow_{name}"), |b| {
            b.iter(|| {
                let decision = rt.block_on(setup.engine.decide(black_box(&http)));
                assert!(decision.verdict.is_allow());
            })
        });
    }
    // The same ES256 decision against the quickstart plus a link per user.
    let http = request(Some(&setup.tokens[0].1));
    println!("large policy set: {} policies", setup.large_policies);
    c.bench_function("decide_allow_ES256_large_policy_set", |b| {
        b.iter(|| {
            let decision = rt.block_on(setup.large.decide(black_box(&http)));
            assert!(decision.verdict.is_allow());
        })
    });
    let hot = request(Some(&setup.tokens[0].1));
    c.bench_function("decide_allow_cached_hit", |b| {
        b.iter(|| {
            let decision = rt.block_on(setup.cached.decide(black_box(&hot)));
            assert!(decision.verdict.is_allow());
        })
    });
    let anonymous = request(None);
    c.bench_function("decide_deny_missing_token", |b| {
        b.iter(|| rt.block_on(setup.engine.decide(black_box(&anonymous))))
    });
}

/// Policy evaluation alone, sliced and full, as the policy set grows.
fn policy_benches(c: &mut Criterion) {
    let authorizer = Authorizer::new();
    for n in policy_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let shape = policy_gen::write_folder(dir.path(), n, 0xbe0c);
        let started = std::time::Instant::now();
        let store = PolicyStore::load(dir.path()).unwrap();
        println!(
            "{n} policies: folder loaded, validated and indexed in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let mut rng = policy_gen::Rng(0x5eed);
        let inputs: Vec<_> = (0..256)
            .map(|_| policy_gen::random_input(&mut rng, &store, shape))
            .collect();
        let mut group = c.benchmark_group(format!("policies_{n}"));
        if n >= 10_000 {
            // Full evaluation takes milliseconds here: fewer, longer samples.
            group.sample_size(10);
        }
        let mut i = 0;
        group.bench_function("sliced", |b| {
            b.iter(|| {
                i = (i + 1) % inputs.len();
                black_box(evaluate(&authorizer, &store, black_box(&inputs[i])))
            })
        });
        group.bench_function("full", |b| {
            b.iter(|| {
                i = (i + 1) % inputs.len();
                black_box(evaluate_full(&authorizer, &store, black_box(&inputs[i])))
            })
        });
        group.finish();
    }
}

criterion_group!(group, benches, policy_benches);

fn median_ns(id: &str) -> Option<f64> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/criterion")
        .join(id)
        .join("new/estimates.json");
    let estimates: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn main() {
    group();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    let Some(baseline) = median_ns("baseline_raw_es256_verify") else {
        return; // `cargo test --benches` runs each case once without saving estimates.
    };
    println!(
        "\nmedian cost per decision, as a multiple of one raw ES256 verify ({baseline:.0} ns in this run);\n\
         decide_allow_<alg> run with caches off, decide_allow_cached_hit with the default caches:"
    );
    for id in [
        "verify_token_ES256",
        "verify_token_RS256",
        "verify_token_EdDSA",
        "map_request",
        "decide_allow_ES256",
        "decide_allow_ES256_large_policy_set",
        "decide_allow_RS256",
        "decide_allow_EdDSA",
        "decide_allow_cached_hit",
        "decide_deny_missing_token",
    ] {
        if let Some(ns) = median_ns(id) {
            println!(
                "  {id:<28} {:>9.1} µs   {:>6.2}x",
                ns / 1000.0,
                ns / baseline
            );
        }
    }
    println!(
        "\nthe cold path against the crypto floor (the same token's signature, key parsed once):"
    );
    for alg in ["ES256", "RS256", "EdDSA"] {
        let Some(floor) = median_ns(&format!("floor_verify_{alg}")) else {
            continue;
        };
        let ratio = |id: String| median_ns(&id).map(|ns| ns / floor).unwrap_or(f64::NAN);
        println!(
            "  {alg:<6} floor {:>7.1} µs   verify_token {:>5.2}x   uncached decision {:>5.2}x",
            floor / 1000.0,
            ratio(format!("verify_token_{alg}")),
            ratio(format!("decide_allow_{alg}")),
        );
    }
    if let (Some(small), Some(large)) = (
        median_ns("decide_allow_ES256"),
        median_ns("decide_allow_ES256_large_policy_set"),
    ) {
        println!(
            "\nwhole ES256 decision, caches off: with one template link per user ({} links) / quickstart policies alone = {:.2}x",
            policy_sizes().into_iter().max().unwrap_or(10),
            large / small
        );
    }
    let Some(small) = median_ns("policies_10/sliced") else {
        return;
    };
    println!(
        "\npolicy evaluation alone (median), as a multiple of sliced evaluation at 10 policies ({:.1} µs):",
        small / 1000.0
    );
    for n in policy_sizes() {
        for how in ["sliced", "full"] {
            if let Some(ns) = median_ns(&format!("policies_{n}/{how}")) {
                println!(
                    "  {n:>7} policies {how:<7} {:>10.1} µs   {:>8.2}x",
                    ns / 1000.0,
                    ns / small
                );
            }
        }
    }
}
