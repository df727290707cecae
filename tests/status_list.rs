//! Token Status List checks (`[status_list]`) through the real server over
//! real gRPC, with the lists served by a real HTTPS identity provider.

mod common;

use std::io::Write as _;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::idp::TestIdp;
use common::*;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

/// The `[status_list]` table of these tests: lists are fresh for a second
/// unless they say otherwise.
const FAST: &str = r#"
[status_list]
default_ttl = "1s"
min_refresh = "1s"
max_list_bytes = 8192
max_decompressed_bytes = 65536
"#;

struct Setup {
    idp: TestIdp,
    key: TestKey,
    fx: Fixture,
    server: TestServer,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn setup(status_list: &str) -> Setup {
    let idp = TestIdp::start().await;
    let key = TestKey::es256();
    idp.set_jwks(jwks_of(&[&key]));
    let fx = Fixture::new();
    add_discovery_issuer(&fx, &idp, "refresh = \"1h\"\nrefresh_min = \"1s\"", "");
    fx.append_config(status_list);
    let (server, tasks) = fx.serve_with_background().await;
    Setup {
        idp,
        key,
        fx,
        server,
        _tasks: tasks,
    }
}

/// Packs `statuses`, `bits` each, least-significant bits first (the draft's order).
fn pack(bits: u8, statuses: &[u8]) -> Vec<u8> {
    let per_byte = 8 / usize::from(bits);
    let mut bytes = vec![0u8; statuses.len().div_ceil(per_byte)];
    for (idx, status) in statuses.iter().enumerate() {
        bytes[idx / per_byte] |= status << ((idx % per_byte) * usize::from(bits));
    }
    bytes
}

fn lst(bytes: &[u8]) -> String {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(encoder.finish().unwrap())
}

/// The claims of a good Status List Token for `uri`.
fn list_claims(setup: &Setup, uri: &str, bits: u8, statuses: &[u8]) -> Value {
    json!({
        "sub": uri,
        "iss": setup.idp.issuer(),
        "iat": now(),
        "status_list": { "bits": bits, "lst": lst(&pack(bits, statuses)) },
    })
}

/// `claims` signed by `key` with header `typ`.
fn sign_list(key: &TestKey, typ: &str, claims: &Value) -> String {
    let mut header = Header::new(key.algorithm);
    header.typ = Some(typ.to_owned());
    header.kid = Some(key.kid().to_owned());
    let encoding = EncodingKey::from_ec_pem(key.pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

impl Setup {
    /// Serves a good list named `name`: `bits` per entry, `statuses`, `extra` claims.
    fn serve_list(&self, name: &str, bits: u8, statuses: &[u8], extra: Value) {
        let uri = self.idp.status_list_uri(name);
        let mut claims = list_claims(self, &uri, bits, statuses);
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            claims.extend(extra.clone());
        }
        let token = sign_list(&self.key, "statuslist+jwt", &claims);
        self.idp.set_status_list(name, Some(token));
    }

    /// An access token whose status is entry `idx` of list `name`.
    fn token(&self, name: &str, idx: u64) -> String {
        let mut claims = claims("alice", &["orders:read"], &[]);
        claims["iss"] = json!(self.idp.issuer());
        claims["status"] = json!({
            "status_list": { "idx": idx, "uri": self.idp.status_list_uri(name) }
        });
        self.key.sign(&claims)
    }

    /// HTTP status and audit reason of a `Check` with `token`.
    async fn check(&self, token: &str) -> (i32, String) {
        let response = self
            .server
            .check(envoy_request("GET", "/orders/7", Some(token)))
            .await;
        let out = outcome(&response);
        if out.http_status == 200 {
            return (200, String::new());
        }
        let reason = self.fx.audit_line(&out.decision_id)["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (out.http_status, reason)
    }

    /// Checks `token` until it is refused (within `deadline`); returns the
    /// reason and when.
    async fn until_refused(&self, token: &str, deadline: Duration) -> (String, Instant) {
        let start = Instant::now();
        while start.elapsed() < deadline {
            let (status, reason) = self.check(token).await;
            if status != 200 {
                assert_eq!((status, reason.clone()), refused(&reason));
                return (reason, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("still allowed after {deadline:?}");
    }
}

/// A refusal for `reason`: 401, except `token_status_unavailable`, which is
/// 503 (a dependency failed: retry later), as `introspection_failed` is.
fn refused(reason: &str) -> (i32, String) {
    let status = if reason == "token_status_unavailable" {
        503
    } else {
        401
    };
    (status, reason.to_owned())
}

fn allowed() -> (i32, String) {
    (200, String::new())
}

#[tokio::test]
async fn valid_entries_pass_and_invalid_or_suspended_ones_are_refused_after_the_ttl() {
    let s = setup(FAST).await;
    let mut statuses = vec![0u8; 64];
    s.serve_list("a", 2, &statuses, json!({ "ttl": 1 }));
    let token = s.token("a", 5);
    assert_eq!(s.check(&token).await, allowed());
    assert_eq!(
        s.idp.status_list_accept().as_deref(),
        Some("application/statuslist+jwt")
    );
    // Beyond the list: refused.
    assert_eq!(
        s.check(&s.token("a", 64)).await,
        refused("token_status_not_valid")
    );

    // The issuer revokes entry 5 (INVALID): refused once the list's ttl ran out.
    statuses[5] = 1;
    s.serve_list("a", 2, &statuses, json!({ "ttl": 1 }));
    let flipped = Instant::now();
    let (reason, at) = s.until_refused(&token, Duration::from_secs(5)).await;
    assert_eq!(reason, "token_status_not_valid");
    assert!(
        at - flipped <= Duration::from_millis(2500),
        "{:?}",
        at - flipped
    );
    // Its neighbours are unaffected.
    assert_eq!(s.check(&s.token("a", 4)).await, allowed());

    // SUSPENDED (2) and the application-specific 3 are refused too; VALID again passes.
    for (status, expected) in [
        (2, refused("token_status_not_valid")),
        (3, refused("token_status_not_valid")),
        (0, allowed()),
    ] {
        statuses[5] = status;
        s.serve_list("a", 2, &statuses, json!({ "ttl": 1 }));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(s.check(&token).await, expected, "status {status}");
    }
}

#[tokio::test]
async fn tokens_without_a_status_claim_are_unaffected() {
    let s = setup(FAST).await;
    let mut claims = claims("alice", &["orders:read"], &[]);
    claims["iss"] = json!(s.idp.issuer());
    let plain = s.key.sign(&claims);
    assert_eq!(s.check(&plain).await, allowed());
    assert_eq!(s.idp.status_list_fetches(), 0);
    // And the quickstart issuer's tokens (local keys) as before.
    let local = s.fx.es256().token("alice", &["orders:read"], &[]);
    assert_eq!(s.check(&local).await, allowed());
    assert_eq!(s.idp.status_list_fetches(), 0);
}

#[tokio::test]
async fn checks_are_off_when_disabled() {
    let s = setup("[status_list]\nenabled = false\n").await;
    // No list is served at all: the token is accepted unchecked.
    assert_eq!(s.check(&s.token("missing", 0)).await, allowed());
    assert_eq!(s.idp.status_list_fetches(), 0);
}

#[tokio::test]
async fn an_unreachable_list_answers_within_its_validity_and_grace_then_fails_closed() {
    let s = setup(
        r#"
[status_list]
default_ttl = "2s"
min_refresh = "1s"
grace = "1s"
"#,
    )
    .await;
    s.serve_list("a", 1, &[0; 16], json!({}));
    let token = s.token("a", 3);
    let start = Instant::now();
    assert_eq!(s.check(&token).await, allowed());

    s.idp.set_status_lists_down(true);
    // Fetched at t0 >= start at second s0 = floor(t0): fresh until s0 + 2,
    // answers until s0 + 3, which is after start + 2 seconds.
    assert_eq!(s.check(&token).await, allowed(), "fresh");
    tokio::time::sleep(Duration::from_millis(1900).saturating_sub(start.elapsed())).await;
    assert_eq!(
        s.check(&token).await,
        allowed(),
        "within validity and grace"
    );
    let fetches = s.idp.status_list_fetches();
    let (reason, at) = s.until_refused(&token, Duration::from_secs(6)).await;
    assert_eq!(reason, "token_status_unavailable");
    assert!(at - start >= Duration::from_secs(2), "{:?}", at - start);
    assert!(
        s.idp.status_list_fetches() > fetches,
        "refreshes were tried"
    );
    // Refused for as long as the list cannot be had.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(s.check(&token).await, refused("token_status_unavailable"));

    // Back up: the next refresh (at most min_refresh later) lets it through again.
    s.idp.set_status_lists_down(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(s.check(&token).await, allowed());
}

#[tokio::test]
async fn failed_refreshes_are_rate_limited_and_a_burst_makes_one_fetch() {
    let s = setup(
        r#"
[status_list]
default_ttl = "1h"
min_refresh = "1h"
"#,
    )
    .await;
    s.serve_list("a", 1, &[0; 8], json!({}));
    s.idp.set_delay(Some(Duration::from_millis(300)));
    let token = s.token("a", 1);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let mut client = s.server.client.clone();
        let request = envoy_request("GET", "/orders/7", Some(&token));
        calls.spawn(async move { outcome(&client.check(request).await.unwrap().into_inner()) });
    }
    while let Some(out) = calls.join_next().await {
        assert_eq!(out.unwrap().http_status, 200);
    }
    assert_eq!(s.idp.status_list_fetches(), 1, "one fetch for the burst");
    s.idp.set_delay(None);

    // A list that cannot be fetched is not asked for again before min_refresh.
    for _ in 0..5 {
        assert_eq!(
            s.check(&s.token("missing", 0)).await,
            refused("token_status_unavailable")
        );
    }
    assert_eq!(s.idp.status_list_fetches(), 2);
}

#[tokio::test]
async fn lists_that_break_a_rule_are_refused() {
    let s = setup(FAST).await;
    let statuses = [0u8; 32];
    let good = |name: &str| list_claims(&s, &s.idp.status_list_uri(name), 1, &statuses);
    let big_lst = {
        // Incompressible entries, larger than max_list_bytes once encoded.
        let mut state = 0x2545_f491_u32;
        let bytes: Vec<u8> = (0..8192)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        lst(&bytes)
    };
    let impostor = s.key.impostor_of();
    let other_issuer_key = TestKey::es256();
    let mut cases: Vec<(&str, String)> = Vec::new();

    let mut claims = good("other-key");
    cases.push(("other-key", sign_list(&impostor, "statuslist+jwt", &claims)));
    claims = good("unknown-key");
    cases.push((
        "unknown-key",
        sign_list(&other_issuer_key, "statuslist+jwt", &claims),
    ));
    claims = good("wrong-sub");
    claims["sub"] = json!(s.idp.status_list_uri("elsewhere"));
    cases.push(("wrong-sub", sign_list(&s.key, "statuslist+jwt", &claims)));
    claims = good("wrong-typ");
    cases.push(("wrong-typ", sign_list(&s.key, "JWT", &claims)));
    claims = good("wrong-iss");
    claims["iss"] = json!(ISSUER);
    cases.push(("wrong-iss", sign_list(&s.key, "statuslist+jwt", &claims)));
    claims = good("no-iat");
    claims.as_object_mut().unwrap().remove("iat");
    cases.push(("no-iat", sign_list(&s.key, "statuslist+jwt", &claims)));
    claims = good("expired");
    claims["exp"] = json!(now() - 10);
    cases.push(("expired", sign_list(&s.key, "statuslist+jwt", &claims)));
    claims = good("bad-bits");
    claims["status_list"]["bits"] = json!(3);
    cases.push(("bad-bits", sign_list(&s.key, "statuslist+jwt", &claims)));
    claims = good("too-large");
    claims["status_list"]["lst"] = json!(big_lst);
    cases.push(("too-large", sign_list(&s.key, "statuslist+jwt", &claims)));
    claims = good("bomb");
    // 1 MiB of zeros: about 1 KiB compressed, 16 times max_decompressed_bytes.
    claims["status_list"]["lst"] = json!(lst(&vec![0u8; 1024 * 1024]));
    cases.push(("bomb", sign_list(&s.key, "statuslist+jwt", &claims)));
    let token = sign_list(&s.key, "statuslist+jwt", &good("tampered"));
    let (head, rest) = token.split_once('.').unwrap();
    let (_, signature) = rest.rsplit_once('.').unwrap();
    let mut tampered = good("tampered");
    tampered["status_list"]["lst"] = json!(lst(&[0xff; 4]));
    let payload =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tampered.to_string().as_bytes());
    cases.push(("tampered", format!("{head}.{payload}.{signature}")));
    cases.push(("not-a-jwt", "this is not a token".to_owned()));

    for (name, list) in &cases {
        s.idp.set_status_list(name, Some(list.clone()));
        assert_eq!(
            s.check(&s.token(name, 0)).await,
            refused("token_status_unavailable"),
            "{name}"
        );
    }
    // The same token shape with a good list passes: the cases failed for their fault.
    s.serve_list("good", 1, &statuses, json!({}));
    assert_eq!(s.check(&s.token("good", 0)).await, allowed());
}

#[tokio::test]
async fn fetches_are_counted_by_outcome_in_the_metrics() {
    let idp = TestIdp::start().await;
    let key = TestKey::es256();
    idp.set_jwks(jwks_of(&[&key]));
    let fx = Fixture::new();
    add_discovery_issuer(&fx, &idp, "refresh = \"1h\"\nrefresh_min = \"1s\"", "");
    fx.append_config(&format!(
        "{FAST}\n[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n"
    ));
    let served = common::served::Served::start(&fx, &[]).await;
    let metrics = served.metrics.expect("the metrics address is logged");
    let token = |name: &str| {
        let mut claims = claims("alice", &["orders:read"], &[]);
        claims["iss"] = json!(idp.issuer());
        claims["status"] = json!({
            "status_list": { "idx": 0, "uri": idp.status_list_uri(name) }
        });
        key.sign(&claims)
    };
    let list = |name: &str, typ: &str| {
        let claims = json!({
            "sub": idp.status_list_uri(name),
            "iss": idp.issuer(),
            "iat": now(),
            "status_list": { "bits": 1, "lst": lst(&[0]) },
        });
        sign_list(&key, typ, &claims)
    };
    idp.set_status_list("good", Some(list("good", "statuslist+jwt")));
    idp.set_status_list("bad", Some(list("bad", "JWT")));
    for (name, status) in [("good", 200), ("bad", 503), ("missing", 503)] {
        let request = tonic::Request::new(envoy_request("GET", "/orders/7", Some(&token(name))));
        assert_eq!(served.check(request).await.http_status, status, "{name}");
    }
    let text = scrape_metrics(metrics).await;
    for outcome in ["ok", "invalid", "unreachable"] {
        let line = format!("portcullis_status_list_fetches_total{{outcome=\"{outcome}\"}} 1");
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    served.stop().await;
}
