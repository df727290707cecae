//! The Shared Signals receiver, as a transmitter meets it: the test is the
//! transmitter (its own key pair and JWKS file, real signed SETs), pushing
//! over real HTTP (RFC 8935) to in-process instances started by
//! `serve::spawn`, or serving a poll endpoint over real HTTPS (RFC 8936)
//! with a private CA; the revocations are checked through the real Check RPC
//! and the admin API, and shared through a real `redis-server`.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use common::*;
use jsonwebtoken::{EncodingKey, Header};
use portcullis::admin::pb;
use redis_harness::RedisServer;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const TRANSMITTER: &str = "https://idp.example.test";
const RECEIVER: &str = "https://portcullis.example.test/ssf";
const PUSH_TOKEN: &str = "push-token-0123456789abcdef";
const POLL_TOKEN: &str = "poll-token-0123456789abcdef";
const SESSION_REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
const CREDENTIAL_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/credential-change";

type Instance = common::instance::AdminInstance;

static SEQ: AtomicU64 = AtomicU64::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// The transmitter: a key pair whose public JWKS the receiver trusts.
struct Transmitter {
    key: TestKey,
}

impl Transmitter {
    fn new() -> Transmitter {
        Transmitter {
            key: TestKey::es256(),
        }
    }

    fn jwks(&self) -> Value {
        jwks_of(&[&self.key])
    }

    /// A SET with `claims`, signed with `key` under `typ`.
    fn sign_with(key: &TestKey, typ: &str, claims: &Value) -> String {
        let mut header = Header::new(key.algorithm);
        header.kid = Some(key.kid().to_owned());
        header.typ = Some(typ.to_owned());
        let encoding = EncodingKey::from_ec_pem(key.pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &encoding).unwrap()
    }

    fn sign(&self, claims: &Value) -> String {
        Self::sign_with(&self.key, "secevent+jwt", claims)
    }

    /// The claims of a SET with one event, a fresh `jti`, issued now.
    fn claims(event_type: &str, event: Value) -> Value {
        json!({
            "iss": TRANSMITTER,
            "aud": [RECEIVER],
            "iat": now(),
            "jti": unique("set"),
            "events": { event_type: event },
        })
    }
}

fn iss_sub(sub: &str) -> Value {
    json!({"format": "iss_sub", "iss": ISSUER, "sub": sub})
}

/// A token allowed on `GET /orders/1` for `sub`, issued at `iat`.
fn token(key: &TestKey, sub: &str, iat: i64) -> (String, String) {
    let mut claims = claims(sub, &["orders:read"], &[]);
    let jti = unique("tok");
    claims["jti"] = Value::from(jti.clone());
    claims["iat"] = Value::from(iat);
    claims["exp"] = Value::from(iat + 600);
    (key.sign(&claims), jti)
}

/// Writes the instance configuration `name.toml`: the fixture's, an admin
/// API, `revocation` and `ssf` sections.
fn instance_config(fx: &Fixture, name: &str, revocation: &str, ssf: &str) -> PathBuf {
    let base = std::fs::read_to_string(fx.config_path()).unwrap();
    let text = format!(
        "{base}\n{revocation}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n{ssf}\n"
    );
    let path = fx.path(&format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// An `[ssf]` section trusting `tx`'s keys (written next to the fixture).
fn ssf_section(fx: &Fixture, tx: &Transmitter, extra: &str) -> String {
    let jwks = fx.path("transmitter-jwks.json");
    std::fs::write(&jwks, tx.jwks().to_string()).unwrap();
    format!(
        "[ssf]\nissuer = \"{TRANSMITTER}\"\naudience = \"{RECEIVER}\"\njwks_file = \"{}\"\n{extra}\n",
        jwks.display()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Push settings on a free port, with the push token in a file.
fn push_settings(fx: &Fixture) -> (String, u16) {
    let token_file = fx.path("push-token");
    std::fs::write(&token_file, format!("{PUSH_TOKEN}\n")).unwrap();
    let port = free_port();
    (
        format!(
            "push_listen = \"127.0.0.1:{port}\"\npush_token_file = \"{}\"",
            token_file.display()
        ),
        port,
    )
}

/// A pusher: an HTTP client of the push endpoint.
struct Pusher {
    url: String,
    client: reqwest::Client,
}

impl Pusher {
    fn new(port: u16) -> Pusher {
        Pusher {
            url: format!("http://127.0.0.1:{port}/ssf/events"),
            client: reqwest::Client::new(),
        }
    }

    async fn push_as(&self, token: Option<&str>, set: &str) -> (u16, Value) {
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/secevent+jwt")
            .body(set.to_owned());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn push(&self, set: &str) -> (u16, Value) {
        self.push_as(Some(PUSH_TOKEN), set).await
    }
}

async fn check(instance: &Instance, token: &str) -> Outcome {
    outcome(
        &instance
            .server
            .check(envoy_request("GET", "/orders/1", Some(token)))
            .await,
    )
}

async fn assert_allowed(instance: &Instance, token: &str) {
    let out = check(instance, token).await;
    assert_eq!(out.http_status, 200, "{out:?}");
}

fn assert_revoked(out: &Outcome) {
    assert_eq!(out.http_status, 401, "{out:?}");
    assert_eq!(out.metadata["reason"], "revoked", "{out:?}");
}

/// Polls until `token` is denied as revoked.
async fn eventually_revoked(instance: &Instance, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = check(instance, token).await;
        if out.http_status == 401 {
            assert_revoked(&out);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "token still {} after 30s",
            out.http_status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn list(instance: &Instance) -> Vec<pb::Revocation> {
    let mut request = tonic::Request::new(pb::ListRevocationsRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    instance
        .admin()
        .await
        .list_revocations(request)
        .await
        .unwrap()
        .into_inner()
        .revocations
}

/// Waits until the push endpoint accepts connections.
async fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "push endpoint never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_session_revoked_is_enforced_by_both_instances_and_a_re_login_works() {
    let redis = RedisServer::start();
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let tx = Transmitter::new();
    let (push, port) = push_settings(&fx);
    let shared = |dir: &str| {
        format!(
            "[revocation]\ndata_dir = \"{dir}\"\nredis_url = \"{}\"\nstartup = \"wait\"\n",
            redis.url()
        )
    };
    let a = Instance::start(
        &instance_config(&fx, "a", &shared("data-a"), &ssf_section(&fx, &tx, &push)),
        fx.path("a.audit.log"),
    )
    .await;
    let b = Instance::start(
        &instance_config(&fx, "b", &shared("data-b"), ""),
        fx.path("b.audit.log"),
    )
    .await;
    wait_listening(port).await;
    let pusher = Pusher::new(port);

    let now = now();
    let (before, _) = token(fx.es256(), "alice", now - 60);
    let (after, _) = token(fx.es256(), "alice", now - 5);
    let (other, _) = token(fx.es256(), "bob", now - 60);
    for t in [&before, &after, &other] {
        assert_allowed(&a, t).await;
        assert_allowed(&b, t).await;
    }

    // The user's sessions were revoked 30 s ago: tokens issued up to then are
    // refused on both instances, the one issued since (a re-login) is not.
    let claims = Transmitter::claims(
        SESSION_REVOKED,
        json!({"subject": iss_sub("alice"), "event_timestamp": now - 30}),
    );
    let set_jti = claims["jti"].as_str().unwrap().to_owned();
    let set = tx.sign(&claims);
    let (status, body) = pusher.push(&set).await;
    assert_eq!(status, 202, "{body}");
    assert_revoked(&check(&a, &before).await);
    eventually_revoked(&b, &before).await;
    assert_allowed(&a, &after).await;
    assert_allowed(&b, &after).await;
    assert_allowed(&b, &other).await;

    // The admin listing says where the revocation came from.
    let listed = list(&b).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0].reason,
        format!("ssf session-revoked jti={set_jti}")
    );

    // The same SET again (a transmitter retry): accepted, nothing new.
    let (status, _) = pusher.push(&set).await;
    assert_eq!(status, 202);
    assert_eq!(list(&a).await.len(), 1);
    assert_allowed(&a, &after).await;
    assert_eq!(
        a.metric("portcullis_ssf_events_total{event=\"session-revoked\",outcome=\"applied\"}")
            .await,
        1.0
    );

    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sets_and_pushers_are_refused_and_nothing_is_revoked() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let tx = Transmitter::new();
    let (push, port) = push_settings(&fx);
    let inst = Instance::start(
        &instance_config(
            &fx,
            "a",
            "[revocation]\ndata_dir = \"data\"",
            &ssf_section(&fx, &tx, &push),
        ),
        fx.path("a.audit.log"),
    )
    .await;
    wait_listening(port).await;
    let pusher = Pusher::new(port);
    let (alice, alice_jti) = token(fx.es256(), "alice", now() - 60);
    let revoke_alice = || {
        Transmitter::claims(
            SESSION_REVOKED,
            json!({"subject": iss_sub("alice"), "event_timestamp": now()}),
        )
    };

    // Each bad SET: 400 with the RFC 8935 error code.
    let impostor = tx.key.impostor_of();
    let mut wrong_issuer = revoke_alice();
    wrong_issuer["iss"] = json!("https://evil.example.test");
    let mut wrong_audience = revoke_alice();
    wrong_audience["aud"] = json!("https://someone-else.example.test");
    let mut no_iat = revoke_alice();
    no_iat.as_object_mut().unwrap().remove("iat");
    let mut expired = revoke_alice();
    expired["exp"] = json!(now() - 3600);
    let cases = [
        (
            "bad signature",
            Transmitter::sign_with(&impostor, "secevent+jwt", &revoke_alice()),
            "authentication_failed",
        ),
        ("wrong issuer", tx.sign(&wrong_issuer), "invalid_issuer"),
        (
            "wrong audience",
            tx.sign(&wrong_audience),
            "invalid_audience",
        ),
        (
            "wrong typ",
            Transmitter::sign_with(&tx.key, "JWT", &revoke_alice()),
            "invalid_request",
        ),
        ("no iat", tx.sign(&no_iat), "invalid_request"),
        ("expired", tx.sign(&expired), "invalid_request"),
        (
            "unknown kid",
            Transmitter::sign(
                &Transmitter {
                    key: TestKey::es256(),
                },
                &revoke_alice(),
            ),
            "invalid_key",
        ),
        ("not a JWS", "not.a-set".to_owned(), "invalid_request"),
    ];
    for (what, set, code) in cases {
        let (status, body) = pusher.push(&set).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["err"], code, "{what}: {body}");
        assert!(body["description"].is_string(), "{what}: {body}");
    }
    // `typ` with the media-type prefix is accepted (checked below: applied).
    let prefixed = Transmitter::sign_with(
        &tx.key,
        "application/secevent+jwt",
        &Transmitter::claims(
            SESSION_REVOKED,
            json!({"subject": {"format": "jwt_id", "iss": ISSUER, "jti": "some-other-token"}}),
        ),
    );

    // Pushers without the push token: 401, the SET is not even read.
    let good = tx.sign(&revoke_alice());
    let (status, _) = pusher.push_as(None, &good).await;
    assert_eq!(status, 401);
    let (status, _) = pusher.push_as(Some("wrong-token"), &good).await;
    assert_eq!(status, 401);

    // Wrong content type, method, path.
    let client = reqwest::Client::new();
    let response = client
        .post(&pusher.url)
        .bearer_auth(PUSH_TOKEN)
        .header("content-type", "application/json")
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = client.get(&pusher.url).send().await.unwrap();
    assert_eq!(response.status(), 405);
    let response = client
        .post(format!("http://127.0.0.1:{port}/elsewhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // Events acknowledged with nothing to revoke: an unknown event type, a
    // verification event, a subject by e-mail address.
    let unknown = Transmitter::claims(
        "https://schemas.openid.net/secevent/caep/event-type/token-claims-change",
        json!({"subject": iss_sub("alice")}),
    );
    let verification = Transmitter::claims(
        "https://schemas.openid.net/secevent/ssf/event-type/verification",
        json!({"state": "abc"}),
    );
    let by_email = Transmitter::claims(
        SESSION_REVOKED,
        json!({"subject": {"format": "email", "email": "alice@example.test"}}),
    );
    for claims in [unknown, verification, by_email] {
        let (status, body) = pusher.push(&tx.sign(&claims)).await;
        assert_eq!(status, 202, "{body}");
    }

    // Nothing was revoked: alice's token is still allowed, nothing listed.
    assert_allowed(&inst, &alice).await;
    assert!(list(&inst).await.is_empty());
    assert_eq!(
        inst.metric("portcullis_ssf_events_total{event=\"unverified\",outcome=\"refused\"}")
            .await,
        8.0
    );
    assert_eq!(
        inst.metric("portcullis_ssf_events_total{event=\"other\",outcome=\"ignored\"}")
            .await,
        1.0
    );

    // The prefixed typ is accepted; a jwt_id subject revokes that one token.
    let (status, body) = pusher.push(&prefixed).await;
    assert_eq!(status, 202, "{body}");
    let listed = list(&inst).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_allowed(&inst, &alice).await;
    let by_jti = Transmitter::claims(
        CREDENTIAL_CHANGE,
        json!({"subject": {"format": "jwt_id", "iss": ISSUER, "jti": alice_jti}}),
    );
    let (status, _) = pusher.push(&tx.sign(&by_jti)).await;
    assert_eq!(status, 202);
    assert_revoked(&check(&inst, &alice).await);

    inst.stop().await;
}

/// The transmitter's poll endpoint: what it was asked, what it serves next.
#[derive(Default)]
struct PollEndpoint {
    requests: Mutex<Vec<(Option<String>, Value)>>,
    queue: Mutex<Vec<(String, String)>>,
}

async fn poll_handler(
    State(endpoint): State<Arc<PollEndpoint>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    endpoint.requests.lock().unwrap().push((auth, body));
    let sets: serde_json::Map<String, Value> = endpoint
        .queue
        .lock()
        .unwrap()
        .drain(..)
        .map(|(jti, set)| (jti, Value::from(set)))
        .collect();
    axum::Json(json!({"sets": sets, "moreAvailable": false}))
}

/// Serves `endpoint` at `POST /poll` over HTTPS with a certificate of `ca`.
async fn serve_poll(endpoint: Arc<PollEndpoint>, ca: &common::pki::TestCa) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new()
        .route("/poll", post(poll_handler))
        .with_state(endpoint);
    common::pki::serve_https(ca, listener, app);
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_sets_are_applied_and_acknowledged_in_the_next_poll() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let tx = Transmitter::new();
    let ca = common::pki::TestCa::new("transmitter CA");
    let ca_file = fx.path("transmitter-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let token_file = fx.path("poll-token");
    std::fs::write(&token_file, POLL_TOKEN).unwrap();

    let now = now();
    let (carol, _) = token(fx.es256(), "carol", now - 60);
    let (dave, dave_jti) = token(fx.es256(), "dave", now - 60);
    let (dave_other, _) = token(fx.es256(), "dave", now - 60);
    let first = Transmitter::claims(
        SESSION_REVOKED,
        json!({"subject": iss_sub("carol"), "event_timestamp": now - 30}),
    );
    let second = Transmitter::claims(
        CREDENTIAL_CHANGE,
        json!({
            "subject": {"format": "jwt_id", "iss": ISSUER, "jti": dave_jti},
            "credential_type": "password",
            "change_type": "update",
        }),
    );
    let jtis: Vec<String> = [&first, &second]
        .iter()
        .map(|c| c["jti"].as_str().unwrap().to_owned())
        .collect();
    let endpoint = Arc::new(PollEndpoint::default());
    endpoint.queue.lock().unwrap().extend([
        (jtis[0].clone(), tx.sign(&first)),
        (jtis[1].clone(), tx.sign(&second)),
    ]);
    let port = serve_poll(endpoint.clone(), &ca).await;

    let poll = format!(
        "poll_url = \"https://127.0.0.1:{port}/poll\"\npoll_token_file = \"{}\"\npoll_interval = \"200ms\"\npoll_max_events = 10\n[ssf.remote]\nca_file = \"{}\"",
        token_file.display(),
        ca_file.display()
    );
    let inst = Instance::start(
        &instance_config(
            &fx,
            "a",
            "[revocation]\ndata_dir = \"data\"",
            &ssf_section(&fx, &tx, &poll),
        ),
        fx.path("a.audit.log"),
    )
    .await;

    // Both SETs are applied...
    eventually_revoked(&inst, &carol).await;
    eventually_revoked(&inst, &dave).await;
    assert_allowed(&inst, &dave_other).await;

    // ...and a later poll acknowledges both, with the bearer token.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let requests = endpoint.requests.lock().unwrap().clone();
        let acked = requests.iter().find(|(_, body)| {
            let ack = body["ack"].as_array().cloned().unwrap_or_default();
            jtis.iter().all(|j| ack.contains(&Value::from(j.clone())))
        });
        if let Some((auth, body)) = acked {
            assert_eq!(auth.as_deref(), Some(&*format!("Bearer {POLL_TOKEN}")));
            assert_eq!(body["maxEvents"], 10);
            assert_eq!(body["returnImmediately"], true);
            // The first request acknowledged nothing.
            assert_eq!(requests[0].1["ack"], json!([]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no poll acknowledged both SETs: {requests:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reasons: Vec<String> = list(&inst).await.into_iter().map(|r| r.reason).collect();
    assert!(
        reasons.contains(&format!("ssf credential-change jti={}", jtis[1])),
        "{reasons:?}"
    );

    inst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_an_unusable_ssf_section_listing_every_problem() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let tx = Transmitter::new();
    let section = ssf_section(
        &fx,
        &tx,
        "jwks_uri = \"http://idp.example.test/jwks\"\npoll_url = \"http://idp.example.test/poll\"\nalgorithms = [\"HS256\"]",
    );
    let path = instance_config(&fx, "bad", "[revocation]\ndata_dir = \"data\"", &section);
    let config = portcullis::config::Config::load(&path).unwrap();
    let problems = portcullis::ssf::validate(config.ssf.as_ref().unwrap());
    let text = problems.join("\n");
    for expected in [
        "exactly one of jwks_file and jwks_uri",
        "\"HS256\" is not accepted",
        "poll_url must be an https:// URL",
    ] {
        assert!(text.contains(expected), "{expected:?} not in {text}");
    }
    let (_, _, task) = portcullis::serve::spawn(config).await.unwrap();
    let error = task.await.unwrap().unwrap_err().to_string();
    assert!(error.contains("invalid [ssf] configuration"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_the_store_cannot_take_is_answered_503_for_the_transmitter_to_retry() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let tx = Transmitter::new();
    let (push, port) = push_settings(&fx);
    let inst = Instance::start(
        &instance_config(
            &fx,
            "a",
            "[revocation]\ndata_dir = \"data\"\nmax_entries = 1",
            &ssf_section(&fx, &tx, &push),
        ),
        fx.path("a.audit.log"),
    )
    .await;
    wait_listening(port).await;
    let pusher = Pusher::new(port);
    let (bob, _) = token(fx.es256(), "bob", now() - 60);
    let revoke = |sub: &str| {
        tx.sign(&Transmitter::claims(
            SESSION_REVOKED,
            json!({"subject": iss_sub(sub), "event_timestamp": now()}),
        ))
    };
    let (status, body) = pusher.push(&revoke("alice")).await;
    assert_eq!(status, 202, "{body}");
    // The store is full: not applied, not acknowledged (503); a retry of the
    // same SET gets the same answer while the store stays full.
    let bob_set = revoke("bob");
    for _ in 0..2 {
        let (status, _) = pusher.push(&bob_set).await;
        assert_eq!(status, 503);
    }
    assert_allowed(&inst, &bob).await;
    assert_eq!(list(&inst).await.len(), 1);
    inst.stop().await;
}
