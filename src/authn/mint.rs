//! Development tokens: sign a short-lived JWT with a local private key.
//!
//! For trying Portcullis out only. Production tokens come from your identity
//! provider; the quickstart's `dev-key.pem` is public and must never be trusted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

/// Errors raised while minting.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The key file is not a PEM private key for the algorithm.
    #[error("cannot use the private key for {algorithm:?}: {reason}")]
    Key {
        /// The requested algorithm.
        algorithm: Algorithm,
        /// Why the key was refused.
        reason: String,
    },
    /// Signing failed.
    #[error("cannot sign the token: {0}")]
    Sign(String),
    /// `exp` would be past year 9999 (the latest NumericDate verifiers accept).
    #[error("the token lifetime is too long: exp would be past year 9999")]
    LifetimeTooLong,
}

/// What goes into a minted token.
#[derive(Debug, Clone)]
pub struct MintRequest {
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: String,
    /// `sub`.
    pub subject: String,
    /// Space-joined into `scope`.
    pub scopes: Vec<String>,
    /// The `roles` claim.
    pub roles: Vec<String>,
    /// `exp - iat`.
    pub lifetime: Duration,
    /// Extra claims merged last.
    pub extra_claims: Map<String, Value>,
}

/// A PKCS#8 DER private key as PEM (`-----BEGIN PRIVATE KEY-----`).
pub fn pkcs8_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

/// A private signing key with its public JWK and `kid` (the RFC 7638 thumbprint
/// unless given).
pub struct SigningKey {
    algorithm: Algorithm,
    key: EncodingKey,
    kid: String,
    public: Jwk,
}

impl SigningKey {
    /// Reads a PEM private key (PKCS#8 or SEC1 for EC, PKCS#1/8 for RSA, PKCS#8 for Ed25519).
    pub fn from_pem(
        pem: &[u8],
        algorithm: Algorithm,
        kid: Option<String>,
    ) -> Result<Self, MintError> {
        let key_error = |reason: String| MintError::Key { algorithm, reason };
        let key = match algorithm {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => EncodingKey::from_rsa_pem(pem),
            _ => return Err(key_error("only asymmetric algorithms are supported".into())),
        }
        .map_err(|e| key_error(e.to_string()))?;
        let mut public =
            Jwk::from_encoding_key(&key, algorithm).map_err(|e| key_error(e.to_string()))?;
        let kid = match kid {
            Some(kid) => kid,
            None => public
                .thumbprint(ThumbprintHash::SHA256)
                .map_err(|e| key_error(e.to_string()))?,
        };
        public.common.key_id = Some(kid.clone());
        Ok(SigningKey {
            algorithm,
            key,
            kid,
            public,
        })
    }

    /// A freshly generated ES256 (P-256) key, e.g. for `portcullis test`'s
    /// throw-away tokens.
    pub fn generate_es256(kid: Option<String>) -> Result<Self, MintError> {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let algorithm = Algorithm::ES256;
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|e| MintError::Key {
                    algorithm,
                    reason: e.to_string(),
                })?;
        Self::from_pem(pkcs8_pem(pkcs8.as_ref()).as_bytes(), algorithm, kid)
    }

    /// A compact JWS over `header` and `claims` exactly as given (any bytes),
    /// signed with this key: for fuzz targets that mutate the signed parts.
    #[cfg(test)]
    pub(crate) fn sign_raw(&self, header: &[u8], claims: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let message = format!("{}.{}", b64.encode(header), b64.encode(claims));
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &self.key, self.algorithm)
            .unwrap_or_default();
        format!("{message}.{signature}")
    }

    /// The key id put in minted tokens' headers.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A JWKS document holding this key's public half.
    pub fn public_jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.public.clone()],
        }
    }

    /// Signs a token for `request`, issued now.
    pub fn mint(&self, request: &MintRequest) -> Result<String, MintError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(request.issuer));
        claims.insert("aud".into(), json!(request.audience));
        claims.insert("sub".into(), json!(request.subject));
        claims.insert("iat".into(), json!(now));
        // A lifetime past year 9999 would mint a token no verifier accepts.
        let exp = now
            .checked_add(request.lifetime.as_secs())
            .filter(|&exp| exp <= super::claims::MAX_NUMERIC_DATE as u64)
            .ok_or(MintError::LifetimeTooLong)?;
        claims.insert("exp".into(), json!(exp));
        claims.insert("jti".into(), json!(uuid::Uuid::now_v7().to_string()));
        if !request.scopes.is_empty() {
            claims.insert("scope".into(), json!(request.scopes.join(" ")));
        }
        if !request.roles.is_empty() {
            claims.insert("roles".into(), json!(request.roles));
        }
        claims.extend(request.extra_claims.clone());
        self.sign_claims(&Value::Object(claims))
    }

    /// Signs arbitrary claims with this key (used by tests to build odd tokens).
    pub fn sign_claims(&self, claims: &Value) -> Result<String, MintError> {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| MintError::Sign(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lifetime whose `exp` would pass year 9999 (or overflow) is refused
    /// instead of minting a token no verifier accepts.
    #[test]
    fn lifetimes_past_year_9999_are_refused() {
        let key = SigningKey::generate_es256(None).unwrap();
        let request = |lifetime| MintRequest {
            issuer: "https://i.test".into(),
            audience: "a".into(),
            subject: "alice".into(),
            scopes: Vec::new(),
            roles: Vec::new(),
            lifetime,
            extra_claims: Map::new(),
        };
        assert!(key.mint(&request(Duration::from_secs(600))).is_ok());
        for secs in [super::super::claims::MAX_NUMERIC_DATE as u64, u64::MAX] {
            assert!(matches!(
                key.mint(&request(Duration::from_secs(secs))),
                Err(MintError::LifetimeTooLong)
            ));
        }
    }
}
