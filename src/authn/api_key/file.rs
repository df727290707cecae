//! The API key file's format: the entries as written, loading and validating
//! a file into an [`ApiKeyStore`], the `sha256:` hashes, RFC 3339 times, and
//! errors that never repeat anything that looks like a key.

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{
    ApiKeyError, ApiKeyIdentity, ApiKeyStore, HASH_PREFIX, KEY_PREFIX, StoredKey, is_valid_id,
};

/// One entry of the key file, as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyEntry {
    pub(super) id: String,
    pub(super) hash: String,
    pub(super) principal: String,
    #[serde(default)]
    pub(super) scopes: Vec<String>,
    #[serde(default)]
    pub(super) roles: Vec<String>,
    pub(super) created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) expires: Option<String>,
    #[serde(default = "enabled_default")]
    pub(super) enabled: bool,
}

fn enabled_default() -> bool {
    true
}

/// The key file, as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyFile {
    #[serde(default)]
    pub(super) keys: Vec<KeyEntry>,
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
}

pub(super) fn sha256(text: &str) -> [u8; 32] {
    crate::digest::sha256(text.as_bytes())
}

pub(super) fn format_hash(digest: &[u8; 32]) -> String {
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
pub(super) fn format_time(time: SystemTime) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::api_key::create_key;
    use crate::authn::api_key::tests::{HOUR, new_key, temp_file};

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
}
