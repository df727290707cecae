//! Loading and reloading a large policy set (issue 23).
//!
//! Generates about 100,000 policies (`tests/common/policy_gen.rs`: half
//! static policies spread over 100 policy files, half per-user template links
//! in `links.json`, with entities for their users, folders and documents) and
//! times, in this process:
//!
//! - a full load (read, parse, strictly validate, link, index, digest);
//! - the resident memory the loaded set adds (`VmRSS` after the load, minus
//!   before; the previous store is dropped first), per policy;
//! - a reload after one of the 100 files changed (one policy added), through
//!   [`PolicyStore::reload`], which re-parses and re-validates only that
//!   file, and checks the new policy is in the new set;
//! - a reload with that file broken, which must be refused.
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs with 2,000
//! policies. `PORTCULLIS_BENCH_POLICIES` and `PORTCULLIS_BENCH_FILES`
//! override the sizes.
//!
//! Run: `cargo bench --bench policy_load`

mod common;
#[path = "../tests/common/policy_gen.rs"]
mod policy_gen;

use std::time::Instant;

use cedar_policy::PolicyId;
use common::status_mib;
use portcullis::authz::policy_store::PolicyStore;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let policies = env_or(
        "PORTCULLIS_BENCH_POLICIES",
        if full { 100_000 } else { 2_000 },
    );
    let files = env_or("PORTCULLIS_BENCH_FILES", 100) as usize;
    let dir = tempfile::tempdir().unwrap();
    let (_shape, names) = policy_gen::write_folder_split(dir.path(), policies, 0xbe0c, files);
    println!(
        "threads available: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let baseline = status_mib("VmRSS:");
    let started = Instant::now();
    let store = PolicyStore::load(dir.path()).unwrap();
    let load = started.elapsed().as_secs_f64();
    let loaded = status_mib("VmRSS:");
    println!(
        "{policies} policies in {} files: loaded, validated and indexed in {load:.2} s",
        names.len()
    );
    println!(
        "resident memory of the loaded set: {:+.0} MiB ({:.1} KiB per policy)",
        loaded - baseline,
        (loaded - baseline) * 1024.0 / store.len() as f64
    );

    // One file of the set changes: a policy is added to it.
    let changed = dir.path().join(&names[names.len() / 2]);
    let mut text = std::fs::read_to_string(&changed).unwrap();
    text.push_str(
        "@id(\"bench-added\")\npermit(principal == User::\"u1\", action == Action::\"read\", resource == Doc::\"d1\");\n",
    );
    std::fs::write(&changed, &text).unwrap();
    let started = Instant::now();
    let reloaded = store.reload(dir.path()).unwrap();
    let reload = started.elapsed().as_secs_f64();
    println!(
        "one file of {} changed: reloaded in {reload:.3} s",
        names.len()
    );
    assert!(
        reloaded
            .policies
            .policy(&PolicyId::new("bench-added"))
            .is_some(),
        "the changed file's new policy is in the reloaded set"
    );
    assert_eq!(reloaded.len(), store.len() + 1);
    assert_ne!(reloaded.digest, store.digest);

    // The same file broken: refused, with the file named.
    std::fs::write(
        &changed,
        format!("{text}permit(principal ==, action, resource);\n"),
    )
    .unwrap();
    let started = Instant::now();
    let refused = reloaded.reload(dir.path()).unwrap_err();
    println!(
        "the same file broken: refused in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        refused
            .diagnostics
            .iter()
            .any(|d| d.file == changed && d.line.is_some()),
        "the refusal names the broken file and line: {refused}"
    );
}
