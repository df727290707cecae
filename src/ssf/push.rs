//! The RFC 8935 push endpoint: `POST <push_path>` with one SET as an
//! `application/secevent+jwt` body, on a plain HTTP/1.1 listener.
//!
//! Answers: `202` once the SET is applied (or had nothing to apply); `400`
//! with `{"err", "description"}` (RFC 8935 §2.3) for a bad SET, never
//! applied; `401` without the configured bearer token; `413` for a body over
//! 64 KiB; `503` when the keys are not loaded or the store refused the write
//! (the transmitter retries); `404`/`405` elsewhere.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;

use super::set::{ErrorCode, MAX_SET_BYTES};
use super::{Failure, Processor};
use crate::http_listener::{self, Limits};

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send the body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the endpoint serves.
#[derive(Debug)]
pub struct Endpoint {
    /// The path (`[ssf] push_path`).
    pub path: String,
    /// The bearer token required, when configured.
    pub token: Option<String>,
    /// Applies the SETs.
    pub processor: Arc<Processor>,
}

/// Serves `endpoint` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, endpoint: Endpoint) {
    let endpoint = Arc::new(endpoint);
    let limits = Limits {
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: HEADER_READ_TIMEOUT,
        max_buf_size: MAX_SET_BYTES + 16 * 1024,
    };
    http_listener::serve(listener, limits, "ssf push", move |request| {
        let endpoint = endpoint.clone();
        async move { respond(request, &endpoint).await }
    })
    .await
}

fn reply(status: StatusCode, body: Option<serde_json::Value>) -> Response<Full<Bytes>> {
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    let json = !text.is_empty();
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    if json {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}

fn error(status: StatusCode, code: ErrorCode, description: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        Some(serde_json::json!({"err": code.as_str(), "description": description})),
    )
}

/// Is the presented `Authorization` header `Bearer <expected>`? Compared in
/// constant time.
fn authorized(header: Option<&HeaderValue>, expected: &str) -> bool {
    let Some(value) = header.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && bool::from(token.trim().as_bytes().ct_eq(expected.as_bytes()))
}

fn is_secevent(header: Option<&HeaderValue>) -> bool {
    header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/secevent+jwt"))
}

async fn respond(request: Request<Incoming>, endpoint: &Endpoint) -> Response<Full<Bytes>> {
    if request.uri().path() != endpoint.path {
        return reply(StatusCode::NOT_FOUND, None);
    }
    if request.method() != Method::POST {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, None);
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    if let Some(token) = &endpoint.token
        && !authorized(request.headers().get(AUTHORIZATION), token)
    {
        tracing::warn!("Shared Signals push refused: missing or wrong bearer token");
        let mut response = reply(StatusCode::UNAUTHORIZED, None);
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    if !is_secevent(request.headers().get(CONTENT_TYPE)) {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "Content-Type must be application/secevent+jwt",
        );
    }
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::InvalidRequest,
            "the SET is larger than 64 KiB",
        )
    };
    if request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_SET_BYTES as u64)
    {
        return too_large();
    }
    let body = Limited::new(request.into_body(), MAX_SET_BYTES);
    let bytes = match tokio::time::timeout(BODY_READ_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(_)) | Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                "the body could not be read",
            );
        }
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "the body is not UTF-8",
        );
    };
    match endpoint.processor.process(text.trim()).await {
        Ok(_) => reply(StatusCode::ACCEPTED, None),
        Err(Failure::Refused(e)) => error(StatusCode::BAD_REQUEST, e.code, &e.description),
        Err(Failure::Unavailable(_)) => {
            let mut response = reply(StatusCode::SERVICE_UNAVAILABLE, None);
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("5"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_compared_exactly() {
        let header = |s: &'static str| HeaderValue::from_static(s);
        assert!(authorized(Some(&header("Bearer s3cret")), "s3cret"));
        assert!(authorized(Some(&header("bearer s3cret")), "s3cret"));
        assert!(!authorized(Some(&header("Bearer s3cre")), "s3cret"));
        assert!(!authorized(Some(&header("Basic s3cret")), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }

    #[test]
    fn the_content_type_may_carry_parameters() {
        let header = |s: &'static str| HeaderValue::from_static(s);
        assert!(is_secevent(Some(&header("application/secevent+jwt"))));
        assert!(is_secevent(Some(&header(
            "Application/SecEvent+JWT; charset=utf-8"
        ))));
        assert!(!is_secevent(Some(&header("application/jwt"))));
        assert!(!is_secevent(None));
    }
}
