//! Behaviour of the `Check` RPC against the real server over loopback gRPC.

mod common;

use base64::Engine as _;
use common::*;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

const INVALID_ARGUMENT: i32 = 3;
const PERMISSION_DENIED: i32 = 7;
const UNAUTHENTICATED: i32 = 16;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn allowed_request_carries_identity_and_metadata() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders/7", Some(&token)))
            .await,
    );
    assert_eq!(out.grpc_code, 0);
    assert_eq!(out.http_status, 200);
    assert_eq!(out.header("x-portcullis-subject"), Some("alice"));
    assert_eq!(out.metadata["principal"], "User::\"alice\"");
    assert_eq!(out.metadata["policies"], json!(["orders-read"]));

    let line = fx.audit_line(&out.decision_id);
    assert_eq!(line["outcome"], "allow");
    assert_eq!(line["reason"], "allowed");
    assert_eq!(line["status"], 200);
    assert_eq!(line["principal"], "User::\"alice\"");
    assert_eq!(line["action"], "Action::\"get /orders/{id}\"");
    assert_eq!(line["resource"], "Application::\"orders\"");
    assert_eq!(line["policies"], json!(["orders-read"]));
    assert!(line["jti"].as_str().unwrap().starts_with("jti-alice-"));
    assert!(line["latency_us"].is_u64());
}

#[tokio::test]
async fn every_supported_algorithm_verifies() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    for key in &fx.keys {
        let token = key.token("alice", &["orders:read"], &[]);
        let out = outcome(
            &server
                .check(envoy_request("GET", "/orders", Some(&token)))
                .await,
        );
        assert_eq!(out.http_status, 200, "{:?}", key.algorithm);
    }
}

/// Each rejected credential: expected reason class of the audit line.
#[tokio::test]
async fn invalid_credentials_are_401_with_their_reason() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let key = fx.es256();
    let rsa = &fx.keys[1];
    let now = now();
    let with = |patch: serde_json::Value| {
        let mut c = claims("alice", &["orders:read"], &[]);
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        key.sign(&c)
    };

    let payload = b64(claims("alice", &["orders:read"], &[])
        .to_string()
        .as_bytes());
    let alg_none = format!(
        "{}.{payload}.",
        b64(json!({"alg": "none", "kid": key.kid()})
            .to_string()
            .as_bytes())
    );
    let alg_none_with_sig = format!(
        "{}.{payload}.c2ln",
        b64(json!({"alg": "none", "kid": key.kid()})
            .to_string()
            .as_bytes())
    );
    // The classic confusion attack: HMAC keyed with the issuer's public key.
    let mut hs_header = Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = Some(rsa.kid().to_owned());
    let hs256_with_public_key = jsonwebtoken::encode(
        &hs_header,
        &claims("alice", &["orders:read"], &[]),
        &EncodingKey::from_secret(rsa.public_jwk().to_string().as_bytes()).unwrap(),
    )
    .unwrap();
    // RSA key pinned to RS256; a token claiming PS256 with that kid is refused.
    let mut ps_header = Header::new(jsonwebtoken::Algorithm::PS256);
    ps_header.kid = Some(rsa.kid().to_owned());
    let ps256_on_rs256_key = format!(
        "{}.{payload}.c2ln",
        b64(serde_json::to_string(&ps_header).unwrap().as_bytes())
    );
    let unknown_kid = TestKey::es256().token("alice", &["orders:read"], &[]);
    let bad_signature = key.impostor_of().token("alice", &["orders:read"], &[]);
    let oversize = with(json!({"pad": "x".repeat(17 * 1024)}));

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing_token"),
        ("garbage", Some("not-a-jwt".into()), "malformed_token"),
        ("two parts", Some("abc.def".into()), "malformed_token"),
        ("bad signature", Some(bad_signature), "bad_signature"),
        ("alg none", Some(alg_none), "unsupported_algorithm"),
        (
            "alg none with signature",
            Some(alg_none_with_sig),
            "unsupported_algorithm",
        ),
        (
            "HS256 with public key",
            Some(hs256_with_public_key),
            "unsupported_algorithm",
        ),
        (
            "alg does not match key",
            Some(ps256_on_rs256_key),
            "algorithm_mismatch",
        ),
        ("unknown kid", Some(unknown_kid), "unknown_key"),
        (
            "expired",
            Some(with(json!({"iat": now - 900, "exp": now - 120}))),
            "expired",
        ),
        (
            "not yet valid",
            Some(with(json!({"nbf": now + 300}))),
            "not_yet_valid",
        ),
        (
            "issued in the future",
            Some(with(json!({"iat": now + 300, "exp": now + 900}))),
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            Some(with(json!({"iss": "https://evil.example"}))),
            "unknown_issuer",
        ),
        (
            "no issuer",
            Some(with(json!({"iss": null}))),
            "unknown_issuer",
        ),
        (
            "wrong audience",
            Some(with(json!({"aud": "billing-api"}))),
            "wrong_audience",
        ),
        (
            "no audience",
            Some(with(json!({"aud": null}))),
            "wrong_audience",
        ),
        (
            "audiences not naming us",
            Some(with(json!({"aud": ["billing-api", "search"]}))),
            "wrong_audience",
        ),
        (
            "empty audience list",
            Some(with(json!({"aud": []}))),
            "wrong_audience",
        ),
        (
            "audience list with a non-string",
            Some(with(json!({"aud": [AUDIENCE, 7]}))),
            "malformed_token",
        ),
        (
            "audience as a number",
            Some(with(json!({"aud": 7}))),
            "malformed_token",
        ),
        (
            "lifetime too long",
            Some(with(json!({"iat": now, "exp": now + 7200}))),
            "lifetime_too_long",
        ),
        ("no exp", Some(with(json!({"exp": null}))), "missing_claim"),
        ("no iat", Some(with(json!({"iat": null}))), "missing_claim"),
        ("no sub", Some(with(json!({"sub": null}))), "missing_claim"),
        (
            "exp as string",
            Some(with(json!({"exp": "soon"}))),
            "malformed_token",
        ),
        ("oversize", Some(oversize), "token_too_large"),
    ];

    for (name, token, reason) in cases {
        let out = outcome(
            &server
                .check(envoy_request("GET", "/orders/7", token.as_deref()))
                .await,
        );
        assert_eq!(out.http_status, 401, "{name}");
        assert_eq!(out.grpc_code, UNAUTHENTICATED, "{name}");
        let challenge = out
            .header("www-authenticate")
            .unwrap_or_default()
            .to_owned();
        assert!(
            challenge.starts_with("Bearer realm=\"orders\""),
            "{name}: {challenge}"
        );
        if token.is_some() {
            assert!(
                challenge.contains("error=\"invalid_token\""),
                "{name}: {challenge}"
            );
        } else {
            assert!(!challenge.contains("error="), "{name}: {challenge}");
        }
        assert_eq!(out.body["decision_id"], out.decision_id.as_str(), "{name}");
        let line = fx.audit_line(&out.decision_id);
        assert_eq!(line["reason"], reason, "{name}");
        assert_eq!(line["outcome"], "deny", "{name}");
        assert_eq!(line["status"], 401, "{name}");
        assert!(line["principal"].is_null(), "{name}");
    }
}

#[tokio::test]
async fn tokens_never_reach_the_audit_log_or_responses() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let good = fx.es256().token("alice", &["orders:read"], &[]);
    let forged = fx
        .es256()
        .impostor_of()
        .token("mallory", &["orders:read"], &[]);
    for token in [&good, &forged] {
        let response = server
            .check(envoy_request("GET", "/orders/7", Some(token)))
            .await;
        let signature = token.rsplit('.').next().unwrap();
        assert!(!format!("{response:?}").contains(signature));
    }
    let log = std::fs::read_to_string(fx.audit_path()).unwrap();
    for token in [&good, &forged] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!log.contains(signature), "signature in audit log");
        assert!(!log.contains(token.as_str()), "token in audit log");
    }
}

#[tokio::test]
async fn policy_deny_is_403_with_decision_id() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let reader = fx.es256().token("alice", &["orders:read"], &[]);
    let out = outcome(
        &server
            .check(envoy_request("POST", "/orders", Some(&reader)))
            .await,
    );
    assert_eq!(out.http_status, 403);
    assert_eq!(out.grpc_code, PERMISSION_DENIED);
    assert_eq!(out.body["error"], "forbidden");
    assert_eq!(out.body["decision_id"], out.decision_id.as_str());
    assert_eq!(out.header("content-type"), Some("application/json"));
    let line = fx.audit_line(&out.decision_id);
    assert_eq!(line["reason"], "policy_denied");
    assert_eq!(line["principal"], "User::\"alice\"");
    assert_eq!(line["action"], "Action::\"post /orders\"");
}

#[tokio::test]
async fn roles_scopes_and_forbids_follow_the_shipped_policies() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let key = fx.es256();
    let writer = key.token("bob", &["orders:write"], &[]);
    let admin = key.token("carol", &[], &["admin"]);
    let reader = key.token("alice", &["orders:read"], &[]);

    let status = |req| {
        let server = &server;
        async move { outcome(&server.check(req).await).http_status }
    };
    assert_eq!(
        status(envoy_request("POST", "/orders", Some(&writer))).await,
        200
    );
    assert_eq!(
        status(envoy_request("GET", "/orders", Some(&writer))).await,
        403
    );
    assert_eq!(
        status(envoy_request("DELETE", "/orders/9", Some(&admin))).await,
        200
    );
    assert_eq!(
        status(envoy_request("DELETE", "/orders/9", Some(&reader))).await,
        403
    );
    assert_eq!(
        status(envoy_request("GET", "/orders", Some(&reader))).await,
        200
    );

    // The forbid on 203.0.113.0/24 overrides the read permit, also for IPv4-mapped peers.
    for ip in ["203.0.113.9", "::ffff:203.0.113.9"] {
        let mut req = envoy_request("GET", "/orders/7", Some(&reader));
        req.attributes.as_mut().unwrap().source = Some(peer(ip));
        let out = outcome(&server.check(req).await);
        assert_eq!(out.http_status, 403, "{ip}");
        assert_eq!(
            out.metadata["policies"],
            json!(["block-test-net-3"]),
            "{ip}"
        );
    }
}

#[tokio::test]
async fn route_matching_ignores_the_query_and_needs_whole_segments() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);

    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders/7?x=1", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 200);
    assert_eq!(fx.audit_line(&out.decision_id)["path"], "/orders/7");

    for path in ["/orders/7/extra", "/customers", "/"] {
        let out = outcome(&server.check(envoy_request("GET", path, Some(&token))).await);
        assert_eq!(out.http_status, 403, "{path}");
        assert_eq!(
            fx.audit_line(&out.decision_id)["reason"],
            "no_route",
            "{path}"
        );
    }
    // No route still authenticates first: an anonymous probe learns nothing.
    let out = outcome(&server.check(envoy_request("GET", "/customers", None)).await);
    assert_eq!(out.http_status, 401);
}

#[tokio::test]
async fn non_canonical_paths_and_missing_http_attributes_are_400() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    // `/orders/..;` and `/orders/.;x` used to match `GET /orders/{id}` and be
    // allowed, while a servlet container upstream reads them as `/` and
    // `/orders`: a dot segment behind path parameters is refused too.
    for path in [
        "/orders/../admin",
        "/orders/%2e%2e/admin",
        "/orders%2F7",
        "/orders/..;",
        "/orders/..;jsessionid=x",
        "/orders/.;x",
        "//orders/7",
        "/orders//7",
    ] {
        let out = outcome(&server.check(envoy_request("GET", path, Some(&token))).await);
        assert_eq!(out.http_status, 400, "{path}");
        assert_eq!(out.grpc_code, INVALID_ARGUMENT, "{path}");
        assert_eq!(
            fx.audit_line(&out.decision_id)["reason"],
            "non_canonical_path"
        );
    }
    let empty = envoy_types::pb::envoy::service::auth::v3::CheckRequest::default();
    let out = outcome(&server.check(empty).await);
    assert_eq!(out.http_status, 400);
    assert_eq!(out.grpc_code, INVALID_ARGUMENT);
    assert_eq!(
        fx.audit_line(&out.decision_id)["reason"],
        "missing_http_attributes"
    );
}

#[tokio::test]
async fn raw_header_map_from_envoy_is_understood() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let out = outcome(
        &server
            .check(raw_header_request("GET", "/orders/7", &token))
            .await,
    );
    assert_eq!(out.http_status, 200);
    // Lower-case scheme word, tab separator: still a bearer token.
    let mut req = envoy_request("GET", "/orders/7", None);
    let http = http_mut(&mut req);
    http.headers
        .insert("authorization".into(), format!("bearer\t{token}"));
    assert_eq!(outcome(&server.check(req).await).http_status, 200);
}

#[tokio::test]
async fn authorization_header_can_be_removed_upstream() {
    let fx = Fixture::new();
    let config = std::fs::read_to_string(fx.config_path())
        .unwrap()
        .replace(
            "remove_authorization = false",
            "remove_authorization = true",
        )
        .replace("x-portcullis-subject", "x-user");
    std::fs::write(fx.config_path(), config).unwrap();
    let server = fx.serve().await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 200);
    assert_eq!(out.ok_headers_to_remove, vec!["authorization".to_string()]);
    assert_eq!(out.header("x-user"), Some("alice"));
}

#[tokio::test]
async fn other_schemes_get_a_challenge_without_an_error_code() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let mut req = envoy_request("GET", "/orders", None);
    let http = http_mut(&mut req);
    http.headers
        .insert("authorization".into(), "Basic YWxpY2U6c2VjcmV0".into());
    let out = outcome(&server.check(req).await);
    assert_eq!(out.http_status, 401);
    assert_eq!(
        out.header("www-authenticate"),
        Some("Bearer realm=\"orders\"")
    );
    assert_eq!(fx.audit_line(&out.decision_id)["reason"], "not_bearer");
}

#[tokio::test]
async fn users_from_entities_json_keep_their_parents_and_gain_token_roles() {
    let fx = Fixture::new();
    std::fs::write(
        fx.path("policies/entities.json"),
        r#"[
            {"uid": {"type": "User", "id": "dave"}, "attrs": {}, "parents": [{"type": "Role", "id": "admin"}]},
            {"uid": {"type": "User", "id": "frank"}, "attrs": {}, "parents": [{"type": "Role", "id": "viewer"}]}
        ]"#,
    )
    .unwrap();
    let server = fx.serve().await;
    let key = fx.es256();
    // dave is an admin by entities.json alone.
    let dave = key.token("dave", &[], &[]);
    assert_eq!(
        outcome(
            &server
                .check(envoy_request("DELETE", "/orders/1", Some(&dave)))
                .await
        )
        .http_status,
        200
    );
    // frank is a viewer in entities.json and an admin by his token: both count.
    let frank = key.token("frank", &[], &["admin"]);
    assert_eq!(
        outcome(
            &server
                .check(envoy_request("DELETE", "/orders/1", Some(&frank)))
                .await
        )
        .http_status,
        200
    );
    let frank_plain = key.token("frank", &[], &[]);
    assert_eq!(
        outcome(
            &server
                .check(envoy_request("DELETE", "/orders/1", Some(&frank_plain)))
                .await
        )
        .http_status,
        403
    );
}

#[tokio::test]
async fn dry_run_allows_and_logs_the_would_deny() {
    let fx = Fixture::new();
    let config = std::fs::read_to_string(fx.config_path())
        .unwrap()
        .replace("name = \"orders\"", "name = \"orders\"\nmode = \"dry-run\"")
        .replacen(
            "method = \"DELETE\"\npath = \"/orders/{id}\"",
            "method = \"DELETE\"\npath = \"/orders/{id}\"\nmode = \"enforce\"",
            1,
        );
    std::fs::write(fx.config_path(), config).unwrap();
    let server = fx.serve().await;
    let reader = fx.es256().token("alice", &["orders:read"], &[]);

    // A policy deny in dry-run: allowed, logged as a would-deny with its reason.
    let out = outcome(
        &server
            .check(envoy_request("POST", "/orders", Some(&reader)))
            .await,
    );
    assert_eq!(out.http_status, 200);
    assert_eq!(out.metadata["dry_run"], "would-deny");
    let line = fx.audit_line(&out.decision_id);
    assert_eq!(line["outcome"], "allow");
    assert_eq!(line["dry_run"], true);
    assert_eq!(line["would"], "deny");
    assert_eq!(line["reason"], "policy_denied");

    // The route says enforce.
    let out = outcome(
        &server
            .check(envoy_request("DELETE", "/orders/1", Some(&reader)))
            .await,
    );
    assert_eq!(out.http_status, 403);
    // Envoy's per-route context_extensions win over both.
    let mut enforced = envoy_request("POST", "/orders", Some(&reader));
    enforced
        .attributes
        .as_mut()
        .unwrap()
        .context_extensions
        .insert("portcullis.mode".into(), "enforce".into());
    assert_eq!(outcome(&server.check(enforced).await).http_status, 403);
    let mut dry = envoy_request("DELETE", "/orders/1", Some(&reader));
    dry.attributes
        .as_mut()
        .unwrap()
        .context_extensions
        .insert("portcullis.mode".into(), "dry-run".into());
    assert_eq!(outcome(&server.check(dry).await).http_status, 200);

    // Credential failures are enforced unless token_mode says otherwise.
    let out = outcome(&server.check(envoy_request("GET", "/orders", None)).await);
    assert_eq!(out.http_status, 401);
    // Allowed requests are not marked.
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders", Some(&reader)))
            .await,
    );
    assert_eq!(fx.audit_line(&out.decision_id)["dry_run"], false);
}

#[tokio::test]
async fn token_failures_can_be_dry_run_separately() {
    let fx = Fixture::new();
    let config = std::fs::read_to_string(fx.config_path()).unwrap().replace(
        "name = \"orders\"",
        "name = \"orders\"\ntoken_mode = \"dry-run\"",
    );
    std::fs::write(fx.config_path(), config).unwrap();
    let server = fx.serve().await;
    let out = outcome(&server.check(envoy_request("GET", "/orders", None)).await);
    assert_eq!(out.http_status, 200);
    assert_eq!(fx.audit_line(&out.decision_id)["reason"], "missing_token");
    // Policy denies stay enforced.
    let reader = fx.es256().token("alice", &["orders:read"], &[]);
    let out = outcome(
        &server
            .check(envoy_request("POST", "/orders", Some(&reader)))
            .await,
    );
    assert_eq!(out.http_status, 403);
}

/// `aud` may be a list: a token naming us among other audiences is accepted,
/// signed by each key type (the keys are parsed once, at load).
#[tokio::test]
async fn an_audience_list_naming_us_is_accepted_for_every_key_type() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    for key in &fx.keys {
        let mut c = claims("alice", &["orders:read"], &["customer"]);
        c["aud"] = json!(["billing-api", AUDIENCE]);
        let token = key.sign(&c);
        let out = outcome(
            &server
                .check(envoy_request("GET", "/orders/7", Some(&token)))
                .await,
        );
        assert_eq!(out.http_status, 200, "{:?}: {out:?}", key.algorithm);
    }
}
