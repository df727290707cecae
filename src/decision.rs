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
}
