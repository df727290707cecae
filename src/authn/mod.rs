//! Authentication: from the request's credential to a verified identity.
//!
//! - [`authenticator`] is the stage itself: credential choice, verification,
//!   the lifetime rules, the revocation check, counters;
//! - [`token_cache`] keeps verified tokens so a token is verified once;
//! - [`credential`] extracts the bearer token from the request headers;
//! - [`jwks`] parses an issuer's public keys, each pinned to one algorithm;
//! - [`keys`] keeps them: a local file, or a remote JWKS refreshed in the background;
//! - [`jwt`] verifies a token against its issuer's rules;
//! - [`introspection`] asks the issuer about opaque tokens (RFC 7662);
//! - [`workload`] turns an mTLS peer's SPIFFE identity into a principal;
//! - [`api_key`] verifies opaque API keys against a file of their hashes;
//! - [`dpop`] checks DPoP proofs (RFC 9449) and remembers their `jti`s;
//! - [`sender_constraint`] checks DPoP-bound and certificate-bound tokens
//!   against the request and what issuers and routes require;
//! - [`status_list`] checks tokens against their issuer's Token Status List;
//! - [`mint`] signs development tokens (for trying things out only).

pub mod api_key;
pub mod authenticator;
pub mod claims;
pub mod credential;
pub mod dpop;
pub mod introspection;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod mint;
pub mod sender_constraint;
pub mod status_list;
pub mod token_cache;
pub mod workload;

/// Largest accepted token, checked before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a credential was refused. Each variant is one reason class of the audit
/// line; the HTTP answer is always 401 with `error="invalid_token"` (or no error
/// code at all for a missing credential, as RFC 6750 asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `authorization` header.
    #[error("no bearer token")]
    Missing,
    /// An `authorization` header whose scheme is not `Bearer`, or an empty token.
    #[error("authorization header is not a bearer token")]
    NotBearer,
    /// Longer than [`MAX_TOKEN_BYTES`].
    #[error("token larger than 16 KiB")]
    TooLarge,
    /// Not three base64url JSON parts, or claims of the wrong type.
    #[error("token is malformed")]
    Malformed,
    /// `alg` is `none`, HMAC, or not one we accept.
    #[error("token algorithm is not accepted")]
    UnsupportedAlgorithm,
    /// The header lists `crit` extensions we do not implement.
    #[error("token header has unsupported critical parameters")]
    UnsupportedCritical,
    /// `iss` names no configured issuer.
    #[error("token issuer is not trusted")]
    UnknownIssuer,
    /// No key of the issuer has the token's `kid`.
    #[error("token key id is unknown")]
    UnknownKey,
    /// The token's `alg` is not the algorithm its key is pinned to.
    #[error("token algorithm does not match its key")]
    AlgorithmMismatch,
    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` names none of the issuer's audiences.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// `exp - iat` exceeds the issuer's `max_token_lifetime`.
    #[error("token lifetime exceeds the maximum")]
    LifetimeTooLong,
    /// The `typ` header is not the issuer's required token type.
    #[error("token type is not accepted")]
    WrongTokenType,
    /// Introspection says the token is not active.
    #[error("token is not active")]
    InactiveToken,
    /// The introspection endpoint failed or timed out (fail closed).
    #[error("token introspection failed")]
    IntrospectionFailed,
    /// A required claim (`exp`, `iat`, `sub`) is absent. (A missing `aud` is
    /// [`TokenError::WrongAudience`], a missing `iss` [`TokenError::UnknownIssuer`].)
    #[error("token lacks a required claim")]
    MissingClaim,
    /// An API key whose id is unknown or whose secret is wrong (the two are not
    /// told apart, so key ids cannot be probed).
    #[error("API key is unknown")]
    UnknownApiKey,
    /// An API key that is disabled in the key file.
    #[error("API key is disabled")]
    DisabledApiKey,
    /// An API key past its `expires` time.
    #[error("API key expired")]
    ExpiredApiKey,
    /// The credential verified but is revoked (by jti, subject, key, client or
    /// API key id; see `crate::revocation`).
    #[error("token is revoked")]
    Revoked,
    /// `IsAuthorized` asserted a workload identity, but the caller is not an
    /// mTLS client that `[workload] asserting_callers` allows to assert one.
    #[error("the caller may not assert a workload identity")]
    UntrustedCaller,
    /// The issuer or route requires a sender-constrained token (`[[issuers]]` /
    /// `[[routes]] require_sender_constraint`) and this one is not bound, or
    /// bound the other way.
    #[error("a sender-constrained token is required")]
    SenderConstraintRequired,
    /// A `cnf` claim with no confirmation method we can check (fail closed).
    #[error("token confirmation method is not supported")]
    UnsupportedBinding,
    /// A certificate-bound token (`cnf["x5t#S256"]`) over a connection without
    /// that client certificate.
    #[error("client certificate does not match the token's binding")]
    CertificateMismatch,
    /// A DPoP-bound token (`cnf.jkt`) presented with the `Bearer` scheme.
    #[error("a DPoP-bound token was presented as a bearer token")]
    DpopBoundAsBearer,
    /// The `DPoP` scheme with a token that is not DPoP-bound.
    #[error("the DPoP scheme was used with a token that is not DPoP-bound")]
    DpopSchemeUnbound,
    /// A DPoP proof problem (RFC 9449).
    #[error(transparent)]
    Dpop(#[from] dpop::DpopError),
    /// The token's status list marks it invalid (revoked) or suspended.
    #[error("token status is not valid")]
    StatusNotValid,
    /// The token's status list could not be fetched or verified and the last
    /// good copy is past its validity (and grace): fail closed.
    #[error("token status could not be checked")]
    StatusUnavailable,
}

impl TokenError {
    /// The stable reason class written to the audit line.
    pub fn class(self) -> &'static str {
        match self {
            TokenError::Missing => "missing_token",
            TokenError::NotBearer => "not_bearer",
            TokenError::TooLarge => "token_too_large",
            TokenError::Malformed => "malformed_token",
            TokenError::UnsupportedAlgorithm => "unsupported_algorithm",
            TokenError::UnsupportedCritical => "unsupported_critical_header",
            TokenError::UnknownIssuer => "unknown_issuer",
            TokenError::UnknownKey => "unknown_key",
            TokenError::AlgorithmMismatch => "algorithm_mismatch",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::LifetimeTooLong => "lifetime_too_long",
            TokenError::MissingClaim => "missing_claim",
            TokenError::WrongTokenType => "wrong_token_type",
            TokenError::InactiveToken => "inactive_token",
            TokenError::IntrospectionFailed => "introspection_failed",
            TokenError::UnknownApiKey => "unknown_api_key",
            TokenError::DisabledApiKey => "disabled_api_key",
            TokenError::ExpiredApiKey => "expired_api_key",
            TokenError::Revoked => "revoked",
            TokenError::UntrustedCaller => "untrusted_caller",
            TokenError::SenderConstraintRequired => "sender_constraint_required",
            TokenError::UnsupportedBinding => "unsupported_binding",
            TokenError::CertificateMismatch => "certificate_mismatch",
            TokenError::DpopBoundAsBearer => "dpop_bound_as_bearer",
            TokenError::DpopSchemeUnbound => "dpop_scheme_unbound",
            TokenError::Dpop(e) => e.class(),
            TokenError::StatusNotValid => "token_status_not_valid",
            TokenError::StatusUnavailable => "token_status_unavailable",
        }
    }

    /// A dependency of the check failed (the introspection endpoint, a
    /// status list, the shared DPoP replay cache), not the caller's
    /// credential: answered 503, without a challenge.
    pub fn is_dependency_failure(self) -> bool {
        matches!(
            self,
            TokenError::IntrospectionFailed
                | TokenError::StatusUnavailable
                | TokenError::Dpop(dpop::DpopError::ReplayCheckFailed)
        )
    }

    /// The `DPoP` challenge (`error="invalid_dpop_proof"`, RFC 9449 §7.1)
    /// fits this refusal better than the `Bearer` one.
    pub fn is_dpop_proof_error(self) -> bool {
        matches!(self, TokenError::Dpop(_) | TokenError::DpopBoundAsBearer)
    }

    /// The proof lacked a valid server nonce: the client retries with the
    /// `DPoP-Nonce` it is sent (`error="use_dpop_nonce"`).
    pub fn needs_dpop_nonce(self) -> bool {
        matches!(self, TokenError::Dpop(e) if e.needs_nonce())
    }

    /// What the caller is told in `error_description`: enough to fix an honest
    /// mistake, nothing that helps probe keys or issuers.
    pub fn public_description(self) -> &'static str {
        match self {
            TokenError::Missing => "a bearer token is required",
            TokenError::Expired => "the access token expired",
            TokenError::NotYetValid => "the access token is not yet valid",
            TokenError::LifetimeTooLong => "the access token lifetime is too long",
            TokenError::IntrospectionFailed | TokenError::StatusUnavailable => {
                "the access token could not be checked; retry later"
            }
            TokenError::Dpop(dpop::DpopError::ReplayCheckFailed) => {
                "the DPoP proof could not be checked; retry later"
            }
            TokenError::Dpop(dpop::DpopError::NonceMissing | dpop::DpopError::NonceInvalid) => {
                "the DPoP proof must carry the server's nonce"
            }
            TokenError::Dpop(_) | TokenError::DpopBoundAsBearer => "the DPoP proof is invalid",
            TokenError::DpopSchemeUnbound => "the access token is not DPoP-bound",
            TokenError::SenderConstraintRequired => "a sender-constrained access token is required",
            TokenError::CertificateMismatch => {
                "the client certificate does not match the access token"
            }
            TokenError::ExpiredApiKey => "the API key expired",
            TokenError::UnknownApiKey | TokenError::DisabledApiKey => "the API key is invalid",
            _ => "the access token is invalid",
        }
    }
}

/// What kind of credential established an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// A signed JWT verified with the issuer's keys.
    Jwt,
    /// An opaque token vouched for by the issuer's introspection endpoint.
    Introspected,
    /// An opaque API key from the key file.
    ApiKey,
    /// An mTLS peer's SPIFFE identity, on a route that allows it.
    Workload,
    /// A subject asserted by an authenticated AuthZEN caller (the policy
    /// enforcement point vouches for it; nothing is presented to verify).
    Authzen,
}

impl CredentialKind {
    /// Name used in the audit line.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Jwt => "jwt",
            CredentialKind::Introspected => "introspection",
            CredentialKind::ApiKey => "api_key",
            CredentialKind::Authzen => "authzen",
            CredentialKind::Workload => "workload",
        }
    }
}

/// The identity established from a verified credential: what later stages may rely on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The configured issuer that vouched for the credential (`iss`), or
    /// `api-key` / `workload` for those credentials.
    pub issuer: String,
    /// The `sub` claim (the principal id when there is no `sub`).
    pub subject: String,
    /// Cedar entity type of the principal, e.g. `User` or `Client`.
    pub principal_type: String,
    /// Cedar entity id of the principal.
    pub principal_id: String,
    /// The `jti` claim, if any.
    pub jti: Option<String>,
    /// Issued-at, seconds since the epoch.
    pub issued_at: i64,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
    /// Scopes from `scope` (space separated) or `scp` (array or string).
    pub scopes: Vec<String>,
    /// Roles from the issuer's roles claim.
    pub roles: Vec<String>,
    /// The `client_id` (or `azp`) claim, if any.
    pub client_id: Option<String>,
    /// The `kid` of the key that verified the signature (empty for credentials
    /// that are not signed tokens).
    pub key_id: String,
    /// The id of the API key this identity came from, for API-key credentials.
    pub api_key_id: Option<String>,
    /// How the identity was established.
    pub credential: CredentialKind,
    /// The key or certificate the token is bound to (`cnf`), if any.
    pub binding: Option<TokenBinding>,
    /// Where the token's status is published (`status.status_list`), if anywhere.
    pub status: Option<StatusReference>,
    /// The claims `[[responses]]` templates read (`{claims.<name>}`), as text:
    /// strings as they are, numbers and booleans in JSON form. JWTs only.
    pub claims: Vec<(String, String)>,
}

impl VerifiedToken {
    /// An identity that is only a principal: no claims, times, scopes, roles
    /// or binding. For identities vouched for by the connection or the
    /// caller (a workload's SPIFFE ID, an AuthZEN subject), and for tests.
    pub fn principal_only(
        issuer: &str,
        principal_type: &str,
        principal_id: &str,
        credential: CredentialKind,
    ) -> VerifiedToken {
        VerifiedToken {
            issuer: issuer.to_owned(),
            subject: principal_id.to_owned(),
            principal_type: principal_type.to_owned(),
            principal_id: principal_id.to_owned(),
            jti: None,
            issued_at: 0,
            expires_at: 0,
            scopes: Vec::new(),
            roles: Vec::new(),
            client_id: None,
            key_id: String::new(),
            api_key_id: None,
            credential,
            binding: None,
            status: None,
            claims: Vec::new(),
        }
    }
}

/// A token's `status.status_list` claim (Token Status List): which entry of
/// which list holds its status. Checked by [`status_list`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatusReference {
    /// `uri`: where the Status List Token is fetched.
    pub uri: String,
    /// `idx`: the token's entry in the list.
    pub idx: u64,
}

/// What a sender-constrained token is bound to (its `cnf` claim, RFC 7800).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenBinding {
    /// `cnf.jkt`: the RFC 7638 thumbprint of the DPoP key (RFC 9449).
    Dpop {
        /// base64url SHA-256 JWK thumbprint.
        jkt: String,
    },
    /// `cnf["x5t#S256"]`: the client certificate's thumbprint (RFC 8705).
    Mtls {
        /// base64url SHA-256 of the certificate's DER.
        x5t_s256: String,
    },
}

impl TokenBinding {
    /// `dpop` or `mtls`: the audit line's and Cedar's name for it.
    pub fn kind(&self) -> &'static str {
        match self {
            TokenBinding::Dpop { .. } => "dpop",
            TokenBinding::Mtls { .. } => "mtls",
        }
    }
}
