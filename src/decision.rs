//! The decision: the one value the response, the audit line and the logs derive from.

use std::time::Duration;

use crate::authn::TokenError;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The request itself is unusable (no HTTP attributes, non-canonical path).
    BadRequest(BadRequest),
    /// The credential is missing or invalid.
    Unauthenticated(TokenError),
    /// No route matches and no default action is configured.
    NoRoute,
    /// The policies deny (a forbid applies, or no permit does).
    PolicyDenied,
    /// A policy raised an evaluation error (fail closed).
    PolicyError,
    /// The request does not fit the schema: a configuration problem, denied.
    SchemaMismatch,
    /// Policies and keys are not loaded yet.
    NotReady,
}

/// What made a request unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// The `CheckRequest` carries no HTTP request attributes.
    MissingHttpAttributes,
    /// The path has dot segments or encoded separators.
    NonCanonicalPath,
    /// No method or path.
    MissingMethodOrPath,
}

impl DenyReason {
    /// The stable reason class written to the audit line.
    pub fn class(self) -> &'static str {
        match self {
            DenyReason::BadRequest(BadRequest::MissingHttpAttributes) => "missing_http_attributes",
            DenyReason::BadRequest(BadRequest::NonCanonicalPath) => "non_canonical_path",
            DenyReason::BadRequest(BadRequest::MissingMethodOrPath) => "missing_method_or_path",
            DenyReason::Unauthenticated(token) => token.class(),
            DenyReason::NoRoute => "no_route",
            DenyReason::PolicyDenied => "policy_denied",
            DenyReason::PolicyError => "policy_error",
            DenyReason::SchemaMismatch => "schema_mismatch",
            DenyReason::NotReady => "not_ready",
        }
    }
}

/// Allow, or deny with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The request may proceed.
    Allow,
    /// The request is refused.
    Deny(DenyReason),
}

impl Verdict {
    /// The reason class: `allowed` or the deny reason's class.
    pub fn class(self) -> &'static str {
        match self {
            Verdict::Allow => "allowed",
            Verdict::Deny(reason) => reason.class(),
        }
    }

    /// True for an allow.
    pub fn is_allow(self) -> bool {
        self == Verdict::Allow
    }

    /// The HTTP status the client gets for this verdict (through Envoy, and
    /// in the audit line): 200, 400 for an unusable request, 401 for a
    /// credential, 503 when a dependency failed or nothing is loaded yet
    /// (retryable, not the caller's fault), 403 otherwise.
    pub fn http_status(self) -> u16 {
        match self {
            Verdict::Allow => 200,
            Verdict::Deny(DenyReason::BadRequest(_)) => 400,
            Verdict::Deny(DenyReason::Unauthenticated(e)) if e.is_dependency_failure() => 503,
            Verdict::Deny(DenyReason::Unauthenticated(_)) => 401,
            Verdict::Deny(DenyReason::NotReady) => 503,
            Verdict::Deny(_) => 403,
        }
    }
}

/// Everything known about one decision.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Unique, time-ordered id (UUIDv7), returned to the caller for support.
    pub id: String,
    /// The outcome.
    pub verdict: Verdict,
    /// Cedar principal, e.g. `User::"alice"`, once the token verified.
    pub principal: Option<String>,
    /// The token subject, for the identity header.
    pub subject: Option<String>,
    /// Cedar action, e.g. `Action::"get /orders/{id}"`.
    pub action: Option<String>,
    /// Cedar resource, e.g. `Application::"orders"`.
    pub resource: Option<String>,
    /// Determining policy ids.
    pub policies: std::sync::Arc<[String]>,
    /// Evaluation errors.
    pub errors: Vec<String>,
    /// Token issuer, once verified.
    pub issuer: Option<String>,
    /// Token `jti`, once verified.
    pub jti: Option<String>,
    /// The API key id, for API-key credentials.
    pub api_key_id: Option<String>,
    /// The kind of credential that authenticated (`jwt`, `api_key`, ...).
    pub credential: Option<&'static str>,
    /// How the token is bound to its sender (`dpop`, `mtls`), if it is.
    pub binding: Option<&'static str>,
    /// What the `[[responses]]` profiles that applied add to the answer.
    pub shaping: Option<std::sync::Arc<Shaping>>,
    /// What the policies could read, for an exact replay (`[audit]
    /// record_inputs`); `Check` decisions that reached the policies only.
    pub inputs: Option<Box<DecisionInputs>>,
    /// HTTP method.
    pub method: String,
    /// HTTP path without query string.
    pub path: String,
    /// Time spent deciding.
    pub elapsed: Duration,
    /// The verdict is a deny that dry-run mode turns into an allow.
    pub dry_run: bool,
    /// Generation of the policy set that decided (0: none loaded).
    pub policy_generation: u64,
    /// Content digest of that policy set.
    pub policy_digest: Option<std::sync::Arc<str>>,
    /// The mTLS identity of the connection that asked (Envoy, or the service
    /// calling `IsAuthorized`): see `crate::tls::PeerInfo::caller`.
    pub caller: Option<std::sync::Arc<str>>,
}

/// What response profiles add to a decision's answer, rendered for its
/// identity (see `crate::answer::profile`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shaping {
    /// The profiles that applied, route's first.
    pub profiles: Vec<String>,
    /// On allow: headers set on the upstream request.
    pub upstream_headers: Vec<(String, String)>,
    /// On allow: headers removed from the upstream request.
    pub remove_upstream_headers: Vec<String>,
    /// On allow: query parameters set.
    pub set_query: Vec<(String, String)>,
    /// On allow: query parameters removed.
    pub remove_query: Vec<String>,
    /// Headers added to the client's response (allow and policy deny).
    pub client_headers: Vec<(String, String)>,
    /// How a policy deny is answered, when a profile says.
    pub deny: Option<DenyProblem>,
}

/// The identity and request facts of a decision beyond what the audit line
/// always says: with it, a decision line is a `portcullis replay` record.
/// Never the token, its signature or key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DecisionInputs {
    /// The principal's Cedar type.
    pub principal_type: String,
    /// The principal's Cedar id.
    pub principal_id: String,
    /// The credential's roles.
    pub roles: Vec<String>,
    /// The credential's scopes.
    pub scopes: Vec<String>,
    /// `iat`, seconds since the epoch.
    pub iat: i64,
    /// `exp`, seconds since the epoch.
    pub exp: i64,
    /// `client_id` (or `azp`).
    pub client_id: Option<String>,
    /// The request's host.
    pub host: String,
    /// The request's scheme.
    pub scheme: String,
    /// The client's address.
    pub source_ip: Option<String>,
    /// The trusted mTLS peer identity, when the route allows workloads.
    pub workload: Option<String>,
}

/// An RFC 9457 problem a policy deny is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyProblem {
    /// The HTTP status (400 to 599).
    pub status: u16,
    /// `title`.
    pub title: Option<String>,
    /// `detail`.
    pub detail: Option<String>,
    /// `type` (a URI; `about:blank` when unset).
    pub problem_type: Option<String>,
}

impl Decision {
    /// A fresh decision for a request, denied until proven otherwise.
    pub fn new(method: &str, path: &str) -> Decision {
        Decision {
            id: uuid::Uuid::now_v7().to_string(),
            verdict: Verdict::Deny(DenyReason::NotReady),
            principal: None,
            subject: None,
            action: None,
            resource: None,
            policies: std::sync::Arc::from([]),
            errors: Vec::new(),
            issuer: None,
            jti: None,
            credential: None,
            binding: None,
            shaping: None,
            inputs: None,
            api_key_id: None,
            method: method.to_owned(),
            path: path.to_owned(),
            elapsed: Duration::ZERO,
            dry_run: false,
            policy_generation: 0,
            policy_digest: None,
            caller: None,
        }
    }

    /// What the caller gets: the verdict, or an allow for a dry-run deny.
    pub fn effective_verdict(&self) -> Verdict {
        if self.dry_run {
            Verdict::Allow
        } else {
            self.verdict
        }
    }

    /// What the caller got: `allow`, `deny`, or `would_deny` (a dry-run deny
    /// that was answered as an allow).
    pub fn outcome(&self) -> &'static str {
        match (self.verdict.is_allow(), self.dry_run) {
            (true, _) => "allow",
            (false, true) => "would_deny",
            (false, false) => "deny",
        }
    }

    /// Which check refused the request: `token:<reason>`, `revocation`,
    /// `route`, `policy:forbid` / `policy:no_permit` / `policy:error` (the
    /// policy ids are in the decision), `schema`, `bad_request:<reason>` or
    /// `not_ready`; `None` for an allow.
    pub fn failed_check(&self) -> Option<String> {
        let Verdict::Deny(reason) = self.verdict else {
            return None;
        };
        Some(match reason {
            DenyReason::Unauthenticated(TokenError::Revoked) => "revocation".into(),
            DenyReason::Unauthenticated(token) => format!("token:{}", token.class()),
            DenyReason::BadRequest(_) => format!("bad_request:{}", reason.class()),
            DenyReason::NoRoute => "route".into(),
            DenyReason::PolicyDenied if self.policies.is_empty() => "policy:no_permit".into(),
            DenyReason::PolicyDenied => "policy:forbid".into(),
            DenyReason::PolicyError => "policy:error".into(),
            DenyReason::SchemaMismatch => "schema".into(),
            DenyReason::NotReady => "not_ready".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_check_names_the_stage() {
        let mut d = Decision::new("GET", "/");
        d.verdict = Verdict::Allow;
        assert_eq!(d.failed_check(), None);
        assert_eq!(d.outcome(), "allow");
        d.verdict = Verdict::Deny(DenyReason::Unauthenticated(TokenError::Expired));
        assert_eq!(d.failed_check().as_deref(), Some("token:expired"));
        assert_eq!(d.outcome(), "deny");
        d.verdict = Verdict::Deny(DenyReason::PolicyDenied);
        assert_eq!(d.failed_check().as_deref(), Some("policy:no_permit"));
        d.policies = vec!["forbid-deletes".into()].into();
        assert_eq!(d.failed_check().as_deref(), Some("policy:forbid"));
        d.dry_run = true;
        assert_eq!(d.outcome(), "would_deny");
    }

    #[test]
    fn http_statuses_by_reason() {
        use TokenError::*;
        let deny = |r| Verdict::Deny(r);
        assert_eq!(Verdict::Allow.http_status(), 200);
        assert_eq!(
            deny(DenyReason::BadRequest(BadRequest::NonCanonicalPath)).http_status(),
            400
        );
        assert_eq!(
            deny(DenyReason::Unauthenticated(Expired)).http_status(),
            401
        );
        assert_eq!(
            deny(DenyReason::Unauthenticated(IntrospectionFailed)).http_status(),
            503
        );
        assert_eq!(deny(DenyReason::NotReady).http_status(), 503);
        assert_eq!(deny(DenyReason::PolicyDenied).http_status(), 403);
        assert_eq!(deny(DenyReason::NoRoute).http_status(), 403);
    }
}
