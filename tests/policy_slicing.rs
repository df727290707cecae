//! Slicing never changes a decision: over large generated policy sets (static
//! policies of every scope kind, template-linked per-user policies, conditions
//! that fail at run time), the sliced evaluation and Cedar's evaluation of the
//! whole set agree on the answer, the determining policies and the errors, for
//! thousands of random requests.

#[path = "common/policy_gen.rs"]
mod policy_gen;

use cedar_policy::Authorizer;
use policy_gen::{Rng, random_input, write_folder};
use portcullis::authz::index::Slice;
use portcullis::authz::policy_store::PolicyStore;
use portcullis::authz::{evaluate, evaluate_full};

/// What a stream of requests exercised.
#[derive(Debug, Default)]
struct Coverage {
    allows: u64,
    forbids: u64,
    defaults: u64,
    errors: u64,
    linked: u64,
}

fn differential(policies: u64, requests: u64, seed: u64) -> Coverage {
    let dir = tempfile::tempdir().unwrap();
    let shape = write_folder(dir.path(), policies, seed);
    let store = PolicyStore::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        store.index.len() as u64,
        policies,
        "every policy and link indexed"
    );
    let authorizer = Authorizer::new();
    let mut rng = Rng(seed.wrapping_mul(31) | 1);
    let mut seen = Coverage::default();
    let mut sliced_sizes = 0;
    for step in 0..requests {
        let input = random_input(&mut rng, &store, shape);
        let full = evaluate_full(&authorizer, &store, &input);
        let sliced = evaluate(&authorizer, &store, &input);
        assert_eq!(
            sliced, full,
            "step {step} (seed {seed}): sliced and full evaluation differ for {} {} {}",
            input.principal, input.action, input.resource
        );
        if full.allowed {
            seen.allows += 1;
        } else if !full.errors.is_empty() {
            seen.errors += 1;
        } else if !full.policies.is_empty() {
            seen.forbids += 1;
        } else {
            seen.defaults += 1;
        }
        if full.policies.iter().any(|p| p.starts_with("link")) {
            seen.linked += 1;
        }
        sliced_sizes += match store.index.slice(
            &input.entities,
            &input.principal,
            &input.action,
            &input.resource,
        ) {
            Slice::All => policies,
            Slice::Some(set) => set.policies().count() as u64,
        };
    }
    let mean = sliced_sizes / requests;
    eprintln!("{policies} policies, {requests} requests: {seen:?}, mean slice {mean} policies");
    // Slicing does cut the work: candidates are a small part of the set.
    assert!(
        mean * 10 < policies,
        "mean slice {mean} of {policies} policies"
    );
    seen
}

/// The streams exercise every kind of outcome, so agreement means something.
fn assert_covers(seen: &Coverage, requests: u64) {
    assert!(seen.allows > requests / 20, "{seen:?}");
    assert!(seen.forbids > 0, "no deny by a forbid: {seen:?}");
    assert!(seen.defaults > 0, "no deny for want of a permit: {seen:?}");
    assert!(seen.errors > 0, "no evaluation error: {seen:?}");
    assert!(seen.linked > 0, "no decision by a template link: {seen:?}");
}

#[test]
fn slicing_agrees_with_full_evaluation_on_small_sets() {
    let mut total = Coverage::default();
    for seed in 1..=6 {
        let seen = differential(60, 500, seed);
        total.allows += seen.allows;
        total.forbids += seen.forbids;
        total.defaults += seen.defaults;
        total.errors += seen.errors;
        total.linked += seen.linked;
    }
    assert_covers(&total, 3000);
}

#[test]
fn slicing_agrees_with_full_evaluation_on_a_large_set() {
    let seen = differential(4000, 1000, 0x5eed);
    assert_covers(&seen, 1000);
}
