//! The Envoy adapter: `CheckRequest` to [`HttpRequest`], [`Decision`] to
//! `CheckResponse`. The only module that knows Envoy's messages, gRPC status codes
//! and the HTTP status of each deny reason.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, QueryParameter};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest as EnvoyHttpRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode as HttpStatusCode};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;

use crate::answer::Answer;
use crate::attributes::{HttpRequest, parse_source_ip};
use crate::authn::workload::spiffe_id_from_certificate;
use crate::decision::{BadRequest, Decision, DenyReason, Verdict};
use crate::engine::Engine;
use crate::state::ServerState;
use crate::telemetry::traces::{RequestSpan, remote_parent};
use tracing::Instrument as _;

/// gRPC status codes used in `CheckResponse.status` (google.rpc.Code).
mod grpc_code {
    pub(super) const OK: i32 = 0;
    pub(super) const INVALID_ARGUMENT: i32 = 3;
    pub(super) const PERMISSION_DENIED: i32 = 7;
    pub(super) const UNAVAILABLE: i32 = 14;
    pub(super) const UNAUTHENTICATED: i32 = 16;
}

fn grpc_status(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Allow => grpc_code::OK,
        Verdict::Deny(DenyReason::BadRequest(_)) => grpc_code::INVALID_ARGUMENT,
        Verdict::Deny(DenyReason::Unauthenticated(e)) if e.is_dependency_failure() => {
            grpc_code::UNAVAILABLE
        }
        Verdict::Deny(DenyReason::Unauthenticated(_)) => grpc_code::UNAUTHENTICATED,
        Verdict::Deny(DenyReason::NotReady) => grpc_code::UNAVAILABLE,
        Verdict::Deny(_) => grpc_code::PERMISSION_DENIED,
    }
}

/// Extracts the HTTP attributes Envoy sent; `None` when there are none.
/// Headers come from `headers`, or from `header_map` when Envoy is configured with
/// `encode_raw_headers`; repeated headers are joined with `,` as HTTP allows.
/// Takes the request by value: its strings move into the result rather than
/// being copied (this runs for every `Check`).
pub(crate) fn http_request(check: CheckRequest) -> Option<HttpRequest> {
    let mut attributes = check.attributes?;
    let http: EnvoyHttpRequest = attributes.request.take()?.http?;
    let lower = |mut name: String| {
        name.make_ascii_lowercase();
        name
    };
    // Envoy sends lower-case names: the map is then used as it was decoded.
    let mut headers: HashMap<String, String> = http.headers;
    if headers
        .keys()
        .any(|k| k.bytes().any(|b| b.is_ascii_uppercase()))
    {
        headers = headers.into_iter().map(|(k, v)| (lower(k), v)).collect();
    }
    if let Some(map) = http.header_map {
        for header in map.headers {
            let value = if header.raw_value.is_empty() {
                header.value
            } else {
                String::from_utf8_lossy(&header.raw_value).into_owned()
            };
            headers
                .entry(lower(header.key))
                .and_modify(|existing| {
                    existing.push(',');
                    existing.push_str(&value);
                })
                .or_insert(value);
        }
    }
    let header_or = |field: String, pseudo: &str| {
        if field.is_empty() {
            headers.get(pseudo).cloned().unwrap_or_default()
        } else {
            field
        }
    };
    let mut method = header_or(http.method, ":method");
    method.make_ascii_uppercase();
    let path = header_or(http.path, ":path");
    let host = header_or(http.host, ":authority");
    let scheme = header_or(http.scheme, ":scheme");
    let source = attributes.source.take();
    let source_ip = source
        .as_ref()
        .and_then(|peer| peer.address.as_ref())
        .and_then(|address| match &address.address {
            Some(Address::SocketAddress(socket)) => parse_source_ip(&socket.address),
            _ => None,
        });
    // The peer certificate (`include_peer_certificate`), kept as Envoy sends
    // it: only a certificate-bound token needs its thumbprint.
    let peer_certificate = source
        .as_ref()
        .map(|peer| peer.certificate.clone())
        .filter(|pem| !pem.is_empty());
    // Envoy's `source.principal` (the URI SAN of a verified mTLS peer), else the
    // SPIFFE ID of the peer certificate sent with `include_peer_certificate`.
    let peer_principal = source.and_then(|peer| {
        if peer.principal.is_empty() {
            (!peer.certificate.is_empty())
                .then(|| spiffe_id_from_certificate(&peer.certificate))
                .flatten()
        } else {
            Some(peer.principal)
        }
    });
    Some(HttpRequest {
        method,
        path,
        host,
        scheme,
        headers,
        source_ip,
        peer_principal,
        peer_certificate,
        context_extensions: attributes.context_extensions,
        caller: None,
    })
}

fn header(key: String, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            value,
            ..Default::default()
        }),
        // Overwrite so a client cannot smuggle its own identity header upstream.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// Builds the response Envoy acts on: `answer` (the decision's
/// [`Answer`]) encoded, with the decision's id, reason, principal and
/// policies in the dynamic metadata.
pub(crate) fn check_response(decision: &Decision, answer: Answer) -> CheckResponse {
    let verdict = decision.effective_verdict();
    let http_response = if answer.is_allow() {
        HttpResponse::OkResponse(ok_response(answer))
    } else {
        HttpResponse::DeniedResponse(denied_response(answer))
    };
    let mut metadata = Struct::default();
    metadata
        .fields
        .insert("decision_id".into(), string_value(&decision.id));
    metadata
        .fields
        .insert("reason".into(), string_value(decision.verdict.class()));
    if decision.dry_run {
        metadata
            .fields
            .insert("dry_run".into(), string_value("would-deny"));
    }
    if let Some(principal) = &decision.principal {
        metadata
            .fields
            .insert("principal".into(), string_value(principal));
    }
    if let Some(shaping) = &decision.shaping {
        let list = |items: Vec<&str>| Value {
            kind: Some(Kind::ListValue(ListValue {
                values: items.into_iter().map(string_value).collect(),
            })),
        };
        metadata.fields.insert(
            "response_profiles".into(),
            list(shaping.profiles.iter().map(String::as_str).collect()),
        );
        metadata.fields.insert(
            "upstream_headers_set".into(),
            list(
                shaping
                    .upstream_headers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect(),
            ),
        );
        metadata.fields.insert(
            "upstream_headers_removed".into(),
            list(
                shaping
                    .remove_upstream_headers
                    .iter()
                    .map(String::as_str)
                    .collect(),
            ),
        );
    }
    metadata.fields.insert(
        "policies".into(),
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: decision.policies.iter().map(|p| string_value(p)).collect(),
            })),
        },
    );
    CheckResponse {
        status: Some(rpc::Status {
            code: grpc_status(verdict),
            message: verdict.class().to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(http_response),
        dynamic_metadata: Some(metadata),
    }
}

fn ok_response(answer: Answer) -> OkHttpResponse {
    OkHttpResponse {
        headers: answer
            .upstream_headers
            .into_iter()
            .map(|(name, value)| header(name, value))
            .collect(),
        headers_to_remove: answer.upstream_headers_to_remove,
        query_parameters_to_set: answer
            .query_to_set
            .into_iter()
            .map(|(key, value)| QueryParameter { key, value })
            .collect(),
        query_parameters_to_remove: answer.query_to_remove,
        response_headers_to_add: answer
            .client_headers
            .into_iter()
            .map(|(name, value)| header(name, value))
            .collect(),
        ..Default::default()
    }
}

fn denied_response(answer: Answer) -> DeniedHttpResponse {
    DeniedHttpResponse {
        status: Some(HttpStatus {
            code: status_code(answer.status) as i32,
        }),
        headers: answer
            .client_headers
            .into_iter()
            .map(|(name, value)| header(name, value))
            .collect(),
        body: answer.body,
    }
}

/// Envoy's `StatusCode` enum for an HTTP status (403 for one it lacks).
fn status_code(status: u16) -> HttpStatusCode {
    HttpStatusCode::try_from(i32::from(status)).unwrap_or(HttpStatusCode::Forbidden)
}

/// The `envoy.service.auth.v3.Authorization` service.
#[derive(Debug, Clone)]
pub(crate) struct CheckService {
    state: Arc<ServerState>,
}

impl CheckService {
    /// A service deciding with the engine installed in `state`.
    pub(crate) fn new(state: Arc<ServerState>) -> CheckService {
        CheckService { state }
    }
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        // No decision that cannot be logged (fail closed).
        self.state
            .audit_ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (metadata, extensions, check) = request.into_parts();
        let caller = extensions
            .get::<crate::tls::PeerInfo>()
            .and_then(|peer| peer.caller.clone());
        let mut http = http_request(check);
        if let Some(http) = &mut http {
            http.caller = caller.clone();
        }
        // The caller's trace: Envoy's ext_authz client span in the gRPC
        // metadata, else the downstream request's own headers.
        let parent = remote_parent(|name| metadata.get(name).and_then(|v| v.to_str().ok()))
            .or_else(|| {
                http.as_ref()
                    .and_then(|h| remote_parent(|name| h.headers.get(name).map(String::as_str)))
            });
        let span = RequestSpan::start("portcullis.check", parent);
        let engine = self.state.engine();
        let mut decision = match (http, &engine) {
            (None, _) => {
                let mut d = Decision::new("", "");
                d.verdict =
                    Verdict::Deny(DenyReason::BadRequest(BadRequest::MissingHttpAttributes));
                d
            }
            (Some(http), None) => Decision::new(&http.method, http.path_without_query()),
            (Some(http), Some(engine)) => {
                engine.decide(&http).instrument(span.span().clone()).await
            }
        };
        decision.caller = caller;
        // Not loaded yet: a 503 Envoy passes on (health is NOT_SERVING meanwhile).
        let answer = Engine::answer(engine.as_deref(), &decision);
        self.state
            .account_in_span(&decision, answer.status, &span, "check");
        Ok(tonic::Response::new(check_response(&decision, answer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderMap;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::Request as EnvoyRequest;

    fn check(http: EnvoyHttpRequest) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(EnvoyRequest {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn lower_case_headers_are_used_as_decoded_and_others_lower_cased() {
        let lower = http_request(check(EnvoyHttpRequest {
            method: "get".into(),
            path: "/orders".into(),
            headers: [("authorization".to_owned(), "Bearer a".to_owned())].into(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(lower.method, "GET");
        assert_eq!(lower.header("authorization"), Some("Bearer a"));

        let mixed = http_request(check(EnvoyHttpRequest {
            path: "/orders".into(),
            headers: [
                ("Authorization".to_owned(), "Bearer b".to_owned()),
                (":method".to_owned(), "POST".to_owned()),
                ("X-Request-Id".to_owned(), "1".to_owned()),
            ]
            .into(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(mixed.header("authorization"), Some("Bearer b"));
        assert_eq!(mixed.header("x-request-id"), Some("1"));
        assert_eq!(mixed.method, "POST", "taken from the :method pseudo-header");
    }

    #[test]
    fn raw_header_map_values_are_joined() {
        let header = |key: &str, raw: &str| HeaderValue {
            key: key.into(),
            raw_value: raw.as_bytes().to_vec(),
            ..Default::default()
        };
        let http = http_request(check(EnvoyHttpRequest {
            method: "GET".into(),
            path: "/".into(),
            header_map: Some(HeaderMap {
                headers: vec![header("Accept", "a"), header("accept", "b")],
            }),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(http.header("accept"), Some("a,b"));
    }

    #[test]
    fn no_http_attributes_is_none() {
        assert!(http_request(CheckRequest::default()).is_none());
    }
}

/// Fuzz targets of the `CheckRequest` adapter and the pipeline behind it
/// (see [`crate::fuzz`]). Oracle: no panic, no hang, and an allow only for a
/// request the shipped policies allow with a valid credential.
#[cfg(test)]
mod fuzz {
    use std::net::IpAddr;

    use envoy_types::pb::envoy::config::core::v3::address::Address as CoreAddress;
    use envoy_types::pb::envoy::config::core::v3::{
        Address as EnvoyAddress, HeaderMap, SocketAddress,
    };
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        Peer, Request as EnvoyRequest,
    };
    use prost::Message;
    use serde_json::json;

    use super::*;
    use crate::engine::Engine;
    use crate::fuzz::{Target, bytes, run};
    use crate::test_setup::{NOW, Setup, setup};

    /// The pipeline over the shipped policies and the tokens that may pass it.
    struct Subject {
        /// Keeps the configuration's folder alive.
        _setup: Setup,
        engine: Engine,
        runtime: tokio::runtime::Runtime,
        /// Valid tokens carrying `orders:read` (the only scope that opens the
        /// one route, `GET /orders/{id}`).
        readers: Vec<String>,
        /// Valid tokens without it, and invalid ones.
        others: Vec<String>,
    }

    fn subject() -> Subject {
        let setup = setup("");
        let engine = Engine::from_config(&setup.config).unwrap();
        let runtime = crate::fuzz::runtime();
        let sign = |claims: serde_json::Value| setup.key.sign_claims(&claims).unwrap();
        let base = json!({
            "iss": "https://idp.test", "aud": "orders-api", "sub": "bob", "jti": "t2",
            "iat": NOW - 10, "exp": NOW + 600,
        });
        let with = |extra: serde_json::Value| {
            let mut claims = base.clone();
            if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
                claims.extend(extra.clone());
            }
            sign(claims)
        };
        let readers = vec![
            setup.token("orders:read", NOW - 10, NOW + 600),
            with(json!({ "scope": "orders:read orders:write", "roles": ["admin"] })),
        ];
        let others = vec![
            setup.token("orders:write", NOW - 10, NOW + 600),
            setup.token("orders:read", NOW - 1200, NOW - 600),
            with(json!({ "scope": "orders:read", "aud": "other-api" })),
            with(json!({ "scope": "orders:read", "iss": "https://evil.test" })),
            with(json!({ "scope": "orders:read", "exp": NOW + 86_400 })),
        ];
        Subject {
            _setup: setup,
            engine,
            runtime,
            readers,
            others,
        }
    }

    impl Subject {
        /// The request as the engine sees it, and whether the engine allowed it.
        fn decide(&self, check: CheckRequest) -> Option<(HttpRequest, bool)> {
            let http = http_request(check)?;
            let decision = self.runtime.block_on(self.engine.decide_at(&http, NOW));
            let response = check_response(&decision, Engine::answer(Some(&self.engine), &decision));
            let allowed = response.status.as_ref().map(|s| s.code) == Some(grpc_code::OK);
            assert_eq!(allowed, decision.verdict == Verdict::Allow, "{decision:?}");
            Some((http, allowed))
        }

        /// What the shipped policies allow, said independently and
        /// conservatively: `GET /orders/<one plain segment>` with a valid
        /// `orders:read` token as the one bearer credential, from outside
        /// 203.0.113.0/24.
        fn may_allow(&self, http: &HttpRequest) -> bool {
            let token = http.headers.get("authorization").and_then(|value| {
                let mut parts = value.split_ascii_whitespace();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(scheme), Some(token), None) if scheme.eq_ignore_ascii_case("bearer") => {
                        Some(token)
                    }
                    _ => None,
                }
            });
            let path = http.path.split(['?', '#']).next().unwrap_or("");
            let segment_plain = path.strip_prefix("/orders/").is_some_and(|segment| {
                let lower = segment.to_ascii_lowercase();
                !segment.is_empty()
                    && !segment.contains(['/', '\\'])
                    && !segment.bytes().any(|b| b.is_ascii_control())
                    && !matches!(lower.replace("%2e", ".").as_str(), "." | "..")
                    && !lower.contains("%2f")
                    && !lower.contains("%5c")
            });
            let blocked = http.source_ip.is_some_and(|ip| match ip {
                IpAddr::V4(v4) => v4.octets()[..3] == [203, 0, 113],
                IpAddr::V6(_) => false,
            });
            http.method == "GET"
                && segment_plain
                && !blocked
                && token.is_some_and(|t| self.readers.iter().any(|r| r == t))
        }
    }

    /// `CheckRequest` protobuf bytes as Envoy would send them.
    fn encoded(
        method: &str,
        path: &str,
        token: Option<&str>,
        source: Option<&str>,
        raw: bool,
    ) -> Vec<u8> {
        let mut headers: HashMap<String, String> = HashMap::new();
        headers.insert(":authority".into(), "orders.test".into());
        headers.insert("x-request-id".into(), "r-1".into());
        if let Some(token) = token {
            headers.insert("authorization".into(), format!("Bearer {token}"));
        }
        let http = if raw {
            EnvoyHttpRequest {
                method: method.into(),
                path: path.into(),
                header_map: Some(HeaderMap {
                    headers: headers
                        .into_iter()
                        .map(|(key, value)| HeaderValue {
                            key,
                            raw_value: value.into_bytes(),
                            ..Default::default()
                        })
                        .collect(),
                }),
                ..Default::default()
            }
        } else {
            EnvoyHttpRequest {
                method: method.into(),
                path: path.into(),
                host: "orders.test".into(),
                scheme: "https".into(),
                headers,
                ..Default::default()
            }
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                source: source.map(|ip| Peer {
                    address: Some(EnvoyAddress {
                        address: Some(CoreAddress::SocketAddress(SocketAddress {
                            address: ip.into(),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(EnvoyRequest {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    fn dictionary(subject: &Subject) -> Vec<Vec<u8>> {
        let mut words = bytes([
            "Bearer ",
            "bearer\t",
            "/orders/",
            "/orders",
            "..",
            "%2e",
            "%2F",
            "%5c",
            "?",
            "#",
            "//",
            ";",
            "GET",
            "POST",
            "DELETE",
            "get",
            "authorization",
            ":path",
            ":method",
            "203.0.113.9",
            "::ffff:203.0.113.9",
            "10.0.0.1",
            "eyJhbGciOiJub25lIn0.",
            ".",
        ]);
        for token in subject.readers.iter().chain(&subject.others) {
            words.push(token.as_bytes().to_vec());
            // The header and the claims of each, for splicing.
            words.extend(token.split('.').map(|part| part.as_bytes().to_vec()));
        }
        words
    }

    #[test]
    fn fuzz_check_request_protobuf() {
        let subject = subject();
        let reader = subject.readers[0].as_str();
        let mut seeds = vec![
            encoded("GET", "/orders/7", Some(reader), None, false),
            encoded("GET", "/orders/7?x=1", Some(reader), Some("10.1.2.3"), true),
            encoded("POST", "/orders", Some(&subject.readers[1]), None, false),
            encoded("GET", "/orders/7", None, None, false),
            CheckRequest::default().encode_to_vec(),
        ];
        seeds.extend(
            subject
                .others
                .iter()
                .map(|t| encoded("GET", "/orders/7", Some(t), None, false)),
        );
        let allowed = CheckRequest::decode(seeds[0].as_slice())
            .ok()
            .and_then(|check| subject.decide(check));
        assert!(
            allowed.is_some_and(|(_, allowed)| allowed),
            "the first seed is an allow, so that the oracle is exercised"
        );
        run(
            Target {
                name: "check_request_protobuf",
                seeds,
                dictionary: dictionary(&subject),
                cases: 4000,
            },
            |input| {
                let Ok(check) = CheckRequest::decode(input) else {
                    return;
                };
                if let Some((http, allowed)) = subject.decide(check) {
                    assert!(!allowed || subject.may_allow(&http), "allowed: {http:?}");
                }
            },
        );
    }

    /// The fields of a request, one per line (method, path, authorization,
    /// source address, one extra header `name: value`, and `raw` for Envoy's
    /// `header_map` encoding), so that mutations land inside fields instead of
    /// breaking the protobuf framing.
    #[test]
    fn fuzz_check_request_fields() {
        let subject = subject();
        let line = |method: &str, path: &str, token: &str, source: &str, extra: &str, raw: &str| {
            format!("{method}\n{path}\nBearer {token}\n{source}\n{extra}\n{raw}")
        };
        let reader = subject.readers[0].as_str();
        let mut seeds = vec![
            line("GET", "/orders/7", reader, "10.1.2.3", "x-a: 1", ""),
            line("GET", "/orders/7", reader, "203.0.113.9", "", "raw"),
            line("DELETE", "/orders/7", &subject.readers[1], "", "", ""),
            line(
                "GET",
                "/orders/abc?x=y",
                &subject.readers[1],
                "::1",
                "authorization: x",
                "raw",
            ),
        ];
        seeds.extend(
            subject
                .others
                .iter()
                .map(|t| line("GET", "/orders/7", t, "10.1.2.3", "", "")),
        );
        run(
            Target {
                name: "check_request_fields",
                seeds: bytes(seeds),
                dictionary: dictionary(&subject),
                cases: 6000,
            },
            |input| {
                let text = String::from_utf8_lossy(input);
                let mut fields = text.split('\n');
                let mut next = || fields.next().unwrap_or("").to_owned();
                let (method, path, authorization, source) = (next(), next(), next(), next());
                let extra = next();
                let raw = next() == "raw";
                let mut check = CheckRequest::decode(
                    encoded(
                        &method,
                        &path,
                        None,
                        Some(&source).filter(|s| !s.is_empty()).map(|s| s.as_str()),
                        raw,
                    )
                    .as_slice(),
                )
                .unwrap();
                let mut headers = vec![("authorization".to_owned(), authorization)];
                if let Some((name, value)) = extra.split_once(':') {
                    headers.push((name.to_owned(), value.trim_start().to_owned()));
                }
                if let Some(http) = check
                    .attributes
                    .as_mut()
                    .and_then(|a| a.request.as_mut())
                    .and_then(|r| r.http.as_mut())
                {
                    for (name, value) in headers {
                        match http.header_map.as_mut() {
                            Some(map) => map.headers.push(HeaderValue {
                                key: name,
                                raw_value: value.into_bytes(),
                                ..Default::default()
                            }),
                            None => {
                                http.headers.insert(name, value);
                            }
                        }
                    }
                }
                // Through the wire format, as Envoy's bytes arrive.
                let check = CheckRequest::decode(check.encode_to_vec().as_slice()).unwrap();
                if let Some((http, allowed)) = subject.decide(check) {
                    assert!(!allowed || subject.may_allow(&http), "allowed: {http:?}");
                }
            },
        );
    }
}
