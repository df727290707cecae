//! Introspection routing and its guards (issue 15), through the real server
//! and real HTTPS identity providers on loopback: an opaque token goes to the
//! one issuer its prefix names, never to the others; refusals are cached
//! briefly; concurrent checks of one token share one call; calls in flight
//! per issuer are capped.

mod common;

use std::time::Duration;

use common::idp::TestIdp;
use common::*;
use serde_json::{Value, json};

/// Adds `idp` as an introspection-only issuer (no key source) with client
/// credentials; `extra` goes into its `[issuers.introspection]` table and
/// `remote` into its `[issuers.remote]` table.
fn introspecting_issuer(fx: &Fixture, idp: &TestIdp, extra: &str, remote: &str) {
    let secret = fx.path(&format!("secret-{}", idp.addr().port()));
    idp.set_client_credentials("portcullis", "s3cret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    fx.append_config(&format!(
        r#"
[[issuers]]
issuer = "{}"
audiences = ["orders-api"]

[issuers.introspection]
endpoint = "{}"
client_id = "portcullis"
client_secret_file = "{}"
{extra}

[issuers.remote]
ca_file = "{}"
{remote}
"#,
        idp.issuer(),
        idp.introspection_uri(),
        secret.display(),
        idp.ca_file().display()
    ));
}

/// An active RFC 7662 answer for principal `sub`.
fn active(sub: &str) -> Value {
    json!({"active": true, "sub": sub, "scope": "orders:read", "aud": "orders-api",
        "iat": now(), "exp": now() + 300})
}

/// HTTP status, audit reason and principal of one check of `GET /orders/7`.
async fn decide(fx: &Fixture, server: &TestServer, token: &str) -> (i32, Value, Value) {
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders/7", Some(token)))
            .await,
    );
    let line = fx.audit_line(&out.decision_id);
    (
        out.http_status,
        line["reason"].clone(),
        line["principal"].clone(),
    )
}

/// HTTP statuses of concurrent checks, one per token, in order.
async fn concurrent_statuses(server: &TestServer, tokens: &[&str]) -> Vec<i32> {
    let checks: Vec<_> = tokens
        .iter()
        .map(|token| {
            let mut client = server.client.clone();
            let request = envoy_request("GET", "/orders/7", Some(token));
            tokio::spawn(async move { client.check(request).await.unwrap().into_inner() })
        })
        .collect();
    let mut statuses = Vec::new();
    for check in checks {
        statuses.push(outcome(&check.await.unwrap()).http_status);
    }
    statuses
}

/// Two identity providers, each owning a prefix: a token reaches only the
/// one its prefix names, even when the other would call it active, and a
/// token no prefix names reaches neither.
#[tokio::test]
async fn an_opaque_token_goes_only_to_the_issuer_its_prefix_names() {
    let (idp_a, idp_b) = (TestIdp::start().await, TestIdp::start().await);
    let fx = Fixture::new();
    introspecting_issuer(&fx, &idp_a, r#"token_prefixes = ["a_"]"#, "");
    introspecting_issuer(&fx, &idp_b, r#"token_prefixes = ["b_", "bee."]"#, "");
    let (server, _tasks) = fx.serve_with_background().await;
    idp_a.set_introspection("a_token", active("alice-at-a"));
    idp_b.set_introspection("b_token", active("bob-at-b"));
    idp_b.set_introspection("bee.token", active("bee-at-b"));
    // B would vouch for these, but they carry A's prefix (or none): B never sees them.
    idp_b.set_introspection("a_token", active("impostor-at-b"));
    idp_b.set_introspection("a_unknown_to_a", active("impostor-at-b"));
    idp_b.set_introspection("c_token", active("impostor-at-b"));

    let (code, _, principal) = decide(&fx, &server, "a_token").await;
    assert_eq!((code, principal), (200, json!("User::\"alice-at-a\"")));
    assert_eq!(
        (idp_a.introspection_calls(), idp_b.introspection_calls()),
        (1, 0)
    );

    let (code, reason, _) = decide(&fx, &server, "a_unknown_to_a").await;
    assert_eq!((code, reason), (401, json!("inactive_token")));
    assert_eq!(
        (idp_a.introspection_calls(), idp_b.introspection_calls()),
        (2, 0)
    );

    let (code, _, principal) = decide(&fx, &server, "b_token").await;
    assert_eq!((code, principal), (200, json!("User::\"bob-at-b\"")));
    let (code, _, principal) = decide(&fx, &server, "bee.token").await;
    assert_eq!((code, principal), (200, json!("User::\"bee-at-b\"")));
    assert_eq!(
        (idp_a.introspection_calls(), idp_b.introspection_calls()),
        (2, 2)
    );

    // No prefix matches: refused without any outbound call, with the same
    // reason as when no issuer introspects at all.
    for token in ["c_token", "A_token", "b", "opaque"] {
        let (code, reason, _) = decide(&fx, &server, token).await;
        assert_eq!((code, reason), (401, json!("malformed_token")), "{token}");
    }
    assert_eq!(
        (idp_a.introspection_calls(), idp_b.introspection_calls()),
        (2, 2)
    );
}

/// One introspecting issuer with prefixes takes only its own tokens; without
/// prefixes (the common case) it takes every opaque token, as before.
#[tokio::test]
async fn a_single_introspecting_issuer_takes_its_prefixes_or_everything() {
    let (prefixed, catch_all) = (TestIdp::start().await, TestIdp::start().await);

    let fx = Fixture::new();
    introspecting_issuer(&fx, &prefixed, r#"token_prefixes = ["at_"]"#, "");
    let (server, _tasks) = fx.serve_with_background().await;
    prefixed.set_introspection("at_1", active("svc"));
    prefixed.set_introspection("other", active("svc"));
    assert_eq!(decide(&fx, &server, "at_1").await.0, 200);
    let (code, reason, _) = decide(&fx, &server, "other").await;
    assert_eq!((code, reason), (401, json!("malformed_token")));
    assert_eq!(prefixed.introspection_calls(), 1);

    let fx = Fixture::new();
    introspecting_issuer(&fx, &catch_all, "", "");
    let (server, _tasks) = fx.serve_with_background().await;
    catch_all.set_introspection("anything-at-all", active("svc"));
    assert_eq!(decide(&fx, &server, "anything-at-all").await.0, 200);
    assert_eq!(catch_all.introspection_calls(), 1);
}

/// Ambiguous routing is a configuration error, reported by `validate` (which
/// loads the configuration as `serve` does) with both issuers named.
#[tokio::test]
async fn ambiguous_introspection_routing_is_a_configuration_error() {
    let issuer = |host: &str, extra: &str| {
        format!(
            "\n[[issuers]]\nissuer = \"https://{host}\"\naudiences = [\"orders-api\"]\n\
             [issuers.introspection]\nendpoint = \"https://{host}/introspect\"\n\
             client_id = \"portcullis\"\nclient_secret_env = \"IDP_SECRET\"\n{extra}\n"
        )
    };
    let cases = [
        (
            issuer("idp-a.test", "") + &issuer("idp-b.test", ""),
            vec!["needs token_prefixes", "https://idp-a.test"],
        ),
        (
            issuer("idp-a.test", r#"token_prefixes = ["a_"]"#) + &issuer("idp-b.test", ""),
            vec!["needs token_prefixes", "https://idp-b.test"],
        ),
        (
            issuer("idp-a.test", r#"token_prefixes = ["tok_"]"#)
                + &issuer("idp-b.test", r#"token_prefixes = ["tok_b"]"#),
            vec![
                "overlap",
                "https://idp-a.test",
                "https://idp-b.test",
                "\"tok_b\"",
            ],
        ),
        (
            issuer("idp-a.test", r#"token_prefixes = []"#),
            vec!["at least one prefix"],
        ),
        (
            issuer("idp-a.test", "max_concurrent = 0"),
            vec!["max_concurrent must be at least 1"],
        ),
    ];
    for (issuers, expected) in cases {
        let fx = Fixture::new();
        fx.append_config(&issuers);
        let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
        assert_eq!(out.status.code(), Some(1), "accepted:\n{issuers}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for text in &expected {
            assert!(stderr.contains(text), "{text:?} not in {stderr}");
        }
    }
}

/// `active: false` (and an active answer we refuse) is reused for
/// `negative_cache`, then asked again; a failed call is never reused.
#[tokio::test]
async fn refusals_are_cached_briefly_and_failures_not_at_all() {
    let idp = TestIdp::start().await;
    let fx = Fixture::new();
    introspecting_issuer(&fx, &idp, r#"negative_cache = "2s""#, "");
    let (server, _tasks) = fx.serve_with_background().await;
    idp.set_introspection("opaque-inactive", json!({"active": false}));
    let mut wrong_audience = active("svc");
    wrong_audience["aud"] = json!("billing");
    idp.set_introspection("opaque-wrong-aud", wrong_audience);

    for _ in 0..3 {
        let (code, reason, _) = decide(&fx, &server, "opaque-inactive").await;
        assert_eq!((code, reason), (401, json!("inactive_token")));
    }
    assert_eq!(idp.introspection_calls(), 1, "the refusal is reused");
    for _ in 0..3 {
        let (code, reason, _) = decide(&fx, &server, "opaque-wrong-aud").await;
        assert_eq!((code, reason), (401, json!("wrong_audience")));
    }
    assert_eq!(idp.introspection_calls(), 2, "so is an answer we refuse");

    // Once negative_cache has passed the IdP is asked again, and its new
    // answer counts.
    idp.set_introspection("opaque-inactive", active("svc"));
    let mut code = 401;
    for _ in 0..200 {
        code = decide(&fx, &server, "opaque-inactive").await.0;
        if code == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(code, 200, "the cached refusal never expired");
    assert_eq!(idp.introspection_calls(), 3);

    // A failed call is not cached: the next check asks again.
    idp.set_down(true);
    let (code, reason, _) = decide(&fx, &server, "opaque-later").await;
    assert_eq!((code, reason), (503, json!("introspection_failed")));
    idp.set_down(false);
    idp.set_introspection("opaque-later", active("svc"));
    assert_eq!(decide(&fx, &server, "opaque-later").await.0, 200);
    assert_eq!(idp.introspection_calls(), 5);
}

/// `negative_cache = "0s"`: every check of a refused token asks.
#[tokio::test]
async fn a_zero_negative_cache_asks_every_time() {
    let idp = TestIdp::start().await;
    let fx = Fixture::new();
    introspecting_issuer(&fx, &idp, r#"negative_cache = "0s""#, "");
    let (server, _tasks) = fx.serve_with_background().await;
    for _ in 0..3 {
        let (code, reason, _) = decide(&fx, &server, "opaque-inactive").await;
        assert_eq!((code, reason), (401, json!("inactive_token")));
    }
    assert_eq!(idp.introspection_calls(), 3);
}

/// Concurrent checks of one token, while the IdP is slow, make one call;
/// when that call fails, every one of them fails closed, and the failure is
/// not reused by the next check.
#[tokio::test]
async fn concurrent_checks_of_one_token_share_one_call() {
    let idp = TestIdp::start().await;
    let fx = Fixture::new();
    introspecting_issuer(&fx, &idp, "", "");
    let (server, _tasks) = fx.serve_with_background().await;
    idp.set_introspection("opaque-shared", active("svc"));
    idp.set_delay(Some(Duration::from_millis(1500)));

    let statuses = concurrent_statuses(&server, &["opaque-shared"; 8]).await;
    assert_eq!(statuses, vec![200; 8]);
    assert_eq!(idp.introspection_calls(), 1);

    idp.set_down(true);
    let statuses = concurrent_statuses(&server, &["opaque-failing"; 8]).await;
    assert_eq!(statuses, vec![503; 8]);
    assert_eq!(idp.introspection_calls(), 2);

    idp.set_down(false);
    idp.set_delay(None);
    idp.set_introspection("opaque-failing", active("svc"));
    assert_eq!(decide(&fx, &server, "opaque-failing").await.0, 200);
    assert_eq!(idp.introspection_calls(), 3);
}

/// `max_concurrent = 1`: different tokens checked at once reach the IdP one
/// at a time, and all succeed while the timeout allows.
#[tokio::test]
async fn calls_in_flight_are_capped_per_issuer() {
    let idp = TestIdp::start().await;
    let fx = Fixture::new();
    introspecting_issuer(&fx, &idp, "max_concurrent = 1", "");
    let (server, _tasks) = fx.serve_with_background().await;
    let tokens = ["opaque-1", "opaque-2", "opaque-3", "opaque-4"];
    for token in tokens {
        idp.set_introspection(token, active("svc"));
    }
    idp.set_delay(Some(Duration::from_millis(300)));

    let statuses = concurrent_statuses(&server, &tokens).await;
    assert_eq!(statuses, vec![200; 4]);
    assert_eq!(idp.introspection_calls(), 4);
    assert_eq!(idp.max_introspections_in_flight(), 1);
}

/// A call that cannot get a turn and finish within the issuer's `timeout`
/// fails closed as `introspection_failed` (503); the cap still holds.
#[tokio::test]
async fn a_call_waiting_past_the_timeout_for_its_turn_fails_closed() {
    let idp = TestIdp::start().await;
    let fx = Fixture::new();
    introspecting_issuer(&fx, &idp, "max_concurrent = 1", r#"timeout = "3s""#);
    let (server, _tasks) = fx.serve_with_background().await;
    idp.set_introspection("opaque-1", active("svc"));
    idp.set_introspection("opaque-2", active("svc"));
    // Each answer takes 2s: the second call's turn comes after 2s, leaving
    // it at most 1s of its 3s, too little.
    idp.set_delay(Some(Duration::from_secs(2)));

    let mut statuses = concurrent_statuses(&server, &["opaque-1", "opaque-2"]).await;
    statuses.sort();
    assert_eq!(statuses, vec![200, 503]);
    assert_eq!(idp.max_introspections_in_flight(), 1);
}
