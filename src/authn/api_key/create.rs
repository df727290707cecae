//! `apikey create`: a new key with a fresh secret, its entry (the hash only)
//! appended to the key file, which must still load afterwards.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::file::{KeyEntry, KeyFile, format_hash, format_time, sha256};
use super::{ApiKeyError, ApiKeyStore, KEY_PREFIX, SECRET_BYTES, is_valid_id};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::api_key::is_api_key;
    use crate::authn::api_key::tests::{HOUR, new_key, now_unix, temp_file};

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
}
