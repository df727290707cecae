//! JWT verification against the configured issuers.
//!
//! Order matters: size, shape and header first (cheap, no key work); then the
//! unverified `iss` picks the issuer (an unknown issuer is refused before any key
//! lookup); then the key by `kid`, whose pinned algorithm must equal the header's;
//! then the signature, with the key parsed once when it was loaded (aws-lc), over
//! the payload bytes already parsed for `iss` (parsed once); then `aud`, then our
//! own rules: `exp` and `iat` required, `iat` not in the future, lifetime
//! bounded, the principal claim required.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::Value;

use super::claims::{
    binding, check_lifetime, numeric_date, roles, scopes, secs_i64, status_reference, string_claim,
};
use super::introspection::{IntrospectionSetupError, Introspector};
use super::jwks::is_accepted_algorithm;
use super::keys::{IssuerKeys, KeysError};
use super::{CredentialKind, MAX_TOKEN_BYTES, TokenError, VerifiedToken};
use crate::config::IssuerConfig;

/// One trusted issuer: its keys and its token rules.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// The exact `iss` value.
    pub issuer: String,
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Algorithms accepted from this issuer.
    pub algorithms: Vec<Algorithm>,
    /// Longest accepted `exp - iat`.
    pub max_token_lifetime: Duration,
    /// Clock skew tolerance.
    pub leeway: Duration,
    /// Dotted path of the roles claim.
    pub roles_claim: String,
    /// Claims that must be present besides `exp` and `iat`.
    pub required_claims: Vec<String>,
    /// Required `typ` header value, compared case-insensitively.
    pub token_type: Option<String>,
    /// Cedar entity type of the principal.
    pub principal_type: String,
    /// Claim holding the principal id.
    pub principal_claim: String,
    /// Where the public keys come from.
    pub keys: Arc<IssuerKeys>,
    /// Introspection of opaque tokens, when configured.
    pub introspection: Option<Arc<Introspector>>,
    /// Claims kept in the verified token for response templates.
    pub captured_claims: Vec<String>,
}

/// Errors building an issuer.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// Its keys are unusable.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// Its introspection settings are unusable.
    #[error(transparent)]
    Introspection(#[from] IntrospectionSetupError),
}

impl Issuer {
    /// Builds an issuer from its configuration; a local JWKS file is read now.
    pub fn from_config(config: &IssuerConfig) -> Result<Issuer, IssuerError> {
        let keys = Arc::new(IssuerKeys::from_config(config)?);
        let introspection = Introspector::from_config(config, keys.clone())?.map(Arc::new);
        Ok(Issuer {
            issuer: config.issuer.clone(),
            audiences: config.audiences.clone(),
            algorithms: config
                .algorithms
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            max_token_lifetime: config.max_token_lifetime,
            leeway: config.leeway,
            roles_claim: config.roles_claim.clone(),
            required_claims: config.required_claims.clone(),
            token_type: config.token_type.clone(),
            principal_type: config.principal_type.clone(),
            principal_claim: config.principal_claim.clone(),
            keys,
            introspection,
            captured_claims: Vec::new(),
        })
    }
}

/// When a verification result holds: the key generation that verified it and
/// the seconds `[from, until)` in which the time checks pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidityWindow {
    /// Generation of the issuer's key set used.
    pub key_generation: u64,
    /// First second at which `nbf`/`iat` (minus leeway) allow the token.
    pub from: i64,
    /// First second at which `exp` (plus leeway) refuses it.
    pub until: i64,
}

/// All trusted issuers, by `iss`.
#[derive(Debug, Clone, Default)]
pub struct IssuerSet {
    issuers: HashMap<String, Issuer>,
}

/// The members of a JOSE header that signed tokens are judged on (access
/// tokens, status lists, security event tokens), read before the signature.
#[derive(Deserialize)]
pub(crate) struct JoseHeader {
    /// The signature algorithm's name.
    pub(crate) alg: String,
    /// The key id.
    #[serde(default)]
    pub(crate) kid: Option<String>,
    /// The media type of the token.
    #[serde(default)]
    pub(crate) typ: Option<String>,
    /// Critical extensions (none is implemented: their presence refuses).
    #[serde(default)]
    pub(crate) crit: Option<Value>,
}

impl IssuerSet {
    /// Builds the set from issuers.
    pub fn new(issuers: impl IntoIterator<Item = Issuer>) -> IssuerSet {
        IssuerSet {
            issuers: issuers.into_iter().map(|i| (i.issuer.clone(), i)).collect(),
        }
    }

    /// The issuers, for readiness checks and background refresh.
    pub fn iter(&self) -> impl Iterator<Item = &Issuer> {
        self.issuers.values()
    }

    /// True when every issuer has a key set (or needs none: introspection only).
    pub fn keys_ready(&self) -> bool {
        self.issuers
            .values()
            .all(|i| i.keys.is_ready() || (!i.keys.is_remote() && i.keys.get().is_none()))
    }

    /// Verifies `token` at time `now` (seconds since the epoch).
    pub async fn verify(&self, token: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        self.verify_with_window(token, now)
            .await
            .map(|(token, _)| token)
    }

    /// The generation of `iss`'s key set, while it has one.
    pub fn key_generation(&self, iss: &str) -> Option<u64> {
        let keys = &self.issuers.get(iss)?.keys;
        keys.get().map(|_| keys.generation())
    }

    /// Verifies `token` and also says when the same verification would succeed:
    /// the key generation used and the `[from, until)` window of seconds.
    pub async fn verify_with_window(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(VerifiedToken, ValidityWindow), TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: JoseHeader = decode_json(header_b64)?;
        // `none`, HMAC and unknown names are refused before anything else, so an
        // `alg: none` token (empty signature) is reported as what it is.
        let header_alg: Algorithm = header
            .alg
            .parse()
            .map_err(|_| TokenError::UnsupportedAlgorithm)?;
        if !is_accepted_algorithm(header_alg) {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        if payload_b64.is_empty() || signature_b64.is_empty() {
            return Err(TokenError::Malformed);
        }
        if header.crit.is_some() {
            return Err(TokenError::UnsupportedCritical);
        }

        // Which issuer? Read `iss` unverified only to choose rules and keys.
        let unverified: Value = decode_json(payload_b64)?;
        let iss = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(TokenError::UnknownIssuer)?;
        let issuer = self.issuers.get(iss).ok_or(TokenError::UnknownIssuer)?;
        if !issuer.algorithms.contains(&header_alg) {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        if let Some(expected) = &issuer.token_type {
            let typ = header.typ.as_deref().unwrap_or_default();
            let typ = typ.strip_prefix("application/").unwrap_or(typ);
            if !typ.eq_ignore_ascii_case(expected) {
                return Err(TokenError::WrongTokenType);
            }
        }

        let kid = header.kid.as_deref().ok_or(TokenError::UnknownKey)?;
        // Read before the keys, so a concurrent refresh can only make it older.
        let mut key_generation = issuer.keys.generation();
        let key = match issuer.keys.get() {
            Some(keys) if keys.get(kid).is_some() => keys,
            // A new kid may mean the issuer rotated: one shared, rate-limited refresh.
            _ => {
                issuer.keys.refresh_for_unknown_kid(key_generation).await;
                key_generation = issuer.keys.generation();
                issuer.keys.get().ok_or(TokenError::UnknownKey)?
            }
        };
        let key = key.get(kid).ok_or(TokenError::UnknownKey)?;
        if key.algorithm != header_alg {
            return Err(TokenError::AlgorithmMismatch);
        }

        // The signed message is the first two parts exactly as received; the
        // payload was parsed once above, from those very bytes.
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| TokenError::Malformed)?;
        let message = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
        if !key.verifies(message, &signature) {
            return Err(TokenError::BadSignature);
        }
        let claims = unverified;
        // `iss` is this issuer's (it chose the issuer); `aud` must name us.
        check_audience(issuer, &claims)?;
        check_times(issuer, &claims, now)?;
        for claim in &issuer.required_claims {
            if claims.get(claim).is_none_or(Value::is_null) {
                return Err(TokenError::MissingClaim);
            }
        }
        let principal_id = string_claim(&claims, &issuer.principal_claim)
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::MissingClaim)?;
        let leeway = secs_i64(issuer.leeway);
        let issued_at = numeric_date(&claims, "iat")?.unwrap_or_default();
        let not_before = numeric_date(&claims, "nbf")?
            .unwrap_or(i64::MIN)
            .max(issued_at);
        let window = ValidityWindow {
            key_generation,
            from: not_before.saturating_sub(leeway),
            until: numeric_date(&claims, "exp")?
                .unwrap_or_default()
                .saturating_add(leeway),
        };
        let verified = VerifiedToken {
            issuer: issuer.issuer.clone(),
            subject: string_claim(&claims, "sub").unwrap_or_else(|| principal_id.clone()),
            principal_type: issuer.principal_type.clone(),
            principal_id,
            jti: string_claim(&claims, "jti"),
            issued_at: numeric_date(&claims, "iat")?.unwrap_or_default(),
            expires_at: numeric_date(&claims, "exp")?.unwrap_or_default(),
            scopes: scopes(&claims),
            roles: roles(&claims, &issuer.roles_claim),
            client_id: string_claim(&claims, "client_id").or_else(|| string_claim(&claims, "azp")),
            key_id: kid.to_owned(),
            api_key_id: None,
            credential: CredentialKind::Jwt,
            binding: binding(&claims)?,
            status: status_reference(&claims)?,
            claims: issuer
                .captured_claims
                .iter()
                .filter_map(|name| claim_text(&claims, name).map(|value| (name.clone(), value)))
                .collect(),
        };
        Ok((verified, window))
    }

    /// The introspectors of opaque tokens, in a stable order (by issuer).
    pub fn introspectors(&self) -> Vec<&Arc<Introspector>> {
        let mut issuers: Vec<&Issuer> = self
            .issuers
            .values()
            .filter(|i| i.introspection.is_some())
            .collect();
        issuers.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        issuers
            .iter()
            .filter_map(|i| i.introspection.as_ref())
            .collect()
    }
}

/// A claim as text for a response template: a string as it is, a number or
/// a boolean in JSON form; other types (objects, arrays, null) are not text.
fn claim_text(claims: &Value, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) => Some(s.clone()),
        value @ (Value::Number(_) | Value::Bool(_)) => Some(value.to_string()),
        _ => None,
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// `aud` (required): a string, or an array of strings, naming at least one of
/// the issuer's audiences. Absent or `null` is a wrong audience; another
/// type, or an array with a non-string member, is malformed.
fn check_audience(issuer: &Issuer, claims: &Value) -> Result<(), TokenError> {
    let ours = |aud: &str| issuer.audiences.iter().any(|a| a == aud);
    match claims.get("aud") {
        Some(Value::String(aud)) if ours(aud) => Ok(()),
        Some(Value::Array(items)) => {
            let mut named = false;
            for item in items {
                let aud = item.as_str().ok_or(TokenError::Malformed)?;
                named |= ours(aud);
            }
            if named {
                Ok(())
            } else {
                Err(TokenError::WrongAudience)
            }
        }
        None | Some(Value::Null) | Some(Value::String(_)) => Err(TokenError::WrongAudience),
        Some(_) => Err(TokenError::Malformed),
    }
}

/// `exp` (required), `nbf` and `iat` (required) with leeway; lifetime bound.
///
/// The claims are issuer-controlled: every sum and difference is checked, so
/// no value can wrap around into an allow (or panic in a debug build).
fn check_times(issuer: &Issuer, claims: &Value, now: i64) -> Result<(), TokenError> {
    let leeway = secs_i64(issuer.leeway);
    let exp = numeric_date(claims, "exp")?.ok_or(TokenError::MissingClaim)?;
    let iat = numeric_date(claims, "iat")?.ok_or(TokenError::MissingClaim)?;
    if exp <= now.saturating_sub(leeway) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now.saturating_add(leeway)
    {
        return Err(TokenError::NotYetValid);
    }
    if iat > now.saturating_add(leeway) {
        return Err(TokenError::NotYetValid);
    }
    check_lifetime(exp, iat, issuer.max_token_lifetime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::claims::MAX_NUMERIC_DATE;
    use serde_json::json;

    #[test]
    fn scopes_come_from_scope_and_scp() {
        assert_eq!(
            scopes(&json!({"scope": "b a", "scp": ["c", "a"]})),
            vec!["a", "b", "c"]
        );
        assert!(scopes(&json!({})).is_empty());
    }

    #[test]
    fn roles_follow_a_dotted_path() {
        let claims = json!({"realm_access": {"roles": ["admin", "ops"]}, "roles": "solo"});
        assert_eq!(roles(&claims, "realm_access.roles"), vec!["admin", "ops"]);
        assert_eq!(roles(&claims, "roles"), vec!["solo"]);
        assert!(roles(&claims, "missing.path").is_empty());
    }

    #[test]
    fn numeric_dates_reject_strings() {
        assert_eq!(numeric_date(&json!({"exp": 10}), "exp"), Ok(Some(10)));
        assert_eq!(numeric_date(&json!({"exp": 10.9}), "exp"), Ok(Some(10)));
        assert_eq!(
            numeric_date(&json!({"exp": "10"}), "exp"),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn numeric_dates_out_of_range_are_malformed() {
        assert_eq!(numeric_date(&json!({"exp": 0}), "exp"), Ok(Some(0)));
        assert_eq!(
            numeric_date(&json!({"exp": MAX_NUMERIC_DATE}), "exp"),
            Ok(Some(MAX_NUMERIC_DATE))
        );
        for value in [
            json!(i64::MIN),
            json!(-1),
            json!(MAX_NUMERIC_DATE + 1),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(1e300),
            json!(-1e300),
        ] {
            assert_eq!(
                numeric_date(&json!({ "iat": value }), "iat"),
                Err(TokenError::Malformed),
                "{value}"
            );
        }
    }

    fn issuer(max_token_lifetime: Duration, leeway: Duration) -> Issuer {
        let config: IssuerConfig =
            toml::from_str("issuer = \"https://i.test\"\naudiences = [\"a\"]\n").unwrap();
        Issuer {
            max_token_lifetime,
            leeway,
            ..Issuer::from_config(&config).unwrap()
        }
    }

    /// Extreme `iat`/`exp`/`nbf` and leeways never panic (debug builds check
    /// overflow) and never pass: each is refused with a reason class.
    #[test]
    fn extreme_times_are_refused_without_overflow() {
        let hour = Duration::from_secs(3600);
        let now = 1_700_000_000;
        let normal = issuer(hour, Duration::from_secs(30));
        let times = |exp: i64, iat: i64, nbf: Option<i64>| {
            let mut claims = json!({ "exp": exp, "iat": iat });
            if let Some(nbf) = nbf {
                claims["nbf"] = json!(nbf);
            }
            claims
        };
        let cases = [
            (times(i64::MAX, now, None), TokenError::Malformed),
            (times(now + 60, i64::MIN, None), TokenError::Malformed),
            (times(i64::MAX, i64::MIN, None), TokenError::Malformed),
            (times(now + 60, now, Some(i64::MAX)), TokenError::Malformed),
            (times(now + 60, now, Some(i64::MIN)), TokenError::Malformed),
            (
                times(MAX_NUMERIC_DATE, 0, None),
                TokenError::LifetimeTooLong,
            ),
            (
                times(MAX_NUMERIC_DATE, now, None),
                TokenError::LifetimeTooLong,
            ),
        ];
        for (claims, expected) in &cases {
            assert_eq!(
                check_times(&normal, claims, now),
                Err(*expected),
                "{claims}"
            );
        }
        // Leeways and lifetimes at the edge of `i64` saturate instead of wrapping.
        let huge = issuer(Duration::from_secs(u64::MAX), Duration::from_secs(u64::MAX));
        assert_eq!(
            check_times(&huge, &times(MAX_NUMERIC_DATE, 0, None), now),
            Ok(())
        );
        assert_eq!(
            check_times(&huge, &times(now + 60, now, None), i64::MIN),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            check_times(&normal, &times(now + 60, now, None), i64::MAX),
            Err(TokenError::Expired)
        );
        assert_eq!(
            check_lifetime(i64::MAX, i64::MIN, hour),
            Err(TokenError::LifetimeTooLong)
        );
        assert_eq!(
            check_lifetime(i64::MIN, i64::MAX, hour),
            Err(TokenError::LifetimeTooLong)
        );
        assert_eq!(check_lifetime(0, MAX_NUMERIC_DATE, hour), Ok(()));
        assert_eq!(secs_i64(Duration::from_secs(u64::MAX)), i64::MAX);
    }
}
