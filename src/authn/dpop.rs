//! DPoP proofs (RFC 9449): verification of the `DPoP` header and the replay
//! cache of proof `jti`s.
//!
//! [`DpopVerifier::verify`] checks one proof for one request (RFC 9449 §4.3):
//! the cheap structural and claim checks first, then the signature, and only
//! then records the proof's `(jkt, jti)` so that nothing unsigned can fill the
//! replay cache. Replays are refused per instance (a bounded in-memory cache)
//! and, with [`DpopVerifier::with_shared_replay`], across instances (Redis
//! `SET NX`). A replay cache that cannot answer or remember refuses the proof
//! (fail closed). Neither the proof, the access token nor keys are logged or
//! put in errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq as _;

use crate::config::SenderConstraintConfig;

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
    /// Server nonces are required (`dpop_nonce`) and the proof carries none.
    #[error("DPoP proof has no server nonce")]
    NonceMissing,
    /// The proof's `nonce` was not issued by this deployment, or has expired.
    #[error("DPoP proof nonce is invalid or expired")]
    NonceInvalid,
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
            DpopError::NonceMissing => "dpop_nonce_missing",
            DpopError::NonceInvalid => "dpop_nonce_invalid",
        }
    }

    /// The client must retry with the nonce it is sent (RFC 9449 §8:
    /// `error="use_dpop_nonce"`).
    pub fn needs_nonce(self) -> bool {
        matches!(self, DpopError::NonceMissing | DpopError::NonceInvalid)
    }
}

/// Largest accepted proof (the whole header value), in bytes.
pub const MAX_PROOF_BYTES: usize = 8 * 1024;

/// Longest accepted `jti`, in bytes (bounds the replay cache's input).
pub const MAX_JTI_BYTES: usize = 256;

/// How long one shared replay check (connect and `SET`) may take before the
/// proof is refused.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// Algorithms a proof may be signed with: asymmetric ones jsonwebtoken verifies.
const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
];

/// JWK members that only a private (or symmetric) key has.
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Why `[sender_constraint]` cannot be used for DPoP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopConfigError {
    /// A `dpop_algorithms` entry is not an asymmetric signature algorithm
    /// jsonwebtoken supports (`none`, `HS256`, unknown names...).
    #[error(
        "[sender_constraint] dpop_algorithms: {0:?} is not accepted (use ES256, ES384, EdDSA, PS256, PS384, PS512, RS256, RS384 or RS512)"
    )]
    UnsupportedAlgorithm(String),
    /// `dpop_algorithms` is empty: every proof would be refused.
    #[error("[sender_constraint] dpop_algorithms is empty")]
    NoAlgorithms,
    /// `dpop_max_age` is zero: every proof would be stale.
    #[error("[sender_constraint] dpop_max_age must be more than zero")]
    ZeroMaxAge,
    /// `dpop_replay_entries` is zero: every proof would be refused.
    #[error("[sender_constraint] dpop_replay_entries must be at least 1")]
    ZeroReplayEntries,
    /// The replay window (`dpop_max_age + dpop_clock_skew`) does not fit in
    /// Redis's `PX` milliseconds.
    #[error("[sender_constraint] dpop_max_age + dpop_clock_skew is too long")]
    WindowTooLong,
    /// The Redis URL for the shared replay cache is not usable.
    #[error("invalid Redis URL for the DPoP replay cache: {0}")]
    RedisUrl(String),
    /// `dpop_nonce_lifetime` is zero: every nonce would be expired.
    #[error("[sender_constraint] dpop_nonce_lifetime must be more than zero")]
    ZeroNonceLifetime,
    /// The nonce secret is too short (the file's contents are never shown).
    #[error(
        "[sender_constraint] dpop_nonce_secret_file must hold at least {MIN_NONCE_SECRET_BYTES} bytes"
    )]
    ShortNonceSecret,
    /// No random secret could be drawn for the nonces.
    #[error("no random nonce secret could be drawn from the system")]
    NoRandom,
}

/// Shortest nonce secret accepted, in bytes.
pub const MIN_NONCE_SECRET_BYTES: usize = 32;

/// Bytes of the truncated HMAC-SHA256 in a nonce (128 bits: forging one is
/// out of reach; the nonce stays short in every request).
const NONCE_MAC_BYTES: usize = 16;

/// Server nonces (RFC 9449 §8 and §9), stateless: a nonce is its issue time
/// and an HMAC of it under a secret, so any instance holding the secret
/// accepts it without shared state. Issue times are rounded down to a tenth
/// of the lifetime (1 s to 60 s), so one nonce serves many requests and the
/// `DPoP-Nonce` header rarely changes; the replay cache, not the nonce,
/// keeps a proof from being used twice.
pub struct DpopNonces {
    key: aws_lc_rs::hmac::Key,
    lifetime: i64,
    granularity: i64,
    clock_skew: i64,
}

// Hand-written: the key must never be printed.
impl std::fmt::Debug for DpopNonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopNonces")
            .field("lifetime", &self.lifetime)
            .field("granularity", &self.granularity)
            .finish_non_exhaustive()
    }
}

impl DpopNonces {
    /// Nonces under `secret` (at least [`MIN_NONCE_SECRET_BYTES`]), accepted
    /// for `lifetime` after issue and `clock_skew` before (instances' clocks
    /// differ a little).
    pub fn new(
        secret: &[u8],
        lifetime: Duration,
        clock_skew: Duration,
    ) -> Result<DpopNonces, DpopConfigError> {
        if secret.len() < MIN_NONCE_SECRET_BYTES {
            return Err(DpopConfigError::ShortNonceSecret);
        }
        let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        if lifetime == 0 {
            return Err(DpopConfigError::ZeroNonceLifetime);
        }
        Ok(DpopNonces {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret),
            lifetime,
            granularity: (lifetime / 10).clamp(1, 60),
            clock_skew: i64::try_from(clock_skew.as_secs()).unwrap_or(i64::MAX),
        })
    }

    /// Nonces under a fresh random secret: only this process accepts them.
    pub fn random(lifetime: Duration, clock_skew: Duration) -> Result<DpopNonces, DpopConfigError> {
        let mut secret = [0u8; MIN_NONCE_SECRET_BYTES];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| DpopConfigError::NoRandom)?;
        DpopNonces::new(&secret, lifetime, clock_skew)
    }

    /// The nonce to hand out at `now` (Unix seconds).
    pub fn issue(&self, now: i64) -> String {
        let issued = now - now.rem_euclid(self.granularity);
        let mut nonce = [0u8; 8 + NONCE_MAC_BYTES];
        nonce[..8].copy_from_slice(&issued.to_be_bytes());
        let tag = aws_lc_rs::hmac::sign(&self.key, &nonce[..8]);
        nonce[8..].copy_from_slice(&tag.as_ref()[..NONCE_MAC_BYTES]);
        b64().encode(nonce)
    }

    /// Whether `nonce` was issued under this secret and is still fresh at `now`.
    pub fn accepts(&self, nonce: &str, now: i64) -> bool {
        let mut bytes = [0u8; 8 + NONCE_MAC_BYTES];
        if nonce.len() > 64 || b64().decode_slice(nonce, &mut bytes) != Ok(bytes.len()) {
            return false;
        }
        let tag = aws_lc_rs::hmac::sign(&self.key, &bytes[..8]);
        let authentic: bool = tag.as_ref()[..NONCE_MAC_BYTES].ct_eq(&bytes[8..]).into();
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&bytes[..8]);
        let issued = i64::from_be_bytes(issued);
        authentic
            && issued <= now.saturating_add(self.clock_skew)
            && now.saturating_sub(issued) <= self.lifetime
    }
}

/// The request a proof must be for.
pub struct ProofRequest<'a> {
    /// The HTTP method (`:method`), compared exactly with `htm`.
    pub method: &'a str,
    /// `http` or `https` (`:scheme`).
    pub scheme: &'a str,
    /// The authority (`:authority` / `Host`), possibly with a port.
    pub authority: &'a str,
    /// The path (`:path`), which may carry `?query` (ignored).
    pub path: &'a str,
    /// The access token presented with the proof (hashed into `ath`).
    pub access_token: &'a str,
    /// The token's `cnf.jkt`: the thumbprint the proof key must have.
    pub expected_jkt: &'a str,
}

// Hand-written so that the access token is never printed.
impl std::fmt::Debug for ProofRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofRequest")
            .field("method", &self.method)
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field("access_token", &"<redacted>")
            .field("expected_jkt", &self.expected_jkt)
            .finish()
    }
}

/// What a verified proof established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    /// The RFC 7638 SHA-256 thumbprint of the proof key (equal to the token's
    /// `cnf.jkt`).
    pub jkt: String,
    /// The proof's `jti` (recorded in the replay cache).
    pub jti: String,
    /// The proof's `iat` (whole seconds).
    pub iat: i64,
}

/// Verifies DPoP proofs and remembers their `(jkt, jti)` for the replay
/// window. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct DpopVerifier {
    algorithms: Vec<Algorithm>,
    max_age: i64,
    clock_skew: i64,
    window: Duration,
    local: LocalReplay,
    shared: Option<SharedReplay>,
    nonces: Option<DpopNonces>,
}

// Hand-written: the Redis client's URL may hold a password.
impl std::fmt::Debug for DpopVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopVerifier")
            .field("algorithms", &self.algorithms)
            .field("max_age", &self.max_age)
            .field("clock_skew", &self.clock_skew)
            .field("replay_entries", &self.local.capacity)
            .field(
                "shared_replay_prefix",
                &self.shared.as_ref().map(|s| s.prefix.as_str()),
            )
            .field("nonces", &self.nonces)
            .finish()
    }
}

/// A Redis client for [`DpopVerifier::with_shared_replay`] from a URL such as
/// `[revocation] redis_url` (`redis://`, `rediss://`, `unix://`). Does not
/// connect. The error names the problem's kind only: the URL may hold a
/// password.
pub fn redis_client(url: &crate::config::Secret) -> Result<redis::Client, DpopConfigError> {
    // rediss:// uses rustls; make its crypto provider explicit (an error only
    // means one is installed already), as the revocation store does.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    redis::Client::open(url.expose()).map_err(|e| {
        DpopConfigError::RedisUrl(format!(
            "expected redis://[user:password@]host[:port][/db] or rediss://...; {:?}: {}",
            e.kind(),
            e.detail().unwrap_or("cannot be used")
        ))
    })
}

impl DpopVerifier {
    /// A verifier for `[sender_constraint]`. Refuses algorithms that are not
    /// asymmetric ones jsonwebtoken supports (`none`, `HS*`, unknown names),
    /// naming the first such entry, and settings that would refuse every proof.
    pub fn new(config: &SenderConstraintConfig) -> Result<DpopVerifier, DpopConfigError> {
        let mut algorithms = Vec::new();
        for name in &config.dpop_algorithms {
            // Exact names only: `es256` or ` ES256` are configuration typos.
            let algorithm = ASYMMETRIC
                .iter()
                .copied()
                .find(|a| algorithm_name(*a) == name)
                .ok_or_else(|| DpopConfigError::UnsupportedAlgorithm(name.clone()))?;
            if !algorithms.contains(&algorithm) {
                algorithms.push(algorithm);
            }
        }
        if algorithms.is_empty() {
            return Err(DpopConfigError::NoAlgorithms);
        }
        if config.dpop_max_age.is_zero() {
            return Err(DpopConfigError::ZeroMaxAge);
        }
        if config.dpop_replay_entries == 0 {
            return Err(DpopConfigError::ZeroReplayEntries);
        }
        let window = config
            .dpop_max_age
            .checked_add(config.dpop_clock_skew)
            .filter(|w| i64::try_from(w.as_millis()).is_ok())
            .ok_or(DpopConfigError::WindowTooLong)?;
        let seconds = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        Ok(DpopVerifier {
            algorithms,
            max_age: seconds(config.dpop_max_age),
            clock_skew: seconds(config.dpop_clock_skew),
            window,
            local: LocalReplay::new(config.dpop_replay_entries, window),
            shared: None,
            nonces: None,
        })
    }

    /// Requires every proof to carry a nonce `nonces` issued (RFC 9449 §9).
    pub fn with_nonces(mut self, nonces: DpopNonces) -> DpopVerifier {
        self.nonces = Some(nonces);
        self
    }

    /// A nonce to send the client (`DPoP-Nonce`), when nonces are required.
    pub fn fresh_nonce(&self, now: i64) -> Option<String> {
        self.nonces.as_ref().map(|n| n.issue(now))
    }

    /// Also records each proof in Redis (`SET <key_prefix>dpop:<hex> 1 NX PX
    /// <window>`), so that a proof replayed to another instance sharing the
    /// Redis is refused. Does not connect: the connection is opened at the
    /// first proof and again after any error.
    pub fn with_shared_replay(mut self, client: redis::Client, key_prefix: &str) -> DpopVerifier {
        self.shared = Some(SharedReplay {
            client,
            prefix: key_prefix.to_owned(),
            connection: tokio::sync::Mutex::new(None),
        });
        self
    }

    /// Verifies `proof` (the `DPoP` header value) for `request` at `now`
    /// (Unix seconds), then records it against replays. On success, returns
    /// the proof key's thumbprint, `jti` and `iat`.
    pub async fn verify(
        &self,
        proof: &str,
        request: &ProofRequest<'_>,
        now: i64,
    ) -> Result<VerifiedProof, DpopError> {
        let checked = self.check(proof, request, now)?;
        let key = replay_key(&checked.jkt, &checked.jti);
        // Local first: it is free, and a replay to this instance needs no Redis.
        self.local.record(key)?;
        if let Some(shared) = &self.shared {
            shared.record(&key, self.window).await?;
        }
        Ok(checked)
    }

    /// Every check but the replay cache, cheapest first, the signature last.
    fn check(
        &self,
        proof: &str,
        request: &ProofRequest<'_>,
        now: i64,
    ) -> Result<VerifiedProof, DpopError> {
        // Envoy joins repeated headers with ","; whitespace is never in a JWS.
        if proof.is_empty()
            || proof.len() > MAX_PROOF_BYTES
            || proof.bytes().any(|b| b == b',' || b.is_ascii_whitespace())
        {
            return Err(DpopError::Malformed);
        }
        let mut parts = proof.split('.');
        let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(DpopError::Malformed);
        };
        let header: ProofHeader = decode_part(header_b64)?;
        if header.typ.as_deref() != Some("dpop+jwt") {
            return Err(DpopError::WrongType);
        }
        let algorithm = header
            .alg
            .as_deref()
            .and_then(|name| {
                self.algorithms
                    .iter()
                    .copied()
                    .find(|a| algorithm_name(*a) == name)
            })
            .ok_or(DpopError::UnsupportedAlgorithm)?;
        // No extension is understood, so a critical one must be refused (RFC 7515 §4.1.11).
        if header.crit.is_some() {
            return Err(DpopError::Malformed);
        }
        let jwk = header.jwk.ok_or(DpopError::Malformed)?;
        let decoding_key = public_key(algorithm, &jwk)?;
        let jwk = Value::Object(jwk);
        let jkt = jwk_thumbprint(&jwk).ok_or(DpopError::Malformed)?;

        let claims: ProofClaims = decode_part(claims_b64)?;
        let jti = claims
            .jti
            .filter(|j| !j.is_empty() && j.len() <= MAX_JTI_BYTES)
            .ok_or(DpopError::Malformed)?;
        let htm = claims.htm.ok_or(DpopError::Malformed)?;
        let htu = claims.htu.ok_or(DpopError::Malformed)?;
        let iat = claims
            .iat
            .as_ref()
            .and_then(numeric_date)
            .ok_or(DpopError::Malformed)?;
        if htm != request.method {
            return Err(DpopError::WrongMethod);
        }
        let requested = normalize_target(request.scheme, request.authority, request.path);
        match (normalize_htu(&htu), requested) {
            (Some(claimed), Some(requested)) if claimed == requested => {}
            _ => return Err(DpopError::WrongUri),
        }
        if iat < now.saturating_sub(self.max_age) || iat > now.saturating_add(self.clock_skew) {
            return Err(DpopError::Stale);
        }
        let expected_ath = b64().encode(digest(request.access_token.as_bytes()));
        let ath_matches = claims
            .ath
            .as_deref()
            .is_some_and(|ath| bool::from(ath.as_bytes().ct_eq(expected_ath.as_bytes())));
        if !ath_matches {
            return Err(DpopError::WrongAccessToken);
        }
        if jkt != request.expected_jkt {
            return Err(DpopError::KeyMismatch);
        }

        // The signed message is the ASCII of the first two parts as received.
        let message_len = header_b64.len() + 1 + claims_b64.len();
        let message = &proof.as_bytes()[..message_len];
        let verified = !signature_b64.is_empty()
            && jsonwebtoken::crypto::verify(signature_b64, message, &decoding_key, algorithm)
                .unwrap_or(false);
        if !verified {
            return Err(DpopError::BadSignature);
        }
        // After the signature: a nonce error sends the client a new nonce,
        // which only a proof by the token's key earns.
        if let Some(nonces) = &self.nonces {
            let nonce = claims.nonce.as_deref().ok_or(DpopError::NonceMissing)?;
            if !nonces.accepts(nonce, now) {
                return Err(DpopError::NonceInvalid);
            }
        }
        Ok(VerifiedProof { jkt, jti, iat })
    }
}

/// The JOSE header members read (serde refuses a duplicate of any of them).
#[derive(Deserialize)]
struct ProofHeader {
    typ: Option<String>,
    alg: Option<String>,
    jwk: Option<Map<String, Value>>,
    crit: Option<Value>,
}

/// The claims read (serde refuses a duplicate of any of them).
#[derive(Deserialize)]
struct ProofClaims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    iat: Option<Value>,
    ath: Option<String>,
    nonce: Option<String>,
}

fn b64() -> base64::engine::GeneralPurpose {
    // Canonical only: no padding, no non-zero trailing bits.
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref());
    out
}

/// A base64url JSON part of the proof, or `Malformed`.
fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, DpopError> {
    let bytes = b64().decode(part).map_err(|_| DpopError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| DpopError::Malformed)
}

fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        // Never in a verifier's list (`new` refuses them).
        _ => "",
    }
}

/// A NumericDate (integer or fractional seconds) as whole seconds.
fn numeric_date(value: &Value) -> Option<i64> {
    let Value::Number(n) = value else {
        return None;
    };
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    // Out-of-range floats would saturate: refuse them rather than guess.
    n.as_f64()
        .filter(|f| f.is_finite() && f.abs() < 1e15)
        .map(|f| f.floor() as i64)
}

/// The verification key of a public `jwk` whose type fits `algorithm`.
fn public_key(algorithm: Algorithm, jwk: &Map<String, Value>) -> Result<DecodingKey, DpopError> {
    if PRIVATE_MEMBERS.iter().any(|m| jwk.contains_key(*m)) {
        return Err(DpopError::Malformed);
    }
    let text = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .ok_or(DpopError::Malformed)
    };
    // A coordinate of exactly `len` bytes (RFC 7518 §6.2.1.2, RFC 8037 §2).
    let sized = |name: &str, len: usize| -> Result<&str, DpopError> {
        let value = text(name)?;
        match b64().decode(value) {
            Ok(bytes) if bytes.len() == len => Ok(value),
            _ => Err(DpopError::Malformed),
        }
    };
    let (kty, crv) = (text("kty")?, jwk.get("crv").and_then(Value::as_str));
    let key = match (algorithm, kty, crv) {
        (Algorithm::ES256, "EC", Some("P-256")) => {
            DecodingKey::from_ec_components(sized("x", 32)?, sized("y", 32)?)
        }
        (Algorithm::ES384, "EC", Some("P-384")) => {
            DecodingKey::from_ec_components(sized("x", 48)?, sized("y", 48)?)
        }
        (Algorithm::EdDSA, "OKP", Some("Ed25519")) => {
            DecodingKey::from_ed_components(sized("x", 32)?)
        }
        (
            Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
            | Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512,
            "RSA",
            _,
        ) => DecodingKey::from_rsa_components(text("n")?, text("e")?),
        _ => return Err(DpopError::Malformed),
    };
    key.map_err(|_| DpopError::Malformed)
}

/// The RFC 7638 JWK SHA-256 thumbprint, base64url without padding: the
/// required members only, in lexicographic order, without whitespace (EC:
/// `crv`, `kty`, `x`, `y`; RSA: `e`, `kty`, `n`; OKP: `crv`, `kty`, `x`).
/// `None` for other key types or when a required member is not a string.
pub fn jwk_thumbprint(jwk: &Value) -> Option<String> {
    let member = |name: &str| jwk.get(name).and_then(Value::as_str);
    let kty = member("kty")?;
    let members: &[&str] = match kty {
        "EC" => &["crv", "kty", "x", "y"],
        "RSA" => &["e", "kty", "n"],
        "OKP" => &["crv", "kty", "x"],
        _ => return None,
    };
    let mut canonical = String::from("{");
    for (i, name) in members.iter().enumerate() {
        if i > 0 {
            canonical.push(',');
        }
        // serde_json escapes like RFC 8259 asks, so odd values stay unambiguous.
        canonical.push_str(&serde_json::to_string(name).ok()?);
        canonical.push(':');
        canonical.push_str(&serde_json::to_string(member(name)?).ok()?);
    }
    canonical.push('}');
    Some(b64().encode(digest(canonical.as_bytes())))
}

/// `htu` as `scheme://authority/path`, normalised, or `None` when it is not
/// an absolute URI of that shape.
fn normalize_htu(htu: &str) -> Option<String> {
    let (scheme, rest) = htu.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    normalize_target(scheme, authority, path)
}

/// `scheme://authority/path` with query and fragment dropped, scheme and host
/// lowercased, the scheme's default port removed, an empty path made `/`, and
/// percent-encodings normalised (RFC 3986 §6.2.2). `None` when a part is not
/// usable (userinfo, bad port, relative path...).
fn normalize_target(scheme: &str, authority: &str, path: &str) -> Option<String> {
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    if authority.is_empty()
        || authority
            .bytes()
            .any(|b| b == b'@' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return None;
    }
    let (host, port) = if authority.starts_with('[') {
        let close = authority.find(']')?;
        let (host, rest) = authority.split_at(close + 1);
        match rest {
            "" => (host, None),
            _ => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority.as_str(), None),
        }
    };
    if host.is_empty() || (!host.starts_with('[') && host.contains(':')) {
        return None;
    }
    let port = match port {
        // "host:" means the default port (RFC 3986 §6.2.3).
        None | Some("") => None,
        Some(digits) if digits.bytes().all(|b| b.is_ascii_digit()) => {
            let number: u16 = digits.parse().ok()?;
            let default = match scheme.as_str() {
                "https" => Some(443),
                "http" => Some(80),
                _ => None,
            };
            (default != Some(number)).then_some(number)
        }
        Some(_) => return None,
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = match path {
        "" => "/",
        p if p.starts_with('/') => p,
        _ => return None,
    };
    let mut out = format!("{scheme}://{host}");
    if let Some(port) = port {
        out.push_str(&format!(":{port}"));
    }
    out.push_str(&normalize_percent(path)?);
    Some(out)
}

/// Decodes percent-encoded unreserved characters and uppercases the hex
/// digits of the others (RFC 3986 §6.2.2.1, §6.2.2.2). A `%` not followed by
/// two hex digits is kept as is.
fn normalize_percent(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
        {
            let byte = (h * 16 + l) as u8;
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                out.push(byte);
            } else {
                out.extend_from_slice(format!("%{byte:02X}").as_bytes());
            }
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The replay cache key of a proof: SHA-256 of `jkt` and `jti`. The thumbprint
/// has a fixed length, so the concatenation is unambiguous.
fn replay_key(jkt: &str, jti: &str) -> [u8; 32] {
    let mut input = Vec::with_capacity(jkt.len() + 1 + jti.len());
    input.extend_from_slice(jkt.as_bytes());
    input.push(b'.');
    input.extend_from_slice(jti.as_bytes());
    digest(&input)
}

/// This instance's memory of recent proofs: at most `capacity` entries, each
/// kept for the replay window. When full of unexpired entries it refuses new
/// proofs instead of forgetting old ones (which would let them be replayed).
struct LocalReplay {
    seen: moka::sync::Cache<[u8; 32], ()>,
    /// Entries held plus insertions under way; decremented by the eviction
    /// listener (expiry), so it is exact, unlike moka's eventual count.
    live: Arc<AtomicU64>,
    capacity: u64,
}

impl LocalReplay {
    fn new(capacity: u64, window: Duration) -> LocalReplay {
        let live = Arc::new(AtomicU64::new(0));
        let released = live.clone();
        // No moka max_capacity: its size eviction would drop unexpired jtis.
        let seen = moka::sync::Cache::builder()
            .time_to_live(window)
            .eviction_listener(move |_, _, _| {
                released.fetch_sub(1, Ordering::SeqCst);
            })
            .build();
        LocalReplay {
            seen,
            live,
            capacity,
        }
    }

    fn reserve(&self) -> bool {
        self.live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    /// Records `key`: `Replayed` if present, `ReplayCheckFailed` if full.
    fn record(&self, key: [u8; 32]) -> Result<(), DpopError> {
        // A replay is a replay even when the cache is full.
        if self.seen.contains_key(&key) {
            return Err(DpopError::Replayed);
        }
        if !self.reserve() {
            // Expired entries may still be counted: purge them, then retry.
            self.seen.run_pending_tasks();
            if !self.reserve() {
                return Err(DpopError::ReplayCheckFailed);
            }
        }
        // Atomic per key: of two concurrent identical proofs, one is fresh.
        if self.seen.entry(key).or_insert(()).is_fresh() {
            Ok(())
        } else {
            self.live.fetch_sub(1, Ordering::SeqCst);
            Err(DpopError::Replayed)
        }
    }
}

/// The replay cache shared by instances through Redis.
struct SharedReplay {
    client: redis::Client,
    prefix: String,
    /// The multiplexed connection, opened at first use; `None` after an error
    /// so that the next proof reconnects. Locked only to read or (re)connect.
    connection: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl SharedReplay {
    /// `SET <prefix>dpop:<hex> 1 NX PX <window>`: `Replayed` when the key
    /// exists, `ReplayCheckFailed` on any error or timeout (fail closed).
    async fn record(&self, key: &[u8; 32], window: Duration) -> Result<(), DpopError> {
        let redis_key = format!("{}dpop:{}", self.prefix, hex::encode(key));
        let millis = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        // The connect and the SET each have their own timeout; this bounds the
        // whole, lock wait included.
        let outcome = tokio::time::timeout(REDIS_TIMEOUT * 2, async {
            let mut connection = self.connection().await?;
            redis::cmd("SET")
                .arg(&redis_key)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(millis)
                .query_async::<Option<String>>(&mut connection)
                .await
        })
        .await;
        match outcome {
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Ok(None)) => Err(DpopError::Replayed),
            Ok(Err(error)) => {
                // The error's kind only (its detail might echo the URL); debug
                // level, as every proof fails while Redis is down and the
                // audit line's reason class already says so.
                tracing::debug!(kind = ?error.kind(), "DPoP replay check in Redis failed");
                self.forget_connection();
                Err(DpopError::ReplayCheckFailed)
            }
            Err(_) => {
                tracing::debug!("DPoP replay check in Redis timed out");
                self.forget_connection();
                Err(DpopError::ReplayCheckFailed)
            }
        }
    }

    /// Drops the connection so that the next proof reconnects. Skipped when
    /// another proof holds the lock (it is connecting or reading the slot):
    /// waiting would add latency, and a still-broken connection is dropped by
    /// the next proof that fails on it.
    fn forget_connection(&self) {
        if let Ok(mut slot) = self.connection.try_lock() {
            slot.take();
        }
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use serde_json::json;

    use super::*;
    use crate::authn::mint::{SigningKey, pkcs8_pem};

    const NOW: i64 = 1_800_000_000;
    const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";

    fn config() -> SenderConstraintConfig {
        SenderConstraintConfig {
            dpop_algorithms: ASYMMETRIC
                .iter()
                .map(|a| algorithm_name(*a).into())
                .collect(),
            ..SenderConstraintConfig::default()
        }
    }

    fn verifier() -> DpopVerifier {
        DpopVerifier::new(&config()).unwrap()
    }

    /// A proof key: the signer and its public JWK as it goes in the header.
    struct ProofKey {
        signer: SigningKey,
        alg: &'static str,
        jwk: Value,
        thumbprint: String,
    }

    impl ProofKey {
        fn new(signer: SigningKey, alg: &'static str) -> ProofKey {
            let mut jwk = serde_json::to_value(&signer.public_jwks().keys[0]).unwrap();
            if let Some(map) = jwk.as_object_mut() {
                map.remove("kid");
            }
            let thumbprint = jwk_thumbprint(&jwk).unwrap();
            ProofKey {
                signer,
                alg,
                jwk,
                thumbprint,
            }
        }

        fn jkt(&self) -> String {
            self.thumbprint.clone()
        }

        /// A proof with this header and these claims, signed by this key.
        fn sign(&self, header: &Value, claims: &Value) -> String {
            self.signer.sign_raw(
                serde_json::to_string(header).unwrap().as_bytes(),
                serde_json::to_string(claims).unwrap().as_bytes(),
            )
        }

        fn header(&self) -> Value {
            json!({"typ": "dpop+jwt", "alg": self.alg, "jwk": self.jwk})
        }

        /// A valid proof for [`request`], with `edit` applied to its claims.
        fn proof_with(&self, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
            let mut claims = valid_claims();
            if let Some(map) = claims.as_object_mut() {
                edit(map);
            }
            self.sign(&self.header(), &claims)
        }

        fn proof(&self) -> String {
            self.proof_with(|_| {})
        }
    }

    fn valid_claims() -> Value {
        json!({
            "jti": uuid::Uuid::now_v7().to_string(),
            "htm": "POST",
            "htu": "https://api.example.com/orders",
            "iat": NOW,
            "ath": b64().encode(digest(TOKEN.as_bytes())),
        })
    }

    fn es256() -> &'static ProofKey {
        static KEY: OnceLock<ProofKey> = OnceLock::new();
        KEY.get_or_init(|| ProofKey::new(SigningKey::generate_es256(None).unwrap(), "ES256"))
    }

    fn ed25519() -> &'static ProofKey {
        static KEY: OnceLock<ProofKey> = OnceLock::new();
        KEY.get_or_init(|| {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(&rng).unwrap();
            let pem = pkcs8_pem(pkcs8.as_ref());
            ProofKey::new(
                SigningKey::from_pem(pem.as_bytes(), Algorithm::EdDSA, None).unwrap(),
                "EdDSA",
            )
        })
    }

    /// One RSA 2048 key, used as RS256 and PS256.
    fn rsa_pem() -> &'static str {
        static PEM: OnceLock<String> = OnceLock::new();
        PEM.get_or_init(|| {
            use aws_lc_rs::encoding::AsDer as _;
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let der: aws_lc_rs::encoding::Pkcs8V1Der<'static> = pair.as_der().unwrap();
            pkcs8_pem(der.as_ref())
        })
    }

    fn rsa(algorithm: Algorithm, alg: &'static str) -> ProofKey {
        ProofKey::new(
            SigningKey::from_pem(rsa_pem().as_bytes(), algorithm, None).unwrap(),
            alg,
        )
    }

    fn request(jkt: &str) -> ProofRequest<'_> {
        ProofRequest {
            method: "POST",
            scheme: "https",
            authority: "api.example.com",
            path: "/orders",
            access_token: TOKEN,
            expected_jkt: jkt,
        }
    }

    async fn verify_with<'a>(
        key: &'a ProofKey,
        proof: &str,
        edit: impl FnOnce(&mut ProofRequest<'a>),
    ) -> Result<VerifiedProof, DpopError> {
        let mut request = request(&key.thumbprint);
        edit(&mut request);
        verifier().verify(proof, &request, NOW).await
    }

    async fn verify(key: &ProofKey, proof: &str) -> Result<VerifiedProof, DpopError> {
        verify_with(key, proof, |_| {}).await
    }

    fn nonces(secret: &[u8]) -> DpopNonces {
        DpopNonces::new(secret, Duration::from_secs(300), Duration::from_secs(5)).unwrap()
    }

    /// With nonces required, a proof needs one this deployment issued, still
    /// fresh: missing, forged, foreign and expired nonces are refused, each
    /// with its class, and only after the signature checked out.
    #[tokio::test]
    async fn nonces_are_required_when_configured() {
        let secret = [7u8; 32];
        let with_nonces = DpopVerifier::new(&config())
            .unwrap()
            .with_nonces(nonces(&secret));
        let key = es256();
        let check = |proof: String| {
            let verifier = &with_nonces;
            async move {
                verifier
                    .verify(&proof, &request(&key.thumbprint), NOW)
                    .await
            }
        };
        assert_eq!(check(key.proof()).await, Err(DpopError::NonceMissing));
        let issued = with_nonces.fresh_nonce(NOW).unwrap();
        let with = |nonce: &str| {
            let nonce = nonce.to_owned();
            key.proof_with(move |c| {
                c.insert("nonce".into(), json!(nonce));
            })
        };
        assert!(check(with(&issued)).await.is_ok());
        // Issued by another deployment (another secret).
        let foreign = nonces(&[8u8; 32]).issue(NOW);
        assert_eq!(check(with(&foreign)).await, Err(DpopError::NonceInvalid));
        // Expired: issued longer than the lifetime ago.
        let old = nonces(&secret).issue(NOW - 400);
        assert_eq!(check(with(&old)).await, Err(DpopError::NonceInvalid));
        // From the future beyond the clock skew.
        let future = nonces(&secret).issue(NOW + 120);
        assert_eq!(check(with(&future)).await, Err(DpopError::NonceInvalid));
        // Tampered: another issue time under the old tag.
        let mut bytes = b64().decode(&issued).unwrap();
        bytes[7] ^= 1;
        assert_eq!(
            check(with(&b64().encode(&bytes))).await,
            Err(DpopError::NonceInvalid)
        );
        for junk in ["", "not base64!", &"A".repeat(100)] {
            assert_eq!(check(with(junk)).await, Err(DpopError::NonceInvalid));
        }
        // The signature is checked first: a forged proof is a bad signature.
        let mut forged = key.proof();
        forged.push('A');
        assert_eq!(check(forged).await, Err(DpopError::BadSignature));
        // Without nonces configured, none is asked for or handed out.
        assert!(verifier().fresh_nonce(NOW).is_none());
    }

    /// One nonce serves a tenth of the lifetime; the next one differs and both
    /// are accepted while fresh.
    #[test]
    fn nonces_rotate_in_steps_and_overlap() {
        let n = nonces(&[1u8; 32]);
        let start = NOW - NOW.rem_euclid(30);
        assert_eq!(n.issue(start), n.issue(start + 29));
        let next = n.issue(start + 30);
        assert_ne!(n.issue(start), next);
        assert!(n.accepts(&n.issue(start), start + 300));
        assert!(!n.accepts(&n.issue(start), start + 301));
        assert!(n.accepts(&next, start + 30));
    }

    #[test]
    fn a_short_secret_or_a_zero_lifetime_is_refused() {
        let short = DpopNonces::new(&[0u8; 31], Duration::from_secs(60), Duration::ZERO);
        assert_eq!(short.err(), Some(DpopConfigError::ShortNonceSecret));
        let zero = DpopNonces::new(&[0u8; 32], Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.err(), Some(DpopConfigError::ZeroNonceLifetime));
        let random = DpopNonces::random(Duration::from_secs(60), Duration::ZERO).unwrap();
        assert!(random.accepts(&random.issue(NOW), NOW));
        assert!(!format!("{random:?}").contains("key:"));
    }

    /// Valid proofs from EC P-256, Ed25519 and RSA (PKCS#1 and PSS) keys verify
    /// and report the key's thumbprint, the `jti` and `iat`.
    #[tokio::test]
    async fn valid_proofs_of_every_key_type_verify() {
        let keys = [
            es256(),
            ed25519(),
            &rsa(Algorithm::RS256, "RS256"),
            &rsa(Algorithm::PS256, "PS256"),
        ];
        for key in keys {
            let proof = key.proof_with(|c| {
                c.insert("jti".into(), json!("one"));
            });
            let verified = verify(key, &proof).await.unwrap();
            assert_eq!(verified.jkt, key.jkt(), "{}", key.alg);
            assert_eq!(verified.jti, "one");
            assert_eq!(verified.iat, NOW);
        }
    }

    /// The RFC 7638 §3.1 example key has the thumbprint the RFC gives.
    #[test]
    fn thumbprint_matches_rfc_7638_example() {
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            jwk_thumbprint(&jwk).as_deref(),
            Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
        );
        assert_eq!(jwk_thumbprint(&json!({"kty": "oct", "k": "AAAA"})), None);
        assert_eq!(
            jwk_thumbprint(&json!({"kty": "EC", "crv": "P-256", "x": "AA"})),
            None
        );
    }

    #[tokio::test]
    async fn wrong_method_is_refused() {
        let key = es256();
        let proof = key.proof_with(|c| {
            c.insert("htm".into(), json!("GET"));
        });
        assert_eq!(verify(key, &proof).await, Err(DpopError::WrongMethod));
        // Exact: methods are case-sensitive.
        let proof = key.proof_with(|c| {
            c.insert("htm".into(), json!("post"));
        });
        assert_eq!(verify(key, &proof).await, Err(DpopError::WrongMethod));
    }

    #[tokio::test]
    async fn other_host_path_scheme_or_port_is_refused() {
        let key = es256();
        for htu in [
            "https://other.example.com/orders",
            "https://api.example.com/orders/1",
            "https://api.example.com/Orders",
            "http://api.example.com/orders",
            "https://api.example.com:8443/orders",
            "https://user@api.example.com/orders",
            "api.example.com/orders",
            "/orders",
        ] {
            let proof = key.proof_with(|c| {
                c.insert("htu".into(), json!(htu));
            });
            assert_eq!(verify(key, &proof).await, Err(DpopError::WrongUri), "{htu}");
        }
    }

    /// Query and fragment are ignored on both sides; scheme and host compare
    /// case-insensitively; percent-encoded unreserved characters equal their
    /// plain form.
    #[tokio::test]
    async fn query_case_and_percent_encoding_are_normalised() {
        let key = es256();
        for htu in [
            "https://api.example.com/orders?page=2",
            "https://api.example.com/orders#top",
            "HTTPS://API.Example.COM/orders",
            "https://api.example.com/%6Frders",
            "https://api.example.com/%6frders",
        ] {
            let proof = key.proof_with(|c| {
                c.insert("htu".into(), json!(htu));
            });
            let verified = verify_with(key, &proof, |r| r.path = "/orders?page=1").await;
            assert!(verified.is_ok(), "{htu}: {verified:?}");
        }
        // Reserved characters stay encoded (case of the hex digits aside).
        let proof = key.proof_with(|c| {
            c.insert("htu".into(), json!("https://api.example.com/a%2fb"));
        });
        assert!(
            verify_with(key, &proof, |r| r.path = "/a%2Fb")
                .await
                .is_ok()
        );
        let proof = key.proof_with(|c| {
            c.insert("htu".into(), json!("https://api.example.com/a%2Fb"));
        });
        assert_eq!(
            verify_with(key, &proof, |r| r.path = "/a/b").await,
            Err(DpopError::WrongUri)
        );
    }

    /// `:443` for https and `:80` for http equal no port, on either side.
    #[tokio::test]
    async fn default_ports_are_equivalent() {
        let key = es256();
        let cases = [
            (
                "https://api.example.com:443/orders",
                "https",
                "api.example.com",
            ),
            (
                "https://api.example.com/orders",
                "https",
                "api.example.com:443",
            ),
            (
                "http://api.example.com:80/orders",
                "http",
                "api.example.com",
            ),
            (
                "http://api.example.com/orders",
                "http",
                "API.example.com:80",
            ),
            ("https://[::1]:443/orders", "https", "[::1]"),
        ];
        for (htu, scheme, authority) in cases {
            let proof = key.proof_with(|c| {
                c.insert("htu".into(), json!(htu));
            });
            let verified = verify_with(key, &proof, |r| {
                r.scheme = scheme;
                r.authority = authority;
            })
            .await;
            assert!(
                verified.is_ok(),
                "{htu} vs {scheme}://{authority}: {verified:?}"
            );
        }
        // :80 is not https's default.
        let proof = key.proof_with(|c| {
            c.insert("htu".into(), json!("https://api.example.com:80/orders"));
        });
        assert_eq!(verify(key, &proof).await, Err(DpopError::WrongUri));
    }

    #[tokio::test]
    async fn stale_iat_is_refused() {
        let key = es256();
        let max_age = config().dpop_max_age.as_secs() as i64;
        let proof = key.proof_with(|c| {
            c.insert("iat".into(), json!(NOW - max_age - 1));
        });
        assert_eq!(verify(key, &proof).await, Err(DpopError::Stale));
        let proof = key.proof_with(|c| {
            c.insert("iat".into(), json!(NOW - max_age));
        });
        assert!(verify(key, &proof).await.is_ok());
    }

    #[tokio::test]
    async fn future_iat_beyond_the_skew_is_refused() {
        let key = es256();
        let skew = config().dpop_clock_skew.as_secs() as i64;
        let proof = key.proof_with(|c| {
            c.insert("iat".into(), json!(NOW + skew + 1));
        });
        assert_eq!(verify(key, &proof).await, Err(DpopError::Stale));
        let proof = key.proof_with(|c| {
            c.insert("iat".into(), json!(NOW + skew));
        });
        assert!(verify(key, &proof).await.is_ok());
    }

    #[tokio::test]
    async fn missing_or_other_ath_is_refused() {
        let key = es256();
        let proof = key.proof_with(|c| {
            c.remove("ath");
        });
        assert_eq!(verify(key, &proof).await, Err(DpopError::WrongAccessToken));
        let proof = key.proof_with(|c| {
            c.insert("ath".into(), json!(b64().encode(digest(b"another token"))));
        });
        assert_eq!(verify(key, &proof).await, Err(DpopError::WrongAccessToken));
        // The right proof presented with another token.
        let proof = key.proof();
        assert_eq!(
            verify_with(key, &proof, |r| r.access_token = "another token").await,
            Err(DpopError::WrongAccessToken)
        );
    }

    /// A valid proof by a key other than the token's `cnf.jkt`.
    #[tokio::test]
    async fn key_other_than_the_bound_one_is_refused() {
        let proof = ed25519().proof();
        let bound = es256().jkt();
        assert_eq!(
            verify_with(ed25519(), &proof, |r| r.expected_jkt = &bound).await,
            Err(DpopError::KeyMismatch)
        );
    }

    #[tokio::test]
    async fn alg_none_is_refused() {
        let key = es256();
        let mut header = key.header();
        header["alg"] = json!("none");
        let proof = format!(
            "{}.{}.",
            b64().encode(serde_json::to_vec(&header).unwrap()),
            b64().encode(serde_json::to_vec(&valid_claims()).unwrap())
        );
        assert_eq!(
            verify(key, &proof).await,
            Err(DpopError::UnsupportedAlgorithm)
        );
    }

    /// HS256 is refused even with a signature made with the public key's bytes
    /// as the HMAC secret (the classic algorithm confusion).
    #[tokio::test]
    async fn hs256_is_refused() {
        let key = es256();
        let mut header = key.header();
        header["alg"] = json!("HS256");
        let hmac = SigningKey::from_pem(b"", Algorithm::HS256, None);
        assert!(hmac.is_err());
        let message = format!(
            "{}.{}",
            b64().encode(serde_json::to_vec(&header).unwrap()),
            b64().encode(serde_json::to_vec(&valid_claims()).unwrap())
        );
        let secret =
            jsonwebtoken::EncodingKey::from_secret(key.jwk["x"].as_str().unwrap().as_bytes())
                .unwrap();
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &secret, Algorithm::HS256).unwrap();
        let proof = format!("{message}.{signature}");
        assert_eq!(
            verify(key, &proof).await,
            Err(DpopError::UnsupportedAlgorithm)
        );
    }

    /// An algorithm jsonwebtoken supports but the configuration does not list.
    #[tokio::test]
    async fn unlisted_algorithm_is_refused() {
        let mut config = config();
        config.dpop_algorithms = vec!["EdDSA".into()];
        let verifier = DpopVerifier::new(&config).unwrap();
        let key = es256();
        let jkt = key.jkt();
        assert_eq!(
            verifier.verify(&key.proof(), &request(&jkt), NOW).await,
            Err(DpopError::UnsupportedAlgorithm)
        );
    }

    /// A `jwk` carrying a private member (here the real `d`) is refused, even
    /// though the signature would verify.
    #[tokio::test]
    async fn private_key_in_jwk_is_refused() {
        let key = es256();
        for member in ["d", "p", "q", "dp", "dq", "qi", "k"] {
            let mut header = key.header();
            header["jwk"][member] = json!("AQAB");
            let proof = key.sign(&header, &valid_claims());
            assert_eq!(
                verify(key, &proof).await,
                Err(DpopError::Malformed),
                "{member}"
            );
        }
    }

    /// The key type must fit `alg`: an EC key under `EdDSA` or `RS256`.
    #[tokio::test]
    async fn key_type_other_than_the_algorithm_is_refused() {
        let key = es256();
        for alg in ["EdDSA", "RS256", "ES384"] {
            let mut header = key.header();
            header["alg"] = json!(alg);
            let proof = key.sign(&header, &valid_claims());
            assert_eq!(
                verify(key, &proof).await,
                Err(DpopError::Malformed),
                "{alg}"
            );
        }
    }

    #[tokio::test]
    async fn typ_other_than_dpop_jwt_is_refused() {
        let key = es256();
        for typ in [
            json!("JWT"),
            json!("DPoP+JWT"),
            json!("at+jwt"),
            Value::Null,
        ] {
            let mut header = key.header();
            header["typ"] = typ.clone();
            let proof = key.sign(&header, &valid_claims());
            assert_eq!(
                verify(key, &proof).await,
                Err(DpopError::WrongType),
                "{typ}"
            );
        }
        let mut header = key.header();
        header.as_object_mut().unwrap().remove("typ");
        let proof = key.sign(&header, &valid_claims());
        assert_eq!(verify(key, &proof).await, Err(DpopError::WrongType));
    }

    #[tokio::test]
    async fn bad_signature_is_refused() {
        let key = es256();
        let proof = key.proof();
        // The signature of another message by the same key.
        let other = key.proof();
        let (message, _) = proof.rsplit_once('.').unwrap();
        let (_, signature) = other.rsplit_once('.').unwrap();
        let forged = format!("{message}.{signature}");
        assert_eq!(verify(key, &forged).await, Err(DpopError::BadSignature));
        let unsigned = format!("{message}.");
        assert_eq!(verify(key, &unsigned).await, Err(DpopError::BadSignature));
    }

    #[tokio::test]
    async fn missing_claims_are_malformed() {
        let key = es256();
        for claim in ["jti", "htm", "htu", "iat"] {
            let proof = key.proof_with(|c| {
                c.remove(claim);
            });
            assert_eq!(
                verify(key, &proof).await,
                Err(DpopError::Malformed),
                "{claim}"
            );
        }
        for (claim, value) in [
            ("jti", json!("")),
            ("jti", json!("j".repeat(MAX_JTI_BYTES + 1))),
            ("jti", json!(7)),
            ("iat", json!("1800000000")),
        ] {
            let proof = key.proof_with(|c| {
                c.insert(claim.into(), value.clone());
            });
            assert_eq!(
                verify(key, &proof).await,
                Err(DpopError::Malformed),
                "{claim}"
            );
        }
    }

    /// Envoy joins two `DPoP` headers with ","; such a value (and any other
    /// non-JWS shape) is malformed.
    #[tokio::test]
    async fn comma_joined_double_header_is_malformed() {
        let key = es256();
        let proof = key.proof();
        for value in [
            format!("{proof},{proof}"),
            format!("{proof}, {}", key.proof()),
            format!(" {proof}"),
            format!("{proof}.{proof}"),
            "a.b".to_owned(),
            String::new(),
            format!("{proof}{}", "A".repeat(MAX_PROOF_BYTES)),
        ] {
            assert_eq!(verify(key, &value).await, Err(DpopError::Malformed));
        }
    }

    /// The same proof twice: the second is a replay, even with the same
    /// `jti` under a fresh signature.
    #[tokio::test]
    async fn replay_is_refused() {
        let key = es256();
        let verifier = verifier();
        let jkt = key.jkt();
        let proof = key.proof_with(|c| {
            c.insert("jti".into(), json!("once"));
        });
        assert!(verifier.verify(&proof, &request(&jkt), NOW).await.is_ok());
        assert_eq!(
            verifier.verify(&proof, &request(&jkt), NOW).await,
            Err(DpopError::Replayed)
        );
        let again = key.proof_with(|c| {
            c.insert("jti".into(), json!("once"));
            c.insert("iat".into(), json!(NOW + 1));
        });
        assert_ne!(again, proof);
        assert_eq!(
            verifier.verify(&again, &request(&jkt), NOW).await,
            Err(DpopError::Replayed)
        );
        // The same jti from another key is another proof.
        let other = ed25519();
        let other_jkt = other.jkt();
        let proof = other.proof_with(|c| {
            c.insert("jti".into(), json!("once"));
        });
        assert!(
            verifier
                .verify(&proof, &request(&other_jkt), NOW)
                .await
                .is_ok()
        );
    }

    /// A refused proof is not recorded: the valid one with its `jti` still
    /// passes after a forgery with that `jti` was refused.
    #[tokio::test]
    async fn refused_proofs_are_not_recorded() {
        let key = es256();
        let verifier = verifier();
        let jkt = key.jkt();
        let proof = key.proof();
        let (message, _) = proof.rsplit_once('.').unwrap();
        let forged = format!("{message}.{}", b64().encode([7u8; 64]));
        assert_eq!(
            verifier.verify(&forged, &request(&jkt), NOW).await,
            Err(DpopError::BadSignature)
        );
        assert!(verifier.verify(&proof, &request(&jkt), NOW).await.is_ok());
    }

    /// Of many concurrent presentations of one proof, exactly one passes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_replays_pass_once() {
        let key = es256();
        let verifier = Arc::new(verifier());
        let proof = Arc::new(key.proof());
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (verifier, proof, jkt) = (verifier.clone(), proof.clone(), key.jkt());
                tokio::spawn(async move { verifier.verify(&proof, &request(&jkt), NOW).await })
            })
            .collect();
        let mut passed = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => passed += 1,
                Err(e) => assert_eq!(e, DpopError::Replayed),
            }
        }
        assert_eq!(passed, 1);
    }

    /// A full replay cache refuses new proofs (it must not forget unexpired
    /// ones) until entries expire.
    #[tokio::test]
    async fn full_replay_cache_fails_closed_until_entries_expire() {
        let mut config = config();
        config.dpop_replay_entries = 2;
        config.dpop_max_age = Duration::from_secs(1);
        config.dpop_clock_skew = Duration::ZERO;
        let verifier = DpopVerifier::new(&config).unwrap();
        let key = es256();
        let jkt = key.jkt();
        let first = key.proof();
        assert!(verifier.verify(&first, &request(&jkt), NOW).await.is_ok());
        assert!(
            verifier
                .verify(&key.proof(), &request(&jkt), NOW)
                .await
                .is_ok()
        );
        assert_eq!(
            verifier.verify(&key.proof(), &request(&jkt), NOW).await,
            Err(DpopError::ReplayCheckFailed)
        );
        // A replay is still called a replay.
        assert_eq!(
            verifier.verify(&first, &request(&jkt), NOW).await,
            Err(DpopError::Replayed)
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(
            verifier
                .verify(&key.proof(), &request(&jkt), NOW)
                .await
                .is_ok()
        );
    }

    #[test]
    fn settings_that_refuse_everything_or_weak_algorithms_are_refused() {
        for name in ["none", "HS256", "HS512", "es256", "ES512", "Ed25519", ""] {
            let mut config = config();
            config.dpop_algorithms = vec!["ES256".into(), name.into()];
            let error = DpopVerifier::new(&config).unwrap_err();
            assert_eq!(error, DpopConfigError::UnsupportedAlgorithm(name.into()));
            assert!(error.to_string().contains(&format!("{name:?}")));
        }
        let mut config = config();
        config.dpop_algorithms.clear();
        assert_eq!(
            DpopVerifier::new(&config).unwrap_err(),
            DpopConfigError::NoAlgorithms
        );
        let mut config = super::tests::config();
        config.dpop_max_age = Duration::ZERO;
        assert_eq!(
            DpopVerifier::new(&config).unwrap_err(),
            DpopConfigError::ZeroMaxAge
        );
        let mut config = super::tests::config();
        config.dpop_replay_entries = 0;
        assert_eq!(
            DpopVerifier::new(&config).unwrap_err(),
            DpopConfigError::ZeroReplayEntries
        );
        assert!(DpopVerifier::new(&SenderConstraintConfig::default()).is_ok());
    }

    /// Neither the verifier's nor the request's `Debug` prints secrets.
    #[test]
    fn debug_prints_no_secret() {
        let client = redis::Client::open("redis://:hunter2@127.0.0.1:1").unwrap();
        let verifier = verifier().with_shared_replay(client, "p:");
        let printed = format!("{verifier:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        let printed = format!("{:?}", request("jkt"));
        assert!(!printed.contains(TOKEN), "{printed}");
    }
}

#[cfg(test)]
mod fuzz {
    use serde_json::json;

    use super::*;
    use crate::authn::mint::{SigningKey, pkcs8_pem};
    use crate::fuzz::{Target, bytes, run};

    const NOW: i64 = 1_800_000_000;
    const TOKEN: &str = "an-access-token";

    /// A valid proof by `key` (public `jwk`) under `alg` for the fuzzed request.
    fn proof(key: &SigningKey, alg: &str) -> (String, String) {
        let jwk = serde_json::to_value(&key.public_jwks().keys[0]).unwrap_or_default();
        let header = json!({"typ": "dpop+jwt", "alg": alg, "jwk": jwk});
        let claims = json!({
            "jti": "fuzz-jti",
            "htm": "GET",
            "htu": "https://api.example.com/things",
            "iat": NOW,
            "ath": b64().encode(digest(TOKEN.as_bytes())),
        });
        let signed = key.sign_raw(header.to_string().as_bytes(), claims.to_string().as_bytes());
        (signed, jwk_thumbprint(&jwk).unwrap_or_default())
    }

    /// Mutated proofs (header, claims, signature, separators) never verify
    /// unless byte-equal to a valid seed, and never panic. The replay cache is
    /// left out (`check`), so that a seed verifies every time it comes back.
    #[test]
    fn fuzz_dpop_proof() {
        let es256 = SigningKey::generate_es256(None).unwrap();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let ed = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(&rng).unwrap();
        let ed = SigningKey::from_pem(pkcs8_pem(ed.as_ref()).as_bytes(), Algorithm::EdDSA, None)
            .unwrap();
        let valid = [proof(&es256, "ES256"), proof(&ed, "EdDSA")];
        let verifier = DpopVerifier::new(&SenderConstraintConfig::default()).unwrap();
        for (seed, jkt) in &valid {
            let request = fuzz_request(jkt);
            assert!(verifier.check(seed, &request, NOW).is_ok());
        }
        let seeds = bytes(valid.iter().map(|(p, _)| p.as_str()));
        let mut dictionary = bytes([".", ",", " ", "=", "+", "/", "eyJ", "AAAA", "____", "----"]);
        for header in [
            r#"{"typ":"dpop+jwt","alg":"none"}"#,
            r#"{"typ":"dpop+jwt","alg":"HS256"}"#,
            r#"{"typ":"JWT","alg":"ES256"}"#,
        ] {
            dictionary.push(b64().encode(header).into_bytes());
        }
        for (seed, _) in &valid {
            dictionary.extend(bytes(seed.split('.')));
        }
        run(
            Target {
                name: "dpop_proof",
                seeds,
                dictionary,
                cases: 20_000,
            },
            |input| {
                let text = String::from_utf8_lossy(input);
                for (seed, jkt) in &valid {
                    let outcome = verifier.check(&text, &fuzz_request(jkt), NOW);
                    if let Ok(verified) = outcome {
                        assert_eq!(text.as_bytes(), seed.as_bytes(), "a mutated proof verified");
                        assert_eq!(&verified.jkt, jkt);
                    }
                }
            },
        );
    }

    fn fuzz_request(jkt: &str) -> ProofRequest<'_> {
        ProofRequest {
            method: "GET",
            scheme: "https",
            authority: "api.example.com",
            path: "/things",
            access_token: TOKEN,
            expected_jkt: jkt,
        }
    }
}
