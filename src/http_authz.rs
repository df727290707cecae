//! The HTTP authorization listener (`[http_authz]`): decisions for requests
//! described in plain HTTP rather than in an ext_authz `CheckRequest`.
//!
//! Two callers, told apart by the path:
//!
//! - **Envoy's ext_authz filter in `http_service` mode** sends the original
//!   request's method, its path behind the configured `path_prefix`, its
//!   `Host` and `Authorization`, and the headers its `allowed_headers` list
//!   (and `authorization_request.headers_to_add`) name. A 200 is an allow: the
//!   response headers its `allowed_upstream_headers` match are set on the
//!   upstream request, those named in `x-envoy-auth-headers-to-remove` are
//!   removed. Any other status is a deny whose status, headers and body reach
//!   the client (a 5xx becomes Envoy's `status_on_error`).
//! - **Forward auth** (Traefik `forwardAuth`, nginx `auth_request`): a request
//!   to `forward_auth_path` whose `X-Forwarded-Method`, `-Proto`, `-Host` and
//!   `-Uri` describe the original request; the other headers are the original's.
//!
//! Each request goes through the same steps as `Check` (see
//! [`crate::ext_authz`]): the audit gate (fail closed), the engine and its
//! decision cache, [`ServerState::account`] (audit line, metrics, span), and
//! the protocol-neutral [`Answer`], which this module only encodes.
//!
//! The client address is the last entry of `X-Forwarded-For`, as the proxy in
//! front of this listener wrote it: the listener must be reachable only by
//! that proxy (plain HTTP/1.1, like `/metrics`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tracing::Instrument as _;

use crate::answer::Answer;
use crate::attributes::{HttpRequest, parse_source_ip};
use crate::config::HttpAuthzConfig;
use crate::decision::{BadRequest, Decision, DenyReason, Verdict};
use crate::engine::Engine;
use crate::http_listener::{self, Limits};
use crate::state::ServerState;
use crate::telemetry::traces::{RequestSpan, remote_parent};

/// Connections served at once; more wait in the kernel's accept queue.
pub(crate) const MAX_CONNECTIONS: usize = 1024;

/// How long a client may take to send a request head.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head read (the original request's headers, token
/// included); a larger one closes the connection.
pub(crate) const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;

/// The largest request body accepted (and discarded: decisions never read
/// it); a larger one is refused with 413. Envoy sends none unless
/// `with_request_body` is set.
pub(crate) const MAX_BODY_BYTES: usize = 8 * 1024;

/// How long reading (and discarding) a request body may take.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The response header naming upstream headers Envoy removes on an allow.
pub(crate) const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// What the listener needs of `[http_authz]`.
#[derive(Debug, Clone)]
struct Settings {
    path_prefix: String,
    forward_auth_path: String,
}

/// Serves `[http_authz]` on `listener` with the engine installed in `state`,
/// until the returned task is aborted (which also ends open connections).
pub(crate) fn spawn(
    listener: TcpListener,
    config: &HttpAuthzConfig,
    state: Arc<ServerState>,
) -> tokio::task::JoinHandle<()> {
    let settings = Arc::new(Settings {
        path_prefix: config.path_prefix.clone(),
        forward_auth_path: config.forward_auth_path.clone(),
    });
    let limits = Limits {
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: HEADER_READ_TIMEOUT,
        max_buf_size: MAX_REQUEST_HEAD_BYTES,
    };
    tokio::spawn(http_listener::serve(
        listener,
        limits,
        "http_authz",
        move |request| {
            let (state, settings) = (state.clone(), settings.clone());
            async move { handle(request, &settings, &state).await }
        },
    ))
}

/// What the request on the wire describes.
#[derive(Debug)]
enum Described {
    /// A request to decide.
    Request(Box<HttpRequest>),
    /// A request that cannot be decided: a path outside `path_prefix`.
    Outside { method: String, path: String },
}

/// One request on the listener: its decision, accounted as `Check` does, and
/// the encoded answer.
async fn handle(
    request: Request<Incoming>,
    settings: &Settings,
    state: &ServerState,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    // Decisions never read the body: a small one is read and dropped (so the
    // connection can be reused), a large one refused.
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(body, MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "request body too slow"),
    }
    // No decision that cannot be logged (fail closed).
    if let Err(e) = state.audit_ready().await {
        tracing::warn!(error = %e, "http_authz: refusing to decide, the audit log is unavailable");
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": "unavailable" }).to_string(),
        );
    }
    let headers = header_map(&parts.headers);
    let raw_path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let described = describe(parts.method.as_str(), raw_path, headers, settings);

    let parent = match &described {
        Described::Request(http) => remote_parent(|name| http.header(name)),
        Described::Outside { .. } => None,
    };
    let span = RequestSpan::start("portcullis.check", parent);
    let engine = state.engine();
    let decision = match (described, &engine) {
        (Described::Outside { method, path }, _) => {
            tracing::debug!(
                prefix = %settings.path_prefix,
                "http_authz: path outside the configured path_prefix"
            );
            let mut d = Decision::new(&method, &path);
            d.verdict = Verdict::Deny(DenyReason::BadRequest(BadRequest::MissingMethodOrPath));
            d
        }
        (Described::Request(http), None) => Decision::new(&http.method, http.path_without_query()),
        (Described::Request(http), Some(engine)) => {
            engine.decide(&http).instrument(span.span().clone()).await
        }
    };
    // Not loaded yet: a 503 (Envoy answers its `status_on_error`).
    let answer = Engine::answer(engine.as_deref(), &decision);
    state.account_in_span(&decision, answer.status, &span, "http_authz");
    encode(answer, &decision.id)
}

/// Request headers with lower-case names, repeated ones joined with `,`.
fn header_map(headers: &hyper::HeaderMap) -> HashMap<String, String> {
    let mut map: HashMap<String, String> = HashMap::with_capacity(headers.len());
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|existing| {
                existing.push(',');
                existing.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

/// The original request, from Envoy's `http_service` request or a
/// forward-auth request. A missing method or path is left empty, so that the
/// pipeline answers its own 400 (`missing_method_or_path`).
fn describe(
    method: &str,
    raw_path: &str,
    headers: HashMap<String, String>,
    settings: &Settings,
) -> Described {
    let path_only = raw_path.split(['?', '#']).next().unwrap_or("");
    let (method, path, host) = if path_only == settings.forward_auth_path {
        let field = |name: &str| {
            headers
                .get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let uri = field("x-forwarded-uri")
            .filter(|u| u.starts_with('/'))
            .unwrap_or_default();
        let host = field("x-forwarded-host")
            .or_else(|| field("host"))
            .unwrap_or_default();
        (field("x-forwarded-method").unwrap_or_default(), uri, host)
    } else {
        let Some(path) = raw_path
            .strip_prefix(settings.path_prefix.as_str())
            .filter(|p| p.starts_with('/'))
        else {
            return Described::Outside {
                method: method.to_ascii_uppercase(),
                path: path_only.to_owned(),
            };
        };
        let host = headers.get("host").cloned().unwrap_or_default();
        (method.to_owned(), path.to_owned(), host)
    };
    // The proxy's view: the first `X-Forwarded-Proto` value, the address the
    // proxy in front of us appended last to `X-Forwarded-For`.
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let source_ip = headers
        .get("x-forwarded-for")
        .and_then(|v| v.rsplit(',').next())
        .and_then(parse_source_ip);
    Described::Request(Box::new(HttpRequest {
        method: method.to_ascii_uppercase(),
        path,
        host,
        scheme,
        headers,
        source_ip,
        peer_principal: None,
        peer_certificate: None,
        context_extensions: HashMap::new(),
        caller: None,
    }))
}

/// The answer as an HTTP response: an allow is a 200 whose headers Envoy
/// copies to the upstream request (and `x-envoy-auth-headers-to-remove`), a
/// deny its status, headers and body.
fn encode(answer: Answer, decision_id: &str) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::FORBIDDEN);
    let allow = answer.is_allow();
    let mut response = Response::new(Full::new(Bytes::from(if allow {
        String::new()
    } else {
        answer.body
    })));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let mut put = |name: &str, value: &str, replace: bool| match (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        (Ok(name), Ok(value)) => {
            if replace {
                headers.insert(name, value);
            } else {
                headers.append(name, value);
            }
        }
        _ => tracing::warn!(
            header = name,
            decision_id,
            "http_authz: a header of the answer is not valid HTTP; left out"
        ),
    };
    if allow {
        for (name, value) in &answer.upstream_headers {
            put(name, value, true);
        }
        if !answer.upstream_headers_to_remove.is_empty() {
            put(
                HEADERS_TO_REMOVE,
                &answer.upstream_headers_to_remove.join(", "),
                true,
            );
        }
        if !answer.query_to_set.is_empty() || !answer.query_to_remove.is_empty() {
            tracing::debug!(
                decision_id,
                set = answer.query_to_set.len(),
                remove = answer.query_to_remove.len(),
                "http_authz: query parameter changes cannot be expressed over HTTP; not applied"
            );
        }
    }
    for (name, value) in &answer.client_headers {
        put(name, value, !allow);
    }
    response
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(prefix: &str) -> Settings {
        Settings {
            path_prefix: prefix.into(),
            forward_auth_path: "/forward-auth".into(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn request(described: Described) -> HttpRequest {
        match described {
            Described::Request(http) => *http,
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn envoy_requests_lose_the_prefix_and_keep_method_host_and_query() {
        let http = request(describe(
            "delete",
            "/authz/orders/7?x=1",
            headers(&[
                ("host", "orders.test"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-for", "203.0.113.7, 10.0.0.1"),
            ]),
            &settings("/authz"),
        ));
        assert_eq!(http.method, "DELETE");
        assert_eq!(http.path, "/orders/7?x=1");
        assert_eq!(http.host, "orders.test");
        assert_eq!(http.scheme, "https");
        // The last entry: what the proxy in front of us appended.
        assert_eq!(http.source_ip.unwrap().to_string(), "10.0.0.1");
        // No prefix: the path as it came.
        let http = request(describe("GET", "//orders", headers(&[]), &settings("")));
        assert_eq!(http.path, "//orders");
        assert_eq!(http.scheme, "");
        assert!(http.source_ip.is_none());
    }

    #[test]
    fn paths_outside_the_prefix_are_not_decided() {
        for path in ["/orders/7", "/authzorders", "/authz", "/auth/z"] {
            assert!(
                matches!(
                    describe("GET", path, headers(&[]), &settings("/authz")),
                    Described::Outside { .. }
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn forward_auth_reads_the_original_request_from_x_forwarded_headers() {
        let http = request(describe(
            "GET",
            "/forward-auth",
            headers(&[
                ("host", "portcullis:9292"),
                ("x-forwarded-method", "post"),
                ("x-forwarded-uri", "/orders?draft=1"),
                ("x-forwarded-host", "shop.test"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-for", "::ffff:198.51.100.4"),
            ]),
            &settings("/authz"),
        ));
        assert_eq!(http.method, "POST");
        assert_eq!(http.path, "/orders?draft=1");
        assert_eq!(http.host, "shop.test");
        assert_eq!(http.source_ip.unwrap().to_string(), "198.51.100.4");

        // Missing or unusable: left empty for the pipeline's 400.
        for pairs in [
            &[("x-forwarded-uri", "/orders")][..],
            &[("x-forwarded-method", "GET")][..],
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "https://shop.test/orders"),
            ][..],
        ] {
            let http = request(describe(
                "GET",
                "/forward-auth?x",
                headers(pairs),
                &settings(""),
            ));
            assert!(http.method.is_empty() || http.path.is_empty(), "{pairs:?}");
        }
    }

    #[test]
    fn allows_carry_upstream_headers_and_removals_denies_their_body() {
        let allow = encode(
            Answer {
                status: 200,
                upstream_headers: vec![("x-portcullis-subject".into(), "alice".into())],
                upstream_headers_to_remove: vec!["authorization".into(), "x-api-key".into()],
                query_to_set: vec![("a".into(), "b".into())],
                ..Answer::default()
            },
            "id",
        );
        assert_eq!(allow.status(), 200);
        assert_eq!(allow.headers()["x-portcullis-subject"], "alice");
        assert_eq!(
            allow.headers()[HEADERS_TO_REMOVE],
            "authorization, x-api-key"
        );

        let deny = encode(
            Answer {
                status: 401,
                client_headers: vec![
                    ("content-type".into(), "application/json".into()),
                    ("www-authenticate".into(), "Bearer realm=\"orders\"".into()),
                    ("bad\nname".into(), "x".into()),
                ],
                body: "{}".into(),
                ..Answer::default()
            },
            "id",
        );
        assert_eq!(deny.status(), 401);
        assert_eq!(
            deny.headers()["www-authenticate"],
            "Bearer realm=\"orders\""
        );
        assert!(deny.headers().get(HEADERS_TO_REMOVE).is_none());
    }
}
