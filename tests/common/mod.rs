//! Shared fixtures for the behaviour tests: keys generated here, a temporary
//! configuration around the shipped quickstart policies, the real server on an
//! ephemeral loopback port, and a real gRPC client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address as EnvoyAddress, HeaderMap, HeaderValue, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use jsonwebtoken::Algorithm;
use portcullis::audit::AuditLog;
use portcullis::authn::mint::{SigningKey, pkcs8_pem};
use portcullis::config::Config;
use portcullis::engine::Engine;
use portcullis::server::{self, RunningServer};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// Issuer and audience of the test configuration (as in the quickstart).
pub const ISSUER: &str = "https://auth.example.test";
pub const AUDIENCE: &str = "orders-api";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A freshly generated key pair, its PEM and its signer.
pub struct TestKey {
    pub pem: String,
    pub signer: SigningKey,
    pub algorithm: Algorithm,
}

impl TestKey {
    pub fn es256() -> TestKey {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        Self::from_pkcs8(doc.as_ref(), Algorithm::ES256, None)
    }

    pub fn ed25519() -> TestKey {
        let doc = Ed25519KeyPair::generate_pkcs8v1(&SystemRandom::new()).unwrap();
        Self::from_pkcs8(doc.as_ref(), Algorithm::EdDSA, None)
    }

    pub fn rs256() -> TestKey {
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().unwrap();
        Self::from_pkcs8(der.as_ref(), Algorithm::RS256, None)
    }

    /// Same algorithm, new key material, but claiming `kid`: an attacker's key.
    pub fn impostor_of(&self) -> TestKey {
        let fresh = match self.algorithm {
            Algorithm::ES256 => TestKey::es256(),
            Algorithm::EdDSA => TestKey::ed25519(),
            _ => TestKey::rs256(),
        };
        Self::from_pkcs8_pem(&fresh.pem, self.algorithm, Some(self.kid().to_owned()))
    }

    fn from_pkcs8(der: &[u8], algorithm: Algorithm, kid: Option<String>) -> TestKey {
        Self::from_pkcs8_pem(&pkcs8_pem(der), algorithm, kid)
    }

    fn from_pkcs8_pem(pem: &str, algorithm: Algorithm, kid: Option<String>) -> TestKey {
        let signer = SigningKey::from_pem(pem.as_bytes(), algorithm, kid).unwrap();
        TestKey {
            pem: pem.to_owned(),
            signer,
            algorithm,
        }
    }

    pub fn kid(&self) -> &str {
        self.signer.kid()
    }

    pub fn public_jwk(&self) -> Value {
        serde_json::to_value(&self.signer.public_jwks().keys[0]).unwrap()
    }

    /// Signs `claims` as they are.
    pub fn sign(&self, claims: &Value) -> String {
        self.signer.sign_claims(claims).unwrap()
    }

    /// A valid token for `sub` with scopes and roles, issued now for 10 minutes.
    pub fn token(&self, sub: &str, scopes: &[&str], roles: &[&str]) -> String {
        self.sign(&claims(sub, scopes, roles))
    }
}

/// Standard valid claims.
pub fn claims(sub: &str, scopes: &[&str], roles: &[&str]) -> Value {
    let now = now();
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": now + 600,
        "jti": format!("jti-{sub}-{now}"),
        "scope": scopes.join(" "),
        "roles": roles,
    })
}

/// A temporary deployment: config, JWKS and a copy of the quickstart policies.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub keys: Vec<TestKey>,
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Fixture {
    /// ES256, RS256 and EdDSA keys of one issuer; quickstart routes and policies.
    pub fn new() -> Fixture {
        Self::with_keys(vec![TestKey::es256(), TestKey::rs256(), TestKey::ed25519()])
    }

    pub fn with_keys(keys: Vec<TestKey>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let jwks = json!({ "keys": keys.iter().map(TestKey::public_jwk).collect::<Vec<_>>() });
        std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        let shipped = repo_root().join("examples/quickstart/policies");
        for entry in std::fs::read_dir(shipped).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, policies.join(path.file_name().unwrap())).unwrap();
            }
        }
        let config =
            std::fs::read_to_string(repo_root().join("examples/quickstart/portcullis.toml"))
                .unwrap()
                .replace("127.0.0.1:9191", "127.0.0.1:0");
        std::fs::write(dir.path().join("portcullis.toml"), config).unwrap();
        Fixture { dir, keys }
    }

    pub fn es256(&self) -> &TestKey {
        &self.keys[0]
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("portcullis.toml")
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path()).unwrap()
    }

    pub fn audit_path(&self) -> PathBuf {
        self.path("audit.log")
    }

    /// Starts the real server with an engine loaded from this fixture.
    pub async fn serve(&self) -> TestServer {
        let running = self.serve_unloaded().await;
        let engine = Engine::from_config(&self.config()).unwrap();
        running.state().install(engine).await;
        TestServer::connect(running).await
    }

    /// Starts the real server without an engine (health NOT_SERVING).
    pub async fn serve_unloaded(&self) -> RunningServer {
        let audit = AuditLog::file(&self.audit_path()).unwrap();
        server::start("127.0.0.1:0".parse().unwrap(), audit)
            .await
            .unwrap()
    }

    /// All audit lines written so far.
    pub fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The audit line of one decision.
    pub fn audit_line(&self, decision_id: &str) -> Value {
        self.audit_lines()
            .into_iter()
            .find(|l| l["decision_id"] == decision_id)
            .unwrap_or_else(|| panic!("no audit line for decision {decision_id}"))
    }
}

pub struct TestServer {
    pub running: RunningServer,
    pub client: AuthorizationClient<Channel>,
    pub channel: Channel,
}

impl TestServer {
    pub async fn connect(running: RunningServer) -> TestServer {
        let channel = Channel::from_shared(format!("http://{}", running.local_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        TestServer {
            client: AuthorizationClient::new(channel.clone()),
            channel,
            running,
        }
    }

    pub async fn check(&self, request: CheckRequest) -> CheckResponse {
        self.client
            .clone()
            .check(request)
            .await
            .expect("Check RPC succeeds")
            .into_inner()
    }
}

/// A request as Envoy builds it: method, path, host, scheme, headers, peer address.
pub fn envoy_request(method: &str, path: &str, token: Option<&str>) -> CheckRequest {
    let mut headers = std::collections::HashMap::new();
    headers.insert(":method".to_owned(), method.to_owned());
    headers.insert(":path".to_owned(), path.to_owned());
    headers.insert(":authority".to_owned(), "orders.example.test".to_owned());
    if let Some(token) = token {
        headers.insert("authorization".to_owned(), format!("Bearer {token}"));
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.1.2.3")),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "req-1".into(),
                    method: method.into(),
                    path: path.into(),
                    host: "orders.example.test".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

pub fn peer(ip: &str) -> Peer {
    Peer {
        address: Some(EnvoyAddress {
            address: Some(Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(PortSpecifier::PortValue(40000)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// The HTTP attributes of a request built by [`envoy_request`], to edit.
pub fn http_mut(request: &mut CheckRequest) -> &mut HttpRequest {
    request
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("a request with HTTP attributes")
}

/// The same request with Envoy's `encode_raw_headers: true`: headers only in
/// `header_map`, values as raw bytes.
pub fn raw_header_request(method: &str, path: &str, token: &str) -> CheckRequest {
    let mut request = envoy_request(method, path, None);
    let http = http_mut(&mut request);
    http.headers.clear();
    http.header_map = Some(HeaderMap {
        headers: vec![
            raw(":method", method),
            raw(":path", path),
            raw("authorization", &format!("Bearer {token}")),
        ],
    });
    request
}

fn raw(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.into(),
        raw_value: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// What a test asserts about a response.
#[derive(Debug)]
pub struct Outcome {
    pub grpc_code: i32,
    pub http_status: i32,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub metadata: Value,
    pub decision_id: String,
    pub ok_headers_to_remove: Vec<String>,
    /// On allow: headers added to the upstream's response for the client
    /// (`response_headers_to_add`).
    pub ok_response_headers: Vec<(String, String)>,
}

impl Outcome {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub fn outcome(response: &CheckResponse) -> Outcome {
    let grpc_code = response.status.as_ref().map(|s| s.code).unwrap_or(-1);
    let metadata = response
        .dynamic_metadata
        .as_ref()
        .map(struct_to_json)
        .unwrap_or(Value::Null);
    let decision_id = metadata["decision_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let header_pairs =
        |headers: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
            headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| (h.key.clone(), h.value.clone()))
                .collect::<Vec<_>>()
        };
    match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => Outcome {
            grpc_code,
            http_status: 200,
            headers: header_pairs(&ok.headers),
            body: Value::Null,
            metadata,
            decision_id,
            ok_headers_to_remove: ok.headers_to_remove.clone(),
            ok_response_headers: header_pairs(&ok.response_headers_to_add),
        },
        Some(HttpResponse::DeniedResponse(denied)) => Outcome {
            grpc_code,
            http_status: denied.status.as_ref().map(|s| s.code).unwrap_or(-1),
            headers: header_pairs(&denied.headers),
            body: serde_json::from_str(&denied.body).unwrap_or(Value::Null),
            metadata,
            decision_id,
            ok_headers_to_remove: Vec::new(),
            ok_response_headers: Vec::new(),
        },
        other => panic!("unexpected http_response {other:?}"),
    }
}

fn struct_to_json(s: &envoy_types::pb::google::protobuf::Struct) -> Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    fn value(v: &envoy_types::pb::google::protobuf::Value) -> Value {
        match &v.kind {
            Some(Kind::StringValue(s)) => json!(s),
            Some(Kind::NumberValue(n)) => json!(n),
            Some(Kind::BoolValue(b)) => json!(b),
            Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value).collect()),
            Some(Kind::StructValue(s)) => struct_to_json(s),
            _ => Value::Null,
        }
    }
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value(v)))
            .collect(),
    )
}

/// Runs the `portcullis` binary built for these tests.
pub fn portcullis(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .unwrap()
}

pub fn path_arg(p: &Path) -> String {
    p.display().to_string()
}
pub mod dpop;
pub mod envoy;
pub mod idp;
pub mod instance;
pub mod otlp;
pub mod pki;
pub mod served;
pub mod upstream;

impl Fixture {
    /// Appends TOML to the configuration.
    pub fn append_config(&self, text: &str) {
        let mut config = std::fs::read_to_string(self.config_path()).unwrap();
        config.push_str(text);
        std::fs::write(self.config_path(), config).unwrap();
    }

    /// Starts the real server with the engine's background work (remote key
    /// refresh, API key watch) running, and installs the engine once ready, as
    /// `portcullis serve` does.
    pub async fn serve_with_background(&self) -> (TestServer, Vec<tokio::task::JoinHandle<()>>) {
        let running = self.serve_unloaded().await;
        let engine = Engine::from_config(&self.config()).unwrap();
        let tasks = engine.authenticator().spawn_background();
        wait_for("engine ready", || engine.authenticator().is_ready()).await;
        running.state().install(engine).await;
        (TestServer::connect(running).await, tasks)
    }
}

/// Polls `condition` until it holds; panics after a generous deadline (this is
/// a wait for an event, not a timing assertion).
pub async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..600 {
        if condition() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A JWKS document holding the public keys of `keys`.
pub fn jwks_of(keys: &[&TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() })
}

/// Adds `idp` as an issuer found by OpenID Connect discovery: `extra` goes
/// in its `[[issuers]]` table, `remote` in its `[issuers.remote]` table.
pub fn add_discovery_issuer(fx: &Fixture, idp: &idp::TestIdp, remote: &str, extra: &str) {
    fx.append_config(&format!(
        r#"
[[issuers]]
issuer = "{}"
audiences = ["orders-api"]
discovery = true
{extra}
[issuers.remote]
ca_file = "{}"
{remote}
"#,
        idp.issuer(),
        idp.ca_file().display()
    ));
}

/// Takes `idp` down and adds it as a second issuer with a remote JWKS, so
/// `serve` stays NOT_SERVING, waiting for every issuer's keys, until the IdP
/// comes back.
pub fn waiting_for_keys(fx: &Fixture, idp: &idp::TestIdp) {
    idp.set_down(true);
    fx.append_config(&format!(
        r#"
[[issuers]]
issuer = "{}"
audiences = ["orders-api"]
jwks_uri = "{}"
[issuers.remote]
ca_file = "{}"
refresh_min = "1s"
"#,
        idp.issuer(),
        idp.jwks_uri(),
        idp.ca_file().display()
    ));
}

/// What gRPC health says of `service` over `channel` (1 SERVING, 2 NOT_SERVING).
pub async fn health_of(channel: &Channel, service: &str) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Failed key fetches of `engine`'s (first) remote issuer.
pub fn remote_fetch_failures(engine: &Engine) -> u64 {
    engine
        .authenticator()
        .issuers()
        .iter()
        .find(|i| i.keys.is_remote())
        .unwrap()
        .keys
        .stats
        .failures
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Polls gRPC health (the whole server) until it reports `status`.
pub async fn wait_for_health(channel: &Channel, status: i32) {
    for _ in 0..600 {
        if health_of(channel, "").await == status {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("health never became {status}");
}

/// The body of `GET /metrics` from the metrics endpoint at `addr`.
pub async fn scrape_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// `message` as a gRPC request bearing `token` (the admin API's credential).
pub fn with_bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}
