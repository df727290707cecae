//! Sender-constrained tokens through the real server over gRPC: DPoP-bound
//! tokens (RFC 9449) with real proofs, certificate-bound tokens (RFC 8705)
//! with real client certificates, and `require_sender_constraint` per issuer
//! and per route.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use base64::Engine as _;
use common::dpop::DpopKey;
use common::pki::TestCa;
use common::*;
use serde_json::{Value, json};

/// A token of the fixture's issuer with `cnf` set.
fn bound_token(fx: &Fixture, cnf: Value) -> String {
    let mut claims = claims("alice", &["orders:read"], &["customer"]);
    claims["cnf"] = cnf;
    fx.es256().sign(&claims)
}

const HTU: &str = "https://orders.example.test/orders/1";

/// A Check request for GET /orders/1 with `authorization` and `dpop` as given.
fn request(
    authorization: Option<String>,
    dpop: Option<String>,
) -> envoy_types_request::CheckRequest {
    let mut request = envoy_request("GET", "/orders/1", None);
    let http = http_mut(&mut request);
    if let Some(value) = authorization {
        http.headers.insert("authorization".into(), value);
    }
    if let Some(proof) = dpop {
        http.headers.insert("dpop".into(), proof);
    }
    request
}

mod envoy_types_request {
    pub use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
}

/// The reason class Portcullis put in the dynamic metadata.
fn reason_of(out: &Outcome) -> String {
    out.metadata["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The client certificate as Envoy reports it (`include_peer_certificate`):
/// URL-encoded PEM.
fn with_peer_certificate(
    mut request: envoy_types_request::CheckRequest,
    cert_pem: &str,
) -> envoy_types_request::CheckRequest {
    let encoded =
        percent_encoding::utf8_percent_encode(cert_pem, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    if let Some(source) = request.attributes.as_mut().and_then(|a| a.source.as_mut()) {
        source.certificate = encoded;
    }
    request
}

/// base64url SHA-256 of a PEM certificate's DER: its `x5t#S256`.
fn x5t_s256(cert_pem: &str) -> String {
    let der = rustls_pki_der(cert_pem);
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der))
}

fn rustls_pki_der(cert_pem: &str) -> Vec<u8> {
    let body: String = cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

#[tokio::test]
async fn a_dpop_bound_token_needs_a_valid_proof_by_its_key() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let client = DpopKey::new();
    let token = bound_token(&fx, json!({ "jkt": client.jkt() }));

    // The right proof: allowed, and the audit line says how it was bound.
    let proof = client.proof("GET", HTU, &token);
    let out = outcome(
        &server
            .check(request(Some(format!("DPoP {token}")), Some(proof.clone())))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");
    assert_eq!(fx.audit_line(&out.decision_id)["binding"], "dpop");

    // The same proof again: a replay.
    let out = outcome(
        &server
            .check(request(Some(format!("DPoP {token}")), Some(proof)))
            .await,
    );
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "dpop_replayed")
    );
    assert!(
        out.header("www-authenticate")
            .is_some_and(|v| v.starts_with("DPoP ") && v.contains("invalid_dpop_proof")),
        "{out:?}"
    );

    let cases: Vec<(&str, Option<String>, Option<String>)> = vec![
        // Presented as a bearer token, with or without a proof.
        (
            "dpop_bound_as_bearer",
            Some(format!("Bearer {token}")),
            Some(client.proof("GET", HTU, &token)),
        ),
        (
            "dpop_bound_as_bearer",
            Some(format!("Bearer {token}")),
            None,
        ),
        ("dpop_proof_missing", Some(format!("DPoP {token}")), None),
        (
            "dpop_wrong_method",
            Some(format!("DPoP {token}")),
            Some(client.proof("POST", HTU, &token)),
        ),
        (
            "dpop_wrong_uri",
            Some(format!("DPoP {token}")),
            Some(client.proof("GET", "https://orders.example.test/orders/2", &token)),
        ),
        (
            "dpop_wrong_uri",
            Some(format!("DPoP {token}")),
            Some(client.proof("GET", "https://evil.example.test/orders/1", &token)),
        ),
        (
            "dpop_stale",
            Some(format!("DPoP {token}")),
            Some(client.proof_at("GET", HTU, &token, now() - 600)),
        ),
        (
            "dpop_stale",
            Some(format!("DPoP {token}")),
            Some(client.proof_at("GET", HTU, &token, now() + 600)),
        ),
        (
            "dpop_wrong_access_token",
            Some(format!("DPoP {token}")),
            Some(client.proof("GET", HTU, "another-token")),
        ),
        // A thief's own key: a valid proof, but not by the bound key.
        (
            "dpop_key_mismatch",
            Some(format!("DPoP {token}")),
            Some(DpopKey::new().proof("GET", HTU, &token)),
        ),
        (
            "dpop_proof_malformed",
            Some(format!("DPoP {token}")),
            Some("not.a.proof".into()),
        ),
    ];
    for (reason, authorization, dpop) in cases {
        let out = outcome(&server.check(request(authorization.clone(), dpop)).await);
        assert_eq!(
            (out.http_status, reason_of(&out).as_str()),
            (401, reason),
            "{authorization:?}: {out:?}"
        );
    }

    // The query string is not part of htu.
    let mut with_query = request(
        Some(format!("DPoP {token}")),
        Some(client.proof("GET", HTU, &token)),
    );
    http_mut(&mut with_query).path = "/orders/1?fields=all".into();
    let out = outcome(&server.check(with_query).await);
    assert_eq!(out.http_status, 200, "{out:?}");
}

#[tokio::test]
async fn the_dpop_scheme_with_an_unbound_token_is_refused() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let token = fx.es256().token("alice", &["orders:read"], &["customer"]);
    let client = DpopKey::new();
    let out = outcome(
        &server
            .check(request(
                Some(format!("DPoP {token}")),
                Some(client.proof("GET", HTU, &token)),
            ))
            .await,
    );
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "dpop_scheme_unbound")
    );
    // As a bearer token it is what it always was.
    let out = outcome(
        &server
            .check(request(Some(format!("Bearer {token}")), None))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");
}

#[tokio::test]
async fn a_certificate_bound_token_needs_its_certificate() {
    let fx = Fixture::new();
    fx.append_config(
        "\n[sender_constraint]\nclient_certificate_header = \"x-forwarded-client-cert\"\n",
    );
    let server = fx.serve().await;
    let ca = TestCa::new("clients");
    let mine = ca.client("checkout", None);
    let other = ca.client("thief", None);
    let token = bound_token(&fx, json!({ "x5t#S256": x5t_s256(&mine.cert_pem) }));
    let bearer = || Some(format!("Bearer {token}"));

    let out = outcome(
        &server
            .check(with_peer_certificate(
                request(bearer(), None),
                &mine.cert_pem,
            ))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");
    assert_eq!(fx.audit_line(&out.decision_id)["binding"], "mtls");

    let out = outcome(
        &server
            .check(with_peer_certificate(
                request(bearer(), None),
                &other.cert_pem,
            ))
            .await,
    );
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "certificate_mismatch")
    );
    let out = outcome(&server.check(request(bearer(), None)).await);
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "certificate_mismatch")
    );

    // From a trusted front proxy, as one x-forwarded-client-cert element.
    let hash = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &rustls_pki_der(&mine.cert_pem),
    ));
    let mut forwarded = request(bearer(), None);
    http_mut(&mut forwarded).headers.insert(
        "x-forwarded-client-cert".into(),
        format!("By=spiffe://front/proxy;Hash={hash};Subject=\"CN=checkout\""),
    );
    let out = outcome(&server.check(forwarded).await);
    assert_eq!(out.http_status, 200, "{out:?}");
    // Two elements are ambiguous: refused.
    let mut two = request(bearer(), None);
    http_mut(&mut two).headers.insert(
        "x-forwarded-client-cert".into(),
        format!("Hash={hash},Hash={hash}"),
    );
    let out = outcome(&server.check(two).await);
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "certificate_mismatch")
    );
}

#[tokio::test]
async fn an_issuer_or_a_route_can_require_a_bound_token() {
    let fx = Fixture::new();
    // The route GET /orders/{id} requires `mtls`; the issuer requires `any`.
    let config = std::fs::read_to_string(fx.config_path()).unwrap();
    let config = config
        .replacen(
            "roles_claim = \"roles\"",
            "roles_claim = \"roles\"\nrequire_sender_constraint = \"any\"",
            1,
        )
        .replacen(
            "path = \"/orders/{id}\"",
            "path = \"/orders/{id}\"\nrequire_sender_constraint = \"mtls\"",
            1,
        );
    std::fs::write(fx.config_path(), config).unwrap();
    let server = fx.serve().await;
    let client = DpopKey::new();
    let ca = TestCa::new("clients");
    let cert = ca.client("checkout", None);

    let bearer = fx.es256().token("alice", &["orders:read"], &["customer"]);
    let dpop_bound = bound_token(&fx, json!({ "jkt": client.jkt() }));
    let cert_bound = bound_token(&fx, json!({ "x5t#S256": x5t_s256(&cert.cert_pem) }));

    // GET /orders: the issuer's `any`.
    let list = |authorization: String, dpop: Option<String>| {
        let mut r = request(Some(authorization), dpop);
        http_mut(&mut r).path = "/orders".into();
        r
    };
    let out = outcome(&server.check(list(format!("Bearer {bearer}"), None)).await);
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "sender_constraint_required")
    );
    let proof = client.proof("GET", "https://orders.example.test/orders", &dpop_bound);
    let out = outcome(
        &server
            .check(list(format!("DPoP {dpop_bound}"), Some(proof)))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");

    // GET /orders/1: the route's `mtls` too; a DPoP-bound token is not enough.
    let proof = client.proof("GET", HTU, &dpop_bound);
    let out = outcome(
        &server
            .check(request(Some(format!("DPoP {dpop_bound}")), Some(proof)))
            .await,
    );
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "sender_constraint_required")
    );
    let out = outcome(
        &server
            .check(with_peer_certificate(
                request(Some(format!("Bearer {cert_bound}")), None),
                &cert.cert_pem,
            ))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");
}

#[tokio::test]
async fn policies_can_read_how_the_token_is_bound() {
    let fx = Fixture::new();
    // Deleting an order needs a bound token, whatever else allows it.
    std::fs::write(
        fx.path("policies/bound.cedar"),
        "@id(\"delete-needs-bound-token\")\nforbid (principal, action == Action::\"delete /orders/{id}\", resource)\nunless { context.token has binding };\n",
    )
    .unwrap();
    let server = fx.serve().await;
    let client = DpopKey::new();
    let htu = "https://orders.example.test/orders/1";
    let delete = |authorization: String, dpop: Option<String>| {
        let mut r = request(Some(authorization), dpop);
        http_mut(&mut r).method = "DELETE".into();
        r
    };
    let bearer = fx.es256().token("alice", &["orders:write"], &["admin"]);
    let out = outcome(&server.check(delete(format!("Bearer {bearer}"), None)).await);
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (403, "policy_denied"),
        "{out:?}"
    );
    let line = fx.audit_line(&out.decision_id);
    assert!(
        line["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|id| id == "delete-needs-bound-token")),
        "{line}"
    );

    let mut claims = claims("alice", &["orders:write"], &["admin"]);
    claims["cnf"] = json!({ "jkt": client.jkt() });
    let bound = fx.es256().sign(&claims);
    let out = outcome(
        &server
            .check(delete(
                format!("DPoP {bound}"),
                Some(client.proof("DELETE", htu, &bound)),
            ))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");
}

#[tokio::test]
async fn a_cnf_the_server_cannot_check_is_refused() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    for (cnf, reason) in [
        (json!({ "jwk": { "kty": "EC" } }), "unsupported_binding"),
        (json!({}), "unsupported_binding"),
        (json!({ "jkt": "short" }), "malformed_token"),
        (json!("jkt"), "malformed_token"),
    ] {
        let token = bound_token(&fx, cnf.clone());
        let out = outcome(
            &server
                .check(request(Some(format!("Bearer {token}")), None))
                .await,
        );
        assert_eq!(
            (out.http_status, reason_of(&out).as_str()),
            (401, reason),
            "{cnf}"
        );
    }
}

#[tokio::test]
async fn a_proof_replayed_to_another_instance_sharing_redis_is_refused() {
    let redis = redis_harness::RedisServer::start();
    let fx = Fixture::new();
    fx.append_config(&format!(
        "\n[revocation]\nredis_url = \"{}\"\nredis_prefix = \"dpop-test:\"\n",
        redis.url()
    ));
    // Two instances of one deployment: same configuration, same Redis.
    let first = fx.serve().await;
    let second = fx.serve().await;
    let client = DpopKey::new();
    let token = bound_token(&fx, json!({ "jkt": client.jkt() }));
    let proof = client.proof("GET", HTU, &token);
    let asked = || request(Some(format!("DPoP {token}")), Some(proof.clone()));

    let out = outcome(&first.check(asked()).await);
    assert_eq!(out.http_status, 200, "{out:?}");
    let out = outcome(&second.check(asked()).await);
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "dpop_replayed")
    );

    // Redis gone: the replay check cannot be made, so DPoP requests are
    // refused (503, a dependency failed), while bearer tokens still work.
    drop(redis);
    let fresh = client.proof("GET", HTU, &token);
    let out = outcome(
        &second
            .check(request(Some(format!("DPoP {token}")), Some(fresh)))
            .await,
    );
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (503, "dpop_replay_check_failed")
    );
    assert_eq!(out.header("retry-after"), Some("1"));
    assert!(out.header("www-authenticate").is_none(), "{out:?}");
    let bearer = fx.es256().token("alice", &["orders:read"], &["customer"]);
    let out = outcome(
        &second
            .check(request(Some(format!("Bearer {bearer}")), None))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");
}

#[tokio::test]
async fn a_spent_proof_stays_spent_across_a_configuration_reload() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let client = DpopKey::new();
    let token = bound_token(&fx, json!({ "jkt": client.jkt() }));
    let proof = client.proof("GET", HTU, &token);
    let asked = || request(Some(format!("DPoP {token}")), Some(proof.clone()));
    let out = outcome(&server.check(asked()).await);
    assert_eq!(out.http_status, 200, "{out:?}");

    // The configuration file is reloaded (every stage rebuilt): the proofs
    // seen before are still remembered.
    let state = server.running.state();
    let rebuilt = state.engine().unwrap().rebuild(&fx.config()).unwrap();
    state.install(rebuilt).await;
    let out = outcome(&server.check(asked()).await);
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "dpop_replayed")
    );
}

/// The `DPoP-Nonce` a response hands the client: on a deny, among the deny
/// headers; on an allow, among the headers added to the upstream's response.
fn dpop_nonce_of(out: &Outcome) -> Option<String> {
    out.headers
        .iter()
        .chain(&out.ok_response_headers)
        .find(|(name, _)| name == "dpop-nonce")
        .map(|(_, value)| value.clone())
}

#[tokio::test]
async fn with_server_nonces_a_proof_needs_a_nonce_the_deployment_issued() {
    let fx = Fixture::new();
    std::fs::write(
        fx.path("nonce.secret"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    fx.append_config(
        "\n[sender_constraint]\ndpop_nonce = true\ndpop_nonce_secret_file = \"nonce.secret\"\n",
    );
    // Two instances sharing the secret, and one of another deployment (its
    // own random secret).
    let first = fx.serve().await;
    let second = fx.serve().await;
    let other = Fixture::new();
    other.append_config("\n[sender_constraint]\ndpop_nonce = true\n");
    let stranger = other.serve().await;

    let client = DpopKey::new();
    let token = bound_token(&fx, json!({ "jkt": client.jkt() }));
    let dpop = |proof: String| request(Some(format!("DPoP {token}")), Some(proof));

    // No nonce yet: 401 use_dpop_nonce, with a nonce to retry with.
    let out = outcome(&first.check(dpop(client.proof("GET", HTU, &token))).await);
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "dpop_nonce_missing")
    );
    let challenge = out.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("DPoP ") && challenge.contains("error=\"use_dpop_nonce\""),
        "{out:?}"
    );
    assert_eq!(out.body["error"], "use_dpop_nonce");
    let nonce = dpop_nonce_of(&out).expect("a 401 use_dpop_nonce carries DPoP-Nonce");

    // The retry with it passes, on either instance of the deployment, and
    // the allowed answer hands the nonce on for the next proof.
    let out = outcome(
        &first
            .check(dpop(client.proof_with_nonce("GET", HTU, &token, &nonce)))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");
    assert!(dpop_nonce_of(&out).is_some(), "{out:?}");
    let out = outcome(
        &second
            .check(dpop(client.proof_with_nonce("GET", HTU, &token, &nonce)))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");

    // Another deployment does not accept it: it answers with its own.
    let stranger_token = bound_token(&other, json!({ "jkt": client.jkt() }));
    let out = outcome(
        &stranger
            .check(request(
                Some(format!("DPoP {stranger_token}")),
                Some(client.proof_with_nonce("GET", HTU, &stranger_token, &nonce)),
            ))
            .await,
    );
    assert_eq!(
        (out.http_status, reason_of(&out).as_str()),
        (401, "dpop_nonce_invalid")
    );
    assert_ne!(dpop_nonce_of(&out).as_deref(), Some(nonce.as_str()));

    // A made-up nonce, and other proof errors: the DPoP challenge carries a
    // nonce too; a bearer token's refusal does not.
    let out = outcome(
        &first
            .check(dpop(client.proof_with_nonce("GET", HTU, &token, "bm9wZQ")))
            .await,
    );
    assert_eq!(reason_of(&out), "dpop_nonce_invalid");
    let out = outcome(
        &first
            .check(dpop(client.proof_with_nonce("POST", HTU, &token, &nonce)))
            .await,
    );
    assert_eq!(reason_of(&out), "dpop_wrong_method");
    assert!(dpop_nonce_of(&out).is_some(), "{out:?}");
    let bearer = fx.es256().token("alice", &["orders:read"], &["customer"]);
    let out = outcome(
        &first
            .check(request(Some(format!("Bearer {bearer}")), None))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");
    assert!(dpop_nonce_of(&out).is_none(), "{out:?}");

    // The audit line has the reason class and never the nonce.
    let lines = std::fs::read_to_string(fx.audit_path()).unwrap_or_default();
    assert!(!lines.contains(&nonce));
}

#[test]
fn a_short_or_missing_nonce_secret_is_refused_at_load() {
    let fx = Fixture::new();
    std::fs::write(fx.path("short.secret"), "too short").unwrap();
    fx.append_config(
        "\n[sender_constraint]\ndpop_nonce = true\ndpop_nonce_secret_file = \"short.secret\"\n",
    );
    let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("at least 32 bytes"), "{stderr}");
    assert!(
        !stderr.contains("too short"),
        "the secret is never shown: {stderr}"
    );

    let fx = Fixture::new();
    fx.append_config(
        "\n[sender_constraint]\ndpop_nonce = true\ndpop_nonce_secret_file = \"absent.secret\"\n",
    );
    let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dpop_nonce_secret_file"),
        "{out:?}"
    );
}
