//! Hot reload: the policy folder, the configuration file and the issuers'
//! local key files are watched (and
//! SIGHUP or the admin `ReloadPolicies` call force a look); a change is parsed,
//! strictly validated and indexed off the request path, then swapped in
//! atomically. An invalid change is rejected as a whole: the last good set
//! keeps serving and the problems are logged and counted.
//!
//! A change to the policy folder alone, or to the configuration's routes,
//! application, response or policy settings, builds a new evaluator over the
//! serving credential stage (its verified-token cache and keys stay warm). A
//! change to `[[issuers]]`, `[api_keys]`, `[workload]` or `[cache]`, or to
//! the content of a local `jwks_file`, builds the credential stage again too: its remote keys are fetched before the swap,
//! and a reload whose keys do not arrive within [`KEYS_WAIT`] is rejected.
//! `[server]`, `[admin]`, `[audit]`, `[revocation]` and `[telemetry]` hold
//! listeners and connections made at start: a change to them is logged as
//! needing a restart and otherwise ignored.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::authz::policy_store::folder_fingerprint;
use crate::config::Config;
use crate::engine::{Engine, LoadError};

/// Where the engine in force lives: what a reload reads and replaces
/// ([`crate::state::ServerState`] in the server).
pub trait EngineSlot {
    /// The engine in force, if any.
    fn current(&self) -> Option<Arc<Engine>>;
    /// Publishes `engine` to new requests atomically.
    fn replace(&self, engine: Engine);
    /// What reloads have done so far.
    fn reload_stats(&self) -> &ReloadStats;
}

impl<T: EngineSlot + ?Sized> EngineSlot for Arc<T> {
    fn current(&self) -> Option<Arc<Engine>> {
        (**self).current()
    }

    fn replace(&self, engine: Engine) {
        (**self).replace(engine);
    }

    fn reload_stats(&self) -> &ReloadStats {
        (**self).reload_stats()
    }
}

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
    /// The configuration file cannot be read or is invalid; the running
    /// configuration keeps serving.
    #[error("configuration change rejected, the previous configuration keeps serving:\n{0}")]
    Config(String),
    /// The revocations in force could not be extended to longer token
    /// lifetimes; the previous configuration keeps serving.
    #[error(
        "configuration change rejected, the previous configuration keeps serving: revocations could not be extended to the longer token lifetimes: {0}"
    )]
    Revocations(String),
    /// The loading task failed.
    #[error("reload task: {0}")]
    Task(String),
}

/// How long a reload that rebuilds the credential stage waits for the remote
/// keys of its issuers before it is rejected.
pub const KEYS_WAIT: Duration = Duration::from_secs(30);

/// Sections read only at start: a change needs a restart.
pub const RESTART_ONLY: &[&str] = &["server", "admin", "audit", "revocation", "telemetry"];

/// Sections of the credential stage: a change rebuilds it.
const CREDENTIAL_SECTIONS: &[&str] = &["issuers", "api_keys", "workload", "cache"];

/// The configuration a server runs with and the file it came from: what a
/// reload reads again.
#[derive(Debug)]
pub struct RunningConfig {
    path: Option<PathBuf>,
    running: Mutex<Running>,
}

#[derive(Debug, Clone)]
struct Running {
    config: Config,
    /// The file's text as TOML, to tell which sections a change touches.
    table: Option<toml::Table>,
    /// The content of the issuers' local key files (`jwks_file`) when the
    /// configuration was read: a change rebuilds the credential stage, so
    /// that a key removed from the file is distrusted by a reload.
    key_files: KeyFiles,
}

/// Each local key file with its content (`None` when unreadable).
type KeyFiles = Vec<(PathBuf, Option<Vec<u8>>)>;

fn key_files(config: &Config) -> KeyFiles {
    config
        .issuers
        .iter()
        .filter_map(|issuer| issuer.jwks_file.clone())
        .map(|path| {
            let content = std::fs::read(&path).ok();
            (path, content)
        })
        .collect()
}

impl RunningConfig {
    /// Reads the configuration file at `path` (as [`Config::load`]); reloads
    /// read it again.
    pub fn load(path: &Path) -> Result<RunningConfig, crate::config::ConfigError> {
        let (config, table) = read(path)?;
        Ok(RunningConfig {
            path: Some(path.to_owned()),
            running: Mutex::new(Running {
                key_files: key_files(&config),
                config,
                table: Some(table),
            }),
        })
    }

    /// A configuration with no file behind it: reloads read the policy
    /// folder again, never the configuration.
    pub fn fixed(config: Config) -> RunningConfig {
        RunningConfig {
            path: None,
            running: Mutex::new(Running {
                key_files: key_files(&config),
                config,
                table: None,
            }),
        }
    }

    /// The configuration in force.
    pub fn current(&self) -> Config {
        crate::revocation::lock(&self.running).config.clone()
    }

    /// The configuration file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn snapshot(&self) -> Running {
        crate::revocation::lock(&self.running).clone()
    }

    fn replace(&self, running: Running) {
        *crate::revocation::lock(&self.running) = running;
    }
}

impl From<Config> for RunningConfig {
    fn from(config: Config) -> RunningConfig {
        RunningConfig::fixed(config)
    }
}

/// Reads the file once: the checked configuration and its TOML table.
fn read(path: &Path) -> Result<(Config, toml::Table), crate::config::ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| crate::config::ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let config = Config::from_toml(&text, path, base)?;
    // It parsed as a configuration, so it parses as a table.
    let table = text.parse::<toml::Table>().unwrap_or_default();
    Ok((config, table))
}

/// The sections among `names` whose text differs between two files.
fn changed(before: &toml::Table, after: &toml::Table, names: &[&'static str]) -> Vec<&'static str> {
    names
        .iter()
        .copied()
        .filter(|name| before.get(*name) != after.get(*name))
        .collect()
}

/// What a reload is about to apply.
enum Change {
    /// The policy folder (and the evaluation settings) over the serving
    /// credential stage.
    Policies(Config),
    /// Every stage built again.
    Everything(Config),
}

/// Reloads now: the configuration file (when the server has one) and the
/// policy folder. Returns the generation serving afterwards.
pub async fn reload_once(
    state: &(impl EngineSlot + ?Sized),
    running: &RunningConfig,
) -> Result<u64, ReloadError> {
    let stats = state.reload_stats();
    let _one_at_a_time = stats.serial.lock().await;
    let current = state.current().ok_or(ReloadError::NotServing)?;
    let before = running.snapshot();
    let (change, after) = match running.path() {
        None => {
            let config = before.config.clone();
            let keys = tokio::task::spawn_blocking(move || key_files(&config))
                .await
                .map_err(|e| ReloadError::Task(e.to_string()))?;
            let change = if keys == before.key_files {
                Change::Policies(before.config.clone())
            } else {
                Change::Everything(before.config.clone())
            };
            let after = Running {
                key_files: keys,
                ..before.clone()
            };
            (change, after)
        }
        Some(path) => {
            let path = path.to_owned();
            let read = tokio::task::spawn_blocking(move || {
                read(&path).map(|(config, table)| {
                    let keys = key_files(&config);
                    (config, table, keys)
                })
            })
            .await
            .map_err(|e| ReloadError::Task(e.to_string()))?;
            let (config, table, keys) = match read {
                Ok(read) => read,
                Err(e) => {
                    let error = ReloadError::Config(e.to_string());
                    tracing::error!("configuration change rejected: {e}");
                    record_failure(stats, &error);
                    return Err(error);
                }
            };
            let previous = before.table.clone().unwrap_or_default();
            let restart = changed(&previous, &table, RESTART_ONLY);
            if !restart.is_empty() {
                tracing::warn!(
                    sections = ?restart,
                    "configuration sections changed that are read only at start: restart to apply them"
                );
            }
            let credentials_changed = !changed(&previous, &table, CREDENTIAL_SECTIONS).is_empty()
                || keys != before.key_files;
            let change = if credentials_changed {
                Change::Everything(config.clone())
            } else {
                Change::Policies(config.clone())
            };
            (
                change,
                Running {
                    config,
                    table: Some(table),
                    key_files: keys,
                },
            )
        }
    };
    let text_changed = before.table != after.table || before.key_files != after.key_files;
    let rebuilds = matches!(change, Change::Everything(_));
    let loaded = {
        let current = current.clone();
        tokio::task::spawn_blocking(move || match change {
            Change::Policies(config) => current.reload_policies(&config),
            Change::Everything(config) => current.rebuild(&config),
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))?
    };
    let loaded = match loaded {
        Ok(engine) if rebuilds => wait_for_keys(engine).await,
        other => other,
    };
    match loaded {
        Ok(engine)
            if !text_changed && Some(&engine.policies().digest) == state_digest(state).as_ref() =>
        {
            // Same content (a `touch`, an editor's temporary file): keep the
            // serving set and its warm caches.
            if let Ok(mut last) = stats.last_error.lock() {
                *last = None;
            }
            Ok(engine.generation() - 1)
        }
        Ok(engine) => {
            // Longer token lifetimes need longer revocations, before the
            // first token the new rules accept is checked.
            if let Some(store) = engine.authenticator().revocations()
                && let Err(e) = store.raise_lifetimes(after.config.token_lifetimes()).await
            {
                let error = ReloadError::Revocations(e.to_string());
                tracing::error!("configuration change rejected: {error}");
                record_failure(stats, &error);
                return Err(error);
            }
            let generation = engine.generation();
            tracing::info!(
                generation,
                digest = %engine.policies().digest,
                policies = engine.policies().len(),
                configuration = text_changed,
                credential_stage_rebuilt = rebuilds,
                "policy set reloaded"
            );
            state.replace(engine);
            running.replace(after);
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
            let error = ReloadError::Invalid(e);
            record_failure(stats, &error);
            Err(error)
        }
    }
}

/// Starts the background work of a rebuilt engine's credential stage and
/// waits (at most [`KEYS_WAIT`]) until every issuer has keys.
async fn wait_for_keys(engine: Engine) -> Result<Engine, LoadError> {
    // Stopped when the engine is dropped (a rejected reload, or a later one).
    drop(engine.authenticator().spawn_background());
    let deadline = tokio::time::Instant::now() + KEYS_WAIT;
    while !engine.authenticator().is_ready() {
        if tokio::time::Instant::now() >= deadline {
            return Err(LoadError {
                problems: engine
                    .authenticator()
                    .issuers_without_keys()
                    .into_iter()
                    .map(|issuer| {
                        format!(
                            "issuer {issuer}: no keys within {}s of the reload",
                            KEYS_WAIT.as_secs()
                        )
                    })
                    .collect(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(engine)
}

fn record_failure(stats: &ReloadStats, error: &ReloadError) {
    stats.failures.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut last) = stats.last_error.lock() {
        *last = Some(error.to_string());
    }
}

fn state_digest(state: &(impl EngineSlot + ?Sized)) -> Option<Arc<str>> {
    state.current().map(|e| e.policies().digest.clone())
}

/// Watches the policy folder, the configuration file and the issuers' local
/// key files (polling every
/// `[policies] watch_interval`, unless `[policies] watch = false`) and SIGHUP,
/// reloading on each change once the files have stopped changing
/// ([`crate::settle`]). Runs until aborted.
pub async fn watch(state: Arc<impl EngineSlot + ?Sized>, running: Arc<RunningConfig>) {
    let fingerprint = |running: &RunningConfig| {
        let config = running.current();
        let stamp = |path: &Path| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        };
        let file = running.path().and_then(stamp);
        let key_files: Vec<_> = config
            .issuers
            .iter()
            .filter_map(|issuer| issuer.jwks_file.as_deref())
            .map(stamp)
            .collect();
        (folder_fingerprint(&config.policies.dir), file, key_files)
    };
    let mut seen = fingerprint(&running);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let config = running.current();
        let interval = config.policies.watch_interval;
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
        let now = fingerprint(&running);
        if !forced && (!config.policies.watch || now == seen) {
            continue;
        }
        // A file caught mid-write (truncated, half written) is not loaded:
        // wait until the stamps stop changing. SIGHUP is an operator's
        // explicit request and reloads at once.
        seen = if forced {
            now
        } else {
            crate::settle::settled(interval.min(crate::settle::SETTLE), || {
                fingerprint(&running)
            })
            .await
        };
        let _ = reload_once(&state, &running).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn sections_compare_by_their_text_secrets_included() {
        let before = table("[admin]\ntoken = \"a\"\n[[issuers]]\nissuer = \"x\"\n");
        let token = table("[admin]\ntoken = \"b\"\n[[issuers]]\nissuer = \"x\"\n");
        assert_eq!(changed(&before, &token, RESTART_ONLY), ["admin"]);
        assert!(changed(&before, &token, CREDENTIAL_SECTIONS).is_empty());
        let issuer = table("[admin]\ntoken = \"a\"\n[[issuers]]\nissuer = \"y\"\n");
        assert_eq!(changed(&before, &issuer, CREDENTIAL_SECTIONS), ["issuers"]);
        assert!(changed(&before, &issuer, RESTART_ONLY).is_empty());
        // A section that appears counts as changed.
        let cache = table("[admin]\ntoken = \"a\"\n[[issuers]]\nissuer = \"x\"\n[cache]\n");
        assert_eq!(changed(&before, &cache, CREDENTIAL_SECTIONS), ["cache"]);
    }

    #[test]
    fn a_configuration_without_a_file_is_never_read_again() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart");
        let path = std::path::Path::new(dir).join("portcullis.toml");
        let fixed = RunningConfig::fixed(Config::load(&path).unwrap());
        assert!(fixed.path().is_none());
        assert!(fixed.snapshot().table.is_none());
        let loaded = RunningConfig::load(&path).unwrap();
        assert_eq!(loaded.path(), Some(path.as_path()));
        let table = loaded.snapshot().table.unwrap();
        assert_eq!(
            table["application"]["name"].as_str(),
            Some(loaded.current().application.name.as_str())
        );
    }
}
