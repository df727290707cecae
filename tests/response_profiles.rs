//! Responses driven by policy (`[[responses]]`, `[[routes]] response`,
//! `@response`): through the real server over gRPC, through a real Envoy
//! (what the upstream and the client see), and the load-time checks.

mod common;

use common::envoy::{Envoy, EnvoySetup};
use common::served::Served;
use common::upstream::Upstream;
use common::*;
use serde_json::{Value, json};

const PROFILES: &str = r#"
[[responses]]
name = "tenant"
upstream_headers = { "x-tenant" = "{claims.tenant}", "x-user" = "{subject}", "x-roles" = "{roles}", "x-org" = "{claims.org}" }
remove_upstream_headers = ["x-debug"]
set_query = { "tenant" = "{claims.tenant}" }
remove_query = ["debug"]
client_headers = { "cache-control" = "no-store" }

[[responses]]
name = "hidden"
deny_status = 404
deny_title = "Not Found"
deny_detail = "There is no such order."
deny_type = "https://errors.example.test/not-found"
client_headers = { "x-denied-by" = "policy" }
"#;

/// The quickstart with the two profiles: GET /orders/{id} uses `tenant`, and
/// a forbid on blocked subjects answers with `hidden`.
fn fixture() -> Fixture {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let config = std::fs::read_to_string(fx.config_path()).unwrap().replacen(
        "path = \"/orders/{id}\"",
        "path = \"/orders/{id}\"\nresponse = \"tenant\"",
        1,
    );
    std::fs::write(fx.config_path(), config).unwrap();
    fx.append_config(&format!(
        "\n[audit]\nfile = \"{}\"\n{PROFILES}",
        fx.audit_path().display()
    ));
    std::fs::write(
        fx.path("policies/hidden.cedar"),
        "@id(\"blocked-users\")\n@response(\"hidden\")\nforbid (principal == User::\"mallory\", action, resource);\n",
    )
    .unwrap();
    fx
}

fn token(fx: &Fixture, sub: &str, extra: Value) -> String {
    let mut claims = claims(sub, &["orders:read"], &["customer"]);
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    fx.es256().sign(&claims)
}

#[tokio::test]
async fn an_allow_carries_what_the_routes_profile_says() {
    let fx = fixture();
    let server = fx.serve().await;
    let token = token(&fx, "alice", json!({ "tenant": "acme" }));
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders/7", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");
    assert_eq!(out.header("x-tenant"), Some("acme"));
    assert_eq!(out.header("x-user"), Some("alice"));
    assert_eq!(out.header("x-roles"), Some("customer"));
    // A claim the token lacks sets nothing.
    assert_eq!(out.header("x-org"), None);
    assert!(out.ok_headers_to_remove.contains(&"x-debug".to_owned()));
    assert_eq!(
        out.metadata["response_profiles"],
        json!(["tenant"]),
        "{:?}",
        out.metadata
    );
    // The audit line names what changed, never the values.
    let line = fx.audit_line(&out.decision_id);
    assert_eq!(line["response"]["profiles"], json!(["tenant"]));
    assert_eq!(
        line["response"]["upstream_headers_set"],
        json!(["x-roles", "x-tenant", "x-user"])
    );
    assert_eq!(line["response"]["query_set"], json!(["tenant"]));
    assert!(!line.to_string().contains("acme"), "{line}");

    // A route without a profile: only the identity header, as before.
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 200);
    assert_eq!(out.header("x-tenant"), None);
    assert_eq!(fx.audit_line(&out.decision_id)["response"], Value::Null);
}

#[tokio::test]
async fn a_forbid_with_a_profile_answers_with_its_problem() {
    let fx = fixture();
    let server = fx.serve().await;
    let token = token(&fx, "mallory", json!({}));
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders/7", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 404, "{out:?}");
    assert_eq!(out.header("content-type"), Some("application/problem+json"));
    assert_eq!(out.header("x-denied-by"), Some("policy"));
    assert_eq!(out.body["type"], "https://errors.example.test/not-found");
    assert_eq!(out.body["title"], "Not Found");
    assert_eq!(out.body["status"], 404);
    assert_eq!(out.body["decision_id"], out.decision_id.as_str());
    assert_eq!(
        fx.audit_line(&out.decision_id)["response"]["deny_status"],
        404
    );
    // The audit line says what the caller got.
    assert_eq!(fx.audit_line(&out.decision_id)["status"], 404);

    // A 401 keeps its challenge whatever the route's profile says.
    let out = outcome(&server.check(envoy_request("GET", "/orders/7", None)).await);
    assert_eq!(out.http_status, 401);
    assert!(out.header("www-authenticate").is_some());
}

#[tokio::test]
async fn envoy_applies_the_profile_to_the_upstream_request_and_the_client_response() {
    let fx = fixture();
    let portcullis = Served::start(&fx, &[]).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(&EnvoySetup::new(portcullis.addr, upstream.addr)).await;
    let token = token(&fx, "alice", json!({ "tenant": "acme" }));
    let bearer = format!("Bearer {token}");

    let reply = envoy
        .send(
            "GET",
            "/orders/7?debug=1&page=2",
            &[
                ("authorization", &bearer),
                ("x-debug", "on"),
                // A client cannot smuggle its own tenant.
                ("x-tenant", "evil"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("cache-control"), Some("no-store"), "{reply:?}");
    let received = upstream.received();
    let seen = received.last().unwrap();
    assert_eq!(seen.all("x-tenant"), ["acme"]);
    assert_eq!(seen.all("x-user"), ["alice"]);
    assert!(seen.all("x-debug").is_empty(), "{seen:?}");
    let query = seen.path.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut params: Vec<&str> = query.split('&').collect();
    params.sort_unstable();
    assert_eq!(params, ["page=2", "tenant=acme"], "{}", seen.path);

    let mallory = format!("Bearer {}", self::token(&fx, "mallory", json!({})));
    let before = upstream.count();
    let reply = envoy
        .send("GET", "/orders/7", &[("authorization", &mallory)])
        .await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(reply.json()["title"], "Not Found");
    assert_eq!(
        upstream.count(),
        before,
        "a deny never reaches the upstream"
    );
}

#[test]
fn profiles_and_their_references_are_checked_at_load() {
    let fx = fixture();
    fx.append_config(
        "\n[[responses]]\nname = \"leaky\"\nupstream_headers = { authorization = \"{subject}\" }\n",
    );
    std::fs::write(
        fx.path("policies/typo.cedar"),
        "@id(\"typo\")\n@response(\"hiden\")\nforbid (principal == User::\"eve\", action, resource);\n",
    )
    .unwrap();
    let config = std::fs::read_to_string(fx.config_path()).unwrap().replacen(
        "path = \"/orders\"",
        "path = \"/orders\"\nresponse = \"nope\"",
        1,
    );
    std::fs::write(fx.config_path(), config).unwrap();
    let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "\"leaky\": upstream_headers \"authorization\" may not be set",
        "response \"nope\" names no [[responses]] profile",
        "typo.cedar: policy \"typo\": @response(\"hiden\") names no [[responses]] profile",
    ] {
        assert!(stderr.contains(expected), "{expected} not in {stderr}");
    }
}

#[test]
fn check_explain_shows_the_response_that_would_be_sent() {
    let fx = fixture();
    let token = token(&fx, "alice", json!({ "tenant": "acme" }));
    let out = portcullis(&[
        "check",
        "--config",
        &path_arg(&fx.config_path()),
        "--explain",
        "--token",
        &token,
        "--path",
        "/orders/7",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("profiles:               tenant"),
        "{stdout}"
    );
    assert!(stdout.contains("x-tenant: acme"), "{stdout}");
    assert!(
        stdout.contains("query set:              tenant: acme"),
        "{stdout}"
    );
}
