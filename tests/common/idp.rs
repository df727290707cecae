//! A real HTTPS identity provider, served by the test itself on loopback.
//!
//! [`TestIdp::start`] makes a throw-away CA and a server certificate for
//! `127.0.0.1` and `localhost` signed by it (rcgen), writes the CA certificate to
//! a temporary PEM file ([`TestIdp::ca_file`], what a client's `ca_file` should
//! name), and serves over TLS (rustls with the aws-lc-rs provider, HTTP/1.1 and
//! HTTP/2 by ALPN) on `127.0.0.1:<ephemeral port>`:
//!
//! - `GET /.well-known/openid-configuration`: `issuer`, `jwks_uri`,
//!   `introspection_endpoint` (or whatever [`TestIdp::set_discovery`] says);
//! - `GET /jwks`: the document set by [`TestIdp::set_jwks`] (initially
//!   `{"keys": []}`), with `Cache-Control: max-age=N` if [`TestIdp::set_max_age`]
//!   gave one;
//! - `POST /introspect` (RFC 7662): form body `token=...`; answers the JSON set by
//!   [`TestIdp::set_introspection`] for that token, `{"active": false}` for any
//!   other, `400 {"error": "invalid_request"}` without a token. Once
//!   [`TestIdp::set_client_credentials`] is called it requires HTTP Basic with
//!   exactly those credentials (`base64(id:secret)`, no form-encoding), else
//!   `401 {"error": "invalid_client"}` with `WWW-Authenticate: Basic`.
//!
//! - `GET /statuslists/<name>`: the Status List Token set by
//!   [`TestIdp::set_status_list`] (`404` until then), as
//!   `application/statuslist+jwt`; [`TestIdp::status_list_uri`] is its URI.
//!
//! Faults: [`TestIdp::set_down`] makes every endpoint answer `503`;
//! [`TestIdp::set_delay`] delays every answer (for client timeouts);
//! [`TestIdp::set_padding`] pads one endpoint's (otherwise valid) JSON answer
//! to a given size and streams it without `Content-Length` (for body limits).
//! Counters ([`TestIdp::jwks_fetches`], [`TestIdp::introspection_calls`],
//! [`TestIdp::discovery_fetches`]) count requests that reached the endpoint,
//! including those answered `503` or `401`;
//! [`TestIdp::max_introspections_in_flight`] is the most `/introspect`
//! requests ever being answered at the same time (delay included).
//!
//! The server runs on the test's Tokio runtime and stops when the `TestIdp` is
//! dropped. Only `127.0.0.1` is ever bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// What the endpoints serve next, and how they misbehave.
#[derive(Default)]
struct Settings {
    jwks: Option<Value>,
    max_age: Option<u64>,
    down: bool,
    delay: Option<Duration>,
    discovery: Option<Value>,
    introspection: HashMap<String, Value>,
    client_credentials: Option<(String, String)>,
    padding: HashMap<Endpoint, usize>,
    status_lists: HashMap<String, String>,
    status_lists_down: bool,
    status_list_accept: Option<String>,
}

/// One endpoint of the IdP, for [`TestIdp::set_padding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /.well-known/openid-configuration`.
    Discovery,
    /// `GET /jwks`.
    Jwks,
    /// `POST /introspect`.
    Introspection,
}

struct Shared {
    issuer: String,
    settings: Mutex<Settings>,
    jwks_fetches: AtomicUsize,
    introspection_calls: AtomicUsize,
    introspections_in_flight: AtomicUsize,
    max_introspections_in_flight: AtomicUsize,
    discovery_fetches: AtomicUsize,
    status_list_fetches: AtomicUsize,
}

/// One `/introspect` request being answered; leaving (even when the client
/// hangs up and the handler is dropped) lowers the in-flight count.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(idp: &'a Shared) -> InFlight<'a> {
        let now = idp.introspections_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        idp.max_introspections_in_flight
            .fetch_max(now, Ordering::SeqCst);
        InFlight(idp)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .introspections_in_flight
            .fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the configured delay, then says whether the IdP is down.
    async fn is_down(&self) -> bool {
        let delay = self.settings().delay;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        self.settings().down
    }
}

/// A loopback HTTPS identity provider: OIDC discovery, JWKS, RFC 7662
/// introspection. See the module documentation.
pub struct TestIdp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
    server: JoinHandle<()>,
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestIdp {
    /// Starts the IdP on `127.0.0.1:0` with a fresh CA and server certificate.
    pub async fn start() -> TestIdp {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca_pem, cert_der, key_der) = certificates();
        let ca_file = dir.path().join("idp-ca.pem");
        std::fs::write(&ca_file, ca_pem).expect("write CA file");

        // The provider is chosen here rather than from the process default, so this
        // works whatever rustls crypto features the build unifies to.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert_der], key_der)
            .expect("server certificate");
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            issuer: format!("https://{addr}"),
            settings: Mutex::new(Settings::default()),
            jwks_fetches: AtomicUsize::new(0),
            introspection_calls: AtomicUsize::new(0),
            introspections_in_flight: AtomicUsize::new(0),
            max_introspections_in_flight: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
            status_list_fetches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/introspect", post(introspect))
            .route("/statuslists/{name}", get(status_list))
            .with_state(shared.clone());

        let server = tokio::spawn(async move {
            // Connections live in this set, so aborting the server (on drop) also
            // closes kept-alive connections: a dropped IdP answers nobody.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let Ok((tcp, _peer)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });

        TestIdp {
            addr,
            shared,
            ca_file,
            _dir: dir,
            server,
        }
    }

    /// The socket address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>`, also the `issuer` of the discovery document.
    pub fn issuer(&self) -> String {
        self.shared.issuer.clone()
    }

    /// `<issuer>/.well-known/openid-configuration`.
    pub fn discovery_uri(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.shared.issuer)
    }

    /// `<issuer>/jwks`.
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.shared.issuer)
    }

    /// `<issuer>/introspect`.
    pub fn introspection_uri(&self) -> String {
        format!("{}/introspect", self.shared.issuer)
    }

    /// PEM file of the CA that signed the server certificate: the one root a
    /// client must trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// What `GET /jwks` serves next.
    pub fn set_jwks(&self, jwks: Value) {
        self.shared.settings().jwks = Some(jwks);
    }

    /// `Cache-Control: public, max-age=<secs>` on `/jwks` (`None`: no header).
    pub fn set_max_age(&self, secs: Option<u64>) {
        self.shared.settings().max_age = secs;
    }

    /// While `true`, every endpoint answers `503 Service Unavailable`.
    pub fn set_down(&self, down: bool) {
        self.shared.settings().down = down;
    }

    /// Every answer waits this long first (`None`: no delay).
    pub fn set_delay(&self, delay: Option<Duration>) {
        self.shared.settings().delay = delay;
    }

    /// While `Some(bytes)`, `endpoint`'s successful JSON answer gets a
    /// `"padding"` member that makes it at least `bytes` long, and is streamed
    /// in 16 KiB chunks without `Content-Length`: still valid JSON with the
    /// same meaning, only too large.
    pub fn set_padding(&self, endpoint: Endpoint, bytes: Option<usize>) {
        let mut settings = self.shared.settings();
        match bytes {
            Some(bytes) => settings.padding.insert(endpoint, bytes),
            None => settings.padding.remove(&endpoint),
        };
    }

    /// Replaces the discovery document (`None`: the default one, naming this IdP's
    /// own endpoints), e.g. to serve a mismatched `issuer`.
    pub fn set_discovery(&self, document: Option<Value>) {
        self.shared.settings().discovery = document;
    }

    /// Requests that reached `GET /jwks`, whatever the answer.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Requests that reached the discovery document, whatever the answer.
    pub fn discovery_fetches(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }

    /// The RFC 7662 answer for `token` (e.g. `{"active": true, "sub": ..., "exp": ...}`).
    pub fn set_introspection(&self, token: &str, response: Value) {
        self.shared
            .settings()
            .introspection
            .insert(token.to_owned(), response);
    }

    /// Requests that reached `POST /introspect`, whatever the answer.
    pub fn introspection_calls(&self) -> usize {
        self.shared.introspection_calls.load(Ordering::SeqCst)
    }

    /// The most `POST /introspect` requests ever answered at the same time.
    pub fn max_introspections_in_flight(&self) -> usize {
        self.shared
            .max_introspections_in_flight
            .load(Ordering::SeqCst)
    }

    /// `<issuer>/statuslists/<name>`: where [`TestIdp::set_status_list`]'s
    /// token for `name` is served.
    pub fn status_list_uri(&self, name: &str) -> String {
        format!("{}/statuslists/{name}", self.shared.issuer)
    }

    /// What `GET /statuslists/<name>` serves next (`None`: `404`).
    pub fn set_status_list(&self, name: &str, token: Option<String>) {
        let mut settings = self.shared.settings();
        match token {
            Some(token) => settings.status_lists.insert(name.to_owned(), token),
            None => settings.status_lists.remove(name),
        };
    }

    /// While `true`, only the status-list endpoint answers `503`.
    pub fn set_status_lists_down(&self, down: bool) {
        self.shared.settings().status_lists_down = down;
    }

    /// Requests that reached `GET /statuslists/<name>`, whatever the answer.
    pub fn status_list_fetches(&self) -> usize {
        self.shared.status_list_fetches.load(Ordering::SeqCst)
    }

    /// The `Accept` header of the last status-list request.
    pub fn status_list_accept(&self) -> Option<String> {
        self.shared.settings().status_list_accept.clone()
    }

    /// From now on `/introspect` requires HTTP Basic with these credentials.
    pub fn set_client_credentials(&self, id: &str, secret: &str) {
        self.shared.settings().client_credentials = Some((id.to_owned(), secret.to_owned()));
    }
}

/// A CA certificate (PEM) and a server certificate for `127.0.0.1` and
/// `localhost` signed by it (DER), with the server's private key.
fn certificates() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Portcullis test IdP CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let ca = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("server key");
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
    server_params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let server_cert = server_params
        .signed_by(&server_key, &ca)
        .expect("server certificate");

    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    (ca_cert.pem(), server_cert.der().clone(), key_der)
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        "identity provider is down\n",
    )
        .into_response()
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// `body` as JSON, padded (see [`TestIdp::set_padding`]) when `padding` says so.
fn padded_json(status: StatusCode, mut body: Value, padding: Option<usize>) -> Response {
    let Some(bytes) = padding else {
        return json_response(status, body);
    };
    body["padding"] = Value::String("x".repeat(bytes));
    let text = body.to_string().into_bytes();
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = text
        .chunks(16 * 1024)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let stream = tokio_stream::iter(chunks);
    let mut response = Response::new(axum::body::Body::from_stream(stream));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn discovery(State(idp): State<Arc<Shared>>) -> Response {
    idp.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    if idp.is_down().await {
        return unavailable();
    }
    let document = idp.settings().discovery.clone().unwrap_or_else(|| {
        json!({
            "issuer": idp.issuer,
            "jwks_uri": format!("{}/jwks", idp.issuer),
            "introspection_endpoint": format!("{}/introspect", idp.issuer),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256", "RS256", "EdDSA"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        })
    });
    let padding = idp.settings().padding.get(&Endpoint::Discovery).copied();
    padded_json(StatusCode::OK, document, padding)
}

async fn jwks(State(idp): State<Arc<Shared>>) -> Response {
    idp.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    if idp.is_down().await {
        return unavailable();
    }
    let (document, max_age, padding) = {
        let settings = idp.settings();
        let document = settings.jwks.clone().unwrap_or_else(|| json!({"keys": []}));
        let padding = settings.padding.get(&Endpoint::Jwks).copied();
        (document, settings.max_age, padding)
    };
    let mut response = padded_json(StatusCode::OK, document, padding);
    if let Some(secs) = max_age {
        let value =
            HeaderValue::from_str(&format!("public, max-age={secs}")).expect("ASCII header value");
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    response
}

async fn status_list(
    State(idp): State<Arc<Shared>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    idp.status_list_fetches.fetch_add(1, Ordering::SeqCst);
    idp.settings().status_list_accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if idp.is_down().await || idp.settings().status_lists_down {
        return unavailable();
    }
    let token = idp.settings().status_lists.get(&name).cloned();
    match token {
        Some(token) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/statuslist+jwt")],
            token,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such status list\n").into_response(),
    }
}

async fn introspect(
    State(idp): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<HashMap<String, String>>, axum::extract::rejection::FormRejection>,
) -> Response {
    idp.introspection_calls.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::enter(&idp);
    if idp.is_down().await {
        return unavailable();
    }
    let required = idp.settings().client_credentials.clone();
    if let Some((id, secret)) = required
        && !basic_auth_matches(&headers, &id, &secret)
    {
        let mut response =
            json_response(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"introspection\""),
        );
        return response;
    }
    let token = match form {
        Ok(Form(fields)) => fields.get("token").cloned().filter(|t| !t.is_empty()),
        Err(_) => None,
    };
    let Some(token) = token else {
        return json_response(StatusCode::BAD_REQUEST, json!({"error": "invalid_request"}));
    };
    let answer = idp
        .settings()
        .introspection
        .get(&token)
        .cloned()
        .unwrap_or_else(|| json!({"active": false}));
    let padding = idp
        .settings()
        .padding
        .get(&Endpoint::Introspection)
        .copied();
    padded_json(StatusCode::OK, answer, padding)
}

fn basic_auth_matches(headers: &HeaderMap, id: &str, secret: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .is_ok_and(|decoded| decoded == format!("{id}:{secret}").as_bytes())
}
