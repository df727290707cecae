//! A client's DPoP key (RFC 9449) for the tests: its public JWK, its RFC 7638
//! thumbprint (the `cnf.jkt` a bound token carries) and real signed proofs.

use base64::Engine as _;
use jsonwebtoken::{EncodingKey, Header};
use portcullis::authn::dpop::jwk_thumbprint;
use serde_json::{Value, json};

use super::{TestKey, now};

/// A DPoP key held by a client: signs proofs with its public JWK in the header.
pub struct DpopKey {
    key: TestKey,
}

impl Default for DpopKey {
    fn default() -> Self {
        DpopKey::new()
    }
}

impl DpopKey {
    /// A fresh P-256 key.
    pub fn new() -> DpopKey {
        DpopKey {
            key: TestKey::es256(),
        }
    }

    /// The public key as it travels in a proof's header: bare (no kid, alg or use).
    pub fn public_jwk(&self) -> Value {
        let mut jwk = self.key.public_jwk();
        if let Some(map) = jwk.as_object_mut() {
            map.retain(|k, _| matches!(k.as_str(), "kty" | "crv" | "x" | "y"));
        }
        jwk
    }

    /// The key's thumbprint: what a token bound to it carries as `cnf.jkt`.
    pub fn jkt(&self) -> String {
        jwk_thumbprint(&self.public_jwk()).expect("an EC key has a thumbprint")
    }

    /// A proof for `method` `htu`, bound to `access_token`, issued at `iat`,
    /// carrying the server's `nonce` when given; each with a new `jti`.
    pub fn proof_with(
        &self,
        method: &str,
        htu: &str,
        access_token: &str,
        iat: i64,
        nonce: Option<&str>,
    ) -> String {
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        header.typ = Some("dpop+jwt".into());
        header.jwk = Some(serde_json::from_value(self.public_jwk()).unwrap());
        let ath = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, access_token.as_bytes()),
        );
        let mut claims = json!({
            "jti": unique_jti(),
            "htm": method,
            "htu": htu,
            "iat": iat,
            "ath": ath,
        });
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        let key = EncodingKey::from_ec_pem(self.key.pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    /// A proof issued at `iat`, without a nonce.
    pub fn proof_at(&self, method: &str, htu: &str, access_token: &str, iat: i64) -> String {
        self.proof_with(method, htu, access_token, iat, None)
    }

    /// A proof issued now, without a nonce.
    pub fn proof(&self, method: &str, htu: &str, access_token: &str) -> String {
        self.proof_at(method, htu, access_token, now())
    }

    /// A proof issued now, carrying the server's `nonce`.
    pub fn proof_with_nonce(
        &self,
        method: &str,
        htu: &str,
        access_token: &str,
        nonce: &str,
    ) -> String {
        self.proof_with(method, htu, access_token, now(), Some(nonce))
    }
}

/// A `jti` never used before in this test process.
pub fn unique_jti() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "proof-{}-{}-{}",
        std::process::id(),
        now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
