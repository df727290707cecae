//! Credential extraction: the bearer token of an `authorization` header, and
//! the credential a request presents, whichever way it arrived (Envoy's HTTP
//! attributes or a service's `IsAuthorized` call).

use super::{MAX_TOKEN_BYTES, TokenError};

/// The credential a request presents, before anything is verified. Both
/// `Check` (from HTTP headers) and `IsAuthorized` (from its `credential` field)
/// turn their input into one of these, so one function verifies them all.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PresentedCredential<'a> {
    /// A bearer value: a JWT, an API key (`pck_...`) or an opaque token.
    Bearer(&'a str),
    /// An API key from the API-key header (or `IsAuthorized`'s `api_key`).
    ApiKey(&'a str),
    /// No credential, but a peer identity (e.g. a SPIFFE ID) that the proxy or
    /// the calling service verified over mTLS; used only where workloads are
    /// allowed and only when its trust domain is configured.
    Workload(&'a str),
    /// No credential at all.
    None,
    /// A credential refused before verification, for this reason (e.g. a
    /// workload identity asserted by a caller not allowed to).
    Refused(TokenError),
}

// Never print a secret: only the kind of credential.
impl std::fmt::Debug for PresentedCredential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PresentedCredential::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            PresentedCredential::ApiKey(_) => f.write_str("ApiKey(<redacted>)"),
            PresentedCredential::Workload(id) => write!(f, "Workload({id:?})"),
            PresentedCredential::None => f.write_str("None"),
            PresentedCredential::Refused(e) => write!(f, "Refused({e:?})"),
        }
    }
}

/// Extracts the token of `Authorization: Bearer <token>` (scheme case-insensitive,
/// RFC 6750 section 2.1) or `Authorization: DPoP <token>` (RFC 9449). The size limit is checked here, before any parsing.
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, TokenError> {
    let value = authorization.ok_or(TokenError::Missing)?.trim();
    if value.is_empty() {
        return Err(TokenError::Missing);
    }
    let (scheme, token) = value.split_once([' ', '\t']).ok_or(TokenError::NotBearer)?;
    // `DPoP` (RFC 9449 §7.1) carries a token too; whether it is bound and
    // proven is the sender-constraint check's business.
    if !scheme.eq_ignore_ascii_case("bearer") && !scheme.eq_ignore_ascii_case("dpop") {
        return Err(TokenError::NotBearer);
    }
    let token = token.trim_start();
    if token.is_empty() {
        return Err(TokenError::NotBearer);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge);
    }
    // RFC 6750's b64token alphabet, byte by byte: whitespace, commas, quotes
    // and non-ASCII are malformed (and a byte scan is cheap on every request).
    if !token.bytes().all(|b| B64TOKEN[usize::from(b)]) {
        return Err(TokenError::Malformed);
    }
    Ok(token)
}

/// `ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" / "="` (RFC 6750 §2.1).
const fn is_b64token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

/// [`is_b64token_byte`] as a table: one load per byte of every token.
const B64TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = is_b64token_byte(b as u8);
        b += 1;
    }
    table
};

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
    fn only_the_b64token_alphabet_is_accepted() {
        let all = "Bearer AZaz09-._~+/==";
        assert_eq!(bearer_token(Some(all)), Ok("AZaz09-._~+/=="));
        for bad in ["a\"b", "a;b", "a\u{a0}b", "é", "a%20b", "a\u{0}b", "a:b"] {
            assert_eq!(
                bearer_token(Some(&format!("Bearer {bad}"))),
                Err(TokenError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_byte_is_classified_as_rfc_6750_says() {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=";
        for b in 0..=u8::MAX {
            assert_eq!(B64TOKEN[usize::from(b)], alphabet.contains(&b), "byte {b}");
        }
    }

    #[test]
    fn oversize_tokens_are_rejected_before_parsing() {
        let big = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(bearer_token(Some(&big)), Err(TokenError::TooLarge));
        let fits = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES));
        assert!(bearer_token(Some(&fits)).is_ok());
    }
}

/// Fuzz target of bearer extraction from the `Authorization` header (see
/// [`crate::fuzz`]). Oracle: no panic, and a token only from a `Bearer` or
/// `DPoP` value, non-empty, within the size bound, in RFC 6750's alphabet.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz::{Target, bytes, run};

    #[test]
    fn fuzz_bearer_extraction() {
        let seeds = bytes([
            "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln",
            "DPoP eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln",
            "bearer\tpck_ci_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "Basic dXNlcjpwYXNz",
            "Bearer a b",
            "",
        ]);
        let dictionary = bytes(["Bearer", "DPoP", " ", "\t", ",", "=", "\u{a0}", "\0", "é"]);
        run(
            Target {
                name: "bearer_extraction",
                seeds,
                dictionary,
                cases: 20_000,
            },
            |input| {
                let header = String::from_utf8_lossy(input);
                if let Ok(token) = bearer_token(Some(&header)) {
                    let scheme = header.trim_start().split([' ', '\t']).next().unwrap_or("");
                    assert!(
                        scheme.eq_ignore_ascii_case("bearer")
                            || scheme.eq_ignore_ascii_case("dpop")
                    );
                    assert!(!token.is_empty() && token.len() <= MAX_TOKEN_BYTES);
                    assert!(token.bytes().all(is_b64token_byte));
                    assert!(header.trim_end().ends_with(token));
                }
            },
        );
    }
}
