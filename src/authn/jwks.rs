//! An issuer's public keys, each pinned to exactly one signature algorithm.
//!
//! The algorithm comes from the key (its `alg`, else its curve, else RS256 for RSA),
//! never from a token header, so a token cannot choose how it is verified.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::signature::ParsedPublicKey;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Errors raised while loading a JWKS.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("cannot read JWKS file {path}: {source}")]
    Read {
        /// The JWKS file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The document is not a JSON object with a `keys` array.
    #[error("JWKS is not a JSON object with a \"keys\" array: {0}")]
    Shape(String),
    /// A key is unusable; keys are never silently skipped in a local file.
    #[error("JWKS key #{index}{kid}: {reason}")]
    Key {
        /// Position of the key in the `keys` array.
        index: usize,
        /// `" (kid \"..\")"` when the key has one.
        kid: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two keys share a `kid`.
    #[error("JWKS has two keys with kid {0:?}")]
    DuplicateKid(String),
    /// No signing keys at all.
    #[error("JWKS has no signing keys")]
    Empty,
}

/// One verification key and the only algorithm it verifies.
#[derive(Clone)]
pub struct VerificationKey {
    /// The pinned algorithm.
    pub algorithm: Algorithm,
    /// The public key, for jsonwebtoken (status lists, Security Event Tokens).
    pub key: DecodingKey,
    /// The same key parsed once for aws-lc, so that the access-token path
    /// does not parse (and, for RSA, rebuild) it on every verification.
    parsed: Arc<ParsedPublicKey>,
}

impl VerificationKey {
    /// `key` for `algorithm`, parsed now: a key aws-lc refuses (a point not
    /// on the curve, a malformed modulus) is refused here, not at each token.
    pub fn new(algorithm: Algorithm, key: DecodingKey) -> Result<VerificationKey, String> {
        let parsed = parse_public_key(algorithm, &key)?;
        Ok(VerificationKey {
            algorithm,
            key,
            parsed: Arc::new(parsed),
        })
    }

    /// Whether `signature` (raw bytes, JWS form) signs `message` with this
    /// key and its pinned algorithm. RSA keys must be 2048 to 8192 bits.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        self.parsed.verify_sig(message, signature).is_ok()
    }
}

/// The aws-lc verification algorithm of a JWS `alg`, with JWS's fixed-size
/// ECDSA signatures.
fn parse_public_key(algorithm: Algorithm, key: &DecodingKey) -> Result<ParsedPublicKey, String> {
    use aws_lc_rs::signature as sig;
    let rsa: Option<&'static sig::RsaParameters> = match algorithm {
        Algorithm::RS256 => Some(&sig::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => Some(&sig::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => Some(&sig::RSA_PKCS1_2048_8192_SHA512),
        Algorithm::PS256 => Some(&sig::RSA_PSS_2048_8192_SHA256),
        Algorithm::PS384 => Some(&sig::RSA_PSS_2048_8192_SHA384),
        Algorithm::PS512 => Some(&sig::RSA_PSS_2048_8192_SHA512),
        _ => None,
    };
    let other: Option<&'static dyn sig::VerificationAlgorithm> = match algorithm {
        Algorithm::ES256 => Some(&sig::ECDSA_P256_SHA256_FIXED),
        Algorithm::ES384 => Some(&sig::ECDSA_P384_SHA384_FIXED),
        Algorithm::EdDSA => Some(&sig::ED25519),
        _ => None,
    };
    let parsed = match (key.kind(), rsa, other) {
        (DecodingKeyKind::RsaModulusExponent { n, e }, Some(params), _) => {
            sig::RsaPublicKeyComponents { n, e }.to_parsed_public_key(params)
        }
        (DecodingKeyKind::SecretOrDer(bytes), Some(params), _) => {
            ParsedPublicKey::new(params, bytes)
        }
        (DecodingKeyKind::SecretOrDer(bytes), None, Some(algorithm)) => {
            ParsedPublicKey::new(algorithm, bytes)
        }
        _ => return Err(format!("the key cannot verify {algorithm:?}")),
    };
    parsed.map_err(|e| format!("the {algorithm:?} public key is not usable: {e}"))
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key material stays out of debug output.
        f.debug_struct("VerificationKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// The keys of one issuer, by `kid`.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, VerificationKey>,
}

impl KeySet {
    /// Loads a JWKS file.
    pub fn from_file(path: &Path) -> Result<KeySet, JwksError> {
        let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses a JWKS document. Keys marked `"use": "enc"` are ignored; any other
    /// key that cannot be used for a strong signature algorithm is an error (a
    /// local file is the operator's own and should be exact).
    pub fn from_json(text: &str) -> Result<KeySet, JwksError> {
        Self::parse(text, true)
    }

    /// Parses a JWKS served by an identity provider: keys we cannot use (other
    /// curves, weak RSA, symmetric) are skipped with a warning, as long as one
    /// signing key remains. Duplicate `kid`s are still refused.
    pub fn from_json_lenient(text: &str) -> Result<KeySet, JwksError> {
        Self::parse(text, false)
    }

    fn parse(text: &str, strict: bool) -> Result<KeySet, JwksError> {
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| JwksError::Shape(e.to_string()))?;
        let entries = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| JwksError::Shape("missing \"keys\" array".into()))?;
        let mut keys = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            let (kid, key) = match parse_key(index, entry) {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) if strict => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping unusable key in remote JWKS");
                    continue;
                }
            };
            if keys.insert(kid.clone(), key).is_some() {
                return Err(JwksError::DuplicateKid(kid));
            }
        }
        if keys.is_empty() {
            return Err(JwksError::Empty);
        }
        Ok(KeySet { keys })
    }

    /// A copy of this set with one more key.
    pub fn with_key(&self, kid: &str, key: VerificationKey) -> KeySet {
        let mut keys = self.keys.clone();
        keys.insert(kid.to_owned(), key);
        KeySet { keys }
    }

    /// The key with this `kid`.
    pub fn get(&self, kid: &str) -> Option<&VerificationKey> {
        self.keys.get(kid)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// One JWKS entry: `None` for an encryption key, else its kid and key (with
/// its pinned algorithm).
fn parse_key(
    index: usize,
    entry: &serde_json::Value,
) -> Result<Option<(String, VerificationKey)>, JwksError> {
    let kid_label = entry
        .get("kid")
        .and_then(|k| k.as_str())
        .map(|k| format!(" (kid {k:?})"))
        .unwrap_or_default();
    let key_error = |reason: String| JwksError::Key {
        index,
        kid: kid_label.clone(),
        reason,
    };
    let jwk: Jwk = serde_json::from_value(entry.clone()).map_err(|e| key_error(e.to_string()))?;
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Ok(None);
    }
    let kid = jwk
        .common
        .key_id
        .clone()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| key_error("a \"kid\" is required".into()))?;
    let algorithm = pinned_algorithm(&jwk).map_err(key_error)?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| key_error(e.to_string()))?;
    let key = VerificationKey::new(algorithm, key).map_err(key_error)?;
    Ok(Some((kid, key)))
}

/// Strong signature algorithms we accept. No `none`, no HMAC (a shared secret in a
/// JWKS is the classic algorithm-confusion hole).
pub fn is_accepted_algorithm(alg: Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::EdDSA
    )
}

fn pinned_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    let declared = match jwk.common.key_algorithm {
        None => None,
        Some(KeyAlgorithm::UNKNOWN_ALGORITHM) => {
            return Err("its \"alg\" is not a supported signature algorithm".into());
        }
        Some(alg) => Some(
            Algorithm::try_from(alg)
                .map_err(|_| format!("\"alg\" {alg} is not a signature algorithm"))?,
        ),
    };
    let from_key = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => match &ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            other => return Err(format!("EC curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match &okp.curve {
            EllipticCurve::Ed25519 => Algorithm::EdDSA,
            other => return Err(format!("OKP curve {other:?} is not supported")),
        },
        AlgorithmParameters::RSA(rsa) => {
            let modulus = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map_err(|_| "RSA modulus is not base64url".to_string())?;
            let significant = modulus.iter().skip_while(|b| **b == 0);
            let bits = match significant.clone().next() {
                Some(first) => significant.count() * 8 - first.leading_zeros() as usize,
                None => 0,
            };
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA modulus of {bits} bits is below the {MIN_RSA_BITS}-bit minimum"
                ));
            }
            declared.unwrap_or(Algorithm::RS256)
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (\"oct\") keys are not accepted".into());
        }
        _ => return Err("key type is not supported".into()),
    };
    let algorithm = declared.unwrap_or(from_key);
    if !is_accepted_algorithm(algorithm) {
        return Err(format!("algorithm {algorithm:?} is not accepted"));
    }
    if algorithm.family() != from_key.family() || (algorithm != from_key && !is_rsa(algorithm)) {
        return Err(format!(
            "\"alg\" {algorithm:?} does not fit the key type (expected {from_key:?})"
        ));
    }
    Ok(algorithm)
}

fn is_rsa(alg: Algorithm) -> bool {
    alg.family() == jsonwebtoken::AlgorithmFamily::Rsa
}

#[cfg(test)]
mod tests {
    use super::*;

    const EC_KEY: &str = r#"{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;

    #[test]
    fn ec_key_is_pinned_to_es256() {
        let set = KeySet::from_json(&format!(r#"{{"keys":[{EC_KEY}]}}"#)).unwrap();
        assert_eq!(set.get("k1").unwrap().algorithm, Algorithm::ES256);
    }

    /// A key aws-lc cannot use is refused when the set is loaded, not at
    /// each token: here a P-256 "point" that is not on the curve.
    #[test]
    fn a_point_off_the_curve_is_refused_at_load() {
        let off_curve = EC_KEY.replace(
            "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
            "x_FEzRu8m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        );
        let err = KeySet::from_json(&format!(r#"{{"keys":[{off_curve}]}}"#)).unwrap_err();
        assert!(err.to_string().contains("not usable"), "{err}");
    }

    #[test]
    fn hmac_keys_are_rejected() {
        let doc = r#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0","alg":"HS256"}]}"#;
        let err = KeySet::from_json(doc).unwrap_err().to_string();
        assert!(err.contains("kid \"h\""), "{err}");
    }

    #[test]
    fn alg_must_fit_the_key() {
        let key = EC_KEY.replace("\"kid\":\"k1\"", "\"kid\":\"k1\",\"alg\":\"ES384\"");
        let err = KeySet::from_json(&format!(r#"{{"keys":[{key}]}}"#)).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn kid_is_required_and_unique() {
        let no_kid = EC_KEY.replace("\"kid\":\"k1\",", "");
        assert!(KeySet::from_json(&format!(r#"{{"keys":[{no_kid}]}}"#)).is_err());
        let dup = format!(r#"{{"keys":[{EC_KEY},{EC_KEY}]}}"#);
        assert!(matches!(
            KeySet::from_json(&dup),
            Err(JwksError::DuplicateKid(_))
        ));
    }

    #[test]
    fn encryption_keys_are_ignored_but_a_set_needs_one_signing_key() {
        let enc = EC_KEY.replace("\"kid\":\"k1\"", "\"kid\":\"e1\",\"use\":\"enc\"");
        assert!(matches!(
            KeySet::from_json(&format!(r#"{{"keys":[{enc}]}}"#)),
            Err(JwksError::Empty)
        ));
        let both = format!(r#"{{"keys":[{enc},{EC_KEY}]}}"#);
        assert_eq!(KeySet::from_json(&both).unwrap().len(), 1);
    }

    #[test]
    fn short_rsa_keys_are_rejected() {
        // A 1024-bit modulus (128 bytes).
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xC5u8; 128]);
        let doc = format!(r#"{{"keys":[{{"kty":"RSA","kid":"r","n":"{n}","e":"AQAB"}}]}}"#);
        let err = KeySet::from_json(&doc).unwrap_err().to_string();
        assert!(err.contains("1024 bits"), "{err}");
    }
}

/// Fuzz target of JWKS documents, as a remote endpoint or a local file serves
/// them (see [`crate::fuzz`]). Oracle: no panic, and a parsed set holds only
/// keys pinned to an accepted asymmetric algorithm (never a symmetric or
/// `none` key, the door to algorithm confusion).
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::authn::mint::SigningKey;
    use crate::fuzz::{Target, bytes, run};

    #[test]
    fn fuzz_jwks_document() {
        let es256 = serde_json::to_string(
            &SigningKey::generate_es256(Some("k1".into()))
                .unwrap()
                .public_jwks(),
        )
        .unwrap();
        let seeds = bytes([
            es256.clone(),
            r#"{"keys":[{"kty":"oct","kid":"h","alg":"HS256","k":"c2VjcmV0"}]}"#.to_owned(),
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"e","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#.to_owned(),
            r#"{"keys":[{"kty":"RSA","kid":"r","alg":"RS256","n":"sXch","e":"AQAB","use":"enc"}]}"#.to_owned(),
        ]);
        let dictionary = bytes([
            r#""alg":"HS256""#,
            r#""alg":"none""#,
            r#""alg":"RS256""#,
            r#""alg":"ES384""#,
            r#""alg":"EdDSA""#,
            r#""kty":"oct""#,
            r#""kty":"RSA""#,
            r#""crv":"P-384""#,
            r#""use":"sig""#,
            r#""use":"enc""#,
            r#""kid":"k1""#,
            r#""kid":"""#,
            r#""k":"AA""#,
            ",",
            "{",
            "}",
            "[",
            "]",
            "null",
        ]);
        run(
            Target {
                name: "jwks_document",
                seeds,
                dictionary,
                cases: 6000,
            },
            |body| {
                let Ok(text) = std::str::from_utf8(body) else {
                    return;
                };
                for set in [KeySet::from_json(text), KeySet::from_json_lenient(text)]
                    .into_iter()
                    .flatten()
                {
                    assert!(!set.is_empty());
                    for (kid, key) in &set.keys {
                        assert!(!kid.is_empty());
                        assert!(
                            is_accepted_algorithm(key.algorithm),
                            "key {kid:?} pinned to {:?}",
                            key.algorithm
                        );
                    }
                }
            },
        );
    }
}
