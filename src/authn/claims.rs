//! Reading claims, shared by every credential that carries them (JWTs and
//! introspection answers): NumericDates within 1970..9999, checked lifetime
//! arithmetic, string claims, scopes and roles.

use std::time::Duration;

use serde_json::Value;

use super::TokenError;

/// `exp - iat` within `max`; a difference out of `i64` range is too long.
pub(crate) fn check_lifetime(exp: i64, iat: i64, max: Duration) -> Result<(), TokenError> {
    match exp.checked_sub(iat) {
        Some(lifetime) if lifetime <= secs_i64(max) => Ok(()),
        _ => Err(TokenError::LifetimeTooLong),
    }
}

/// Whole seconds of a configured duration as `i64`, saturating (configuration
/// bounds durations far below this; see `config::MAX_DURATION`).
pub(crate) fn secs_i64(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// The latest NumericDate accepted, 9999-12-31T23:59:59Z.
pub const MAX_NUMERIC_DATE: i64 = 253_402_300_799;

/// A NumericDate claim; fractional seconds are truncated, other types are
/// malformed, and so is a date before 1970 or after [`MAX_NUMERIC_DATE`]: no
/// issuer means those, and the bound keeps all time arithmetic in range.
pub(crate) fn numeric_date(claims: &Value, name: &str) -> Result<Option<i64>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            // `as` saturates (and NaN is filtered): the range check then refuses it.
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .filter(|secs| (0..=MAX_NUMERIC_DATE).contains(secs))
            .map(Some)
            .ok_or(TokenError::Malformed),
        Some(_) => Err(TokenError::Malformed),
    }
}

/// A string claim, if present and a string.
pub(crate) fn string_claim(claims: &Value, name: &str) -> Option<String> {
    claims.get(name).and_then(Value::as_str).map(str::to_owned)
}

/// Scopes from `scope` (space separated, RFC 8693) or `scp` (array or string).
pub(crate) fn scopes(claims: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => out.extend(s.split_whitespace().map(str::to_owned)),
            Some(Value::Array(items)) => {
                out.extend(items.iter().filter_map(Value::as_str).map(str::to_owned))
            }
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Roles from a dotted claim path holding an array of strings or one string.
pub(crate) fn roles(claims: &Value, path: &str) -> Vec<String> {
    let mut node = claims;
    for segment in path.split('.') {
        match node.get(segment) {
            Some(next) => node = next,
            None => return Vec::new(),
        }
    }
    let mut roles: Vec<String> = match node {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    roles.sort();
    roles.dedup();
    roles
}

/// The `cnf` claim (RFC 7800): the key (`jkt`, RFC 9449) or certificate
/// (`x5t#S256`, RFC 8705) the token is bound to. A `cnf` that is not an
/// object, or whose thumbprint is not a base64url SHA-256, is malformed; one
/// with no confirmation method we check (or both at once) is refused as
/// unsupported, never accepted as a bearer token.
pub(crate) fn binding(claims: &Value) -> Result<Option<super::TokenBinding>, TokenError> {
    let cnf = match claims.get("cnf") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(cnf)) => cnf,
        Some(_) => return Err(TokenError::Malformed),
    };
    let thumbprint = |name: &str| -> Result<Option<String>, TokenError> {
        match cnf.get(name) {
            None => Ok(None),
            Some(Value::String(t)) if is_sha256_base64url(t) => Ok(Some(t.clone())),
            Some(_) => Err(TokenError::Malformed),
        }
    };
    match (thumbprint("jkt")?, thumbprint("x5t#S256")?) {
        (Some(jkt), None) => Ok(Some(super::TokenBinding::Dpop { jkt })),
        (None, Some(x5t_s256)) => Ok(Some(super::TokenBinding::Mtls { x5t_s256 })),
        _ => Err(TokenError::UnsupportedBinding),
    }
}

/// 43 base64url characters without padding: a SHA-256 digest.
fn is_sha256_base64url(text: &str) -> bool {
    text.len() == 43
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The `status.status_list` claim (Token Status List): `idx` and `uri`. Other
/// status mechanisms are ignored; a `status_list` that is not an object with a
/// non-negative integer `idx` and an `https://` `uri` is malformed.
pub(crate) fn status_reference(
    claims: &Value,
) -> Result<Option<super::StatusReference>, TokenError> {
    let status = match claims.get("status") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(status)) => status,
        Some(_) => return Err(TokenError::Malformed),
    };
    let Some(list) = status.get("status_list") else {
        return Ok(None);
    };
    let idx = list
        .get("idx")
        .and_then(Value::as_u64)
        .ok_or(TokenError::Malformed)?;
    let uri = list
        .get("uri")
        .and_then(Value::as_str)
        .filter(|uri| uri.starts_with("https://") && uri.len() <= 2048)
        .ok_or(TokenError::Malformed)?;
    Ok(Some(super::StatusReference {
        uri: uri.to_owned(),
        idx,
    }))
}
