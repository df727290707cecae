//! Peak resident memory with a large policy set and a full decision cache.
//!
//! Loads a generated folder of 100,000 policies (half template-linked per-user
//! policies, with entities for their users, folders and documents), indexes it,
//! then fills the engine's decision cache with 100,000 decisions made by the
//! sliced evaluator, and prints the process' peak RSS (`VmHWM`) after each step
//! next to the RSS before loading anything (the baseline of this same run).
//! Under `cargo test --benches` it runs with 1,000 of each.
//!
//! Run: `cargo bench --bench memory`

mod common;
#[path = "../tests/common/policy_gen.rs"]
mod policy_gen;

use std::sync::Arc;

use cedar_policy::Authorizer;
use common::status_mib;
use portcullis::authz::decision_cache::DecisionCache;
use portcullis::authz::evaluate;
use portcullis::authz::policy_store::PolicyStore;
use portcullis::config::CacheConfig;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (policies, decisions) = if full {
        (100_000, 100_000)
    } else {
        (1_000, 1_000)
    };
    // PORTCULLIS_BENCH_POLICIES overrides the policy count (to find limits).
    let policies = std::env::var("PORTCULLIS_BENCH_POLICIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(policies);
    let dir = tempfile::tempdir().unwrap();
    let shape = policy_gen::write_folder(dir.path(), policies, 0x3e3);
    let baseline = status_mib("VmRSS:");
    println!("baseline RSS before loading: {baseline:.0} MiB");

    let started = std::time::Instant::now();
    let store = PolicyStore::load(dir.path()).unwrap();
    println!("load took {:.1} s", started.elapsed().as_secs_f64());
    let loaded = status_mib("VmHWM:");
    println!(
        "{policies} policies ({} entities) loaded, validated and indexed: peak RSS {loaded:.0} MiB ({:+.0} MiB)",
        store.entities.len(),
        loaded - baseline
    );

    let caches = DecisionCache::new(&CacheConfig {
        decision_max_bytes: 1 << 30,
        ..CacheConfig::default()
    });
    let authorizer = Authorizer::new();
    let mut rng = policy_gen::Rng(0x77);
    for i in 0..decisions {
        let input = policy_gen::random_input(&mut rng, &store, shape);
        let outcome = evaluate(&authorizer, &store, &input);
        let key: [u8; 32] =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &(i as u64).to_be_bytes())
                .as_ref()
                .try_into()
                .unwrap();
        caches.insert(key, Arc::new(outcome));
    }
    let cached = caches.len();
    let filled = status_mib("VmHWM:");
    println!(
        "{cached} decisions cached: peak RSS {filled:.0} MiB ({:+.0} MiB over the loaded set)",
        filled - loaded
    );
    assert!(cached > 0, "the decision cache holds the decisions");
}
