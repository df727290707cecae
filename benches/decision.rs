//! Cost of one decision, against the machine's own signature-verification cost.
//!
//! Criterion measures each case; at the end the medians are read back from
//! `target/criterion` and printed as ratios to the baseline measured in this same
//! run (raw ES256 verification with aws-lc, no JWT parsing), because absolute
//! times drift on shared machines.
//!
//! Run: `cargo bench --bench decision`

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair, UnparsedPublicKey,
};
use criterion::{Criterion, criterion_group};
use jsonwebtoken::Algorithm;
use portcullis::attributes::HttpRequest;
use portcullis::authn::mint::{SigningKey, pkcs8_pem};
use portcullis::config::Config;
use portcullis::engine::Engine;
use serde_json::json;

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
    tokens: Vec<(&'static str, String)>,
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
        tokens,
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

    for (name, token) in &setup.tokens {
        let http = request(Some(token));
        c.bench_function(&format!("decide_allow_{name}"), |b| {
            b.iter(|| {
                let decision = rt.block_on(setup.engine.decide(black_box(&http)));
                assert!(decision.verdict.is_allow());
            })
        });
    }
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

criterion_group!(group, benches);

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
        "decide_allow_ES256",
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
}
