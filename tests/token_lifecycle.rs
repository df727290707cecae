//! Remote keys (discovery, rotation, outages), introspection and API keys, with a
//! real HTTPS identity provider served by the test on loopback.

mod common;

use std::sync::Arc;

use common::idp::TestIdp;
use common::*;
use portcullis::engine::Engine;
use serde_json::{Value, json};

fn idp_claims(idp: &TestIdp, sub: &str) -> Value {
    let mut claims = claims(sub, &["orders:read"], &[]);
    claims["iss"] = json!(idp.issuer());
    claims
}

async fn status(server: &TestServer, token: &str) -> (i32, String) {
    let response = server
        .check(envoy_request("GET", "/orders/7", Some(token)))
        .await;
    let out = outcome(&response);
    (out.http_status, out.decision_id)
}

#[tokio::test]
async fn keys_rotate_without_restart() {
    let idp = TestIdp::start().await;
    let (old, new) = (TestKey::es256(), TestKey::rs256());
    idp.set_jwks(jwks_of(&[&old]));
    let fx = Fixture::new();
    add_discovery_issuer(&fx, &idp, "refresh = \"1s\"\nrefresh_min = \"1s\"", "");
    let (server, _tasks) = fx.serve_with_background().await;

    assert_eq!(
        status(&server, &old.sign(&idp_claims(&idp, "alice")))
            .await
            .0,
        200
    );

    // The IdP publishes a new key: accepted on its first use (unknown-kid refresh).
    idp.set_jwks(jwks_of(&[&old, &new]));
    assert_eq!(
        status(&server, &new.sign(&idp_claims(&idp, "alice")))
            .await
            .0,
        200
    );

    // The IdP retires the old key: refused once a refresh has seen that.
    idp.set_jwks(jwks_of(&[&new]));
    let fetched = idp.jwks_fetches();
    wait_for("a refresh after retirement", || {
        idp.jwks_fetches() > fetched + 1
    })
    .await;
    let (code, id) = status(&server, &old.sign(&idp_claims(&idp, "alice"))).await;
    assert_eq!(code, 401);
    assert_eq!(fx.audit_line(&id)["reason"], "unknown_key");
    assert_eq!(
        status(&server, &new.sign(&idp_claims(&idp, "alice")))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn a_burst_of_unknown_kids_makes_a_handful_of_fetches() {
    let idp = TestIdp::start().await;
    let known = TestKey::es256();
    idp.set_jwks(jwks_of(&[&known]));
    let fx = Fixture::new();
    add_discovery_issuer(&fx, &idp, "refresh = \"1h\"\nrefresh_min = \"30s\"", "");
    let (server, _tasks) = fx.serve_with_background().await;
    let before = idp.jwks_fetches();

    let stranger = Arc::new(TestKey::es256());
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let token = stranger.sign(&idp_claims(&idp, &format!("user{i}")));
        let mut client = server.client.clone();
        calls.spawn(async move {
            let response = client
                .check(envoy_request("GET", "/orders", Some(&token)))
                .await
                .unwrap()
                .into_inner();
            outcome(&response).http_status
        });
    }
    while let Some(code) = calls.join_next().await {
        assert_eq!(code.unwrap(), 401);
    }
    let fetches = idp.jwks_fetches() - before;
    assert!(
        fetches <= 2,
        "{fetches} JWKS fetches for one burst of unknown kids"
    );
    assert!(fetches >= 1, "an unknown kid must trigger a refresh");
}

#[tokio::test]
async fn an_outage_keeps_the_last_good_keys_and_startup_waits_for_keys() {
    let idp = TestIdp::start().await;
    let key = TestKey::es256();
    idp.set_jwks(jwks_of(&[&key]));
    let fx = Fixture::new();
    add_discovery_issuer(&fx, &idp, "refresh = \"1s\"\nrefresh_min = \"1s\"", "");
    let (server, _tasks) = fx.serve_with_background().await;

    idp.set_down(true);
    let engine = server.running.state().engine().unwrap();
    let issuer = engine
        .authenticator()
        .issuers()
        .iter()
        .find(|i| i.keys.is_remote())
        .unwrap()
        .keys
        .clone();
    let failures = issuer
        .stats
        .failures
        .load(std::sync::atomic::Ordering::Relaxed);
    wait_for("a failed refresh", || {
        issuer
            .stats
            .failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > failures
    })
    .await;
    assert_eq!(
        status(&server, &key.sign(&idp_claims(&idp, "alice")))
            .await
            .0,
        200
    );

    // A new instance starting during the outage is not ready (health NOT_SERVING).
    let fresh = Engine::from_config(&fx.config()).unwrap();
    let tasks = fresh.authenticator().spawn_background();
    let attempts = idp.jwks_fetches() + idp.discovery_fetches();
    wait_for("a fetch attempt", || {
        idp.jwks_fetches() + idp.discovery_fetches() > attempts
    })
    .await;
    assert!(!fresh.authenticator().is_ready());
    idp.set_down(false);
    wait_for("keys after the outage", || fresh.authenticator().is_ready()).await;
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test]
async fn opaque_tokens_are_introspected_cached_and_fail_closed() {
    let idp = TestIdp::start().await;
    idp.set_client_credentials("portcullis", "s3cret");
    let fx = Fixture::new();
    std::fs::write(fx.path("client-secret"), "s3cret\n").unwrap();
    add_discovery_issuer(
        &fx,
        &idp,
        "",
        &format!(
            "[issuers.introspection]\nclient_id = \"portcullis\"\nclient_secret_file = \"{}\"\ncache_max = \"5m\"\n",
            fx.path("client-secret").display()
        ),
    );
    idp.set_jwks(jwks_of(&[&TestKey::es256()]));
    let (server, _tasks) = fx.serve_with_background().await;
    let now = now();
    idp.set_introspection(
        "opaque-active",
        json!({"active": true, "sub": "svc", "scope": "orders:read", "aud": "orders-api", "iat": now, "exp": now + 300}),
    );
    idp.set_introspection("opaque-inactive", json!({"active": false}));
    idp.set_introspection(
        "opaque-wrong-aud",
        json!({"active": true, "sub": "svc", "scope": "orders:read", "aud": "billing", "iat": now, "exp": now + 300}),
    );

    let (code, id) = status(&server, "opaque-active").await;
    assert_eq!(code, 200);
    let line = fx.audit_line(&id);
    assert_eq!(line["principal"], "User::\"svc\"");
    assert_eq!(line["credential"], "introspection");
    let calls = idp.introspection_calls();
    assert_eq!(status(&server, "opaque-active").await.0, 200);
    assert_eq!(
        idp.introspection_calls(),
        calls,
        "an active result is cached"
    );

    let (code, id) = status(&server, "opaque-inactive").await;
    assert_eq!(code, 401);
    assert_eq!(fx.audit_line(&id)["reason"], "inactive_token");
    let (code, id) = status(&server, "opaque-wrong-aud").await;
    assert_eq!(code, 401);
    assert_eq!(fx.audit_line(&id)["reason"], "wrong_audience");

    // Endpoint down: a token not in the cache is denied, with its own reason.
    idp.set_down(true);
    let (code, id) = status(&server, "opaque-never-seen").await;
    assert_eq!(code, 503);
    assert_eq!(fx.audit_line(&id)["reason"], "introspection_failed");
    // ...while the cached active result still serves.
    assert_eq!(status(&server, "opaque-active").await.0, 200);
}

fn key_entry(id: &str, key: &str, extra: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "[[keys]]\nid = \"{id}\"\nhash = \"sha256:{hex}\"\nprincipal = \"{id}\"\nscopes = [\"orders:read\"]\ncreated = \"2026-01-01T00:00:00Z\"\n{extra}\n"
    )
}

#[tokio::test]
async fn api_keys_are_allowed_expired_disabled_wrong_and_reloaded() {
    let fx = Fixture::new();
    let keys_file = fx.path("api-keys.toml");
    fx.append_config("\n[api_keys]\nfile = \"api-keys.toml\"\nheader = \"x-api-key\"\nreload_interval = \"100ms\"\n");
    let good = portcullis::authn::api_key::create_key(
        &keys_file,
        portcullis::authn::api_key::NewKey {
            id: "ci-bot".into(),
            scopes: vec!["orders:read".into()],
            lifetime: Some(std::time::Duration::from_secs(86400)),
            ..Default::default()
        },
    )
    .unwrap();
    let secret = "ab".repeat(32);
    let expired = format!("pck_old_{secret}");
    let disabled = format!("pck_off_{secret}");
    let forever = format!("pck_forever_{secret}");
    let mut file = std::fs::read_to_string(&keys_file).unwrap();
    file.push_str(&key_entry(
        "old",
        &expired,
        "expires = \"2026-02-01T00:00:00Z\"",
    ));
    file.push_str(&key_entry(
        "off",
        &disabled,
        "expires = \"2099-02-01T00:00:00Z\"\nenabled = false",
    ));
    file.push_str(&key_entry("forever", &forever, ""));
    std::fs::write(&keys_file, file).unwrap();
    assert!(!std::fs::read_to_string(&keys_file).unwrap().contains(&good));

    let (server, _tasks) = fx.serve_with_background().await;

    // As a bearer token and in the configured header; same policies as tokens.
    let (code, id) = status(&server, &good).await;
    assert_eq!(code, 200);
    let line = fx.audit_line(&id);
    assert_eq!(line["principal"], "Client::\"ci-bot\"");
    assert_eq!(line["credential"], "api_key");
    let mut in_header = envoy_request("GET", "/orders", None);
    let http = http_mut(&mut in_header);
    http.headers.insert("x-api-key".into(), good.clone());
    assert_eq!(outcome(&server.check(in_header).await).http_status, 200);
    // Scopes still govern: no orders:write.
    let out = outcome(
        &server
            .check(envoy_request("POST", "/orders", Some(&good)))
            .await,
    );
    assert_eq!(out.http_status, 403);

    let wrong_secret = format!("{}{}", &good[..good.len() - 4], "0000");
    for (key, reason) in [
        (wrong_secret.as_str(), "unknown_api_key"),
        (format!("pck_nobody_{secret}").as_str(), "unknown_api_key"),
        (expired.as_str(), "expired_api_key"),
        (disabled.as_str(), "disabled_api_key"),
        (forever.as_str(), "lifetime_too_long"),
    ] {
        let (code, id) = status(&server, key).await;
        assert_eq!(code, 401, "{reason}");
        assert_eq!(fx.audit_line(&id)["reason"], reason);
    }
    let log = std::fs::read_to_string(fx.audit_path()).unwrap();
    assert!(!log.contains(&secret) && !log.contains(&good[good.len() - 64..]));

    // A key created while serving works without a restart.
    let later = portcullis::authn::api_key::create_key(
        &keys_file,
        portcullis::authn::api_key::NewKey {
            id: "late".into(),
            scopes: vec!["orders:read".into()],
            lifetime: Some(std::time::Duration::from_secs(3600)),
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..200 {
        if status(&server, &later).await.0 == 200 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("a key added to the file was never accepted");
}
