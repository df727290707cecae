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
//! [`ReloadingApiKeyStore`] publishes the parsed file through an [`ArcSwap`] (the
//! request path never takes a lock) and a background task re-reads the file when
//! its modification time or length changes, keeping the last good store if the new
//! file does not parse.
//!
//! No error, log line or `Debug` output of this module contains a key or a secret.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use super::TokenError;

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
        }
    }
}

/// One entry of the key file, as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    hash: String,
    principal: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
    #[serde(default = "enabled_default")]
    enabled: bool,
}

fn enabled_default() -> bool {
    true
}

/// The key file, as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
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

impl ApiKeyStore {
    /// Loads and validates a key file.
    pub fn load(path: &Path) -> Result<ApiKeyStore, ApiKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| ApiKeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates the text of a key file; `path` is only used in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<ApiKeyStore, ApiKeyError> {
        let path_str = || path.display().to_string();
        let file: KeyFile = toml::from_str(text).map_err(|e| syntax_error(&e, text, path))?;
        let mut keys = HashMap::with_capacity(file.keys.len());
        for (position, entry) in file.keys.into_iter().enumerate() {
            if !is_valid_id(&entry.id) {
                return Err(ApiKeyError::InvalidId {
                    path: path_str(),
                    index: position + 1,
                });
            }
            let id = entry.id;
            let digest = parse_hash(&entry.hash).ok_or_else(|| ApiKeyError::BadHash {
                path: path_str(),
                id: id.clone(),
            })?;
            if entry.principal.is_empty() {
                return Err(ApiKeyError::EmptyPrincipal {
                    path: path_str(),
                    id: id.clone(),
                });
            }
            let time = |field: &'static str, value: &str| {
                parse_time(value).ok_or_else(|| ApiKeyError::BadTime {
                    path: path_str(),
                    id: id.clone(),
                    field,
                    value: redact(value),
                })
            };
            let created = time("created", &entry.created)?;
            let expires = entry
                .expires
                .as_deref()
                .map(|v| time("expires", v))
                .transpose()?;
            let stored = StoredKey {
                digest,
                enabled: entry.enabled,
                identity: ApiKeyIdentity {
                    id: id.clone(),
                    principal: entry.principal,
                    scopes: entry.scopes,
                    roles: entry.roles,
                    created,
                    expires,
                },
            };
            if keys.insert(id.clone(), stored).is_some() {
                return Err(ApiKeyError::DuplicateId {
                    path: path_str(),
                    id,
                });
            }
        }
        Ok(ApiKeyStore { keys })
    }

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

fn sha256(text: &str) -> [u8; 32] {
    crate::digest::sha256(text.as_bytes())
}

fn format_hash(digest: &[u8; 32]) -> String {
    format!("{HASH_PREFIX}{}", hex::encode(digest))
}

fn parse_hash(hash: &str) -> Option<[u8; 32]> {
    let hex_digits = hash.strip_prefix(HASH_PREFIX)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut out).ok()?;
    Some(out)
}

fn parse_time(value: &str) -> Option<i64> {
    let time = humantime::parse_rfc3339_weak(value).ok()?;
    let secs = time.duration_since(UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
}

/// RFC 3339 in UTC to the second; `None` past year 9999 (which humantime cannot
/// format).
fn format_time(time: SystemTime) -> Option<String> {
    let secs = time.duration_since(UNIX_EPOCH).ok()?.as_secs();
    (secs < 253_402_300_800).then(|| humantime::format_rfc3339_seconds(time).to_string())
}

/// Anything that looks like it holds a key is not repeated in an error.
fn redact(value: &str) -> String {
    if value.contains(KEY_PREFIX) {
        "<redacted: looks like an API key>".to_owned()
    } else {
        value.to_owned()
    }
}

/// A TOML error as line, column and message, without the source snippet that the
/// error's `Display` would quote (a pasted key must not reach a log).
fn syntax_error(error: &toml::de::Error, text: &str, path: &Path) -> ApiKeyError {
    let location = error
        .span()
        .map(|span| {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            format!("line {line}, column {column}: ")
        })
        .unwrap_or_default();
    ApiKeyError::Syntax {
        path: path.display().to_string(),
        location,
        message: redact(error.message().trim_end()),
    }
}

/// What [`create_key`] needs to know about a new key.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// The key id; must match `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}` and be unused.
    pub id: String,
    /// The Cedar principal id (default: the key id).
    pub principal: Option<String>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Granted roles.
    pub roles: Vec<String>,
    /// How long the key is valid (`None`: forever, which is discouraged).
    pub lifetime: Option<Duration>,
}

/// Creates a key: draws a fresh secret, appends the entry holding its hash to the
/// key file (creating the file, mode 0600 on Unix, if it is absent; other entries
/// are never rewritten) and returns the full key. The key is not stored anywhere:
/// show it once to the operator.
///
/// Refuses an invalid or already used id, and a file that does not load.
pub fn create_key(path: &Path, new: NewKey) -> Result<String, ApiKeyError> {
    create_key_at(path, new, SystemTime::now())
}

fn create_key_at(path: &Path, new: NewKey, now: SystemTime) -> Result<String, ApiKeyError> {
    if !is_valid_id(&new.id) {
        return Err(ApiKeyError::InvalidNewKey(
            "the id must be 1 to 64 characters of [A-Za-z0-9_.-], starting with a letter or digit"
                .into(),
        ));
    }
    let principal = new.principal.unwrap_or_else(|| new.id.clone());
    if principal.is_empty() {
        return Err(ApiKeyError::InvalidNewKey("the principal is empty".into()));
    }
    if new.lifetime == Some(Duration::ZERO) {
        return Err(ApiKeyError::InvalidNewKey(
            "the lifetime must be positive".into(),
        ));
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(ApiKeyError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    if ApiKeyStore::from_toml(&existing, path)?.contains_id(&new.id) {
        return Err(ApiKeyError::IdTaken(new.id));
    }

    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| ApiKeyError::InvalidNewKey("the system clock is before 1970".into()))?
        .as_secs();
    let created = UNIX_EPOCH + Duration::from_secs(secs);
    let created_text = format_time(created)
        .ok_or_else(|| ApiKeyError::InvalidNewKey("the system clock is past year 9999".into()))?;
    let expires_text = new
        .lifetime
        .map(|lifetime| {
            created
                .checked_add(lifetime)
                .and_then(format_time)
                .ok_or_else(|| ApiKeyError::InvalidNewKey("the lifetime is too long".into()))
        })
        .transpose()?;

    let mut secret = [0u8; SECRET_BYTES];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| ApiKeyError::Random)?;
    let key = format!("{KEY_PREFIX}{}_{}", new.id, hex::encode(secret));

    let entry = KeyFile {
        keys: vec![KeyEntry {
            id: new.id,
            hash: format_hash(&sha256(&key)),
            principal,
            scopes: new.scopes,
            roles: new.roles,
            created: created_text,
            expires: expires_text,
            enabled: true,
        }],
    };
    let block = toml::to_string(&entry).map_err(|e| ApiKeyError::InvalidNewKey(e.to_string()))?;
    let mut appended = String::new();
    if !existing.is_empty() {
        if !existing.ends_with('\n') {
            appended.push('\n');
        }
        appended.push('\n');
    }
    appended.push_str(&block);
    // The file after the append must load (and still hold every old entry).
    let combined = format!("{existing}{appended}");
    ApiKeyStore::from_toml(&combined, path)?;

    append(path, appended.as_bytes())?;
    Ok(key)
}

fn append(path: &Path, bytes: &[u8]) -> Result<(), ApiKeyError> {
    let write_error = |source| ApiKeyError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(write_error)?;
    file.write_all(bytes).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

/// What identifies a version of the key file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileStamp {
    /// Modification time and length.
    Present(SystemTime, u64),
    /// The file could not be stat'ed.
    Missing,
}

fn stamp(path: &Path) -> FileStamp {
    match std::fs::metadata(path) {
        Ok(meta) => FileStamp::Present(meta.modified().unwrap_or(UNIX_EPOCH), meta.len()),
        Err(_) => FileStamp::Missing,
    }
}

/// A key file kept current: the last good [`ApiKeyStore`] behind an [`ArcSwap`]
/// (lock-free reads), replaced when the file changes.
pub struct ReloadingApiKeyStore {
    path: PathBuf,
    current: ArcSwap<ApiKeyStore>,
    /// The file version last parsed (good or bad); only the reloader touches it.
    seen: Mutex<FileStamp>,
}

impl fmt::Debug for ReloadingApiKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingApiKeyStore")
            .field("path", &self.path)
            .field("current", &*self.current.load())
            .finish_non_exhaustive()
    }
}

impl ReloadingApiKeyStore {
    /// Loads the key file; fails if it does not load (a server should not start
    /// with a broken key file).
    pub fn load(path: &Path) -> Result<ReloadingApiKeyStore, ApiKeyError> {
        let seen = stamp(path);
        let store = ApiKeyStore::load(path)?;
        Ok(ReloadingApiKeyStore {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(store),
            seen: Mutex::new(seen),
        })
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current store (a snapshot: later reloads do not change it).
    pub fn current(&self) -> Arc<ApiKeyStore> {
        self.current.load_full()
    }

    /// Verifies a key against the current store; see [`ApiKeyStore::verify`].
    /// Lock-free.
    pub fn verify(&self, presented: &str, now_unix: i64) -> Result<ApiKeyIdentity, TokenError> {
        self.current.load().verify(presented, now_unix)
    }

    /// Re-reads the file if its modification time or length changed since the last
    /// look. `Ok(true)`: a new store is in place; `Ok(false)`: nothing changed;
    /// `Err`: the file changed but does not load, and the last good store stays
    /// (the same broken version is not reported twice).
    pub fn reload_if_changed(&self) -> Result<bool, ApiKeyError> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        // Stamp before reading: a change during the read is seen on the next look.
        let now = stamp(&self.path);
        if now == *seen {
            return Ok(false);
        }
        *seen = now;
        let store = ApiKeyStore::load(&self.path)?;
        self.current.store(Arc::new(store));
        Ok(true)
    }

    /// Re-reads the file now, whether or not it changed; on error the last good
    /// store stays.
    pub fn reload(&self) -> Result<(), ApiKeyError> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        *seen = stamp(&self.path);
        let store = ApiKeyStore::load(&self.path)?;
        self.current.store(Arc::new(store));
        Ok(())
    }

    /// Spawns a task on the current Tokio runtime that checks the file every
    /// `interval` ([`ReloadingApiKeyStore::reload_if_changed`]) and logs reloads
    /// and failures. The task ends when the store is dropped, or when the handle
    /// is aborted.
    pub fn spawn_watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await; // the first tick is immediate
            loop {
                ticker.tick().await;
                let Some(store) = weak.upgrade() else { return };
                match store.reload_if_changed() {
                    Ok(true) => tracing::info!(
                        path = %store.path.display(),
                        keys = store.current.load().len(),
                        "API key file reloaded"
                    ),
                    Ok(false) => {}
                    Err(error) => tracing::error!(
                        path = %store.path.display(),
                        %error,
                        "API key file changed but does not load; keeping the last good keys"
                    ),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn now_unix() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn new_key(id: &str, scopes: &[&str], lifetime: Option<Duration>) -> NewKey {
        NewKey {
            id: id.into(),
            principal: None,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            roles: vec![],
            lifetime,
        }
    }

    fn temp_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.toml");
        (dir, path)
    }

    #[test]
    fn created_key_verifies() {
        let (_dir, path) = temp_file();
        let key = create_key(&path, new_key("ci-bot", &["orders:read"], Some(HOUR))).unwrap();
        assert!(key.starts_with("pck_ci-bot_"));
        assert_eq!(key.len(), "pck_ci-bot_".len() + 64);
        assert!(is_api_key(&key));

        let store = ApiKeyStore::load(&path).unwrap();
        let identity = store.verify(&key, now_unix()).unwrap();
        assert_eq!(identity.id, "ci-bot");
        assert_eq!(identity.principal, "ci-bot");
        assert_eq!(identity.scopes, vec!["orders:read".to_string()]);
        assert!(identity.roles.is_empty());
        assert_eq!(identity.expires, Some(identity.created + 3600));
        assert!((identity.created - now_unix()).abs() < 60);
    }

    #[test]
    fn principal_and_roles_are_kept_and_ids_may_contain_underscores() {
        let (_dir, path) = temp_file();
        let key = create_key(
            &path,
            NewKey {
                id: "billing_job.v2".into(),
                principal: Some("billing".into()),
                scopes: vec![],
                roles: vec!["admin".into()],
                lifetime: None,
            },
        )
        .unwrap();
        let identity = ApiKeyStore::load(&path)
            .unwrap()
            .verify(&key, now_unix())
            .unwrap();
        assert_eq!(identity.id, "billing_job.v2");
        assert_eq!(identity.principal, "billing");
        assert_eq!(identity.roles, vec!["admin".to_string()]);
        assert_eq!(identity.expires, None);
    }

    #[test]
    fn the_file_never_holds_the_key_and_is_private() {
        let (_dir, path) = temp_file();
        let key = create_key(&path, new_key("ci-bot", &[], Some(HOUR))).unwrap();
        let secret = key.rsplit_once('_').unwrap().1;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&key));
        assert!(!text.contains(secret));
        assert!(text.contains("hash = \"sha256:"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
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

    #[test]
    fn create_refuses_duplicates_and_bad_requests_and_appends() {
        let (_dir, path) = temp_file();
        let first = create_key(&path, new_key("a", &[], Some(HOUR))).unwrap();
        let before = std::fs::read_to_string(&path).unwrap();
        assert!(matches!(
            create_key(&path, new_key("a", &[], Some(HOUR))),
            Err(ApiKeyError::IdTaken(id)) if id == "a"
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        for bad in ["", "-a", "a b", "pck_a_b/c", &"x".repeat(65)] {
            assert!(
                matches!(
                    create_key(&path, new_key(bad, &[], Some(HOUR))),
                    Err(ApiKeyError::InvalidNewKey(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            create_key(&path, new_key("z", &[], Some(Duration::ZERO))),
            Err(ApiKeyError::InvalidNewKey(_))
        ));
        let ten_thousand_years = Duration::from_secs(10_000 * 366 * 86_400);
        assert!(matches!(
            create_key(&path, new_key("z", &[], Some(ten_thousand_years))),
            Err(ApiKeyError::InvalidNewKey(_))
        ));
        let far_future = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert!(matches!(
            create_key_at(&path, new_key("z", &[], Some(HOUR)), far_future),
            Err(ApiKeyError::InvalidNewKey(_))
        ));

        let second = create_key(&path, new_key("b", &[], None)).unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(
            after.starts_with(&before),
            "earlier entries are not rewritten"
        );
        let store = ApiKeyStore::load(&path).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(store.verify(&first, now_unix()).unwrap().id, "a");
        assert_eq!(store.verify(&second, now_unix()).unwrap().id, "b");
    }

    #[test]
    fn create_appends_to_a_hand_written_file_without_trailing_newline() {
        let (_dir, path) = temp_file();
        std::fs::write(&path, "# operators' keys").unwrap();
        let key = create_key(&path, new_key("a", &[], Some(HOUR))).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# operators' keys\n"));
        assert!(
            ApiKeyStore::load(&path)
                .unwrap()
                .verify(&key, now_unix())
                .is_ok()
        );
    }

    const HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn entry(id: &str, extra: &str) -> String {
        format!(
            "[[keys]]\nid = \"{id}\"\nhash = \"{HASH}\"\nprincipal = \"p\"\ncreated = \"2026-11-29T09:00:00Z\"\n{extra}\n"
        )
    }

    fn load_text(text: &str) -> Result<ApiKeyStore, ApiKeyError> {
        ApiKeyStore::from_toml(text, Path::new("keys.toml"))
    }

    #[test]
    fn file_format_is_strict() {
        // Minimal entry: defaults for scopes, roles, expires, enabled.
        let store = load_text(&entry("a", "")).unwrap();
        assert_eq!(store.len(), 1);
        assert!(load_text("").unwrap().is_empty());

        let err = load_text(&entry("a", "colour = \"red\"")).unwrap_err();
        assert!(matches!(err, ApiKeyError::Syntax { .. }), "{err}");
        assert!(err.to_string().contains("colour"), "{err}");
        assert!(err.to_string().contains("line 6"), "{err}");

        let err = load_text(&format!("{}{}", entry("a", ""), entry("a", ""))).unwrap_err();
        assert!(
            matches!(err, ApiKeyError::DuplicateId { ref id, .. } if id == "a"),
            "{err}"
        );

        for hash in [
            "0000",
            "sha1:00",
            &HASH.replace("sha256:", "sha512:"),
            &HASH[..70],
        ] {
            let text = entry("bad-hash", "").replace(HASH, hash);
            let err = load_text(&text).unwrap_err();
            assert!(
                matches!(err, ApiKeyError::BadHash { ref id, .. } if id == "bad-hash"),
                "{err}"
            );
            assert!(err.to_string().contains("\"bad-hash\""), "{err}");
        }

        let err = load_text(&entry("a", "expires = \"next week\"")).unwrap_err();
        assert!(
            matches!(
                err,
                ApiKeyError::BadTime {
                    field: "expires",
                    ..
                }
            ),
            "{err}"
        );
        let err =
            load_text(&entry("a", "").replace("2026-11-29T09:00:00Z", "1969-01-01T00:00:00Z"))
                .unwrap_err();
        assert!(
            matches!(
                err,
                ApiKeyError::BadTime {
                    field: "created",
                    ..
                }
            ),
            "{err}"
        );
        let err = load_text(&entry("a b", "")).unwrap_err();
        assert!(
            matches!(err, ApiKeyError::InvalidId { index: 1, .. }),
            "{err}"
        );
        let err = load_text(&entry("a", "").replace("principal = \"p\"", "principal = \"\""))
            .unwrap_err();
        assert!(matches!(err, ApiKeyError::EmptyPrincipal { .. }), "{err}");
    }

    #[test]
    fn errors_and_debug_never_show_a_key() {
        let (_dir, path) = temp_file();
        let key = create_key(&path, new_key("ci-bot", &[], Some(HOUR))).unwrap();
        let secret = key.rsplit_once('_').unwrap().1.to_owned();
        // An operator pastes keys where they do not belong.
        for text in [
            entry("a", &format!("key = \"{key}\"")),
            entry("a", &format!("enabled = \"{key}\"")),
            entry("a", &format!("expires = \"{key}\"")),
            entry(&key, ""),
            entry("a", "").replace(HASH, &key),
        ] {
            let err = load_text(&text).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains(&secret), "{shown}");
        }
        let store = ApiKeyStore::load(&path).unwrap();
        let shown = format!("{store:?}");
        assert!(shown.contains("ci-bot"));
        let text = std::fs::read_to_string(&path).unwrap();
        let hash_hex = text.split("sha256:").nth(1).unwrap()[..64].to_owned();
        assert!(!shown.contains(&hash_hex), "{shown}");
    }

    #[tokio::test]
    async fn reload_picks_up_changes_and_survives_a_broken_file() {
        let (_dir, path) = temp_file();
        let first = create_key(&path, new_key("first", &[], Some(HOUR))).unwrap();
        let store = Arc::new(ReloadingApiKeyStore::load(&path).unwrap());
        let watch = store.spawn_watch(Duration::from_millis(20));

        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        async fn until(deadline: tokio::time::Instant, mut ok: impl FnMut() -> bool) {
            while !ok() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "not observed in time"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        // A key added by `create_key` is picked up.
        let second = create_key(&path, new_key("second", &[], Some(HOUR))).unwrap();
        until(deadline, || store.verify(&second, now_unix()).is_ok()).await;
        assert!(store.verify(&first, now_unix()).is_ok());

        // A broken file keeps the last good keys.
        let good = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{good}\nthis is not toml = = =\n")).unwrap();
        let broken = stamp(&path);
        until(deadline, || *store.seen.lock().unwrap() == broken).await;
        assert!(store.verify(&first, now_unix()).is_ok());
        assert!(store.verify(&second, now_unix()).is_ok());

        // A fixed file with the first key disabled is picked up again.
        std::fs::write(&path, good.replacen("enabled = true", "enabled = false", 1)).unwrap();
        until(deadline, || {
            store.verify(&first, now_unix()) == Err(TokenError::DisabledApiKey)
        })
        .await;
        assert!(store.verify(&second, now_unix()).is_ok());

        // Dropping the store ends the watcher.
        drop(store);
        tokio::time::timeout(Duration::from_secs(30), watch)
            .await
            .expect("the watcher ends once the store is dropped")
            .unwrap();
    }
}
