//! The HTTP authorization listener (`[http_authz]`) as users run it: the
//! `portcullis serve` binary behind a real Envoy 1.40 whose ext_authz filter
//! uses `http_service` (the same cases as the gRPC mode's end-to-end suite,
//! tests/envoy_e2e.rs), forward-auth requests with `X-Forwarded-*` headers
//! sent straight to the listener, and the shipped `http_service` example
//! checked by `envoy --mode validate`.
//!
//! Envoy comes from `PORTCULLIS_ENVOY`, else `target/pyenv/bin/envoy`; without
//! it these tests fail and say how to get it: they never skip.

mod common;

use std::net::SocketAddr;

use common::envoy::{Envoy, EnvoySetup, HTTP_AUTHZ_PREFIX, Reply, send, validate};
use common::served::Served;
use common::upstream::Upstream;
use common::*;
use serde_json::{Value, json};

/// A quickstart fixture with one ES256 key, audit lines in a file, a short
/// drain, the HTTP authorization listener with Envoy's path prefix, and
/// `extra` TOML appended.
fn fixture(extra: &str) -> Fixture {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let config = std::fs::read_to_string(fx.config_path())
        .unwrap()
        .replace("[server]\n", "[server]\ndrain_period = \"0s\"\n");
    std::fs::write(fx.config_path(), config).unwrap();
    fx.append_config(&format!(
        "\n[audit]\nfile = \"{}\"\n\n[http_authz]\nlisten = \"127.0.0.1:0\"\npath_prefix = \"{HTTP_AUTHZ_PREFIX}\"\n{extra}",
        fx.audit_path().display()
    ));
    fx
}

/// Replaces `from` with `to` in the fixture's configuration.
fn edit_config(fx: &Fixture, from: &str, to: &str) {
    let config = std::fs::read_to_string(fx.config_path()).unwrap();
    assert!(config.contains(from), "{from:?} not in the configuration");
    std::fs::write(fx.config_path(), config.replace(from, to)).unwrap();
}

/// One Portcullis with its HTTP authorization listener, the recording
/// upstream, and one Envoy asking that listener in `http_service` mode.
struct Stack {
    fx: Fixture,
    /// Kept running for as long as the stack lives.
    _portcullis: Served,
    upstream: Upstream,
    envoy: Envoy,
}

impl Stack {
    async fn start(fx: Fixture) -> Stack {
        let portcullis = Served::start(&fx, &[]).await;
        let http_authz = http_authz_addr(&portcullis);
        let upstream = Upstream::start().await;
        let envoy = Envoy::start(&EnvoySetup {
            http_authz: Some(http_authz),
            ..EnvoySetup::new(portcullis.addr, upstream.addr)
        })
        .await;
        Stack {
            fx,
            _portcullis: portcullis,
            upstream,
            envoy,
        }
    }

    fn token(&self, sub: &str, scopes: &[&str]) -> String {
        self.fx.es256().token(sub, scopes, &[])
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = extra.to_vec();
        if let Some(bearer) = &bearer {
            headers.push(("authorization", bearer));
        }
        self.envoy.send(method, path, &headers).await
    }
}

/// The address the listener logged.
fn http_authz_addr(served: &Served) -> SocketAddr {
    served
        .addr_logged("http_authz listening")
        .expect("the http_authz listener's address in the log")
}

/// The first audit line that `matches`, once written (lines are batched).
async fn audit_line_where(fx: &Fixture, matches: impl Fn(&Value) -> bool) -> Value {
    wait_for("the audit line", || fx.audit_lines().iter().any(&matches)).await;
    fx.audit_lines().into_iter().find(|l| matches(l)).unwrap()
}

// ---------------------------------------------------------------------------
// Through Envoy's `http_service`.

/// An allow reaches the upstream with the subject header Portcullis set; a
/// copy the client sent is overwritten; the token stays
/// (`remove_authorization = false`). The audit line names the original
/// request, not the path Envoy sent to the listener.
#[tokio::test]
async fn http_service_allow_reaches_the_upstream_with_the_identity_portcullis_sets() {
    let stack = Stack::start(fixture("")).await;
    let token = stack.token("alice", &["orders:read"]);
    let reply = stack
        .send(
            "GET",
            "/orders/42?expand=lines",
            Some(&token),
            &[("x-portcullis-subject", "mallory")],
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "upstream");

    let received = stack.upstream.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.method, "GET");
    assert_eq!(request.path, "/orders/42?expand=lines");
    assert_eq!(request.all("x-portcullis-subject"), ["alice"]);
    assert_eq!(request.all("authorization"), [format!("Bearer {token}")]);

    let line = audit_line_where(&stack.fx, |l| l["outcome"] == "allow").await;
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["path"], "/orders/42", "{line}");
    assert_eq!(line["principal"], r#"User::"alice""#, "{line}");
}

/// `remove_authorization = true`: Envoy removes the token named in
/// `x-envoy-auth-headers-to-remove`; the upstream never sees it.
#[tokio::test]
async fn http_service_remove_authorization_strips_the_token_before_the_upstream() {
    let fx = fixture("");
    edit_config(
        &fx,
        "remove_authorization = false",
        "remove_authorization = true",
    );
    let stack = Stack::start(fx).await;
    let token = stack.token("alice", &["orders:read"]);
    let reply = stack.send("GET", "/orders/42", Some(&token), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let received = stack.upstream.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].all("authorization").is_empty(), "{received:?}");
    assert_eq!(received[0].all("x-portcullis-subject"), ["alice"]);
}

/// Every deny as the client receives it through Envoy: status, challenge,
/// JSON body with the decision id, audited with the original method and
/// path; the upstream is never reached.
#[tokio::test]
async fn http_service_denials_reach_the_client_as_portcullis_wrote_them_and_never_the_upstream() {
    let stack = Stack::start(fixture("")).await;
    let reader = stack.token("alice", &["orders:read"]);

    // No token: 401 with a bare challenge.
    let reply = stack.send("GET", "/orders/42", None, &[]).await;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(
        reply.header("www-authenticate"),
        Some(r#"Bearer realm="orders""#)
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["error"], "unauthorized");
    assert!(
        body["decision_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );

    // A token signed by a key the issuer does not have: invalid_token.
    let forged = stack
        .fx
        .es256()
        .impostor_of()
        .token("alice", &["orders:read"], &[]);
    let reply = stack.send("GET", "/orders/42", Some(&forged), &[]).await;
    assert_eq!(reply.status, 401, "{reply:?}");
    let challenge = reply.header("www-authenticate").unwrap();
    assert!(
        challenge.starts_with(r#"Bearer realm="orders", error="invalid_token""#),
        "{challenge}"
    );
    assert_eq!(reply.json()["error"], "invalid_token");

    // An expired token: invalid_token too.
    let mut expired = claims("alice", &["orders:read"], &[]);
    expired["iat"] = json!(now() - 900);
    expired["exp"] = json!(now() - 300);
    let reply = stack
        .send(
            "GET",
            "/orders/42",
            Some(&stack.fx.es256().sign(&expired)),
            &[],
        )
        .await;
    assert_eq!(reply.status, 401, "{reply:?}");

    // Authenticated, but the policies say no: 403 with the JSON body.
    for (method, path) in [("POST", "/orders"), ("GET", "/customers")] {
        let reply = stack.send(method, path, Some(&reader), &[]).await;
        assert_eq!(reply.status, 403, "{method} {path}: {reply:?}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let body = reply.json();
        assert_eq!(body["error"], "forbidden");
        let id = body["decision_id"].as_str().unwrap().to_owned();
        let line = audit_line_where(&stack.fx, |l| l["decision_id"] == id.as_str()).await;
        assert_eq!(line["outcome"], "deny");
        assert_eq!(line["method"], method);
        assert_eq!(line["path"], path);
    }

    assert_eq!(stack.upstream.count(), 0, "{:?}", stack.upstream.received());
}

/// Non-canonical paths (Envoy without `normalize_path`) are refused by the
/// pipeline's own rule (400) and never reach the upstream; canonical ones
/// with `;` parameters are allowed as they are.
#[tokio::test]
async fn http_service_non_canonical_paths_are_refused() {
    let stack = Stack::start(fixture("")).await;
    let token = stack.token("alice", &["orders:read"]);
    let mut failures = Vec::new();
    for path in [
        "/orders/7/../42",
        "/orders/./42",
        "/orders//42",
        "//orders/42",
        "/orders/%2e%2e/admin",
        "/orders%2F42",
        "/orders/..;/admin",
        "/orders/42%00",
    ] {
        let before = stack.upstream.count();
        let reply = stack.send("GET", path, Some(&token), &[]).await;
        if reply.status != 400 || stack.upstream.count() != before {
            failures.push(format!("{path}: {} {}", reply.status, reply.body));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Refused by Portcullis' rule, with its body (not by Envoy's parser).
    let reply = stack
        .send("GET", "/orders/7/../42", Some(&token), &[])
        .await;
    let body = reply.json();
    assert_eq!(body["error"], "bad_request", "{body}");
    assert_eq!(
        body["error_description"],
        "the request path is not in canonical form"
    );
    let reply = stack.send("GET", "/orders/42;v=1", Some(&token), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(stack.upstream.received()[0].path, "/orders/42;v=1");
}

/// A route in dry-run (`mode = "dry-run"` in portcullis.toml: `http_service`
/// sends no `context_extensions`): a policy deny is let through and audited
/// as a would-deny.
#[tokio::test]
async fn http_service_dry_run_lets_a_deny_through_and_audits_it() {
    let fx = fixture("");
    edit_config(
        &fx,
        "method = \"POST\"\npath = \"/orders\"\n",
        "method = \"POST\"\npath = \"/orders\"\nmode = \"dry-run\"\n",
    );
    let stack = Stack::start(fx).await;
    let reader = stack.token("alice", &["orders:read"]);
    let reply = stack.send("POST", "/orders", Some(&reader), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(stack.upstream.count(), 1);
    let audit =
        audit_line_where(&stack.fx, |l| l["method"] == "POST" && l["dry_run"] == true).await;
    assert_eq!(audit["reason"], "policy_denied", "{audit}");
    // Another route stays enforced.
    let reply = stack.send("DELETE", "/orders/1", Some(&reader), &[]).await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(stack.upstream.count(), 1);
}

// ---------------------------------------------------------------------------
// Forward auth, straight to the listener.

/// Traefik's `forwardAuth` and nginx's `auth_request`: the original request
/// in `X-Forwarded-*`, the token as the original's `Authorization`. Allowed:
/// 200 with the identity header to copy upstream. Denied: the same statuses,
/// challenge and body as through Envoy. Missing method or URI, or a path
/// outside the prefix: 400, audited. A large body: 413.
#[tokio::test]
async fn forward_auth_allows_denies_and_refuses_what_it_cannot_decide() {
    let fx = fixture("");
    edit_config(
        &fx,
        "remove_authorization = false",
        "remove_authorization = true",
    );
    let portcullis = Served::start(&fx, &[]).await;
    let listener = http_authz_addr(&portcullis);
    let reader = format!(
        "Bearer {}",
        fx.es256().token("alice", &["orders:read"], &[])
    );
    let forward = |method: &'static str, uri: &'static str, bearer: Option<String>| {
        let mut headers = vec![
            ("x-forwarded-method".to_owned(), method.to_owned()),
            ("x-forwarded-uri".to_owned(), uri.to_owned()),
            ("x-forwarded-host".to_owned(), "shop.test".to_owned()),
            ("x-forwarded-proto".to_owned(), "https".to_owned()),
            ("x-forwarded-for".to_owned(), "198.51.100.7".to_owned()),
        ];
        if let Some(bearer) = bearer {
            headers.push(("authorization".to_owned(), bearer));
        }
        async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            send(listener, "GET", "/forward-auth", &headers)
                .await
                .unwrap()
        }
    };

    let reply = forward("GET", "/orders/42?expand=lines", Some(reader.clone())).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-portcullis-subject"), Some("alice"));
    assert_eq!(
        reply.header("x-envoy-auth-headers-to-remove"),
        Some("authorization")
    );
    assert_eq!(reply.body, "");
    let line = audit_line_where(&fx, |l| l["outcome"] == "allow").await;
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/orders/42");

    let reply = forward("GET", "/orders/42", None).await;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(
        reply.header("www-authenticate"),
        Some(r#"Bearer realm="orders""#)
    );
    assert_eq!(reply.json()["error"], "unauthorized");
    assert!(reply.header("x-portcullis-subject").is_none());

    let reply = forward("DELETE", "/orders/42", Some(reader.clone())).await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(reply.json()["error"], "forbidden");

    let reply = forward("GET", "/orders/7/../admin", Some(reader.clone())).await;
    assert_eq!(reply.status, 400, "{reply:?}");

    // The client address is the last X-Forwarded-For entry, the one the
    // proxy wrote: the quickstart forbids 203.0.113.0/24.
    for (forwarded_for, status) in [
        ("10.0.0.1, 203.0.113.9", 403),
        ("203.0.113.9, 10.0.0.1", 200),
        ("::ffff:203.0.113.9", 403),
    ] {
        let reply = send(
            listener,
            "GET",
            "/forward-auth",
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/orders/42"),
                ("x-forwarded-for", forwarded_for),
                ("authorization", reader.as_str()),
            ],
        )
        .await
        .unwrap();
        assert_eq!(reply.status, status, "{forwarded_for}: {reply:?}");
    }

    // What cannot be decided: 400 through the pipeline (audited).
    let bearer = [("authorization", reader.as_str())];
    for (path, headers) in [
        ("/forward-auth", vec![("x-forwarded-uri", "/orders/42")]),
        ("/forward-auth", vec![("x-forwarded-method", "GET")]),
        (
            "/forward-auth",
            vec![
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "https://shop.test/orders/42"),
            ],
        ),
        // Neither the forward-auth path nor under Envoy's prefix.
        ("/orders/42", vec![]),
    ] {
        let headers: Vec<(&str, &str)> = headers.into_iter().chain(bearer).collect();
        let reply = send(listener, "GET", path, &headers).await.unwrap();
        assert_eq!(reply.status, 400, "{path} {headers:?}: {reply:?}");
        let body = reply.json();
        assert_eq!(body["error"], "bad_request");
        let id = body["decision_id"].as_str().unwrap().to_owned();
        let line = audit_line_where(&fx, |l| l["decision_id"] == id.as_str()).await;
        assert_eq!(line["outcome"], "deny", "{line}");
    }

    // A body beyond the limit is refused before any decision (the head
    // declares it; the answer comes before it is sent).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
    tcp.write_all(
        b"POST /forward-auth HTTP/1.1\r\nhost: x\r\nx-forwarded-method: GET\r\n\
          x-forwarded-uri: /orders/42\r\ncontent-length: 1000000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
}

// ---------------------------------------------------------------------------
// The shipped configuration.

/// The shipped `http_service` example passes `envoy --mode validate`, and
/// names the listener's path prefix and the headers Portcullis reads and
/// writes.
#[test]
fn shipped_http_service_configuration_passes_envoy_validate() {
    let path = repo_root().join("examples/envoy/envoy-http-service.yaml");
    if let Err(e) = validate(&path) {
        panic!("{} does not validate:\n{e}", path.display());
    }
    let text = std::fs::read_to_string(&path).unwrap();
    for needed in [
        "http_service:",
        "path_prefix: /authz",
        "x-envoy-auth-headers-to-remove",
        "allowed_upstream_headers",
        "x-portcullis-",
        "x-forwarded-proto",
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    ] {
        assert!(text.contains(needed), "{needed} not in {}", path.display());
    }
    // And Envoy does reject a misspelt field of it.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("envoy.yaml");
    std::fs::write(&broken, text.replace("path_prefix", "path_prefx")).unwrap();
    assert!(validate(&broken).is_err(), "a misspelt field passed");
}

/// Stopping the server stops the listener too.
#[tokio::test]
async fn the_listener_stops_with_the_server() {
    let fx = fixture("");
    let portcullis = Served::start(&fx, &[]).await;
    let listener = http_authz_addr(&portcullis);
    assert!(tokio::net::TcpStream::connect(listener).await.is_ok());
    portcullis.stop().await;
    assert!(tokio::net::TcpStream::connect(listener).await.is_err());
}
