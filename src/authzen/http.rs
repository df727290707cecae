//! The AuthZEN listener: HTTP/1.1 and HTTP/2 (plaintext, or over the
//! `[authzen.tls]` accept loop of [`crate::tls`]), caller authentication,
//! routing, limits and errors.
//!
//! | Answer | When |
//! |---|---|
//! | 200 | a decision (`true` or `false`), or the metadata |
//! | 400 | malformed JSON, a wrong shape, a request that does not fit the schema |
//! | 401 | no client certificate and no (or a wrong) bearer token |
//! | 404, 405 | another path, another method |
//! | 413 | a body over [`MAX_BODY_BYTES`] |
//! | 415 | a `Content-Type` other than `application/json` |
//! | 503 | policies not loaded yet, or the audit log cannot take the decision |
//!
//! Error bodies are a plain-text message, as the specification's error table
//! says. Every answer echoes the request's `X-Request-ID`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use super::model::{self, BadRequest, Evaluation, Evaluations, Semantic};
use crate::authn::authenticator::Authentication;
use crate::decision::Decision;
use crate::engine::Engine;
use crate::state::ServerState;
use crate::telemetry::traces::{RequestSpan, remote_parent};
use crate::tls::{Connection, PeerInfo, ServerTls};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Path of the Access Evaluation API.
pub const EVALUATION_PATH: &str = "/access/v1/evaluation";
/// Path of the Access Evaluations API.
pub const EVALUATIONS_PATH: &str = "/access/v1/evaluations";
/// Path of the metadata document.
pub const METADATA_PATH: &str = "/.well-known/authzen-configuration";

/// The audit line's `method` of a decision made through this API.
pub const EVALUATION_METHOD: &str = "AuthZEN.evaluation";
/// The same, for decisions of an `evaluations` request.
pub const EVALUATIONS_METHOD: &str = "AuthZEN.evaluations";

/// Most connections served at once; further ones wait to be accepted.
const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send a request head (HTTP/1.1).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (HTTP/1.1).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Longest `X-Request-ID` echoed.
const MAX_REQUEST_ID_BYTES: usize = 256;

const REQUEST_ID: &str = "x-request-id";

/// How callers authenticate and what the metadata publishes.
#[derive(Clone)]
pub(crate) struct Settings {
    /// SHA-256 of the `token_file` content, when there is one.
    pub(crate) token: Option<[u8; 32]>,
    /// Whether the TLS handshake requires a client certificate chained to
    /// `client_ca_file` (then every TLS connection is an authenticated caller).
    pub(crate) client_certificates: bool,
    /// Whether the listener is TLS (the scheme of URLs built from `Host`).
    pub(crate) https: bool,
    /// `base_url`, without a trailing `/`.
    pub(crate) base_url: Option<String>,
}

struct Api {
    settings: Settings,
    state: Arc<ServerState>,
}

/// Accepts connections on `listener` (through TLS when `tls` is set) and
/// serves each until the returned task is aborted.
pub(crate) fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    settings: Settings,
    state: Arc<ServerState>,
) -> JoinHandle<()> {
    let api = Arc::new(Api { settings, state });
    let mut incoming = crate::tls::incoming(listener, tls, "authzen");
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let connection = match incoming.next().await {
                None => break,
                Some(Ok(connection)) => connection,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "AuthZEN: connection failed");
                    continue;
                }
            };
            let (peer, tls) = match &connection {
                Connection::Plain(_, peer) => (peer.clone(), false),
                Connection::Tls(_, peer) => (peer.clone(), true),
            };
            // Only a handshake that required a certificate chained to the
            // client CA authenticates the caller.
            let by_certificate = tls && api.settings.client_certificates;
            let api = api.clone();
            connections.spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request| {
                    let api = api.clone();
                    let peer = peer.clone();
                    async move {
                        Ok::<_, Infallible>(api.answer(request, &peer, by_certificate).await)
                    }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES);
                // A client that hangs up mid-answer is not our problem.
                let _ = builder
                    .serve_connection(TokioIo::new(connection), service)
                    .await;
            });
            // Reap finished connections so the set does not grow.
            while connections.try_join_next().is_some() {}
        }
        connections.abort_all();
    })
}

/// A byte that may appear in a host (and port) taken from `Host`.
pub(crate) fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
}

fn text(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let mut message = message.into();
    message.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(message)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(value: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn bad_request(e: &BadRequest) -> Response<Full<Bytes>> {
    text(StatusCode::BAD_REQUEST, e.to_string())
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("use {allow} on this path"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// Which evaluation endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Evaluation,
    Evaluations,
}

impl Endpoint {
    /// The audit line's `method`.
    fn method(self) -> &'static str {
        match self {
            Endpoint::Evaluation => EVALUATION_METHOD,
            Endpoint::Evaluations => EVALUATIONS_METHOD,
        }
    }

    /// The audit line's `path`.
    fn path(self) -> &'static str {
        match self {
            Endpoint::Evaluation => EVALUATION_PATH,
            Endpoint::Evaluations => EVALUATIONS_PATH,
        }
    }
}

impl Api {
    async fn answer(
        &self,
        request: Request<Incoming>,
        peer: &PeerInfo,
        by_certificate: bool,
    ) -> Response<Full<Bytes>> {
        let request_id = request
            .headers()
            .get(REQUEST_ID)
            .filter(|v| v.len() <= MAX_REQUEST_ID_BYTES)
            .cloned();
        let mut response = self.route(request, peer, by_certificate).await;
        if let Some(id) = request_id {
            response.headers_mut().insert(REQUEST_ID, id);
        }
        response
    }

    async fn route(
        &self,
        request: Request<Incoming>,
        peer: &PeerInfo,
        by_certificate: bool,
    ) -> Response<Full<Bytes>> {
        let endpoint = match request.uri().path() {
            EVALUATION_PATH => Endpoint::Evaluation,
            EVALUATIONS_PATH => Endpoint::Evaluations,
            METADATA_PATH => {
                return match *request.method() {
                    Method::GET => self.metadata(&request),
                    _ => method_not_allowed("GET"),
                };
            }
            _ => return text(StatusCode::NOT_FOUND, "no such endpoint"),
        };
        if request.method() != Method::POST {
            return method_not_allowed("POST");
        }
        // Authenticated first: an unknown caller learns nothing more.
        let caller = match self.caller(request.headers(), peer, by_certificate) {
            Some(caller) => caller,
            None => return self.unauthorized(),
        };
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the request body must be application/json",
            );
        }
        let headers = request.headers().clone();
        let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
                );
            }
            Err(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                );
            }
        };
        let body: Value = match serde_json::from_slice(&body) {
            Ok(body) => body,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("the request body is not valid JSON: {e}"),
                );
            }
        };
        let parent = remote_parent(|name| headers.get(name).and_then(|v| v.to_str().ok()));
        match endpoint {
            Endpoint::Evaluation => match model::parse_evaluation(&body) {
                Ok(evaluation) => self.evaluation(endpoint, &evaluation, caller, parent).await,
                Err(e) => bad_request(&e),
            },
            Endpoint::Evaluations => match model::parse_evaluations(&body) {
                Ok(Evaluations::Single(evaluation)) => {
                    self.evaluation(endpoint, &evaluation, caller, parent).await
                }
                Ok(Evaluations::Many { semantic, items }) => {
                    self.evaluations(semantic, &items, caller, parent).await
                }
                Err(e) => bad_request(&e),
            },
        }
    }

    /// The authenticated caller: `Some(identity)` for a client certificate
    /// (`Some(None)` if it names no one), `Some(None)` for the right bearer
    /// token; `None` otherwise.
    fn caller(
        &self,
        headers: &HeaderMap,
        peer: &PeerInfo,
        by_certificate: bool,
    ) -> Option<Option<Arc<str>>> {
        if by_certificate {
            return Some(peer.caller.clone());
        }
        let expected = self.settings.token.as_ref()?;
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty() && token.len() <= crate::authn::MAX_TOKEN_BYTES)?;
        // Digests of equal length, compared in constant time: neither the
        // token nor its length shows in the timing.
        let digest = crate::digest::sha256(presented.as_bytes());
        bool::from(digest.ct_eq(expected)).then_some(None)
    }

    fn unauthorized(&self) -> Response<Full<Bytes>> {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            if self.settings.token.is_some() {
                "authenticate with the bearer token or a client certificate"
            } else {
                "authenticate with a client certificate"
            },
        );
        if self.settings.token.is_some() {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"portcullis-authzen\""),
            );
        }
        response
    }

    fn metadata<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        let base = match &self.settings.base_url {
            Some(base) => base.clone(),
            None => {
                let host = request
                    .uri()
                    .authority()
                    .map(|a| a.as_str())
                    .or_else(|| {
                        request
                            .headers()
                            .get(header::HOST)
                            .and_then(|v| v.to_str().ok())
                    })
                    .filter(|h| !h.is_empty() && h.len() <= 255 && h.bytes().all(is_host_byte));
                let Some(host) = host else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "a valid Host header is required (or set [authzen] base_url)",
                    );
                };
                let scheme = if self.settings.https { "https" } else { "http" };
                format!("{scheme}://{host}")
            }
        };
        let mut response = json_response(&json!({
            "policy_decision_point": base,
            "access_evaluation_endpoint": format!("{base}{EVALUATION_PATH}"),
            "access_evaluations_endpoint": format!("{base}{EVALUATIONS_PATH}"),
        }));
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=300"),
        );
        response
    }

    /// The engine, and an audit log ready to take decisions; else a 503.
    async fn engine(&self) -> Result<Arc<Engine>, Response<Full<Bytes>>> {
        let engine = self.state.engine().ok_or_else(|| {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "policies are not loaded yet",
            )
        })?;
        // No decision that cannot be logged (fail closed).
        self.state
            .audit_ready()
            .await
            .map_err(|e| text(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        Ok(engine)
    }

    /// Decides one evaluation (not yet accounted for).
    fn decide(
        engine: &Engine,
        evaluation: &Evaluation,
        caller: &Option<Arc<str>>,
        endpoint: Endpoint,
        span: &RequestSpan,
    ) -> Result<Decision, BadRequest> {
        let (identity, direct) =
            model::direct(&engine.policies().schema, evaluation, caller.clone())?;
        let authentication = Authentication {
            token: Some(Arc::new(identity)),
            refusal: None,
        };
        let mut decision = span
            .span()
            .in_scope(|| engine.decide_direct(&authentication, &direct))
            .map_err(model::engine_error)?;
        decision.method = endpoint.method().to_owned();
        decision.path = endpoint.path().to_owned();
        decision.caller = caller.clone();
        Ok(decision)
    }

    /// Audit line, metrics and span attributes, as for every decision.
    fn account(&self, decision: &Decision, span: &RequestSpan) {
        let status = decision.effective_verdict().http_status();
        self.state
            .account_in_span(decision, status, span, "authzen");
    }

    async fn evaluation(
        &self,
        endpoint: Endpoint,
        evaluation: &Evaluation,
        caller: Option<Arc<str>>,
        parent: Option<opentelemetry::Context>,
    ) -> Response<Full<Bytes>> {
        let engine = match self.engine().await {
            Ok(engine) => engine,
            Err(response) => return response,
        };
        let span = RequestSpan::start("portcullis.authzen.evaluation", parent);
        match Self::decide(&engine, evaluation, &caller, endpoint, &span) {
            Ok(decision) => {
                self.account(&decision, &span);
                json_response(&model::decision_json(&decision))
            }
            Err(e) => bad_request(&e),
        }
    }

    async fn evaluations(
        &self,
        semantic: Semantic,
        items: &[Result<Evaluation, BadRequest>],
        caller: Option<Arc<str>>,
        parent: Option<opentelemetry::Context>,
    ) -> Response<Full<Bytes>> {
        let engine = match self.engine().await {
            Ok(engine) => engine,
            Err(response) => return response,
        };
        let batch_span = RequestSpan::start("portcullis.authzen.evaluations", parent);
        let mut results = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("evaluations[{i}].");
            let decided = item.as_ref().map_err(Clone::clone).and_then(|evaluation| {
                // Each decision has its own span, a child of the batch's.
                let span = batch_span
                    .span()
                    .in_scope(|| RequestSpan::start("portcullis.authzen.evaluation", None));
                Self::decide(&engine, evaluation, &caller, Endpoint::Evaluations, &span)
                    .map(|decision| (decision, span))
                    .map_err(|e| BadRequest {
                        field: format!("{prefix}{}", e.field),
                        message: e.message,
                    })
            });
            let (mut json, allowed) = match &decided {
                Ok((decision, span)) => {
                    self.account(decision, span);
                    (
                        model::decision_json(decision),
                        decision.effective_verdict().is_allow(),
                    )
                }
                Err(e) => (model::error_json(e), false),
            };
            let stop = match semantic {
                Semantic::ExecuteAll => false,
                Semantic::DenyOnFirstDeny => !allowed,
                Semantic::PermitOnFirstPermit => allowed,
            };
            if stop && let Some(context) = json.get_mut("context").and_then(Value::as_object_mut) {
                context.insert(
                    "evaluations_semantic".into(),
                    Value::String(semantic.as_str().to_owned()),
                );
            }
            results.push(json);
            if stop {
                break;
            }
        }
        json_response(&json!({ "evaluations": results }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bytes_exclude_what_could_break_a_url() {
        assert!(b"pdp.example.com:8443".iter().all(|b| is_host_byte(*b)));
        assert!(b"[::1]:80".iter().all(|b| is_host_byte(*b)));
        for bad in [b'/', b'?', b'#', b'@', b' ', b'"'] {
            assert!(!is_host_byte(bad));
        }
    }
}
