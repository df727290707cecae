//! Edges that must fail closed or stay quiet: issuer-controlled numbers at the
//! limits of `i64`, oversized answers from identity providers, and secrets
//! that must never appear in any output.

mod common;

use common::idp::{Endpoint, TestIdp};
use common::*;
use serde_json::{Value, json};

/// `[issuers.remote]` settings that refresh the keys every second.
const REFRESH_EVERY_SECOND: &str = "refresh = \"1s\"\nrefresh_min = \"1s\"";

/// Introspection at the IdP with client credentials written to the fixture.
fn introspecting_issuer(fx: &Fixture, idp: &TestIdp) {
    idp.set_client_credentials("portcullis", "s3cret");
    std::fs::write(fx.path("client-secret"), "s3cret\n").unwrap();
    add_discovery_issuer(
        fx,
        idp,
        REFRESH_EVERY_SECOND,
        &format!(
            "[issuers.introspection]\nclient_id = \"portcullis\"\nclient_secret_file = \"{}\"\n",
            fx.path("client-secret").display()
        ),
    );
}

/// HTTP status and audit reason of one check of `GET /orders/7` with `token`.
async fn decide(fx: &Fixture, server: &TestServer, token: &str) -> (i32, Value) {
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders/7", Some(token)))
            .await,
    );
    (
        out.http_status,
        fx.audit_line(&out.decision_id)["reason"].clone(),
    )
}

/// `iat`, `exp` and `nbf` at the limits of `i64` (and beyond, as floats) are
/// refused with a reason class, through the real server: never a panic (this
/// test binary is built with overflow checks) and never an allow.
#[tokio::test]
async fn extreme_time_claims_are_refused_not_panicked_on() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let with = |changes: Value| {
        let mut claims = claims("alice", &["orders:read"], &[]);
        for (k, v) in changes.as_object().unwrap() {
            claims[k] = v.clone();
        }
        fx.es256().sign(&claims)
    };
    let cases = [
        (json!({"iat": i64::MIN}), "malformed_token"),
        (json!({"exp": i64::MAX}), "malformed_token"),
        (json!({"iat": i64::MIN, "exp": i64::MAX}), "malformed_token"),
        (json!({"nbf": i64::MIN}), "malformed_token"),
        (json!({"nbf": i64::MAX}), "malformed_token"),
        (json!({"exp": u64::MAX}), "malformed_token"),
        (json!({"exp": 1e300}), "malformed_token"),
        (json!({"iat": -1e300}), "malformed_token"),
        (json!({"iat": -1}), "malformed_token"),
        // In range, but a lifetime of eight thousand years.
        (
            json!({"iat": 0, "exp": 253_402_300_799_i64}),
            "lifetime_too_long",
        ),
    ];
    for (changes, reason) in cases {
        let (code, got) = decide(&fx, &server, &with(changes.clone())).await;
        assert_eq!((code, got.as_str()), (401, Some(reason)), "{changes}");
    }
    // The server is still up and still allows a normal token.
    let (code, _) = decide(
        &fx,
        &server,
        &fx.es256().token("alice", &["orders:read"], &[]),
    )
    .await;
    assert_eq!(code, 200);
}

/// The same numbers in an introspection answer: refused, not an allow.
#[tokio::test]
async fn extreme_time_claims_from_introspection_are_refused() {
    let idp = TestIdp::start().await;
    let fx = Fixture::new();
    introspecting_issuer(&fx, &idp);
    idp.set_jwks(jwks_of(&[&TestKey::es256()]));
    let (server, _tasks) = fx.serve_with_background().await;
    let answer = |changes: Value| {
        let mut answer = json!({"active": true, "sub": "svc", "scope": "orders:read",
            "aud": "orders-api", "iat": now(), "exp": now() + 300});
        for (k, v) in changes.as_object().unwrap() {
            answer[k] = v.clone();
        }
        answer
    };
    let cases = [
        ("iat-min", json!({"iat": i64::MIN}), "malformed_token"),
        ("exp-max", json!({"exp": i64::MAX}), "malformed_token"),
        (
            "both",
            json!({"iat": i64::MIN, "exp": i64::MAX}),
            "malformed_token",
        ),
        ("nbf-min", json!({"nbf": i64::MIN}), "malformed_token"),
    ];
    for (token, changes, reason) in cases {
        idp.set_introspection(token, answer(changes));
        let (code, got) = decide(&fx, &server, token).await;
        assert_eq!((code, got.as_str()), (401, Some(reason)), "{token}");
    }
    idp.set_introspection("fine", answer(json!({})));
    assert_eq!(decide(&fx, &server, "fine").await.0, 200);
}

/// A JWKS larger than 1 MiB (streamed, no `Content-Length`) is a failed
/// fetch: the last good keys stay, the oversized set's keys are not used. A
/// set just under the limit is read.
#[tokio::test]
async fn an_oversized_jwks_is_a_failed_fetch_and_the_last_good_keys_stay() {
    let idp = TestIdp::start().await;
    let (old, new) = (TestKey::es256(), TestKey::es256());
    idp.set_jwks(jwks_of(&[&old]));
    let fx = Fixture::new();
    add_discovery_issuer(&fx, &idp, REFRESH_EVERY_SECOND, "");
    let (server, _tasks) = fx.serve_with_background().await;
    let token = |key: &TestKey| {
        let mut claims = claims("alice", &["orders:read"], &[]);
        claims["iss"] = json!(idp.issuer());
        key.sign(&claims)
    };
    assert_eq!(decide(&fx, &server, &token(&old)).await.0, 200);

    idp.set_jwks(jwks_of(&[&new]));
    idp.set_padding(Endpoint::Jwks, Some(2 * 1024 * 1024));
    let failures = remote_fetch_failures(&server.running.state().engine().unwrap());
    wait_for("two failed refreshes", || {
        remote_fetch_failures(&server.running.state().engine().unwrap()) >= failures + 2
    })
    .await;
    assert_eq!(decide(&fx, &server, &token(&old)).await.0, 200);
    let (code, reason) = decide(&fx, &server, &token(&new)).await;
    assert_eq!((code, reason.as_str()), (401, Some("unknown_key")));

    // Just under the limit: read, and the new key is in force.
    idp.set_padding(Endpoint::Jwks, Some(1000 * 1024));
    let mut accepted = false;
    for _ in 0..600 {
        if decide(&fx, &server, &token(&new)).await.0 == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(accepted, "a JWKS under 1 MiB was never accepted");
}

/// An oversized discovery document is a failed fetch: no keys, not ready,
/// until a normal one is served.
#[tokio::test]
async fn an_oversized_discovery_document_is_a_failed_fetch() {
    let idp = TestIdp::start().await;
    idp.set_jwks(jwks_of(&[&TestKey::es256()]));
    idp.set_padding(Endpoint::Discovery, Some(2 * 1024 * 1024));
    let fx = Fixture::new();
    add_discovery_issuer(&fx, &idp, REFRESH_EVERY_SECOND, "");
    let engine = portcullis::engine::Engine::from_config(&fx.config()).unwrap();
    let tasks = engine.authenticator().spawn_background();
    let failures = || remote_fetch_failures(&engine);
    wait_for("a failed discovery", || failures() >= 1).await;
    assert!(!engine.authenticator().is_ready());
    assert_eq!(idp.jwks_fetches(), 0, "no jwks_uri was taken from it");
    idp.set_padding(Endpoint::Discovery, None);
    wait_for("keys once discovery is normal", || {
        engine.authenticator().is_ready()
    })
    .await;
    tasks.iter().for_each(|t| t.abort());
}

/// An introspection answer over 64 KiB is a failed call (503,
/// `introspection_failed`), never an allow; one under it is read.
#[tokio::test]
async fn an_oversized_introspection_answer_fails_closed() {
    let idp = TestIdp::start().await;
    let fx = Fixture::new();
    introspecting_issuer(&fx, &idp);
    idp.set_jwks(jwks_of(&[&TestKey::es256()]));
    let (server, _tasks) = fx.serve_with_background().await;
    let active = json!({"active": true, "sub": "svc", "scope": "orders:read",
        "aud": "orders-api", "iat": now(), "exp": now() + 300});
    idp.set_introspection("opaque-big", active.clone());
    idp.set_introspection("opaque-fits", active);

    idp.set_padding(Endpoint::Introspection, Some(128 * 1024));
    let (code, reason) = decide(&fx, &server, "opaque-big").await;
    assert_eq!((code, reason.as_str()), (503, Some("introspection_failed")));

    idp.set_padding(Endpoint::Introspection, Some(60 * 1024));
    assert_eq!(decide(&fx, &server, "opaque-fits").await.0, 200);
}

const MARKER: &str = "MARKER-s3cr3t-5e81";

/// Runs the binary and returns everything it wrote (stdout and stderr),
/// with its exit status.
fn run(args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .env("RUST_LOG", "trace")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// A configuration file with a TOML syntax error on the line of a secret is
/// refused by `validate`, `check` and `serve` with its line and column, and
/// the secret appears nowhere in their output.
#[test]
fn a_config_syntax_error_never_prints_the_secret_on_its_line() {
    let fx = Fixture::new();
    let good = std::fs::read_to_string(fx.config_path()).unwrap();
    let broken = [
        format!("{good}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{MARKER}\" ok\n"),
        format!("{good}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{MARKER}\n"),
        format!("{good}\n[revocation]\nredis_url = \"redis://:{MARKER}@127.0.0.1:6379\" ,\n"),
    ];
    for text in broken {
        std::fs::write(fx.config_path(), &text).unwrap();
        let config = path_arg(&fx.config_path());
        for args in [
            vec!["validate", "--config", &config],
            vec!["check", "--config", &config, "--path", "/orders"],
            vec!["serve", "--config", &config],
        ] {
            let (status, output) = run(&args);
            assert!(!status.success(), "{args:?}: {output}");
            assert!(output.contains("line "), "{args:?}: {output}");
            assert!(!output.contains(MARKER), "{args:?}: {output}");
        }
    }
}

/// A malformed `--header` (a credential without its name, say) is refused
/// without repeating it.
#[test]
fn a_malformed_header_argument_is_not_echoed() {
    let fx = Fixture::new();
    let config = path_arg(&fx.config_path());
    for header in [format!("Bearer {MARKER}"), format!(":{MARKER}")] {
        let (status, output) = run(&[
            "check", "--config", &config, "--path", "/orders", "--header", &header,
        ]);
        assert!(!status.success(), "{output}");
        assert!(output.contains("--header"), "{output}");
        assert!(!output.contains(MARKER), "{output}");
    }
}

/// The Debug form of a request (what a `{:?}` in a log line would print)
/// holds no header value and no query string.
#[test]
fn request_debug_output_holds_no_credentials() {
    let request = portcullis::attributes::HttpRequest {
        method: "GET".into(),
        path: format!("/orders?token={MARKER}"),
        headers: [
            ("authorization", format!("Bearer {MARKER}")),
            ("cookie", format!("sid={MARKER}")),
            ("x-api-key", format!("pck_a_{MARKER}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        ..Default::default()
    };
    for shown in [format!("{request:?}"), format!("{request:#?}")] {
        assert!(!shown.contains(MARKER), "{shown}");
        assert!(shown.contains("cookie"), "{shown}");
    }
}
