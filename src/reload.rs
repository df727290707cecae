//! Policy hot reload: the policy folder is watched (and SIGHUP forces a look);
//! a change is parsed, strictly validated and indexed off the request path, then
//! swapped in atomically. An invalid change is rejected as a whole: the last good
//! set keeps serving and the problems are logged and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::authz::policy_store::folder_fingerprint;
use crate::config::Config;
use crate::engine::LoadError;
use crate::server::ServerState;

/// What reloads have done, for the logs and the admin status.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Sets swapped in.
    pub reloads: AtomicU64,
    /// Changes rejected (the last good set kept serving).
    pub failures: AtomicU64,
    /// The problems of the last rejected change, cleared by a good one.
    pub last_error: std::sync::Mutex<Option<String>>,
    /// One reload at a time (watch, SIGHUP and the admin call may coincide), so
    /// each builds on the set the previous one installed.
    serial: tokio::sync::Mutex<()>,
}

/// Errors of one reload.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// No engine is serving yet (nothing to reload).
    #[error("no policy set is serving yet")]
    NotServing,
    /// The new set is invalid; the old one keeps serving.
    #[error("policy change rejected, the previous set keeps serving:\n{0}")]
    Invalid(#[from] LoadError),
    /// The loading task failed.
    #[error("reload task: {0}")]
    Task(String),
}

/// Reloads the policy folder now. Returns the new generation.
pub async fn reload_once(state: &Arc<ServerState>, config: &Config) -> Result<u64, ReloadError> {
    let stats = state.reload_stats();
    let _one_at_a_time = stats.serial.lock().await;
    let current = state.engine().ok_or(ReloadError::NotServing)?;
    let config = config.clone();
    let loaded = tokio::task::spawn_blocking(move || current.reload_policies(&config))
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))?;
    match loaded {
        Ok(engine) if Some(&engine.policies().digest) == state_digest(state).as_ref() => {
            // Same content (a `touch`, an editor's temporary file): keep the
            // serving set and its warm caches.
            if let Ok(mut last) = stats.last_error.lock() {
                *last = None;
            }
            Ok(engine.generation() - 1)
        }
        Ok(engine) => {
            let generation = engine.generation();
            tracing::info!(
                generation,
                digest = %engine.policies().digest,
                policies = engine.policies().len(),
                "policy set reloaded"
            );
            state.replace_engine(engine);
            stats.reloads.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = stats.last_error.lock() {
                *last = None;
            }
            Ok(generation)
        }
        Err(e) => {
            for problem in &e.problems {
                tracing::error!("policy change rejected: {problem}");
            }
            stats.failures.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = stats.last_error.lock() {
                *last = Some(e.to_string());
            }
            Err(ReloadError::Invalid(e))
        }
    }
}

fn state_digest(state: &ServerState) -> Option<Arc<str>> {
    state.engine().map(|e| e.policies().digest.clone())
}

/// Watches the policy folder (polling every `interval`, unless `[policies]
/// watch = false`) and SIGHUP, reloading on each change. Runs until aborted.
pub async fn watch(state: Arc<ServerState>, config: Config, interval: Duration) {
    let dir = config.policies.dir.clone();
    let mut seen = folder_fingerprint(&dir);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let forced = match hangup.as_mut() {
            Some(hangup) => tokio::select! {
                _ = hangup.recv() => true,
                _ = tokio::time::sleep(interval) => false,
            },
            None => {
                tokio::time::sleep(interval).await;
                false
            }
        };
        #[cfg(not(unix))]
        let forced = {
            tokio::time::sleep(interval).await;
            false
        };
        let now = folder_fingerprint(&dir);
        if !forced && (!config.policies.watch || now == seen) {
            continue;
        }
        seen = now;
        let _ = reload_once(&state, &config).await;
    }
}
