//! Authentication: from the request's credential to a verified identity.
//!
//! - [`credential`] extracts the bearer token from the request headers;
//! - [`jwks`] loads an issuer's public keys, each pinned to one algorithm;
//! - [`jwt`] verifies a token against its issuer's rules;
//! - [`mint`] signs development tokens (for trying things out only).

pub mod credential;
pub mod jwks;
pub mod jwt;
pub mod mint;

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
    /// A required claim (`exp`, `iat`, `sub`) is absent. (A missing `aud` is
    /// [`TokenError::WrongAudience`], a missing `iss` [`TokenError::UnknownIssuer`].)
    #[error("token lacks a required claim")]
    MissingClaim,
    /// The credential verified but is revoked (by jti, subject, key, client or
    /// API key id; see `crate::revocation`).
    #[error("token is revoked")]
    Revoked,
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
            TokenError::Revoked => "revoked",
        }
    }

    /// What the caller is told in `error_description`: enough to fix an honest
    /// mistake, nothing that helps probe keys or issuers.
    pub fn public_description(self) -> &'static str {
        match self {
            TokenError::Missing => "a bearer token is required",
            TokenError::Expired => "the access token expired",
            TokenError::NotYetValid => "the access token is not yet valid",
            TokenError::LifetimeTooLong => "the access token lifetime is too long",
            _ => "the access token is invalid",
        }
    }
}

/// The identity established from a verified token: what later stages may rely on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The configured issuer that vouched for the token (`iss`).
    pub issuer: String,
    /// The `sub` claim: the principal id.
    pub subject: String,
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
}
