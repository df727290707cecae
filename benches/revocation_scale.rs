//! Cost of one revocation against the number of revocations in force.
//!
//! For 1,000, 100,000 and 1,000,000 entries in force (a mix of every kind,
//! put in force with one batch insert), criterion measures:
//!
//! - `revocation_insert/<n>`: the in-memory part of `RevocationStore::revoke`
//!   for one `jti` (the cap check, the index update and its publication), the
//!   part that used to rebuild the whole index;
//! - `revocation_revoke/<n>`: one whole `RevocationStore::revoke` in embedded
//!   mode (journal in a temporary folder, one fsync each), which the fsync
//!   dominates;
//! - `revocation_check_hit/<n>` and `revocation_check_miss/<n>`: the request
//!   path's check of a revoked and of a clean token.
//!
//! The entries measured expire long before the ones put in force first, and
//! are swept (outside the timing) every 64 inserts, so the count in force stays
//! within 64 of `n` while a size is measured. At the end it prints each
//! median as a multiple of the one at 1,000 entries.
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs 1,000 and
//! 10,000 entries, each case once.
//!
//! Run: `cargo bench --bench revocation_scale`

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use portcullis::authn::{CredentialKind, VerifiedToken};
use portcullis::config::{Lifetimes, RevocationConfig};
use portcullis::revocation::{Revocation, RevocationStore, Target, unix_now};

// The allocator of the server binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Entries in force measured; `cargo test --benches` runs only small ones.
fn sizes() -> Vec<usize> {
    if std::env::args().any(|a| a == "--bench") {
        vec![1_000, 100_000, 1_000_000]
    } else {
        vec![1_000, 10_000]
    }
}

/// Inserts measured between two sweeps.
const CHUNK: u64 = 64;

/// How long the entries put in force first stay (they never expire during a
/// run); the measured ones expire after `token_exp` + leeway, well before.
const FILL_TTL: i64 = 10_000_000;

fn lifetimes() -> Lifetimes {
    Lifetimes {
        max_lifetime: Duration::from_secs(3600),
        leeway: Duration::from_secs(30),
        api_key_lifetime: Duration::ZERO,
    }
}

/// Entry `i` of the fill: mostly `jti` (with and without issuer), then
/// subjects, keys, clients and API keys.
fn fill_entry(i: usize, now: i64) -> Revocation {
    let target = match i % 10 {
        0..=3 => Target::Token {
            jti: format!("fill-jti-{i}"),
            issuer: None,
        },
        4..=5 => Target::Token {
            jti: format!("fill-jti-{i}"),
            issuer: Some(format!("https://issuer-{}.example", i % 4)),
        },
        6 | 7 => Target::Subject {
            sub: format!("fill-user-{i}"),
            issued_before: now,
        },
        8 => Target::Key {
            kid: format!("fill-kid-{i}"),
            issued_before: None,
        },
        _ if i % 20 == 9 => Target::Client {
            client_id: format!("fill-client-{i}"),
            issued_before: None,
        },
        _ => Target::ApiKey {
            api_key_id: format!("fill-api-key-{i}"),
        },
    };
    Revocation {
        target,
        created_at: now,
        expires_at: now + FILL_TTL + (i % 1000) as i64,
        reason: String::new(),
    }
}

fn token(jti: &str) -> VerifiedToken {
    VerifiedToken {
        issuer: "https://issuer-0.example".into(),
        subject: "someone".into(),
        principal_type: "User".into(),
        principal_id: "someone".into(),
        jti: Some(jti.into()),
        issued_at: unix_now(),
        expires_at: unix_now() + 600,
        scopes: vec![],
        roles: vec![],
        client_id: Some("web".into()),
        key_id: "k1".into(),
        api_key_id: None,
        credential: CredentialKind::Jwt,
        binding: None,
        status: None,
        claims: Vec::new(),
    }
}

/// A `jti` not used before in this run.
fn next_jti() -> Target {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    Target::Token {
        jti: format!("measured-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        issuer: None,
    }
}

/// Drops the measured entries (they expire within an hour), keeping the fill.
fn sweep_measured(store: &RevocationStore) {
    store.sweep(unix_now() + 2 * 3600);
}

/// Runs `one` `iters` times, in chunks of [`CHUNK`] with a sweep between them
/// (not timed).
fn timed_in_chunks(store: &RevocationStore, iters: u64, mut one: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let chunk = left.min(CHUNK);
        let start = Instant::now();
        for _ in 0..chunk {
            one();
        }
        total += start.elapsed();
        sweep_measured(store);
        left -= chunk;
    }
    total
}

fn bench_size(c: &mut Criterion, n: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = RevocationConfig {
        data_dir: dir.path().to_owned(),
        max_entries: 2_000_000,
        ..RevocationConfig::default()
    };
    let store: Arc<RevocationStore> = runtime
        .block_on(RevocationStore::open(&config, lifetimes()))
        .unwrap();
    let now = unix_now();
    let started = Instant::now();
    let fill: Vec<Revocation> = (0..n).map(|i| fill_entry(i, now)).collect();
    assert_eq!(store.insert_in_memory(fill), n);
    eprintln!(
        "{n} revocations put in force in {:.2} s (one batch)",
        started.elapsed().as_secs_f64()
    );

    c.benchmark_group("revocation_insert")
        .bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| {
                timed_in_chunks(&store, iters, || {
                    let entry = Revocation {
                        target: next_jti(),
                        created_at: now,
                        expires_at: unix_now() + 330,
                        reason: String::new(),
                    };
                    assert!(store.insert_local_in_memory(entry).unwrap());
                })
            })
        });

    let mut revoke = c.benchmark_group("revocation_revoke");
    revoke
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    revoke.bench_function(n.to_string(), |b| {
        b.iter_custom(|iters| {
            timed_in_chunks(&store, iters, || {
                runtime
                    .block_on(store.revoke(next_jti(), Some(unix_now() + 300), String::new()))
                    .unwrap();
            })
        })
    });
    revoke.finish();

    let clean = token("not-revoked");
    let revoked = token(&format!("fill-jti-{}", n / 2 / 10 * 10));
    assert!(store.check(&clean, unix_now()).is_ok());
    assert!(store.check(&revoked, unix_now()).is_err());
    c.benchmark_group("revocation_check_miss")
        .bench_function(n.to_string(), |b| {
            b.iter(|| black_box(store.check(black_box(&clean), now)))
        });
    c.benchmark_group("revocation_check_hit")
        .bench_function(n.to_string(), |b| {
            b.iter(|| black_box(store.check(black_box(&revoked), now)))
        });

    runtime.block_on(store.shutdown());
}

fn criterion_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion")
}

fn median_ns(group: &str, n: usize) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(n.to_string())
        .join("new/estimates.json");
    let estimates: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    for n in sizes() {
        bench_size(&mut c, n);
    }
    c.final_summary();
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches` runs each case once without saving estimates.
    }
    println!("\nmedian per operation, and as a multiple of the same operation at 1,000 in force:");
    for group in [
        "revocation_insert",
        "revocation_revoke",
        "revocation_check_miss",
        "revocation_check_hit",
    ] {
        let Some(base) = median_ns(group, 1_000) else {
            continue;
        };
        for n in sizes() {
            if let Some(ns) = median_ns(group, n) {
                println!(
                    "  {group:<22} {n:>9} in force {:>10.2} µs   {:>5.2}x",
                    ns / 1000.0,
                    ns / base
                );
            }
        }
    }
}
