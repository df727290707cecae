//! `portcullis replay`: the real binary re-decides recorded decisions with a
//! proposed policy folder and reports what changed. Under the quickstart
//! policies: an opening change (a new permit) is reported deny → allow and
//! fails unless `--allow-opened`; a closing change is counted allow → deny;
//! the same policies leave everything unchanged; malformed lines are reported
//! by number and never stop the others; audit lines replay API keys and
//! workloads (JWTs skipped) and say which fields they lack; 100,000 records are
//! replayed with the time reported.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use common::*;
use serde_json::{Value, json};

const ISS: &str = "https://auth.example.test";

/// A recorded decision input as `--requests` reads it.
fn record(id: &str, outcome: &str, sub: &str, scopes: &[&str], method: &str, path: &str) -> Value {
    json!({
        "decision_id": id,
        "outcome": outcome,
        "principal_type": "User",
        "principal_id": sub,
        "roles": [],
        "scopes": scopes,
        "issuer": ISS,
        "iat": 1_795_947_600,
        "exp": 1_795_948_200,
        "method": method,
        "path": path,
        "host": "shop.example",
        "scheme": "https",
    })
}

/// What the quickstart policies decided for a few requests.
fn recorded_set() -> Vec<Value> {
    let mut admin = record("d5", "allow", "root", &[], "DELETE", "/orders/9");
    admin["roles"] = json!(["admin"]);
    let mut blocked = record("d6", "deny", "mallory", &["orders:read"], "GET", "/orders");
    blocked["source_ip"] = json!("203.0.113.9");
    vec![
        record(
            "d1",
            "allow",
            "alice",
            &["orders:read"],
            "GET",
            "/orders/42",
        ),
        record("d2", "deny", "bob", &[], "GET", "/orders"),
        record("d3", "allow", "carol", &["orders:write"], "POST", "/orders"),
        record(
            "d4",
            "deny",
            "dave",
            &["orders:read"],
            "DELETE",
            "/orders/9",
        ),
        admin,
        blocked,
    ]
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut file = std::fs::File::create(path).unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
}

fn write_records(path: &Path, records: &[Value]) {
    let lines: Vec<String> = records.iter().map(Value::to_string).collect();
    write_lines(path, &lines);
}

/// A copy of the fixture's policy folder, changed by `edit`.
fn proposed(fx: &Fixture, name: &str, edit: impl FnOnce(String) -> String) -> String {
    let dir = fx.path(name);
    std::fs::create_dir(&dir).unwrap();
    for file in ["orders.cedar", "orders.cedarschema"] {
        std::fs::copy(fx.path("policies").join(file), dir.join(file)).unwrap();
    }
    let cedar = std::fs::read_to_string(dir.join("orders.cedar")).unwrap();
    std::fs::write(dir.join("orders.cedar"), edit(cedar)).unwrap();
    path_arg(&dir)
}

fn replay(fx: &Fixture, extra: &[&str]) -> (Option<i32>, String) {
    let config = path_arg(&fx.config_path());
    let mut args = vec!["replay", "--config", config.as_str()];
    args.extend_from_slice(extra);
    let out = portcullis(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code(), format!("{stdout}{stderr}"))
}

fn replay_json(fx: &Fixture, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = extra.to_vec();
    args.push("--json");
    let (code, out) = replay(fx, &args);
    let report = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (code, report)
}

#[test]
fn the_same_policies_leave_every_decision_unchanged() {
    let fx = Fixture::new();
    let requests = fx.path("requests.jsonl");
    write_records(&requests, &recorded_set());
    let (code, report) = replay_json(&fx, &["--requests", &path_arg(&requests)]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["replayed"], 6, "{report}");
    assert_eq!(report["unchanged"], 6, "{report}");
    assert_eq!(report["allow_to_deny"]["count"], 0, "{report}");
    assert_eq!(report["deny_to_allow"]["count"], 0, "{report}");
    assert_eq!(report["malformed"], 0, "{report}");
    assert!(report["inexact"].is_null(), "{report}");
}

#[test]
fn a_new_permit_is_reported_as_opened_access_and_fails_unless_allowed() {
    let fx = Fixture::new();
    let requests = fx.path("requests.jsonl");
    write_records(&requests, &recorded_set());
    let open = proposed(&fx, "open", |cedar| {
        cedar
            + r#"
@id("orders-list-public")
permit (principal, action == Action::"get /orders", resource);
"#
    });
    let requests = path_arg(&requests);
    let (code, out) = replay(&fx, &["--policies", &open, "--requests", &requests]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("deny -> allow: 1"), "{out}");
    assert!(out.contains("unchanged:     5"), "{out}");
    assert!(
        out.contains(r#"e.g. line 2: User::"bob" GET /orders -> orders-list-public (decision d2)"#),
        "{out}"
    );
    assert!(out.contains("records/s"), "{out}");
    // The blocked network's forbid still wins over the new permit.
    assert!(!out.contains("mallory"), "{out}");

    let (code, report) = replay_json(
        &fx,
        &[
            "--policies",
            &open,
            "--requests",
            &requests,
            "--allow-opened",
        ],
    );
    assert_eq!(code, Some(0), "{report}");
    let opened = &report["deny_to_allow"];
    assert_eq!(opened["count"], 1);
    assert_eq!(opened["by_action"]["Action::\"get /orders\""]["count"], 1);
    assert_eq!(opened["by_policy"]["orders-list-public"]["count"], 1);
    let example = &opened["by_policy"]["orders-list-public"]["examples"][0];
    assert_eq!(example["principal"], "User::\"bob\"");
    assert_eq!(example["path"], "/orders");
    assert_eq!(example["line"], 2);
    // Never a token in the report: there is none to show.
    assert!(!report.to_string().contains("eyJ"));
}

#[test]
fn a_closing_change_is_counted_allow_to_deny() {
    let fx = Fixture::new();
    let requests = fx.path("requests.jsonl");
    write_records(&requests, &recorded_set());
    let close = proposed(&fx, "close", |cedar| {
        cedar.replace(
            r#"action in [Action::"get /orders", Action::"get /orders/{id}"]"#,
            r#"action in [Action::"get /orders"]"#,
        ) + r#"
@id("no-deletes")
forbid (principal, action == Action::"delete /orders/{id}", resource);
"#
    });
    let (code, report) = replay_json(
        &fx,
        &["--policies", &close, "--requests", &path_arg(&requests)],
    );
    // Closing access does not fail the run.
    assert_eq!(code, Some(0), "{report}");
    let closed = &report["allow_to_deny"];
    assert_eq!(closed["count"], 2, "{report}");
    assert_eq!(report["unchanged"], 4, "{report}");
    assert_eq!(closed["by_policy"]["(no permit)"]["count"], 1, "{report}");
    assert_eq!(
        closed["by_policy"]["(no permit)"]["examples"][0]["decision_id"],
        "d1"
    );
    assert_eq!(closed["by_policy"]["no-deletes"]["count"], 1, "{report}");
    assert_eq!(
        closed["by_action"]["Action::\"delete /orders/{id}\""]["count"],
        1
    );
}

#[test]
fn malformed_lines_are_reported_by_number_and_the_others_replayed() {
    let fx = Fixture::new();
    let requests = fx.path("requests.jsonl");
    let mut lines: Vec<String> = recorded_set().iter().map(Value::to_string).collect();
    lines.insert(1, "not json".into());
    let mut no_path = record("x", "allow", "alice", &[], "GET", "/orders");
    no_path.as_object_mut().unwrap().remove("path");
    lines.insert(3, no_path.to_string());
    lines.insert(4, String::new());
    let mut bad_ip = record("y", "allow", "alice", &[], "GET", "/orders");
    bad_ip["source_ip"] = json!("not-an-address");
    lines.push(bad_ip.to_string());
    write_lines(&requests, &lines);
    let (code, out) = replay(&fx, &["--requests", &path_arg(&requests)]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("malformed: 3 line(s)"), "{out}");
    assert!(out.contains("line 2: "), "{out}");
    assert!(out.contains("line 4: missing field `path`"), "{out}");
    assert!(out.contains("line 10: "), "{out}");
    assert!(out.contains("replayed 6 record(s) of 9 line(s)"), "{out}");
    assert!(out.contains("unchanged:     6"), "{out}");
}

#[test]
fn audit_lines_replay_api_keys_and_skip_what_they_cannot_know() {
    let fx = Fixture::new();
    std::fs::write(
        fx.path("keys.toml"),
        format!(
            r#"[[keys]]
id = "ci-bot"
hash = "sha256:{}"
principal = "ci-bot"
scopes = ["orders:read"]
created = "2026-11-01T00:00:00Z"
expires = "2026-12-31T00:00:00Z"
"#,
            "0".repeat(64)
        ),
    )
    .unwrap();
    fx.append_config("\n[api_keys]\nfile = \"keys.toml\"\nheader = \"x-api-key\"\n");
    let line =
        |id: &str, outcome: &str, principal: Value, credential: &str, key: Value, path: &str| {
            json!({"type":"decision","ts_ms":1,"decision_id":id,"outcome":outcome,"dry_run":false,
               "would":null,"status":200,"reason":"allowed","failed_check":null,
               "principal":principal,"action":null,"resource":null,"policies":[],"errors":[],
               "issuer":"api-key","jti":null,"credential":credential,"binding":null,
               "api_key_id":key,"caller":null,"method":"GET","path":path})
            .to_string()
        };
    let audit = fx.path("audit.jsonl");
    write_lines(
        &audit,
        &[
            line(
                "a1",
                "allow",
                json!("Client::\"ci-bot\""),
                "api_key",
                json!("ci-bot"),
                "/orders",
            ),
            // Recorded as a deny: the key's scopes now allow it.
            line(
                "a2",
                "deny",
                json!("Client::\"ci-bot\""),
                "api_key",
                json!("ci-bot"),
                "/orders/7",
            ),
            line(
                "a3",
                "allow",
                json!("Client::\"gone\""),
                "api_key",
                json!("gone"),
                "/orders",
            ),
            line(
                "a4",
                "allow",
                json!("User::\"alice\""),
                "jwt",
                json!(null),
                "/orders",
            ),
            line("a5", "deny", json!(null), "jwt", json!(null), "/orders"),
            "{\"type\":\"decision\",".into(),
        ],
    );
    let audit = path_arg(&audit);
    let (code, report) = replay_json(&fx, &["--audit", &audit]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["format"], "audit");
    assert_eq!(report["replayed"], 2, "{report}");
    assert_eq!(report["unchanged"], 1, "{report}");
    assert_eq!(report["deny_to_allow"]["count"], 1, "{report}");
    let skipped = &report["skipped"];
    assert_eq!(skipped["API key not in the key file"], 1, "{report}");
    assert_eq!(
        skipped["token claims are not in the audit line (use --requests)"], 1,
        "{report}"
    );
    assert_eq!(
        skipped["stopped before the policies (credential or request refused)"], 1,
        "{report}"
    );
    assert_eq!(report["malformed"], 1, "{report}");
    assert_eq!(report["malformed_lines"][0]["line"], 6, "{report}");
    // The quickstart's forbid reads the source address, which the audit line
    // does not record: said, not hidden.
    assert_eq!(report["inexact"]["records"], 2, "{report}");
    assert_eq!(report["inexact"]["fields"], json!(["http.source_ip"]));
    let (_, out) = replay(&fx, &["--audit", &audit]);
    assert!(
        out.contains("INEXACT: 2 record(s) were re-decided without http.source_ip"),
        "{out}"
    );
}

/// Records for `count` requests of 500 principals over the four routes,
/// with the verdicts the quickstart policies give them.
fn generated(count: usize) -> Vec<String> {
    let routes = [
        ("GET", "/orders", "orders:read"),
        ("GET", "/orders/7", "orders:read"),
        ("POST", "/orders", "orders:write"),
        ("DELETE", "/orders/7", "admin"),
    ];
    (0..count)
        .map(|i| {
            let (method, path, needs) = routes[i % routes.len()];
            let scopes: &[&str] = match i % 3 {
                0 => &["orders:read"],
                1 => &["orders:read", "orders:write"],
                _ => &[],
            };
            let admin = i % 7 == 0;
            let allowed = if needs == "admin" {
                admin
            } else {
                scopes.contains(&needs)
            };
            let mut r = record(
                &format!("g{i}"),
                if allowed { "allow" } else { "deny" },
                &format!("user-{}", i % 500),
                scopes,
                method,
                path,
            );
            if admin {
                r["roles"] = json!(["admin"]);
            }
            r.to_string()
        })
        .collect()
}

#[test]
fn a_hundred_thousand_records_are_replayed_and_timed() {
    let fx = Fixture::new();
    let requests = fx.path("generated.jsonl");
    write_lines(&requests, &generated(100_000));
    let started = Instant::now();
    let (code, report) = replay_json(&fx, &["--requests", &path_arg(&requests)]);
    let wall = started.elapsed();
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["replayed"], 100_000);
    assert_eq!(report["unchanged"], 100_000, "{report}");
    let seconds = report["seconds"].as_f64().unwrap();
    let rate = report["records_per_second"].as_f64().unwrap();
    assert!(seconds > 0.0 && rate > 0.0, "{report}");
    eprintln!(
        "replayed 100000 records in {seconds:.3} s ({rate:.0} records/s); the run took {:.3} s",
        wall.as_secs_f64()
    );
}

#[test]
fn audit_lines_of_workloads_replay_their_spiffe_identity() {
    let fx = Fixture::new();
    fx.append_config("\n[workload]\ntrust_domains = [\"cluster.local\"]\n");
    let spiffe = "spiffe://cluster.local/ns/shop/sa/checkout";
    let line = json!({"type":"decision","decision_id":"w1","outcome":"deny","dry_run":false,
        "principal":format!("Workload::\"{spiffe}\""),"credential":"workload","api_key_id":null,
        "issuer":"workload","caller":null,"method":"GET","path":"/orders"});
    let audit = fx.path("audit.jsonl");
    write_lines(&audit, &[line.to_string()]);
    let checkout = proposed(&fx, "checkout", |cedar| {
        cedar
            + &format!(
                r#"
@id("checkout-lists-orders")
permit (principal == Workload::"{spiffe}", action == Action::"get /orders", resource);
"#
            )
    });
    let audit = path_arg(&audit);
    let (code, report) = replay_json(&fx, &["--audit", &audit]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["unchanged"], 1, "{report}");
    let (code, report) = replay_json(&fx, &["--policies", &checkout, "--audit", &audit]);
    assert_eq!(code, Some(1), "{report}");
    let opened = &report["deny_to_allow"]["by_policy"]["checkout-lists-orders"];
    assert_eq!(opened["count"], 1, "{report}");
    assert_eq!(
        opened["examples"][0]["principal"],
        format!("Workload::\"{spiffe}\"")
    );
}
