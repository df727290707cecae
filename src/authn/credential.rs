//! Credential extraction: the bearer token of an `authorization` header.

use super::{MAX_TOKEN_BYTES, TokenError};

/// Extracts the token of `Authorization: Bearer <token>` (scheme case-insensitive,
/// RFC 6750 section 2.1). The size limit is checked here, before any parsing.
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, TokenError> {
    let value = authorization.ok_or(TokenError::Missing)?.trim();
    if value.is_empty() {
        return Err(TokenError::Missing);
    }
    let (scheme, token) = value.split_once([' ', '\t']).ok_or(TokenError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::NotBearer);
    }
    let token = token.trim_start();
    if token.is_empty() {
        return Err(TokenError::NotBearer);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge);
    }
    if token.contains(|c: char| c.is_whitespace() || c == ',') {
        return Err(TokenError::Malformed);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_is_case_insensitive() {
        assert_eq!(bearer_token(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("BEARER  abc")), Ok("abc"));
    }

    #[test]
    fn rejects_other_schemes_and_empty_values() {
        assert_eq!(bearer_token(None), Err(TokenError::Missing));
        assert_eq!(bearer_token(Some("  ")), Err(TokenError::Missing));
        assert_eq!(
            bearer_token(Some("Basic dXNlcg==")),
            Err(TokenError::NotBearer)
        );
        assert_eq!(bearer_token(Some("Bearer")), Err(TokenError::NotBearer));
        assert_eq!(bearer_token(Some("Bearer a b")), Err(TokenError::Malformed));
        assert_eq!(bearer_token(Some("Bearer a,b")), Err(TokenError::Malformed));
    }

    #[test]
    fn oversize_tokens_are_rejected_before_parsing() {
        let big = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(bearer_token(Some(&big)), Err(TokenError::TooLarge));
        let fits = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES));
        assert!(bearer_token(Some(&fits)).is_ok());
    }
}
