//! Opaque API keys for machine clients.
//!
//! A key looks like `pck_<id>_<secret>`: `<id>` names the key (it is not secret,
//! it may appear in logs and audit lines), `<secret>` is 64 lower-case hex digits
//! (32 bytes from the system CSPRNG). The id may itself contain `_`, so a key is
//! split at its **last** `_`.
//!
//! The key file (TOML) holds only the SHA-256 of each full key, never the key:
//!
//! ```toml
//! [[keys]]
//! id = "ci-bot"
//! hash = "sha256:<64 hex digits of SHA-256(full key string)>"
//! principal = "ci-bot"                # Cedar principal id
//! scopes = ["orders:read"]            # optional, default []
//! roles = []                          # optional, default []
//! created = "2026-11-29T09:00:00Z"    # RFC 3339, UTC
//! expires = "2026-12-29T09:00:00Z"    # RFC 3339, UTC; optional, but keys that never expire are discouraged
//! enabled = true                      # optional, default true
//! ```
//!
//! Unknown fields, duplicate ids and malformed hashes or times are errors: the
//! whole file is refused rather than silently skipping an entry.
//!
//! Verification ([`ApiKeyStore::verify`]) hashes the presented key, looks its id
//! up and compares the digests in constant time. An unknown id and a wrong secret
//! give the same error, so ids cannot be probed; whether a key is disabled or
//! expired is only revealed to a caller who holds its secret.
//!
//! [`ReloadingApiKeyStore`] publishes the parsed file through an
//! [`ArcSwap`](arc_swap::ArcSwap) (the request path never takes a lock) and a
//! background task re-reads the file when its modification time or length
//! changes, keeping the last good store if the new file does not parse.
//!
//! No error, log line or `Debug` output of this module contains a key or a secret.
//!
//! The files: this one verifies keys ([`ApiKeyStore::verify`]); `file.rs` is
//! the key file's format (loading, hashes, times, redacted errors); `create.rs`
//! makes a new key and appends it (`apikey create`); `reload.rs` keeps a store
//! current as the file changes.

mod create;
mod file;
mod reload;

use std::collections::HashMap;
use std::fmt;

use subtle::ConstantTimeEq as _;

use super::TokenError;
use file::sha256;

pub use create::{NewKey, create_key};
pub use reload::ReloadingApiKeyStore;

/// Every API key starts with this prefix.
pub const KEY_PREFIX: &str = crate::config::API_KEY_PREFIX;

/// Prefix of the `hash` field of a key file entry.
pub const HASH_PREFIX: &str = "sha256:";

/// Longest key id.
pub const MAX_ID_LEN: usize = 64;

/// Bytes of randomness in a key's secret (hex encoded to twice as many characters).
pub const SECRET_BYTES: usize = 32;

const SECRET_HEX_LEN: usize = SECRET_BYTES * 2;

/// Errors raised while loading a key file or creating a key. None of them
/// contains a key or a secret.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The key file could not be read.
    #[error("cannot read API key file {path}: {source}")]
    Read {
        /// The key file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file could not be written.
    #[error("cannot write API key file {path}: {source}")]
    Write {
        /// The key file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file is not valid TOML of the expected shape (unknown field, wrong
    /// type, ...).
    #[error("API key file {path}: {location}{message}")]
    Syntax {
        /// The key file.
        path: String,
        /// `"line L, column C: "` when known.
        location: String,
        /// What the parser expected (values that look like keys are redacted).
        message: String,
    },
    /// An entry's id does not match `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`. The id itself
    /// is not repeated, in case a whole key was pasted into it.
    #[error(
        "API key file {path}: entry #{index} has an invalid id (expected 1 to 64 characters of [A-Za-z0-9_.-], starting with a letter or digit)"
    )]
    InvalidId {
        /// The key file.
        path: String,
        /// Position of the entry in the file (1-based).
        index: usize,
    },
    /// Two entries share an id.
    #[error("API key file {path}: two entries have id {id:?}")]
    DuplicateId {
        /// The key file.
        path: String,
        /// The repeated id.
        id: String,
    },
    /// An entry's `hash` is not `sha256:` followed by 64 hex digits.
    #[error(
        "API key file {path}: entry {id:?} has a malformed hash (expected \"sha256:\" and 64 hex digits)"
    )]
    BadHash {
        /// The key file.
        path: String,
        /// The entry's id.
        id: String,
    },
    /// An entry's `principal` is empty.
    #[error("API key file {path}: entry {id:?} has an empty principal")]
    EmptyPrincipal {
        /// The key file.
        path: String,
        /// The entry's id.
        id: String,
    },
    /// An entry's `created` or `expires` is not an RFC 3339 UTC time after 1970.
    #[error(
        "API key file {path}: entry {id:?} has an invalid {field} time {value:?} (expected RFC 3339 UTC, e.g. 2026-11-29T09:00:00Z)"
    )]
    BadTime {
        /// The key file.
        path: String,
        /// The entry's id.
        id: String,
        /// `created` or `expires`.
        field: &'static str,
        /// The value found.
        value: String,
    },
    /// A key with this id already exists.
    #[error("an API key with id {0:?} already exists")]
    IdTaken(String),
    /// The request to create a key is invalid.
    #[error("cannot create API key: {0}")]
    InvalidNewKey(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// What a verified API key establishes: what later stages may rely on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyIdentity {
    /// The key id (public: the part of the key before the secret).
    pub id: String,
    /// The Cedar principal id.
    pub principal: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Granted roles.
    pub roles: Vec<String>,
    /// When the key was created, seconds since the epoch.
    pub created: i64,
    /// When the key expires, seconds since the epoch (`None`: never).
    pub expires: Option<i64>,
}

impl ApiKeyIdentity {
    /// The identity later stages see: principal `<principal_type>::"<principal>"`,
    /// the key's scopes and roles, issuer `api-key`.
    pub fn into_verified(self, principal_type: &str) -> super::VerifiedToken {
        super::VerifiedToken {
            issuer: "api-key".into(),
            subject: self.principal.clone(),
            principal_type: principal_type.to_owned(),
            principal_id: self.principal,
            jti: None,
            issued_at: self.created,
            expires_at: self.expires.unwrap_or_default(),
            scopes: self.scopes,
            roles: self.roles,
            client_id: None,
            key_id: String::new(),
            api_key_id: Some(self.id),
            credential: super::CredentialKind::ApiKey,
            binding: None,
            status: None,
            claims: Vec::new(),
        }
    }
}

/// A parsed entry: the digest to compare against and the identity it grants.
#[derive(Clone)]
struct StoredKey {
    digest: [u8; 32],
    enabled: bool,
    identity: ApiKeyIdentity,
}

/// The keys of one key file, by id. Immutable once loaded.
#[derive(Clone, Default)]
pub struct ApiKeyStore {
    keys: HashMap<String, StoredKey>,
}

impl fmt::Debug for ApiKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids only: the digests stay out of debug output.
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        f.debug_struct("ApiKeyStore")
            .field("ids", &ids)
            .finish_non_exhaustive()
    }
}

// `ApiKeyStore::load` and `ApiKeyStore::from_toml` are in `file.rs`.
impl ApiKeyStore {
    /// Number of keys (enabled or not).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the file holds no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// True when a key with this id exists (enabled or not).
    pub fn contains_id(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// Verifies a presented key at time `now_unix` (seconds since the epoch).
    ///
    /// - not of the form `pck_<id>_<64 hex>`: [`TokenError::Malformed`];
    /// - unknown id or wrong secret (indistinguishable): [`TokenError::UnknownApiKey`];
    /// - right secret but disabled: [`TokenError::DisabledApiKey`];
    /// - right secret but `now_unix >= expires`: [`TokenError::ExpiredApiKey`].
    pub fn verify(&self, presented: &str, now_unix: i64) -> Result<ApiKeyIdentity, TokenError> {
        let (id, _secret) = split_key(presented).ok_or(TokenError::Malformed)?;
        let presented_digest = sha256(presented);
        // An unknown id still costs one constant-time comparison, against a digest
        // no key has (SHA-256 preimage of all zeroes is not known).
        let stored = self.keys.get(id);
        let expected = stored.map_or(&[0u8; 32], |k| &k.digest);
        let matches: bool = presented_digest.ct_eq(expected).into();
        let key = match stored {
            Some(key) if matches => key,
            _ => return Err(TokenError::UnknownApiKey),
        };
        if !key.enabled {
            return Err(TokenError::DisabledApiKey);
        }
        if let Some(expires) = key.identity.expires
            && now_unix >= expires
        {
            return Err(TokenError::ExpiredApiKey);
        }
        Ok(key.identity.clone())
    }
}

/// True when `credential` claims to be an API key (starts with `pck_`); use it to
/// route a bearer credential to [`ApiKeyStore::verify`] rather than to JWT
/// verification. It says nothing about validity.
pub fn is_api_key(credential: &str) -> bool {
    credential.starts_with(KEY_PREFIX)
}

/// True when `id` matches `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
pub fn is_valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    match bytes.first() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.len() <= MAX_ID_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Splits `pck_<id>_<secret>` into id and secret, checking both formats.
fn split_key(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.rsplit_once('_')?;
    let secret_ok = secret.len() == SECRET_HEX_LEN
        && secret
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (secret_ok && is_valid_id(id)).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub(super) const HOUR: Duration = Duration::from_secs(3600);

    pub(super) fn now_unix() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    pub(super) fn new_key(id: &str, scopes: &[&str], lifetime: Option<Duration>) -> NewKey {
        NewKey {
            id: id.into(),
            principal: None,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            roles: vec![],
            lifetime,
        }
    }

    pub(super) fn temp_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.toml");
        (dir, path)
    }

    #[test]
    fn wrong_secret_and_unknown_id_are_the_same_error() {
        let (_dir, path) = temp_file();
        let key = create_key(&path, new_key("ci-bot", &[], Some(HOUR))).unwrap();
        let store = ApiKeyStore::load(&path).unwrap();
        let now = now_unix();

        let mut wrong = key.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert_eq!(store.verify(&wrong, now), Err(TokenError::UnknownApiKey));

        let secret = key.rsplit_once('_').unwrap().1;
        let other_id = format!("pck_other-bot_{secret}");
        assert_eq!(store.verify(&other_id, now), Err(TokenError::UnknownApiKey));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let store = ApiKeyStore::default();
        let hex64 = "a".repeat(64);
        for bad in [
            String::new(),
            "pck_".into(),
            format!("pck_{hex64}"),
            format!("pck__{hex64}"),
            format!("pk_ci-bot_{hex64}"),
            format!("pck_ci-bot_{}", "a".repeat(63)),
            format!("pck_ci-bot_{}", "A".repeat(64)),
            format!("pck_ci-bot_{}", "g".repeat(64)),
            format!("pck_ci bot_{hex64}"),
            format!("pck_{}_{hex64}", "x".repeat(65)),
            format!("pck_-bot_{hex64}"),
        ] {
            assert_eq!(store.verify(&bad, 0), Err(TokenError::Malformed), "{bad}");
        }
        assert_eq!(
            store.verify(&format!("pck_{}_{hex64}", "x".repeat(64)), 0),
            Err(TokenError::UnknownApiKey)
        );
    }

    #[test]
    fn expired_and_disabled_keys_are_refused_only_with_the_right_secret() {
        let (_dir, path) = temp_file();
        let key = create_key(&path, new_key("ci-bot", &[], Some(HOUR))).unwrap();
        let store = ApiKeyStore::load(&path).unwrap();
        let identity = store.verify(&key, now_unix()).unwrap();
        let expires = identity.expires.unwrap();
        assert!(store.verify(&key, expires - 1).is_ok());
        assert_eq!(store.verify(&key, expires), Err(TokenError::ExpiredApiKey));

        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("enabled = true", "enabled = false");
        std::fs::write(&path, text).unwrap();
        let store = ApiKeyStore::load(&path).unwrap();
        assert_eq!(
            store.verify(&key, now_unix()),
            Err(TokenError::DisabledApiKey)
        );
        // Disabled wins over expired, and neither is revealed without the secret.
        assert_eq!(store.verify(&key, expires), Err(TokenError::DisabledApiKey));
        let wrong = format!("pck_ci-bot_{}", "0".repeat(64));
        assert_eq!(
            store.verify(&wrong, now_unix()),
            Err(TokenError::UnknownApiKey)
        );
    }
}

/// Fuzz targets of API keys (see [`crate::fuzz`]): the presented key, and the
/// key file. Oracle: no panic, and a key accepted only when it is exactly a
/// key the file holds, enabled and unexpired.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz::{Target, bytes, run};

    /// A key file with an enabled key, whose key is returned, and a disabled one.
    fn key_file(dir: &std::path::Path) -> (std::path::PathBuf, String) {
        let path = dir.join("api-keys.toml");
        let new = |id: &str| NewKey {
            id: id.into(),
            scopes: vec!["orders:read".into()],
            lifetime: Some(std::time::Duration::from_secs(3600)),
            ..Default::default()
        };
        let key = create_key(&path, new("ci-job")).unwrap();
        create_key(&path, new("old-job")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let (head, old_job) = text.split_at(text.find("id = \"old-job\"").unwrap());
        let disabled = old_job.replacen("enabled = true", "enabled = false", 1);
        assert_ne!(disabled, old_job);
        std::fs::write(&path, format!("{head}{disabled}")).unwrap();
        (path, key)
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default()
    }

    #[test]
    fn fuzz_api_key_presented() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = key_file(dir.path());
        let store = ApiKeyStore::load(&path).unwrap();
        let now = now();
        assert!(store.verify(&key, now).is_ok(), "the seed key is valid");
        let seeds = bytes([key.as_str(), "pck_old-job_00", "pck__", "pck_ci-job"]);
        let dictionary = bytes(["pck_", "_", "ci-job", "old-job", "0", "f", "F", "g"]);
        run(
            Target {
                name: "api_key_presented",
                seeds,
                dictionary,
                cases: 10_000,
            },
            |input| {
                let presented = String::from_utf8_lossy(input);
                if store.verify(&presented, now).is_ok() {
                    assert_eq!(presented, key, "accepted a key the file does not hold");
                }
            },
        );
    }

    #[test]
    fn fuzz_api_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = key_file(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        let now = now();
        let dictionary = bytes([
            "[[keys]]\n",
            "enabled = false\n",
            "enabled = true\n",
            "expires = \"",
            "\"\n",
            "hash = \"sha256:",
            "id = \"",
            "principal = \"",
            "scopes = [\"*\"]\n",
            "1970-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "=",
            "\n",
        ]);
        run(
            Target {
                name: "api_key_file",
                seeds: bytes([text]),
                dictionary,
                cases: 3000,
            },
            |input| {
                let text = String::from_utf8_lossy(input);
                if let Ok(store) = ApiKeyStore::from_toml(&text, &path) {
                    // Whatever the file says, only its own hash can match.
                    if let Ok(identity) = store.verify(&key, now) {
                        assert_eq!(identity.id, "ci-job");
                    }
                    assert!(store.verify("pck_ci-job_", now).is_err());
                }
            },
        );
    }
}
