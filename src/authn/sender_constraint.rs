//! Sender-constrained tokens: a token bound to a key (DPoP, RFC 9449) or to a
//! client certificate (RFC 8705) is accepted only from whoever proves
//! possession of it, and issuers or routes can refuse unbound (bearer) tokens.
//!
//! Runs on every request after the credential stage (never cached: a proof is
//! for one request, a certificate for one connection):
//!
//! | token | presented | required | result |
//! |---|---|---|---|
//! | `cnf.jkt` | `Authorization: DPoP` + valid `DPoP` proof by that key | none, dpop, any | accepted |
//! | `cnf.jkt` | as `Bearer` | any | `dpop_bound_as_bearer` |
//! | `cnf["x5t#S256"]` | over a connection with that certificate | none, mtls, any | accepted |
//! | `cnf["x5t#S256"]` | without that certificate | any | `certificate_mismatch` |
//! | no `cnf` | `Authorization: DPoP` | any | `dpop_scheme_unbound` |
//! | no `cnf` (or an API key) | `Bearer` | dpop, mtls, any | `sender_constraint_required` |
//!
//! A workload identity (mTLS peer, no token) is the connection's certificate
//! itself: it meets `mtls` and `any`.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;

use super::dpop::{DpopError, DpopNonces, DpopVerifier, ProofRequest};
use super::{CredentialKind, TokenBinding, TokenError, VerifiedToken};
use crate::attributes::HttpRequest;
use crate::config::{Config, SenderConstraint};

/// The `Authorization` scheme a token came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `Bearer` (RFC 6750), or a credential without `Authorization` (API key).
    Bearer,
    /// `DPoP` (RFC 9449 §7.1).
    Dpop,
}

/// The scheme of an `Authorization` value (case-insensitive).
pub fn scheme(authorization: Option<&str>) -> Scheme {
    let is_dpop = authorization
        .map(str::trim_start)
        .and_then(|value| value.split_once([' ', '\t']))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("dpop"));
    if is_dpop {
        Scheme::Dpop
    } else {
        Scheme::Bearer
    }
}

/// The sender-constraint stage: the DPoP verifier, the issuers' requirements
/// and where client certificates come from.
#[derive(Debug)]
pub struct SenderConstraints {
    /// Shared with the stages rebuilt from this one while its settings stay
    /// the same: its replay cache must outlive a configuration reload.
    dpop: Arc<DpopVerifier>,
    /// What `dpop` was built from (settings, Redis URL and prefix), hashed.
    dpop_settings: [u8; 32],
    by_issuer: HashMap<String, SenderConstraint>,
    client_certificate_header: Option<String>,
}

/// The nonce secret file's bytes, without a trailing newline (editors add
/// one). The error never shows the contents.
fn read_nonce_secret(path: &std::path::Path) -> Result<Vec<u8>, SenderConstraintError> {
    let mut bytes = std::fs::read(path).map_err(|e| {
        SenderConstraintError(format!(
            "dpop_nonce_secret_file {}: {}",
            path.display(),
            e.kind()
        ))
    })?;
    while bytes.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        bytes.pop();
    }
    Ok(bytes)
}

/// A setting of `[sender_constraint]` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("[sender_constraint]: {0}")]
pub struct SenderConstraintError(String);

impl SenderConstraints {
    /// From `[sender_constraint]` and the issuers' `require_sender_constraint`.
    /// With `[revocation] redis_url` set, DPoP proof `jti`s are also recorded
    /// in Redis (under `[revocation] redis_prefix`), so a proof replayed to
    /// another instance is refused.
    pub fn from_config(config: &Config) -> Result<SenderConstraints, SenderConstraintError> {
        let settings = &config.sender_constraint;
        let nonce_secret = match (&settings.dpop_nonce_secret_file, settings.dpop_nonce) {
            (Some(path), true) => Some(read_nonce_secret(path)?),
            _ => None,
        };
        // The secret's digest is part of the settings: a rotated secret file
        // takes effect on reload.
        let dpop_settings = crate::digest::sha256(
            format!(
                "{settings:?}\n{:?}\n{}\n{:?}",
                config.revocation.redis_url.as_ref().map(|u| u.expose()),
                config.revocation.redis_prefix,
                nonce_secret.as_deref().map(crate::digest::sha256),
            )
            .as_bytes(),
        );
        let mut dpop =
            DpopVerifier::new(settings).map_err(|e| SenderConstraintError(e.to_string()))?;
        if settings.dpop_nonce {
            let nonces = match &nonce_secret {
                Some(secret) => DpopNonces::new(
                    secret,
                    settings.dpop_nonce_lifetime,
                    settings.dpop_clock_skew,
                ),
                None => DpopNonces::random(settings.dpop_nonce_lifetime, settings.dpop_clock_skew),
            }
            .map_err(|e| SenderConstraintError(e.to_string()))?;
            dpop = dpop.with_nonces(nonces);
        }
        if let Some(url) = &config.revocation.redis_url {
            let client =
                super::dpop::redis_client(url).map_err(|e| SenderConstraintError(e.to_string()))?;
            // `<prefix>:dpop:<hash>`, beside `<prefix>:revocations`.
            let prefix = format!("{}:", config.revocation.redis_prefix);
            dpop = dpop.with_shared_replay(client, &prefix);
        }
        let client_certificate_header = match &settings.client_certificate_header {
            Some(name) => {
                let name = name.to_ascii_lowercase();
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(SenderConstraintError(format!(
                        "client_certificate_header {name:?} is not a header name"
                    )));
                }
                Some(name)
            }
            None => None,
        };
        Ok(SenderConstraints {
            dpop: Arc::new(dpop),
            dpop_settings,
            by_issuer: config
                .issuers
                .iter()
                .map(|i| (i.issuer.clone(), i.require_sender_constraint))
                .collect(),
            client_certificate_header,
        })
    }

    /// A nonce to send a DPoP client (`DPoP-Nonce`) at `now`, when
    /// `[sender_constraint] dpop_nonce` is on.
    pub fn fresh_dpop_nonce(&self, now: i64) -> Option<String> {
        self.dpop.fresh_nonce(now)
    }

    /// Keeps `previous`'s DPoP verifier (and so the proofs it has seen) when
    /// the DPoP settings did not change: a configuration reload must not
    /// open a window in which recent proofs can be replayed.
    pub fn continue_from(&mut self, previous: &SenderConstraints) {
        if self.dpop_settings == previous.dpop_settings {
            self.dpop = previous.dpop.clone();
        }
    }

    /// Checks that `http`'s sender holds what `token` is bound to, and that the
    /// token meets the issuer's and the route's requirement. `access_token` is
    /// the presented token string (hashed into the DPoP proof's `ath`).
    pub async fn check(
        &self,
        http: &HttpRequest,
        token: &VerifiedToken,
        access_token: Option<&str>,
        route_requires: SenderConstraint,
        now: i64,
    ) -> Result<(), TokenError> {
        let scheme = scheme(http.header("authorization"));
        match &token.binding {
            Some(TokenBinding::Dpop { jkt }) => {
                if scheme != Scheme::Dpop {
                    return Err(TokenError::DpopBoundAsBearer);
                }
                let proof = http.header("dpop").ok_or(DpopError::Missing)?;
                let access_token = access_token.ok_or(DpopError::Missing)?;
                let request = ProofRequest {
                    method: &http.method,
                    scheme: &http.scheme,
                    authority: &http.host,
                    path: &http.path,
                    access_token,
                    expected_jkt: jkt,
                };
                self.dpop.verify(proof, &request, now).await?;
            }
            Some(TokenBinding::Mtls { x5t_s256 }) => {
                if scheme == Scheme::Dpop {
                    return Err(TokenError::DpopSchemeUnbound);
                }
                let presented = self
                    .client_certificate_thumbprint(http)
                    .ok_or(TokenError::CertificateMismatch)?;
                let same: bool =
                    subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), x5t_s256.as_bytes()).into();
                if !same {
                    return Err(TokenError::CertificateMismatch);
                }
            }
            None if scheme == Scheme::Dpop => return Err(TokenError::DpopSchemeUnbound),
            None => {}
        }
        let issuer_requires = match token.credential {
            CredentialKind::Jwt | CredentialKind::Introspected => self
                .by_issuer
                .get(&token.issuer)
                .copied()
                .unwrap_or_default(),
            CredentialKind::ApiKey | CredentialKind::Workload | CredentialKind::Authzen => {
                SenderConstraint::None
            }
        };
        for required in [issuer_requires, route_requires] {
            if !meets(token, required) {
                return Err(TokenError::SenderConstraintRequired);
            }
        }
        Ok(())
    }

    /// The check for a token a service hands over directly (`IsAuthorized`):
    /// there is no request to prove possession on, so a bound token is
    /// refused (fail closed), and an unbound one must meet its issuer's
    /// requirement.
    pub fn check_without_request(&self, token: &VerifiedToken) -> Result<(), TokenError> {
        match &token.binding {
            Some(TokenBinding::Dpop { .. }) => Err(TokenError::DpopBoundAsBearer),
            Some(TokenBinding::Mtls { .. }) => Err(TokenError::CertificateMismatch),
            None => match token.credential {
                CredentialKind::Jwt | CredentialKind::Introspected => {
                    let required = self
                        .by_issuer
                        .get(&token.issuer)
                        .copied()
                        .unwrap_or_default();
                    if meets(token, required) {
                        Ok(())
                    } else {
                        Err(TokenError::SenderConstraintRequired)
                    }
                }
                CredentialKind::ApiKey | CredentialKind::Workload | CredentialKind::Authzen => {
                    Ok(())
                }
            },
        }
    }

    /// The base64url SHA-256 thumbprint of the client certificate: Envoy's
    /// peer certificate, else (when configured) the one a trusted proxy hop
    /// reports in an `x-forwarded-client-cert`-style header.
    fn client_certificate_thumbprint(&self, http: &HttpRequest) -> Option<String> {
        if let Some(pem) = &http.peer_certificate {
            return certificate_thumbprint(pem);
        }
        let header = self.client_certificate_header.as_deref()?;
        xfcc_thumbprint(http.header(header)?)
    }
}

/// Does `token` carry the proof of possession `required` asks for?
fn meets(token: &VerifiedToken, required: SenderConstraint) -> bool {
    let bound = match (&token.binding, token.credential) {
        (Some(TokenBinding::Dpop { .. }), _) => Some(SenderConstraint::Dpop),
        (Some(TokenBinding::Mtls { .. }), _) | (None, CredentialKind::Workload) => {
            Some(SenderConstraint::Mtls)
        }
        (None, _) => None,
    };
    match required {
        SenderConstraint::None => true,
        SenderConstraint::Any => bound.is_some(),
        SenderConstraint::Dpop | SenderConstraint::Mtls => bound == Some(required),
    }
}

/// RFC 8705's `x5t#S256` of a certificate sent as Envoy does (URL-encoded
/// PEM): base64url (no padding) of the SHA-256 of its DER.
pub fn certificate_thumbprint(url_encoded_pem: &str) -> Option<String> {
    let pem = percent_encoding::percent_decode_str(url_encoded_pem)
        .decode_utf8()
        .ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    if pem.label != "CERTIFICATE" {
        return None;
    }
    Some(base64url_sha256(&pem.contents))
}

fn base64url_sha256(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::digest::sha256(bytes))
}

/// The client certificate's thumbprint from an `x-forwarded-client-cert`
/// value with exactly one element (a front proxy that set it, forwarded
/// as is): its `Cert=` (URL-encoded PEM), else its `Hash=` (hex SHA-256 of
/// the DER). Several elements are ambiguous and yield nothing.
pub fn xfcc_thumbprint(value: &str) -> Option<String> {
    let elements = split_unquoted(value, ',');
    let [element] = elements.as_slice() else {
        return None;
    };
    let mut hash = None;
    let mut cert = None;
    for pair in split_unquoted(element, ';') {
        let (key, value) = pair.split_once('=')?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        match key.trim().to_ascii_lowercase().as_str() {
            "hash" => hash = Some(value),
            "cert" => cert = Some(value),
            _ => {}
        }
    }
    if let Some(cert) = cert {
        return certificate_thumbprint(cert);
    }
    let digest = hex::decode(hash?).ok().filter(|d| d.len() == 32)?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest))
}

/// Splits on `separator` outside double quotes.
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(binding: Option<TokenBinding>, credential: CredentialKind) -> VerifiedToken {
        VerifiedToken {
            binding,
            ..VerifiedToken::principal_only("https://idp.test", "User", "alice", credential)
        }
    }

    #[test]
    fn each_requirement_is_met_only_by_its_binding() {
        let dpop = token(
            Some(TokenBinding::Dpop { jkt: "k".into() }),
            CredentialKind::Jwt,
        );
        let mtls = token(
            Some(TokenBinding::Mtls {
                x5t_s256: "t".into(),
            }),
            CredentialKind::Jwt,
        );
        let bearer = token(None, CredentialKind::Jwt);
        let api_key = token(None, CredentialKind::ApiKey);
        let workload = token(None, CredentialKind::Workload);
        for (t, expected) in [
            (&dpop, [true, true, false, true]),
            (&mtls, [true, false, true, true]),
            (&bearer, [true, false, false, false]),
            (&api_key, [true, false, false, false]),
            (&workload, [true, false, true, true]),
        ] {
            let got = [
                SenderConstraint::None,
                SenderConstraint::Dpop,
                SenderConstraint::Mtls,
                SenderConstraint::Any,
            ]
            .map(|r| meets(t, r));
            assert_eq!(got, expected, "{:?}", t.binding);
        }
    }

    #[test]
    fn the_scheme_is_read_case_insensitively() {
        assert_eq!(scheme(Some("DPoP abc")), Scheme::Dpop);
        assert_eq!(scheme(Some("dpop abc")), Scheme::Dpop);
        assert_eq!(scheme(Some("Bearer abc")), Scheme::Bearer);
        assert_eq!(scheme(Some("DPoPabc")), Scheme::Bearer);
        assert_eq!(scheme(None), Scheme::Bearer);
    }

    #[test]
    fn xfcc_gives_the_thumbprint_of_one_element_only() {
        let digest = [7u8; 32];
        let hex = hex::encode(digest);
        let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
        assert_eq!(
            xfcc_thumbprint(&format!("By=spiffe://a/b;Hash={hex};Subject=\"CN=x,O=y\"")),
            Some(expected.clone())
        );
        assert_eq!(
            xfcc_thumbprint(&format!("Hash=\"{hex}\";URI=spiffe://a/c")),
            Some(expected)
        );
        // Two hops: ambiguous.
        assert_eq!(xfcc_thumbprint(&format!("Hash={hex},Hash={hex}")), None);
        assert_eq!(xfcc_thumbprint("Hash=abcd"), None);
        assert_eq!(xfcc_thumbprint("By=x"), None);
        assert_eq!(xfcc_thumbprint(""), None);
    }
}
