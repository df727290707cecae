//! Shared Signals stream management, as a transmitter meets the receiver:
//! the test is the transmitter, serving over real HTTPS (a private CA) its
//! configuration metadata (`/.well-known/ssf-configuration`), the stream
//! configuration endpoint (create, read, update, replace, delete), the status,
//! add-subject, remove-subject and verification endpoints, recording what it
//! is sent and checking the management token; it answers a verification
//! request by pushing a real signed verification SET to the receiver's push
//! endpoint (or queueing it for the receiver's poll, or not at all). The
//! `portcullis ssf` commands run as the real binary; verification runs in
//! instances started by `serve::spawn`, and its outcomes are read on the
//! real `/metrics` endpoint.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::*;
use jsonwebtoken::{EncodingKey, Header};
use portcullis::admin::pb;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const RECEIVER: &str = "https://portcullis.example.test/ssf";
const PUSH_TOKEN: &str = "push-token-0123456789abcdef";
const MANAGEMENT_TOKEN: &str = "management-token-0123456789abcdef";
const STREAM_ID: &str = "stream-f00d";
const VERIFICATION: &str = "https://schemas.openid.net/secevent/ssf/event-type/verification";
const STREAM_UPDATED: &str = "https://schemas.openid.net/secevent/ssf/event-type/stream-updated";
const SESSION_REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
const ACCOUNT_PURGED: &str = "https://schemas.openid.net/secevent/risc/event-type/account-purged";
/// What `ssf create-stream` asks for, written out here: the test fails if
/// the list changes unnoticed.
const RECEIVER_EVENTS: [&str; 8] = [
    SESSION_REVOKED,
    "https://schemas.openid.net/secevent/caep/event-type/credential-change",
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled",
    ACCOUNT_PURGED,
    "https://schemas.openid.net/secevent/risc/event-type/account-credential-change-required",
    "https://schemas.openid.net/secevent/risc/event-type/sessions-revoked",
    VERIFICATION,
    STREAM_UPDATED,
];

type Instance = common::instance::AdminInstance;

static SEQ: AtomicU64 = AtomicU64::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// How the transmitter answers a verification request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Pushes the verification SET with the requested state.
    Push,
    /// Pushes a verification SET with another state.
    PushWrongState,
    /// Queues the verification SET for the receiver's next poll.
    Poll,
    /// Answers 204 and sends nothing.
    Silent,
}

/// One request the transmitter received.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    query: Option<String>,
    authorization: Option<String>,
    body: Value,
}

/// The transmitter: keys, stream state, what it was sent.
struct Transmitter {
    /// Its `iss` (of the SETs), `https://localhost:<port>`.
    issuer: String,
    /// The `issuer` its metadata names (normally `issuer`).
    metadata_issuer: Mutex<String>,
    key: TestKey,
    status: Mutex<Value>,
    answer: Mutex<Answer>,
    /// The receiver's push endpoint.
    push_url: Mutex<Option<String>>,
    /// SETs waiting for the receiver's poll, by `jti`.
    poll_queue: Mutex<Vec<(String, String)>>,
    requests: Mutex<Vec<Recorded>>,
    /// `delivery_methods_supported` of its metadata.
    delivery_methods: Mutex<Vec<&'static str>>,
    /// The event types it can deliver (`events_delivered` is the requested
    /// ones among them).
    events_supported: Mutex<Vec<String>>,
    /// The streams created at its configuration endpoint, by id.
    streams: Mutex<BTreeMap<String, Value>>,
    /// When set, the configuration endpoint answers this (status 200 or
    /// 201 as usual) instead of the stream: a broken transmitter.
    configuration_answer: Mutex<Option<String>>,
}

impl Transmitter {
    fn jwks(&self) -> Value {
        jwks_of(&[&self.key])
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.key.algorithm);
        header.kid = Some(self.key.kid().to_owned());
        header.typ = Some("secevent+jwt".to_owned());
        let encoding = EncodingKey::from_ec_pem(self.key.pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &encoding).unwrap()
    }

    /// A SET about the stream with one event, a fresh `jti`, issued now.
    fn set(&self, event_type: &str, event: Value) -> (String, String) {
        let jti = unique("set");
        let claims = json!({
            "iss": self.issuer,
            "aud": [RECEIVER],
            "iat": now(),
            "jti": jti,
            "sub_id": {"format": "opaque", "id": STREAM_ID},
            "events": { event_type: event },
        });
        (jti, self.sign(&claims))
    }

    fn base(&self) -> &str {
        &self.issuer
    }

    fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    fn metadata(&self) -> Value {
        let base = self.base();
        json!({
            "spec_version": "1_0",
            "issuer": *self.metadata_issuer.lock().unwrap(),
            "jwks_uri": format!("{base}/jwks"),
            "delivery_methods_supported": *self.delivery_methods.lock().unwrap(),
            "configuration_endpoint": format!("{base}/ssf/stream"),
            "status_endpoint": format!("{base}/ssf/status"),
            "add_subject_endpoint": format!("{base}/ssf/subjects:add"),
            "remove_subject_endpoint": format!("{base}/ssf/subjects:remove"),
            "verification_endpoint": format!("{base}/ssf/verify"),
        })
    }

    /// Delivers the verification SET answering `state`, as `answer` says.
    async fn answer_verification(self: Arc<Self>, state: String) {
        let answer = *self.answer.lock().unwrap();
        let state = match answer {
            Answer::Silent => return,
            Answer::PushWrongState => "a-state-nobody-asked-for".to_owned(),
            Answer::Push | Answer::Poll => state,
        };
        let (jti, set) = self.set(VERIFICATION, json!({"state": state}));
        if answer == Answer::Poll {
            self.poll_queue.lock().unwrap().push((jti, set));
            return;
        }
        let url = self.push_url.lock().unwrap().clone().unwrap();
        let response = reqwest::Client::new()
            .post(url)
            .bearer_auth(PUSH_TOKEN)
            .header("content-type", "application/secevent+jwt")
            .body(set)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
}

impl Transmitter {
    /// `events_delivered` for `requested`: those it supports.
    fn delivered(&self, requested: &Value) -> Value {
        let supported = self.events_supported.lock().unwrap();
        let requested = requested.as_array().cloned().unwrap_or_default();
        Value::from(
            requested
                .into_iter()
                .filter(|e| supported.iter().any(|s| e.as_str() == Some(s)))
                .collect::<Vec<_>>(),
        )
    }

    /// A stream configuration from the receiver-supplied `request`: its
    /// `delivery` echoed (the push `authorization_header` too, as some
    /// transmitters do), a poll endpoint added for poll delivery.
    fn configure(&self, stream_id: &str, request: &Value) -> Value {
        let mut delivery = request["delivery"].clone();
        if delivery["method"] == "urn:ietf:rfc:8936" {
            delivery["endpoint_url"] = json!(format!("{}/poll/{stream_id}", self.base()));
        }
        let mut stream = json!({
            "stream_id": stream_id,
            "iss": self.issuer,
            "aud": RECEIVER,
            "delivery": delivery,
            "events_supported": *self.events_supported.lock().unwrap(),
            "events_requested": request["events_requested"],
            "events_delivered": self.delivered(&request["events_requested"]),
        });
        if let Some(description) = request.get("description") {
            stream["description"] = description.clone();
        }
        stream
    }

    /// The configuration endpoint: `stream_id` is the query's.
    fn configuration(&self, method: &str, stream_id: Option<String>, request: Value) -> Response {
        // A broken transmitter answers the same whatever is asked.
        if let Some(text) = &*self.configuration_answer.lock().unwrap() {
            let status = if method == "POST" {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            return (status, text.clone()).into_response();
        }
        let answer = json_response;
        let mut streams = self.streams.lock().unwrap();
        let body_id = request["stream_id"].as_str().map(str::to_owned);
        match method {
            "POST" => {
                let id = unique("stream");
                let stream = self.configure(&id, &request);
                streams.insert(id, stream.clone());
                answer(StatusCode::CREATED, stream)
            }
            "GET" => match stream_id {
                Some(id) => match streams.get(&id) {
                    Some(stream) => answer(StatusCode::OK, stream.clone()),
                    None => StatusCode::NOT_FOUND.into_response(),
                },
                None => answer(StatusCode::OK, streams.values().cloned().collect()),
            },
            "PATCH" => match body_id.and_then(|id| streams.get_mut(&id)) {
                Some(stream) => {
                    if let Some(events) = request.get("events_requested") {
                        stream["events_requested"] = events.clone();
                        stream["events_delivered"] = self.delivered(events);
                    }
                    if let Some(description) = request.get("description") {
                        stream["description"] = description.clone();
                    }
                    answer(StatusCode::OK, stream.clone())
                }
                None => StatusCode::NOT_FOUND.into_response(),
            },
            "PUT" => match body_id {
                Some(id) if streams.contains_key(&id) => {
                    let stream = self.configure(&id, &request);
                    streams.insert(id, stream.clone());
                    answer(StatusCode::OK, stream)
                }
                _ => StatusCode::NOT_FOUND.into_response(),
            },
            "DELETE" => match stream_id.and_then(|id| streams.remove(&id)) {
                Some(_) => StatusCode::NO_CONTENT.into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            },
            _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
        }
    }
}

/// The `stream_id` of a request's query.
fn query_stream_id(uri: &Uri) -> Option<String> {
    let url = reqwest::Url::parse(&format!("https://x{uri}")).unwrap();
    url.query_pairs()
        .find(|(k, _)| k == "stream_id")
        .map(|(_, v)| v.into_owned())
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn handle(
    State(tx): State<Arc<Transmitter>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let path = uri.path().to_owned();
    tx.requests.lock().unwrap().push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: uri.query().map(str::to_owned),
        authorization: authorization.clone(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    match path.as_str() {
        "/.well-known/ssf-configuration" => return json_response(StatusCode::OK, tx.metadata()),
        "/jwks" => return json_response(StatusCode::OK, tx.jwks()),
        // The poll endpoint takes no token in these tests.
        "/poll" => {
            let sets: serde_json::Map<String, Value> = tx
                .poll_queue
                .lock()
                .unwrap()
                .drain(..)
                .map(|(jti, set)| (jti, Value::from(set)))
                .collect();
            return json_response(
                StatusCode::OK,
                json!({"sets": sets, "moreAvailable": false}),
            );
        }
        _ => {}
    }
    if authorization.as_deref() != Some(&*format!("Bearer {MANAGEMENT_TOKEN}")) {
        return json_response(StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}));
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (method.as_str(), path.as_str()) {
        (_, "/ssf/stream") => tx.configuration(method.as_str(), query_stream_id(&uri), request),
        ("GET", "/ssf/status") => json_response(StatusCode::OK, tx.status.lock().unwrap().clone()),
        ("POST", "/ssf/subjects:add") => StatusCode::OK.into_response(),
        ("POST", "/ssf/subjects:remove") => StatusCode::NO_CONTENT.into_response(),
        ("POST", "/ssf/verify") => {
            let state = request["state"].as_str().unwrap_or_default().to_owned();
            tokio::spawn(tx.clone().answer_verification(state));
            StatusCode::NO_CONTENT.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Starts a transmitter over HTTPS with a certificate of `ca`, answering
/// verification requests as `answer` says.
async fn start_transmitter(ca: &common::pki::TestCa, answer: Answer) -> Arc<Transmitter> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let tx = Arc::new(Transmitter {
        metadata_issuer: Mutex::new(issuer.clone()),
        issuer,
        key: TestKey::es256(),
        status: Mutex::new(json!({"stream_id": STREAM_ID, "status": "enabled"})),
        answer: Mutex::new(answer),
        push_url: Mutex::new(None),
        poll_queue: Mutex::new(Vec::new()),
        requests: Mutex::new(Vec::new()),
        delivery_methods: Mutex::new(vec!["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"]),
        events_supported: Mutex::new(RECEIVER_EVENTS.iter().map(|e| (*e).to_owned()).collect()),
        streams: Mutex::new(BTreeMap::new()),
        configuration_answer: Mutex::new(None),
    });
    let app = Router::new().fallback(handle).with_state(tx.clone());
    common::pki::serve_https(ca, listener, app);
    tx
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Files the `[ssf]` section names: the transmitter's JWKS and CA, the
/// push and management tokens.
struct Files {
    jwks: PathBuf,
    ca: PathBuf,
    push_token: PathBuf,
    management_token: PathBuf,
}

fn files(fx: &Fixture, tx: &Transmitter, ca: &common::pki::TestCa) -> Files {
    let files = Files {
        jwks: fx.path("transmitter-jwks.json"),
        ca: fx.path("transmitter-ca.pem"),
        push_token: fx.path("push-token"),
        management_token: fx.path("management-token"),
    };
    std::fs::write(&files.jwks, tx.jwks().to_string()).unwrap();
    std::fs::write(&files.ca, &ca.pem).unwrap();
    std::fs::write(&files.push_token, format!("{PUSH_TOKEN}\n")).unwrap();
    std::fs::write(&files.management_token, format!("{MANAGEMENT_TOKEN}\n")).unwrap();
    files
}

/// Writes `name.toml`: the fixture's configuration, a revocation data
/// folder, an admin API and an `[ssf]` section receiving from `tx` by push
/// on `push_port`, with `extra` keys and the transmitter's CA.
fn config(
    fx: &Fixture,
    tx: &Transmitter,
    ca: &common::pki::TestCa,
    name: &str,
    push_port: u16,
    extra: &str,
) -> PathBuf {
    let f = files(fx, tx, ca);
    let base = std::fs::read_to_string(fx.config_path()).unwrap();
    let text = format!(
        "{base}\n[revocation]\ndata_dir = \"data-{name}\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\
         [ssf]\nissuer = \"{}\"\naudience = \"{RECEIVER}\"\njwks_file = \"{}\"\n\
         push_listen = \"127.0.0.1:{push_port}\"\npush_token_file = \"{}\"\n\
         management_token_file = \"{}\"\n{extra}\n[ssf.remote]\nca_file = \"{}\"\n",
        tx.issuer,
        f.jwks.display(),
        f.push_token.display(),
        f.management_token.display(),
        f.ca.display(),
    );
    let path = fx.path(&format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `portcullis <args>` off the runtime (the transmitter answers on it).
async fn run(args: Vec<String>) -> (i32, String, String) {
    let output = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        portcullis(&args)
    })
    .await
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn ssf_args(command: &str, config: &std::path::Path, rest: &[&str]) -> Vec<String> {
    let mut args = vec![
        "ssf".to_owned(),
        command.to_owned(),
        "--config".to_owned(),
        path_arg(config),
    ];
    args.extend(rest.iter().map(|s| (*s).to_owned()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssf_commands_manage_the_stream_at_the_transmitter() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Silent).await;
    let path = config(
        &fx,
        &tx,
        &ca,
        "cli",
        free_port(),
        &format!("stream_id = \"{STREAM_ID}\""),
    );
    let bearer = format!("Bearer {MANAGEMENT_TOKEN}");

    // status: read from the endpoint the metadata (at the issuer's
    // well-known address: configuration_url is unset) names.
    let (code, out, err) = run(ssf_args("status", &path, &[])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), format!("stream {STREAM_ID}: enabled"));
    assert_eq!(
        tx.requests_to("/.well-known/ssf-configuration").len(),
        1,
        "metadata read once"
    );
    let status = tx.requests_to("/ssf/status");
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].method, "GET");
    assert_eq!(
        status[0].query.as_deref(),
        Some(&*format!("stream_id={STREAM_ID}"))
    );
    assert_eq!(status[0].authorization.as_deref(), Some(&*bearer));

    // A paused stream: printed with its reason, exit 1.
    *tx.status.lock().unwrap() =
        json!({"stream_id": STREAM_ID, "status": "paused", "reason": "maintenance"});
    let (code, out, _) = run(ssf_args("status", &path, &[])).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("paused") && out.contains("reason: maintenance"),
        "{out}"
    );

    // add-subject, each form of subject.
    let added = [
        (
            vec!["--email", "alice@example.test"],
            json!({"format": "email", "email": "alice@example.test"}),
            true,
        ),
        (
            vec!["--iss-sub", ISSUER, "alice", "--unverified"],
            json!({"format": "iss_sub", "iss": ISSUER, "sub": "alice"}),
            false,
        ),
        (
            vec!["--opaque", "u-42"],
            json!({"format": "opaque", "id": "u-42"}),
            true,
        ),
        (
            vec![
                "--subject-json",
                r#"{"user": {"format": "opaque", "id": "u-43"}, "tenant": {"format": "opaque", "id": "t1"}}"#,
            ],
            json!({"user": {"format": "opaque", "id": "u-43"}, "tenant": {"format": "opaque", "id": "t1"}}),
            true,
        ),
    ];
    for (args, subject, verified) in &added {
        let (code, out, err) = run(ssf_args("add-subject", &path, args)).await;
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        assert!(
            out.contains(&format!("added to stream {STREAM_ID}")),
            "{out}"
        );
        let last = tx.requests_to("/ssf/subjects:add").pop().unwrap();
        assert_eq!(last.method, "POST");
        assert_eq!(last.authorization.as_deref(), Some(&*bearer));
        assert_eq!(
            last.body,
            json!({"stream_id": STREAM_ID, "subject": subject, "verified": verified}),
            "{args:?}"
        );
    }

    // remove-subject.
    let (code, out, err) = run(ssf_args("remove-subject", &path, &["--opaque", "u-42"])).await;
    assert_eq!(code, 0, "{out}{err}");
    let removed = tx.requests_to("/ssf/subjects:remove");
    assert_eq!(removed.len(), 1);
    assert_eq!(
        removed[0].body,
        json!({"stream_id": STREAM_ID, "subject": {"format": "opaque", "id": "u-42"}})
    );
    assert_eq!(removed[0].authorization.as_deref(), Some(&*bearer));

    // verify: with a chosen state, and a fresh one.
    let (code, out, err) = run(ssf_args("verify", &path, &["--state", "s-1"])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("state s-1"), "{out}");
    let (code, out, _) = run(ssf_args("verify", &path, &[])).await;
    assert_eq!(code, 0, "{out}");
    let verify = tx.requests_to("/ssf/verify");
    assert_eq!(verify.len(), 2);
    assert_eq!(
        verify[0].body,
        json!({"stream_id": STREAM_ID, "state": "s-1"})
    );
    assert_eq!(verify[0].authorization.as_deref(), Some(&*bearer));
    let fresh = verify[1].body["state"].as_str().unwrap();
    assert_eq!(fresh.len(), 32, "{fresh}");
    assert!(out.contains(fresh), "{out}");

    // A subject that is not an identifier is refused before anything is sent.
    let before = tx.requests.lock().unwrap().len();
    let (code, _, err) = run(ssf_args(
        "add-subject",
        &path,
        &["--subject-json", r#"{"email": "a@b.test"}"#],
    ))
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("format"), "{err}");
    assert_eq!(tx.requests.lock().unwrap().len(), before);

    // A wrong management token: the transmitter's 401, explained; the token
    // itself is never printed.
    std::fs::write(fx.path("management-token"), "not-the-token-0123456789").unwrap();
    let (code, out, err) = run(ssf_args("status", &path, &[])).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("401") && err.contains("management token"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-token") && !out.contains("not-the-token"),
        "{err}"
    );
    std::fs::write(fx.path("management-token"), MANAGEMENT_TOKEN).unwrap();

    // Metadata naming another issuer: refused, no endpoint of it is called.
    *tx.metadata_issuer.lock().unwrap() = "https://impostor.example.test".to_owned();
    let before = tx.requests_to("/ssf/status").len();
    let (code, _, err) = run(ssf_args("status", &path, &[])).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("https://impostor.example.test") && err.contains("refused"),
        "{err}"
    );
    assert_eq!(tx.requests_to("/ssf/status").len(), before);
    assert!(!err.contains(MANAGEMENT_TOKEN), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_refuses_inconsistent_stream_management_settings() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Silent).await;
    let good = config(
        &fx,
        &tx,
        &ca,
        "good",
        free_port(),
        &format!("stream_id = \"{STREAM_ID}\"\nverification_interval = \"1m\""),
    );
    let (code, out, err) = run(vec!["validate".into(), "--config".into(), path_arg(&good)]).await;
    assert_eq!(code, 0, "{out}{err}");

    let cases = [
        (
            "verification_interval = \"1m\"",
            "verification_interval is set without stream_id",
        ),
        (
            "stream_id = \"s\"\nverification_interval = \"100ms\"",
            "at least 1s",
        ),
        (
            "stream_id = \"s\"\nconfiguration_url = \"http://idp.example.test/c\"",
            "configuration_url must be an https:// URL",
        ),
    ];
    for (i, (extra, expected)) in cases.iter().enumerate() {
        let path = config(&fx, &tx, &ca, &format!("bad{i}"), free_port(), extra);
        let (code, out, err) =
            run(vec!["validate".into(), "--config".into(), path_arg(&path)]).await;
        assert_eq!(code, 1, "{extra}: {out}{err}");
        assert!(err.contains(expected), "{extra}: {err}");
    }
    let empty_token = fx.path("empty-token");
    std::fs::write(&empty_token, "\n").unwrap();
    let path = config(&fx, &tx, &ca, "bad-token", free_port(), "");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &path_arg(&fx.path("management-token")),
        &path_arg(&empty_token),
    );
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run(vec!["validate".into(), "--config".into(), path_arg(&path)]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("management_token_file") && err.contains("is empty"),
        "{err}"
    );
}

/// An instance receiving from `tx` by push, asking for a verification
/// event every second (plus `extra`).
async fn verifying_instance(
    fx: &Fixture,
    tx: &Arc<Transmitter>,
    ca: &common::pki::TestCa,
    extra: &str,
) -> Instance {
    let port = free_port();
    *tx.push_url.lock().unwrap() = Some(format!("http://127.0.0.1:{port}/ssf/events"));
    let path = config(
        fx,
        tx,
        ca,
        "a",
        port,
        &format!("stream_id = \"{STREAM_ID}\"\nverification_interval = \"1s\"\n{extra}"),
    );
    Instance::start(&path, fx.path("a.audit.log")).await
}

fn verification(outcome: &str) -> String {
    format!("portcullis_ssf_events_total{{event=\"verification\",outcome=\"{outcome}\"}}")
}

/// Waits until the metric `sample` reaches `at_least`.
async fn metric_reaches(instance: &Instance, sample: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = instance.metric(sample).await;
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} is {value} after 30s, expected {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn revocations(instance: &Instance) -> Vec<pb::Revocation> {
    let request = with_bearer(pb::ListRevocationsRequest {}, ADMIN_TOKEN);
    instance
        .admin()
        .await
        .list_revocations(request)
        .await
        .unwrap()
        .into_inner()
        .revocations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_verification_event_pushed_back_is_counted_verified() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Push).await;
    let inst = verifying_instance(&fx, &tx, &ca, "").await;

    metric_reaches(&inst, &verification("verified"), 2.0).await;
    assert_eq!(inst.metric(&verification("unexpected")).await, 0.0);
    // Each request: the stream, a fresh 128-bit state, the management token.
    let requests = tx.requests_to("/ssf/verify");
    assert!(requests.len() >= 2, "{requests:?}");
    let states: Vec<&str> = requests
        .iter()
        .map(|r| r.body["state"].as_str().unwrap())
        .collect();
    for r in &requests {
        assert_eq!(r.body["stream_id"], STREAM_ID);
        assert_eq!(
            r.authorization.as_deref(),
            Some(&*format!("Bearer {MANAGEMENT_TOKEN}"))
        );
    }
    assert!(states.iter().all(|s| s.len() == 32), "{states:?}");
    assert_ne!(states[0], states[1]);
    // The metadata was read once, at the issuer's well-known address.
    assert_eq!(tx.requests_to("/.well-known/ssf-configuration").len(), 1);
    assert!(revocations(&inst).await.is_empty());
    inst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_event_with_a_wrong_state_is_unexpected_and_revokes_nothing() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::PushWrongState).await;
    let inst = verifying_instance(&fx, &tx, &ca, "").await;
    let alice = fx.es256().token("alice", &["orders:read"], &[]);

    metric_reaches(&inst, &verification("unexpected"), 1.0).await;
    // The round whose answer was wrong is missed when the next begins.
    metric_reaches(&inst, &verification("missed"), 1.0).await;
    assert_eq!(inst.metric(&verification("verified")).await, 0.0);
    assert!(revocations(&inst).await.is_empty());
    let out = outcome(
        &inst
            .server
            .check(envoy_request("GET", "/orders/1", Some(&alice)))
            .await,
    );
    assert_eq!(out.http_status, 200, "{out:?}");

    // The transmitter pauses the stream: counted, nothing revoked.
    let (_, set) = tx.set(
        STREAM_UPDATED,
        json!({"status": "paused", "reason": "maintenance"}),
    );
    let push_url = tx.push_url.lock().unwrap().clone().unwrap();
    let response = reqwest::Client::new()
        .post(push_url)
        .bearer_auth(PUSH_TOKEN)
        .header("content-type", "application/secevent+jwt")
        .body(set)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(
        inst.metric("portcullis_ssf_events_total{event=\"stream-updated\",outcome=\"paused\"}")
            .await,
        1.0
    );
    assert!(revocations(&inst).await.is_empty());
    inst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_the_transmitter_never_sends_is_counted_missed() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Silent).await;
    let inst = verifying_instance(&fx, &tx, &ca, "").await;

    metric_reaches(&inst, &verification("missed"), 2.0).await;
    assert_eq!(inst.metric(&verification("verified")).await, 0.0);
    assert_eq!(inst.metric(&verification("request_failed")).await, 0.0);
    assert!(tx.requests_to("/ssf/verify").len() >= 3);
    inst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_event_delivered_by_poll_is_counted_verified() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Poll).await;
    let poll = format!(
        "poll_url = \"{}/poll\"\npoll_interval = \"200ms\"",
        tx.base()
    );
    let inst = verifying_instance(&fx, &tx, &ca, &poll).await;
    metric_reaches(&inst, &verification("verified"), 1.0).await;
    assert_eq!(inst.metric(&verification("unexpected")).await, 0.0);
    inst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_metadata_naming_another_issuer() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Push).await;
    *tx.metadata_issuer.lock().unwrap() = "https://impostor.example.test".to_owned();
    let inst = verifying_instance(&fx, &tx, &ca, "").await;

    // Each round reads the metadata again, refuses it, and asks nothing.
    metric_reaches(&inst, &verification("request_failed"), 2.0).await;
    assert!(tx.requests_to("/.well-known/ssf-configuration").len() >= 2);
    assert!(tx.requests_to("/ssf/verify").is_empty());
    assert_eq!(inst.metric(&verification("verified")).await, 0.0);
    assert_eq!(inst.metric(&verification("missed")).await, 0.0);
    inst.stop().await;
}

/// Runs `portcullis ssf <command>` and checks that neither the management
/// token nor the push token appears in what it prints.
async fn ssf(command: &str, config: &std::path::Path, rest: &[&str]) -> (i32, String, String) {
    let (code, out, err) = run(ssf_args(command, config, rest)).await;
    for secret in [MANAGEMENT_TOKEN, PUSH_TOKEN] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{command} {rest:?} printed a token: {out}{err}"
        );
    }
    (code, out, err)
}

/// `path`'s configuration without push delivery (no `push_listen`, no
/// `push_token_file`): the receiver polls.
fn without_push(path: &std::path::Path) {
    let text: String = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("push_listen") && !l.starts_with("push_token_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
}

const PUBLIC_PUSH_URL: &str = "https://portcullis.example.test/ssf/events";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_stream_asks_for_the_receivers_events_by_push() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Silent).await;
    // The transmitter cannot deliver RISC account-purged.
    tx.events_supported
        .lock()
        .unwrap()
        .retain(|e| e != ACCOUNT_PURGED);
    let path = config(&fx, &tx, &ca, "create", free_port(), "");

    // Push delivery needs the public URL: refused before anything is sent.
    let (code, out, err) = ssf("create-stream", &path, &[]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("--push-url") && err.contains("push_listen"),
        "{err}"
    );
    let (code, _, err) = ssf(
        "create-stream",
        &path,
        &["--push-url", "http://plain.test/e"],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("https://"), "{err}");
    assert!(tx.requests.lock().unwrap().is_empty());

    let (code, out, err) = ssf(
        "create-stream",
        &path,
        &["--push-url", PUBLIC_PUSH_URL, "--description", "authz edge"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let created = tx.requests_to("/ssf/stream");
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].method, "POST");
    assert_eq!(created[0].query, None);
    assert_eq!(
        created[0].authorization.as_deref(),
        Some(&*format!("Bearer {MANAGEMENT_TOKEN}"))
    );
    assert_eq!(
        created[0].body,
        json!({
            "delivery": {
                "method": "urn:ietf:rfc:8935",
                "endpoint_url": PUBLIC_PUSH_URL,
                "authorization_header": format!("Bearer {PUSH_TOKEN}"),
            },
            "events_requested": RECEIVER_EVENTS,
            "description": "authz edge",
        })
    );
    let stream_id = tx.streams.lock().unwrap().keys().next().unwrap().clone();
    assert!(
        out.contains(&format!("created stream {stream_id}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("stream_id = \"{stream_id}\"")),
        "{out}"
    );
    assert!(out.contains(SESSION_REVOKED), "{out}");
    assert!(!out.contains("poll_url"), "{out}");
    // The one event not delivered is warned about, and only it.
    assert!(
        err.contains(&format!("will not deliver {ACCOUNT_PURGED}"))
            && err.contains("revocations of that kind will not arrive"),
        "{err}"
    );
    assert_eq!(err.matches("warning:").count(), 1, "{err}");

    // Once stream_id is set, another create-stream is refused unless --force.
    let path = config(
        &fx,
        &tx,
        &ca,
        "created",
        free_port(),
        &format!("stream_id = \"{stream_id}\""),
    );
    let (code, out, err) = ssf("create-stream", &path, &["--push-url", PUBLIC_PUSH_URL]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&stream_id) && err.contains("--force"), "{err}");
    assert_eq!(tx.requests_to("/ssf/stream").len(), 1);
    let (code, out, err) = ssf(
        "create-stream",
        &path,
        &["--push-url", PUBLIC_PUSH_URL, "--force"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tx.streams.lock().unwrap().len(), 2);
    // No description given: none sent.
    let second = tx.requests_to("/ssf/stream").pop().unwrap();
    assert!(
        second.body.get("description").is_none(),
        "{:?}",
        second.body
    );

    // A transmitter that offers only poll: push is refused before the call.
    *tx.delivery_methods.lock().unwrap() = vec!["urn:ietf:rfc:8936"];
    let (code, out, err) = ssf(
        "create-stream",
        &path,
        &["--push-url", PUBLIC_PUSH_URL, "--force"],
    )
    .await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("does not offer") && err.contains("urn:ietf:rfc:8935"),
        "{err}"
    );
    assert_eq!(tx.requests_to("/ssf/stream").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_stream_with_poll_delivery_prints_the_url_to_poll() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Silent).await;
    let path = config(&fx, &tx, &ca, "poll", free_port(), "");
    without_push(&path);

    // A push URL without push_listen: nothing would receive the pushes.
    let (code, _, err) = ssf("create-stream", &path, &["--push-url", PUBLIC_PUSH_URL]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("push_listen is not set"), "{err}");

    let (code, out, err) = ssf("create-stream", &path, &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let created = tx.requests_to("/ssf/stream");
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].body,
        json!({
            "delivery": {"method": "urn:ietf:rfc:8936"},
            "events_requested": RECEIVER_EVENTS,
        })
    );
    let stream_id = tx.streams.lock().unwrap().keys().next().unwrap().clone();
    // What is printed, exactly: the lines to paste into [ssf] last.
    let delivered: String = RECEIVER_EVENTS.iter().map(|e| format!("  {e}\n")).collect();
    assert_eq!(
        out,
        format!(
            "created stream {stream_id}\nevents delivered:\n{delivered}add to [ssf] in {}:\n\
             stream_id = \"{stream_id}\"\npoll_url = \"{}/poll/{stream_id}\"\n",
            path.display(),
            tx.base()
        )
    );
    assert!(!err.contains("warning"), "{err}");

    // A transmitter that names no URL to poll: said so, nothing to paste.
    *tx.configuration_answer.lock().unwrap() =
        Some(json!({"stream_id": "s-12", "events_delivered": RECEIVER_EVENTS}).to_string());
    let (code, out, err) = ssf("create-stream", &path, &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("poll_url"), "{out}");
    assert!(
        err.contains("gave no delivery endpoint_url to poll"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_update_and_delete_stream_manage_the_configured_stream() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Silent).await;
    let first = config(&fx, &tx, &ca, "first", free_port(), "");
    let (code, out, err) = ssf("create-stream", &first, &["--push-url", PUBLIC_PUSH_URL]).await;
    assert_eq!(code, 0, "{out}{err}");
    let stream_id = tx.streams.lock().unwrap().keys().next().unwrap().clone();
    let path = config(
        &fx,
        &tx,
        &ca,
        "managed",
        free_port(),
        &format!("stream_id = \"{stream_id}\""),
    );
    let bearer = format!("Bearer {MANAGEMENT_TOKEN}");

    // get-stream: the configuration as JSON, the echoed push authorization
    // redacted (the ssf() helper checks the token is not printed).
    let (code, out, err) = ssf("get-stream", &path, &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let printed: Value = serde_json::from_str(&out).unwrap();
    let mut expected = tx.streams.lock().unwrap()[&stream_id].clone();
    assert_eq!(
        expected["delivery"]["authorization_header"],
        format!("Bearer {PUSH_TOKEN}"),
        "the transmitter echoes it"
    );
    expected["delivery"]["authorization_header"] = json!("(redacted)");
    assert_eq!(printed, expected);
    let get = tx.requests_to("/ssf/stream").pop().unwrap();
    assert_eq!(get.method, "GET");
    assert_eq!(
        get.query.as_deref(),
        Some(&*format!("stream_id={stream_id}"))
    );
    assert_eq!(get.authorization.as_deref(), Some(&*bearer));

    // --all: every stream, no stream_id in the query.
    let (code, out, err) = ssf(
        "create-stream",
        &path,
        &["--push-url", PUBLIC_PUSH_URL, "--force"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ssf("get-stream", &path, &["--all"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let all: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().any(|s| s["stream_id"] == *stream_id));
    assert_eq!(tx.requests_to("/ssf/stream").pop().unwrap().query, None);

    // update-stream: a PATCH with only what changes; the receiver's events
    // left out are warned about.
    let (code, out, err) = ssf(
        "update-stream",
        &path,
        &[
            "--event",
            SESSION_REVOKED,
            "--event",
            VERIFICATION,
            "--description",
            "edge 2",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let patch = tx.requests_to("/ssf/stream").pop().unwrap();
    assert_eq!(patch.method, "PATCH");
    assert_eq!(patch.authorization.as_deref(), Some(&*bearer));
    assert_eq!(
        patch.body,
        json!({"stream_id": stream_id, "events_requested": [SESSION_REVOKED, VERIFICATION], "description": "edge 2"})
    );
    assert!(
        out.contains(&format!("updated stream {stream_id}")),
        "{out}"
    );
    assert!(out.contains("\"edge 2\""), "{out}");
    assert_eq!(
        err.matches("warning: the transmitter will not deliver")
            .count(),
        6,
        "{err}"
    );
    assert!(
        err.contains(&format!("will not deliver {STREAM_UPDATED}: a paused")),
        "{err}"
    );

    // --receiver-events: back to what create-stream asks for.
    let (code, out, err) = ssf("update-stream", &path, &["--receiver-events"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        tx.requests_to("/ssf/stream").pop().unwrap().body,
        json!({"stream_id": stream_id, "events_requested": RECEIVER_EVENTS})
    );
    assert!(!err.contains("warning"), "{err}");

    // --replace: a PUT of the whole configuration, the push token included
    // (a rotated token reaches the transmitter this way).
    let new_url = "https://edge-2.example.test/ssf/events";
    let (code, out, err) = ssf(
        "update-stream",
        &path,
        &["--replace", "--push-url", new_url],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let put = tx.requests_to("/ssf/stream").pop().unwrap();
    assert_eq!(put.method, "PUT");
    assert_eq!(
        put.body,
        json!({
            "stream_id": stream_id,
            "delivery": {
                "method": "urn:ietf:rfc:8935",
                "endpoint_url": new_url,
                "authorization_header": format!("Bearer {PUSH_TOKEN}"),
            },
            "events_requested": RECEIVER_EVENTS,
        })
    );

    // Nothing to change: refused by the argument parser, nothing sent.
    let before = tx.requests_to("/ssf/stream").len();
    let (code, _, err) = ssf("update-stream", &path, &[]).await;
    assert_eq!(code, 2, "{err}");

    // delete-stream needs --yes; refused before the transmitter is called.
    let (code, out, err) = ssf("delete-stream", &path, &[]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--yes") && err.contains(&stream_id), "{err}");
    assert_eq!(tx.requests_to("/ssf/stream").len(), before);
    assert!(tx.streams.lock().unwrap().contains_key(&stream_id));
    let (code, out, err) = ssf("delete-stream", &path, &["--yes"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("deleted stream {stream_id}")),
        "{out}"
    );
    assert!(out.contains("remove stream_id"), "{out}");
    let delete = tx.requests_to("/ssf/stream").pop().unwrap();
    assert_eq!(delete.method, "DELETE");
    assert_eq!(
        delete.query.as_deref(),
        Some(&*format!("stream_id={stream_id}"))
    );
    assert_eq!(delete.authorization.as_deref(), Some(&*bearer));
    assert!(!tx.streams.lock().unwrap().contains_key(&stream_id));

    // It is gone: the transmitter's 404, explained, exit 2.
    let (code, _, err) = ssf("get-stream", &path, &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("404") && err.contains("no such stream"),
        "{err}"
    );

    // --stream-id names another stream than [ssf] stream_id.
    let other = tx.streams.lock().unwrap().keys().next().unwrap().clone();
    let (code, out, err) = ssf("delete-stream", &path, &["--stream-id", &other, "--yes"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("remove stream_id"), "{out}");
    assert!(tx.streams.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stream_configurations_are_refused() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    let ca = common::pki::TestCa::new("transmitter CA");
    let tx = start_transmitter(&ca, Answer::Silent).await;
    let path = config(&fx, &tx, &ca, "malformed", free_port(), "");
    let create = ["--push-url", PUBLIC_PUSH_URL, "--force"];
    let cases = [
        ("<html>created</html>".to_owned(), "expected value"),
        (
            json!({"events_delivered": []}).to_string(),
            "stream_id is missing",
        ),
        (
            json!({"stream_id": ""}).to_string(),
            "stream_id must be a non-empty string",
        ),
        (
            json!({"stream_id": "s-9", "iss": "https://impostor.example.test"}).to_string(),
            "is not [ssf] issuer",
        ),
        (
            json!({"stream_id": "s-9", "aud": ["https://someone-else.test"]}).to_string(),
            "does not name [ssf] audience",
        ),
        (
            json!({"stream_id": "s-9", "events_delivered": "all"}).to_string(),
            "events_delivered must be an array of strings",
        ),
    ];
    for (answer, expected) in cases {
        *tx.configuration_answer.lock().unwrap() = Some(answer.clone());
        let (code, out, err) = ssf("create-stream", &path, &create).await;
        assert_eq!(code, 2, "{answer}: {out}{err}");
        assert!(
            err.contains("stream configuration: the transmitter's answer is not valid")
                && err.contains(expected),
            "{answer}: {err}"
        );
        assert!(!out.contains("created stream"), "{answer}: {out}");
    }
    // A stream refused after it was created is named, to be deleted.
    *tx.configuration_answer.lock().unwrap() =
        Some(json!({"stream_id": "s-9", "iss": "https://impostor.example.test"}).to_string());
    let (_, _, err) = ssf("create-stream", &path, &create).await;
    assert!(err.contains("(stream s-9)"), "{err}");

    // An answer without events_delivered: created, with a warning that it
    // cannot be told which events arrive.
    *tx.configuration_answer.lock().unwrap() = Some(json!({"stream_id": "s-10"}).to_string());
    let (code, out, err) = ssf("create-stream", &path, &create).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stream_id = \"s-10\""), "{out}");
    assert!(
        err.contains("does not say which events it delivers"),
        "{err}"
    );

    // get-stream of a configured stream answered with another one.
    let path = config(&fx, &tx, &ca, "other", free_port(), "stream_id = \"s-11\"");
    let (code, _, err) = ssf("get-stream", &path, &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not s-11"), "{err}");

    // A wrong management token: the 401 explained, the token not printed.
    std::fs::write(fx.path("management-token"), "not-the-token-0123456789").unwrap();
    *tx.configuration_answer.lock().unwrap() = None;
    let (code, out, err) = ssf("get-stream", &path, &["--all"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("401") && err.contains("management token"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-token") && !out.contains("not-the-token"),
        "{err}"
    );
}
