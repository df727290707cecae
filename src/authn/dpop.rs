//! DPoP proofs (RFC 9449): verification of the `DPoP` header and the replay
//! cache of proof `jti`s. (Being written.)

/// Why a DPoP proof (or its absence) was refused. Each variant is one reason
/// class of the audit line; the answer is 401 with
/// `WWW-Authenticate: DPoP error="invalid_dpop_proof"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    /// A DPoP-bound token (or the `DPoP` scheme) without a `DPoP` header.
    #[error("DPoP proof missing")]
    Missing,
    /// The proof is not a JWS with a usable header, claims or key.
    #[error("DPoP proof is malformed")]
    Malformed,
    /// The proof's `alg` is not one of `[sender_constraint] dpop_algorithms`.
    #[error("DPoP proof algorithm is not accepted")]
    UnsupportedAlgorithm,
    /// `typ` is not `dpop+jwt`.
    #[error("DPoP proof type is not dpop+jwt")]
    WrongType,
    /// The signature does not verify with the header's `jwk`.
    #[error("DPoP proof signature is invalid")]
    BadSignature,
    /// `htm` is not the request's method.
    #[error("DPoP proof method does not match the request")]
    WrongMethod,
    /// `htu` is not the request's URI.
    #[error("DPoP proof URI does not match the request")]
    WrongUri,
    /// `iat` is older than `dpop_max_age` or further in the future than the skew.
    #[error("DPoP proof is stale or from the future")]
    Stale,
    /// `ath` is absent or is not the hash of the access token.
    #[error("DPoP proof is not for this access token")]
    WrongAccessToken,
    /// The proof's key is not the key the token is bound to (`cnf.jkt`).
    #[error("DPoP proof key does not match the token's binding")]
    KeyMismatch,
    /// The proof's `jti` was seen before within the window.
    #[error("DPoP proof was replayed")]
    Replayed,
    /// The replay cache could not be asked (shared cache unreachable): fail closed.
    #[error("DPoP proof replay check failed")]
    ReplayCheckFailed,
}

impl DpopError {
    /// The stable reason class written to the audit line.
    pub fn class(self) -> &'static str {
        match self {
            DpopError::Missing => "dpop_proof_missing",
            DpopError::Malformed => "dpop_proof_malformed",
            DpopError::UnsupportedAlgorithm => "dpop_unsupported_algorithm",
            DpopError::WrongType => "dpop_wrong_type",
            DpopError::BadSignature => "dpop_bad_signature",
            DpopError::WrongMethod => "dpop_wrong_method",
            DpopError::WrongUri => "dpop_wrong_uri",
            DpopError::Stale => "dpop_stale",
            DpopError::WrongAccessToken => "dpop_wrong_access_token",
            DpopError::KeyMismatch => "dpop_key_mismatch",
            DpopError::Replayed => "dpop_replayed",
            DpopError::ReplayCheckFailed => "dpop_replay_check_failed",
        }
    }
}
