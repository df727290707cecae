//! A key file kept current: the last good [`ApiKeyStore`] published through
//! an [`ArcSwap`], and a watch that re-reads the file when its modification
//! time or length (its stamp) changes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use super::{ApiKeyError, ApiKeyIdentity, ApiKeyStore};
use crate::authn::TokenError;

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
    /// `interval` ([`ReloadingApiKeyStore::reload_if_changed`]), reading a
    /// change once the file has stopped changing ([`crate::settle`]), and logs reloads
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
                let changed = stamp(&store.path)
                    != *store.seen.lock().unwrap_or_else(PoisonError::into_inner);
                if changed {
                    // Not mid-write: wait until the stamp stops changing.
                    let path = store.path.clone();
                    drop(store);
                    crate::settle::settled(interval.min(crate::settle::SETTLE), || stamp(&path))
                        .await;
                }
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
    use crate::authn::api_key::create_key;
    use crate::authn::api_key::tests::{HOUR, new_key, now_unix, temp_file};

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
