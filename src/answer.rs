//! What a decision answers, whichever door asked: the HTTP status, what an
//! allow changes on the upstream request and adds to the client's response,
//! and a deny's headers and body. The adapters ([`crate::ext_authz`] for
//! Envoy's gRPC protocol, the HTTP authorization listener) only encode an
//! [`Answer`]; no adapter decides what a response contains.

pub mod profile;

use crate::authn::TokenError;
use crate::config::ResponseConfig;
use crate::decision::{BadRequest, Decision, DenyProblem, DenyReason, Verdict};

/// The answer to one decision, independent of the protocol that carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status the client gets: 200 for an allow (a dry-run deny
    /// included), else the deny's status.
    pub status: u16,
    /// On allow: headers set on the upstream request, overwriting any the
    /// client sent (so a client cannot smuggle its own identity header).
    pub upstream_headers: Vec<(String, String)>,
    /// On allow: headers removed from the upstream request.
    pub upstream_headers_to_remove: Vec<String>,
    /// On allow: query parameters set on the upstream request.
    pub query_to_set: Vec<(String, String)>,
    /// On allow: query parameters removed from the upstream request.
    pub query_to_remove: Vec<String>,
    /// Headers for the client: on allow, added to the upstream's response;
    /// on deny, the deny response's headers (`content-type` included).
    pub client_headers: Vec<(String, String)>,
    /// On deny: the response body (JSON).
    pub body: String,
}

impl Answer {
    /// Whether the request goes on to the upstream.
    pub fn is_allow(&self) -> bool {
        self.status == 200
    }
}

/// Builds the answer to `decision`. `response` is the `[response]` table,
/// `realm` the `WWW-Authenticate` realm, `credential_header` the API-key
/// header (removed with `authorization` when `remove_authorization` is set).
pub fn answer(
    decision: &Decision,
    response: &ResponseConfig,
    realm: &str,
    credential_header: Option<&str>,
) -> Answer {
    // A dry-run deny is answered as an allow; the real verdict stays in the
    // audit line and the metadata.
    match decision.effective_verdict() {
        Verdict::Allow => {
            let mut upstream_headers = Vec::new();
            if let (false, Some(subject)) = (response.subject_header.is_empty(), &decision.subject)
            {
                upstream_headers.push((response.subject_header.clone(), subject.clone()));
            }
            // Credentials stay at the edge when asked: the bearer token and the
            // API-key header.
            let upstream_headers_to_remove = if response.remove_authorization {
                std::iter::once("authorization".to_owned())
                    .chain(credential_header.map(str::to_owned))
                    .collect()
            } else {
                Vec::new()
            };
            let mut answer = Answer {
                status: 200,
                upstream_headers,
                upstream_headers_to_remove,
                ..Answer::default()
            };
            if let Some(shaping) = &decision.shaping {
                answer
                    .upstream_headers
                    .extend(shaping.upstream_headers.iter().cloned());
                for name in &shaping.remove_upstream_headers {
                    if !answer.upstream_headers_to_remove.contains(name) {
                        answer.upstream_headers_to_remove.push(name.clone());
                    }
                }
                answer.query_to_set = shaping.set_query.clone();
                answer.query_to_remove = shaping.remove_query.clone();
                answer.client_headers = shaping.client_headers.clone();
            }
            answer
        }
        Verdict::Deny(reason) => {
            let mut answer = denied(decision, reason, realm);
            // Profiles shape policy denies only: a 401 keeps its challenge.
            if let (DenyReason::PolicyDenied, Some(shaping)) = (reason, &decision.shaping) {
                if let Some(problem) = &shaping.deny {
                    answer.status = problem.status;
                    answer.client_headers = vec![(
                        "content-type".to_owned(),
                        "application/problem+json".to_owned(),
                    )];
                    answer.body = problem_body(problem, decision);
                }
                answer
                    .client_headers
                    .extend(shaping.client_headers.iter().cloned());
            }
            answer
        }
    }
}

/// With server nonces on (`nonce` gives one), hands a DPoP client the
/// current nonce (`DPoP-Nonce`, RFC 9449 §8.2 and §9): on an allowed request
/// made with a DPoP proof, and on a 401 that answers with the `DPoP`
/// challenge, so the client's next proof can carry it.
pub fn add_dpop_nonce(
    answer: &mut Answer,
    decision: &Decision,
    nonce: impl FnOnce() -> Option<String>,
) {
    let wants_nonce = match decision.verdict {
        Verdict::Allow => decision.binding == Some("dpop"),
        Verdict::Deny(DenyReason::Unauthenticated(token)) => {
            token.is_dpop_proof_error() && !token.is_dependency_failure()
        }
        Verdict::Deny(_) => decision.binding == Some("dpop") && answer.is_allow(),
    };
    if wants_nonce && let Some(nonce) = nonce() {
        answer.client_headers.push(("dpop-nonce".to_owned(), nonce));
    }
}

/// RFC 9457 problem details, with the decision id as an extension member.
fn problem_body(problem: &DenyProblem, decision: &Decision) -> String {
    let mut body = serde_json::json!({
        "type": problem.problem_type.as_deref().unwrap_or("about:blank"),
        "status": problem.status,
        "decision_id": decision.id,
    });
    if let Some(title) = &problem.title {
        body["title"] = title.as_str().into();
    }
    if let Some(detail) = &problem.detail {
        body["detail"] = detail.as_str().into();
    }
    body.to_string()
}

fn denied(decision: &Decision, reason: DenyReason, realm: &str) -> Answer {
    let status = Verdict::Deny(reason).http_status();
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    let body = match reason {
        // Our dependency failed, not the caller's credential: no challenge.
        DenyReason::Unauthenticated(token) if token.is_dependency_failure() => serde_json::json!({
            "error": "temporarily_unavailable",
            "error_description": token.public_description(),
            "decision_id": decision.id,
        }),
        DenyReason::Unauthenticated(token) => {
            headers.push((
                "www-authenticate".to_owned(),
                www_authenticate(token, realm),
            ));
            serde_json::json!({
                "error": if no_bearer_credential(token) {
                    "unauthorized"
                } else if token.needs_dpop_nonce() {
                    "use_dpop_nonce"
                } else if token.is_dpop_proof_error() {
                    "invalid_dpop_proof"
                } else {
                    "invalid_token"
                },
                "error_description": token.public_description(),
                "decision_id": decision.id,
            })
        }
        DenyReason::BadRequest(bad) => serde_json::json!({
            "error": "bad_request",
            "error_description": match bad {
                BadRequest::MissingHttpAttributes => "the check request has no HTTP attributes",
                BadRequest::NonCanonicalPath => "the request path is not in canonical form",
                BadRequest::MissingMethodOrPath => "the request has no method or path",
            },
            "decision_id": decision.id,
        }),
        DenyReason::NotReady => serde_json::json!({
            "error": "unavailable",
            "decision_id": decision.id,
        }),
        _ => serde_json::json!({
            "error": "forbidden",
            "decision_id": decision.id,
        }),
    };
    // A 503 is ours (not loaded yet, or a dependency of the credential
    // check failed), not the caller's: say when to try again.
    if status == 503 {
        headers.push(("retry-after".to_owned(), RETRY_AFTER_SECS.to_owned()));
    }
    Answer {
        status,
        client_headers: headers,
        body: body.to_string(),
        ..Answer::default()
    }
}

/// `Retry-After` of a 503, in seconds: loading and dependency outages are
/// usually over, or failed over, within a second or two.
const RETRY_AFTER_SECS: &str = "1";

/// RFC 6750 section 3.1: no error code when the request carries no bearer
/// credential at all (none, or another scheme such as `Basic`).
fn www_authenticate(token: TokenError, realm: &str) -> String {
    let realm = realm.replace(['"', '\\'], "");
    if no_bearer_credential(token) {
        format!("Bearer realm=\"{realm}\"")
    } else if token.is_dpop_proof_error() {
        let error = if token.needs_dpop_nonce() {
            "use_dpop_nonce"
        } else {
            "invalid_dpop_proof"
        };
        format!(
            "DPoP realm=\"{realm}\", error=\"{error}\", error_description=\"{}\"",
            token.public_description()
        )
    } else {
        format!(
            "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{}\"",
            token.public_description()
        )
    }
}

fn no_bearer_credential(token: TokenError) -> bool {
    matches!(token, TokenError::Missing | TokenError::NotBearer)
}
