//! `portcullis replay` and `portcullis test --coverage` on a large policy set.
//!
//! Generates a policy folder of about 10,000 policies and 2,000 routes: the
//! quickstart's policies and per-user template links
//! (`tests/common/policy_gen.rs`, as the decision benchmark uses), plus, for
//! each of 1,000 services, a `GET` and a `POST` route with a reader and a
//! writer permit and a suspension forbid on roles, and a scope-based permit
//! for 300 of them (the broad policies). It records 100,000 decisions as
//! `[audit] record_inputs` writes them, each with the verdict the policies
//! give (computed here from the rules the generator wrote, independently of
//! Portcullis), then runs the release binary:
//!
//! - `portcullis replay --audit` with the unchanged folder: everything must
//!   be unchanged (this checks the recording);
//! - `portcullis replay --audit` with one writer policy edited to let anyone
//!   write: the deny -> allow count must be exactly the recorded denied
//!   writes to that service that the edit opens;
//! - `portcullis validate`, which must warn about nothing (every forbid of
//!   the set can override a permit);
//! - `portcullis test --coverage-json` on 3,600 cases in the folder's `tests/`
//!   (TOML JWT cases per service; YAML cases per user link and per API-key
//!   writer).
//!
//! The baseline of the same run is the engine deciding the same 100,000
//! requests directly (route, request facts, sliced evaluation through a fresh
//! decision cache, in this process), so the replay's figure is a ratio.
//! Under `cargo test --benches` (no `--bench` argument) it runs with 20
//! services, 20 users and 1,000 decisions.
//!
//! Run: `cargo bench --bench replay`

mod common;
#[path = "../tests/common/policy_gen.rs"]
mod policy_gen;

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use portcullis::attributes::HttpRequest;
use portcullis::authn::{CredentialKind, VerifiedToken};
use portcullis::config::Config;
use portcullis::engine::Engine;
use serde_json::{Value, json};

/// The binary's allocator, so that the in-process baseline allocates as the
/// replaying binary does (the uncached decision path allocates a lot).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    /// Per-user template links.
    users: u64,
    /// Services, each with two routes.
    services: u64,
    /// Services whose read permit is scope-based (broad).
    broad: u64,
    /// Recorded decisions.
    records: u64,
}

/// The service whose writer policy the proposed change opens.
const OPENED: u64 = 7;

const APP: &str = "orders";
const ISSUER: &str = "https://auth.example.test";
const BLOCKED_NET: &str = "203.0.113.";

fn writer_policy(i: u64) -> String {
    format!(
        "@id(\"svc{i}-write\")\npermit (principal in Role::\"svc{i}-writer\", action == Action::\"post /svc{i}/items\", resource == Application::\"{APP}\");\n"
    )
}

/// Writes the folder: the quickstart with `users` per-user links, and the
/// services' actions, routes and policies. Returns the configuration text.
fn write_folder(dir: &Path, sizes: Sizes) -> String {
    let policies = dir.join("policies");
    policy_gen::quickstart_with_user_links(&policies, (0..sizes.users).map(|u| format!("user{u}")));
    let mut schema = String::from("\n// Generated services.\n");
    let mut cedar = String::new();
    let mut routes = String::new();
    for i in 0..sizes.services {
        let _ = write!(
            schema,
            "action \"get /svc{i}/items/{{id}}\" appliesTo {{ principal: [User, Client, Workload], resource: [Application], context: {{ http: Http, path_params: {{ id: String }}, token: Token, workload?: String }} }};\n\
             action \"post /svc{i}/items\" appliesTo {{ principal: [User, Client, Workload], resource: [Application], context: {{ http: Http, path_params: {{}}, token: Token, workload?: String }} }};\n"
        );
        let _ = write!(
            cedar,
            "@id(\"svc{i}-read\")\npermit (principal in Role::\"svc{i}-reader\", action == Action::\"get /svc{i}/items/{{id}}\", resource == Application::\"{APP}\");\n\
             {}\
             @id(\"svc{i}-suspended\")\nforbid (principal in Role::\"svc{i}-suspended\", action in [Action::\"get /svc{i}/items/{{id}}\", Action::\"post /svc{i}/items\"], resource == Application::\"{APP}\");\n",
            writer_policy(i)
        );
        if i < sizes.broad {
            let _ = write!(
                cedar,
                "@id(\"svc{i}-read-scope\")\npermit (principal, action == Action::\"get /svc{i}/items/{{id}}\", resource == Application::\"{APP}\")\nwhen {{ context.token.scopes.contains(\"svc{i}:read\") }};\n"
            );
        }
        let _ = write!(
            routes,
            "\n[[routes]]\nmethod = \"GET\"\npath = \"/svc{i}/items/{{id}}\"\n\n[[routes]]\nmethod = \"POST\"\npath = \"/svc{i}/items\"\n"
        );
    }
    let schema_file = policies.join("orders.cedarschema");
    let mut text = std::fs::read_to_string(&schema_file).unwrap();
    text.push_str(&schema);
    std::fs::write(&schema_file, text).unwrap();
    std::fs::write(policies.join("services.cedar"), cedar).unwrap();
    write_cases(&policies.join("tests"), sizes);

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    std::fs::read_to_string(root.join("portcullis.toml"))
        .unwrap()
        .replace(
            "dir = \"policies\"",
            &format!("dir = {:?}", policies.display().to_string()),
        )
        .replace(
            "jwks_file = \"jwks.json\"",
            &format!(
                "jwks_file = {:?}",
                root.join("jwks.json").display().to_string()
            ),
        )
        + &routes
        // API keys, for the API-key cases (the key file may stay empty).
        + &{
            let keys = dir.join("keys.toml");
            std::fs::write(&keys, "").unwrap();
            format!("\n[api_keys]\nfile = {:?}\n", keys.display().to_string())
        }
}

/// `portcullis test` cases: per service a reader, a writer and a suspended
/// reader; per broad service a scope holder.
fn write_cases(dir: &Path, sizes: Sizes) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cases = String::new();
    for i in 0..sizes.services {
        let _ = write!(
            cases,
            "[[case]]\nname = \"svc{i} readers read\"\npath = \"/svc{i}/items/1\"\nclaims = {{ sub = \"r{i}\", roles = [\"svc{i}-reader\"] }}\nexpect = \"allow\"\npolicies = [\"svc{i}-read\"]\n\n\
             [[case]]\nname = \"svc{i} writers write\"\nmethod = \"POST\"\npath = \"/svc{i}/items\"\nclaims = {{ sub = \"w{i}\", roles = [\"svc{i}-writer\"] }}\nexpect = \"allow\"\npolicies = [\"svc{i}-write\"]\n\n\
             [[case]]\nname = \"svc{i} suspended readers do not\"\npath = \"/svc{i}/items/1\"\nclaims = {{ sub = \"s{i}\", roles = [\"svc{i}-reader\", \"svc{i}-suspended\"] }}\nexpect = \"deny\"\npolicies = [\"svc{i}-suspended\"]\n\n"
        );
        if i < sizes.broad {
            let _ = write!(
                cases,
                "[[case]]\nname = \"svc{i} read scope\"\npath = \"/svc{i}/items/2\"\nclaims = {{ sub = \"c{i}\", scope = \"svc{i}:read\" }}\nexpect = \"allow\"\npolicies = [\"svc{i}-read-scope\"]\n\n"
            );
        }
    }
    std::fs::write(dir.join("services.toml"), cases).unwrap();
    // YAML cases: per-user links (with the quickstart's read permit) and
    // API-key writers.
    let mut yaml = String::from("case:\n");
    for u in 0..sizes.users.min(200) {
        let _ = write!(
            yaml,
            "  - name: user{u} reads through the link\n    path: /orders/1\n    claims: {{ sub: user{u}, scope: \"orders:read\" }}\n    expect: allow\n    policies: [orders-read, read-user{u}]\n"
        );
    }
    for i in 0..sizes.services.min(100) {
        let _ = write!(
            yaml,
            "  - name: svc{i} API-key writers write\n    method: POST\n    path: /svc{i}/items\n    api_key: {{ id: bot{i}, principal: bot{i}, roles: [svc{i}-writer] }}\n    expect: allow\n    policies: [svc{i}-write]\n"
        );
    }
    std::fs::write(dir.join("services.yaml"), yaml).unwrap();
}

/// One recorded decision and what the policies say of it.
struct Record {
    user: u64,
    roles: Vec<String>,
    scopes: Vec<String>,
    method: &'static str,
    path: String,
    source_ip: String,
    allowed: bool,
    /// A write to the opened service the edit lets through.
    opened: bool,
}

/// A recorded decision, drawn at random, with its verdict from the rules the
/// folder was generated with: the quickstart's (read with `orders:read`,
/// nobody from 203.0.113.0/24) and the services' (readers read, writers
/// write, scope holders read the broad services, suspended principals
/// neither).
fn record(rng: &mut policy_gen::Rng, sizes: Sizes) -> Record {
    let user = rng.below(sizes.users.max(1));
    let blocked = rng.chance(2);
    let source_ip = if blocked {
        format!("{BLOCKED_NET}{}", rng.below(250) + 1)
    } else {
        format!("198.51.100.{}", rng.below(250) + 1)
    };
    if rng.chance(20) {
        let read = rng.chance(50);
        let scopes = if read {
            vec!["orders:read".to_owned()]
        } else {
            vec![]
        };
        return Record {
            user,
            roles: vec![],
            scopes,
            method: "GET",
            path: format!("/orders/{}", rng.below(1000)),
            source_ip,
            allowed: read && !blocked,
            opened: false,
        };
    }
    // One decision in ten goes to the service the change opens.
    let service = if rng.chance(10) {
        OPENED.min(sizes.services - 1)
    } else {
        rng.below(sizes.services)
    };
    let (reader, writer, suspended) = (rng.chance(30), rng.chance(30), rng.chance(5));
    let scoped = rng.chance(30);
    let roles: Vec<String> = [
        (reader, "reader"),
        (writer, "writer"),
        (suspended, "suspended"),
    ]
    .iter()
    .filter(|(has, _)| *has)
    .map(|(_, role)| format!("svc{service}-{role}"))
    .collect();
    let scopes = if scoped {
        vec![format!("svc{service}:read")]
    } else {
        vec![]
    };
    let open = !blocked && !suspended;
    if rng.chance(60) {
        Record {
            user,
            roles,
            scopes,
            method: "GET",
            path: format!("/svc{service}/items/{}", rng.below(1000)),
            source_ip,
            allowed: open && (reader || (scoped && service < sizes.broad)),
            opened: false,
        }
    } else {
        Record {
            user,
            roles,
            scopes,
            method: "POST",
            path: format!("/svc{service}/items"),
            source_ip,
            allowed: open && writer,
            opened: open && !writer && service == OPENED.min(sizes.services - 1),
        }
    }
}

/// The audit line `[audit] record_inputs = true` writes for `r`.
fn audit_line(n: u64, r: &Record, now: i64) -> String {
    let outcome = if r.allowed { "allow" } else { "deny" };
    json!({
        "type": "decision", "ts_ms": now * 1000, "decision_id": format!("d{n}"),
        "outcome": outcome, "dry_run": false, "would": null,
        "status": if r.allowed { 200 } else { 403 },
        "principal": format!("User::\"user{}\"", r.user),
        "issuer": ISSUER, "jti": format!("j{n}"), "credential": "jwt",
        "api_key_id": null, "caller": null, "method": r.method, "path": r.path,
        "inputs": {
            "principal_type": "User", "principal_id": format!("user{}", r.user),
            "roles": r.roles, "scopes": r.scopes, "iat": now - 60, "exp": now + 540,
            "client_id": null, "host": "shop.example", "scheme": "https",
            "source_ip": r.source_ip, "workload": null,
        },
    })
    .to_string()
}

/// The engine's own decision of `r`: the baseline (no parsing, no report).
fn decide_directly(engine: &Engine, r: &Record, now: i64) -> bool {
    let mut token = VerifiedToken::principal_only(
        ISSUER,
        "User",
        &format!("user{}", r.user),
        CredentialKind::Jwt,
    );
    token.roles = r.roles.clone();
    token.scopes = r.scopes.clone();
    token.issued_at = now - 60;
    token.expires_at = now + 540;
    let http = HttpRequest {
        method: r.method.to_owned(),
        path: r.path.clone(),
        host: "shop.example".to_owned(),
        scheme: "https".to_owned(),
        source_ip: r.source_ip.parse::<IpAddr>().ok(),
        ..HttpRequest::default()
    };
    let evaluator = engine.evaluator();
    let route = evaluator.route(&http);
    let Some(facts) = evaluator.request_facts(&http, &route, None) else {
        return false;
    };
    evaluator
        .evaluate(&token, facts)
        .map(|o| o.allowed)
        .unwrap_or(false)
}

/// Runs the release binary; returns its stdout and the wall time.
fn portcullis(args: &[&str]) -> (String, f64, bool) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis");
    let wall = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() && out.status.code() != Some(1) {
        panic!(
            "portcullis {args:?} failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (stdout, wall, out.status.success())
}

fn replay(config: &Path, policies: &Path, audit: &Path) -> (Value, f64) {
    let (stdout, wall, _) = portcullis(&[
        "replay",
        "--config",
        &config.display().to_string(),
        "--policies",
        &policies.display().to_string(),
        "--audit",
        &audit.display().to_string(),
        "--json",
    ]);
    (serde_json::from_str(&stdout).expect("replay --json"), wall)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes {
            users: 6_700,
            services: 1_000,
            broad: 300,
            records: 100_000,
        }
    } else {
        Sizes {
            users: 20,
            services: 20,
            broad: 6,
            records: 1_000,
        }
    };
    // PORTCULLIS_BENCH_SERVICES / _USERS / _RECORDS override the sizes (the
    // broad policies stay at most 300), to see what the cost grows with.
    let sizes = Sizes {
        services: common::env_usize("PORTCULLIS_BENCH_SERVICES")
            .map_or(sizes.services, |n| n.max(1) as u64),
        users: common::env_usize("PORTCULLIS_BENCH_USERS").map_or(sizes.users, |n| n.max(1) as u64),
        records: common::env_usize("PORTCULLIS_BENCH_RECORDS").map_or(sizes.records, |n| n as u64),
        ..sizes
    };
    let sizes = Sizes {
        broad: sizes.broad.min(sizes.services),
        ..sizes
    };
    println!(
        "machine: {} ({} cores), load average {}",
        common::cpu_model(),
        common::cores(),
        common::load_average()
    );
    let dir = tempfile::tempdir().unwrap();
    let config_text = write_folder(dir.path(), sizes);
    let config_path = dir.path().join("portcullis.toml");
    std::fs::write(&config_path, &config_text).unwrap();
    let policies = dir.path().join("policies");

    // The proposed change: anyone may write to one service.
    let proposed = dir.path().join("proposed");
    std::fs::create_dir_all(&proposed).unwrap();
    for entry in std::fs::read_dir(&policies).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, proposed.join(path.file_name().unwrap())).unwrap();
        }
    }
    let services = std::fs::read_to_string(policies.join("services.cedar")).unwrap();
    let opened = OPENED.min(sizes.services - 1);
    let edited = services.replace(
        &writer_policy(opened),
        &format!(
            "@id(\"svc{opened}-write\")\npermit (principal, action == Action::\"post /svc{opened}/items\", resource == Application::\"{APP}\");\n"
        ),
    );
    assert_ne!(edited, services, "the edit applies");
    std::fs::write(proposed.join("services.cedar"), edited).unwrap();

    let now = now_secs();
    let mut rng = policy_gen::Rng(0x2e91a7);
    let records: Vec<Record> = (0..sizes.records)
        .map(|_| record(&mut rng, sizes))
        .collect();
    let audit = dir.path().join("audit.log");
    let lines: Vec<String> = records
        .iter()
        .enumerate()
        .map(|(n, r)| audit_line(n as u64, r, now))
        .collect();
    std::fs::write(&audit, lines.join("\n") + "\n").unwrap();
    let expected_opened = records.iter().filter(|r| r.opened).count() as u64;
    let allowed = records.iter().filter(|r| r.allowed).count();

    let config = Config::load(&config_path).unwrap();
    let started = Instant::now();
    let engine = Engine::from_config(&config).unwrap();
    let load = started.elapsed().as_secs_f64();
    let policy_count = engine.policies().len();
    let routes = config.routes.len();
    println!(
        "policy set: {policy_count} policies ({} per-user links, {} services x 3 + {} scope-based, 4 quickstart), {routes} routes; load, validate, index {load:.2} s",
        sizes.users, sizes.services, sizes.broad
    );
    println!(
        "recorded: {} decisions ({allowed} allowed), audit lines with inputs, {:.1} MiB",
        sizes.records,
        std::fs::metadata(&audit).unwrap().len() as f64 / 1048576.0
    );

    // Baseline: the engine deciding the same requests directly.
    let started = Instant::now();
    let mut disagreements = 0u64;
    for r in &records {
        if decide_directly(&engine, r, now) != r.allowed {
            disagreements += 1;
        }
    }
    let direct = started.elapsed().as_secs_f64();
    assert_eq!(
        disagreements, 0,
        "the recorded verdicts are the engine's (the generator's rules match the policies)"
    );
    println!(
        "baseline, engine deciding the same {} requests directly: {direct:.3} s ({:.0} decisions/s)",
        sizes.records,
        sizes.records as f64 / direct
    );

    let (same, same_wall) = replay(&config_path, &policies, &audit);
    assert_eq!(same["replayed"], sizes.records, "{same}");
    assert_eq!(same["unchanged"], sizes.records, "{same}");
    let same_seconds = same["seconds"].as_f64().unwrap();
    println!(
        "replay, unchanged folder: {} replayed, {} unchanged, in {same_seconds:.3} s ({:.0} records/s, {:.2}x the baseline); {same_wall:.2} s with loading",
        same["replayed"],
        same["unchanged"],
        same["records_per_second"].as_f64().unwrap(),
        same_seconds / direct
    );

    let (changed, changed_wall) = replay(&config_path, &proposed, &audit);
    let seconds = changed["seconds"].as_f64().unwrap();
    let deny_to_allow = changed["deny_to_allow"]["count"].as_u64().unwrap();
    let allow_to_deny = changed["allow_to_deny"]["count"].as_u64().unwrap();
    let by_policy: Vec<String> = changed["deny_to_allow"]["by_policy"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}: {}", v["count"]))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "replay, svc{opened}-write opened: {} replayed in {seconds:.3} s ({:.0} records/s, {:.2}x the baseline); {changed_wall:.2} s with loading",
        changed["replayed"],
        changed["records_per_second"].as_f64().unwrap(),
        seconds / direct
    );
    println!(
        "  unchanged {}, allow -> deny {allow_to_deny}, deny -> allow {deny_to_allow} (expected {expected_opened}) by new determining policy: {}",
        changed["unchanged"],
        by_policy.join(", ")
    );
    assert_eq!(deny_to_allow, expected_opened, "{changed}");
    assert!(expected_opened > 0, "the change opens something");
    assert_eq!(allow_to_deny, 0, "{changed}");

    let config_arg = config_path.display().to_string();
    // validate's analyses (unrouted actions, undeclared scopes, forbids that
    // override nothing) on the large set: every forbid here can matter.
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["validate", "--config", &config_arg])
        .output()
        .expect("run portcullis validate");
    let wall = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .count();
    assert_eq!(warnings, 0, "no false warning:\n{stderr}");
    println!("portcullis validate: {wall:.2} s with loading, {warnings} warnings");
    let coverage_json = dir.path().join("coverage.json");
    let (out, wall, passed) = portcullis(&[
        "test",
        "--config",
        &config_arg,
        "--coverage-json",
        &coverage_json.display().to_string(),
    ]);
    let summary: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" case(s), ") || l.starts_with("coverage: "))
        .collect();
    assert!(passed, "every case passes:\n{out}");
    println!(
        "portcullis test --coverage-json on {policy_count} policies: {wall:.2} s with loading\n  {}",
        summary.join("\n  ")
    );
}

/// Seconds since the epoch.
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
