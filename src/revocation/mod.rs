//! Revocation: the set of revoked credentials, checked on every request.
//!
//! - [`Target`] says what an entry matches: one token (`jti`, optionally scoped by
//!   issuer), a subject's tokens issued up to a cut-off, a key (`kid`), a client
//!   (`client_id`) or an API key id;
//! - every [`Revocation`] carries the time after which no token it matches can
//!   still be valid, and is dropped then, so the set does not grow forever;
//! - [`RevocationStore`] holds the set. Requests read an immutable snapshot
//!   (`arc-swap`), so the check never takes a lock or waits on I/O; writers build
//!   a new snapshot and publish it atomically;
//! - [`journal`] persists every entry to an append-only file (fsync per write),
//!   replayed and compacted on start: the embedded mode, and the local copy in
//!   shared mode;
//! - [`redis`] shares entries between instances through Redis (shared mode).

pub mod journal;
pub mod redis;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::authn::VerifiedToken;
use crate::config::RevocationConfig;
use journal::Journal;

/// Longest accepted identifier (jti, sub, kid, client id, API key id, issuer).
pub const MAX_ID_BYTES: usize = 1024;
/// Longest accepted free-text reason.
pub const MAX_REASON_BYTES: usize = 1024;
/// Batches of entries from Redis waiting for the background journal writer
/// at most; beyond, the Redis session waits for the writer.
pub const REMOTE_JOURNAL_BATCHES: usize = 64;

/// Errors of the revocation store. None of them carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// The journal could not be read or written.
    #[error("revocation journal {path}: {source}")]
    Journal {
        /// The journal file or data folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A revocation request is not acceptable.
    #[error("invalid revocation: {0}")]
    Invalid(String),
    /// The Redis URL is not valid.
    #[error("invalid [revocation] redis_url: {0}")]
    RedisUrl(String),
    /// A background task failed.
    #[error("revocation task: {0}")]
    Task(String),
    /// The store holds `[revocation] max_entries` entries in force: the
    /// revocation was not applied.
    #[error(
        "revocation not applied: {max_entries} revocations are in force, the limit set by [revocation] max_entries; raise it or wait for entries to expire"
    )]
    Full {
        /// The configured cap.
        max_entries: usize,
    },
    /// Redis has been unreachable while `[revocation] max_pending_writes`
    /// local revocations wait to be written: the revocation was not applied.
    #[error(
        "revocation not applied: Redis is unreachable and {max_pending_writes} revocations already wait to be written to it, the limit set by [revocation] max_pending_writes; retry once Redis is back"
    )]
    QueueFull {
        /// The configured bound.
        max_pending_writes: usize,
    },
}

/// What a revocation matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// One token, by `jti`; with an issuer, only that issuer's token.
    Token {
        /// The `jti` claim.
        jti: String,
        /// The `iss` claim; `None` matches the `jti` of any issuer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issuer: Option<String>,
    },
    /// Every token of a subject with `iat <= issued_before`.
    Subject {
        /// The `sub` claim.
        sub: String,
        /// The cut-off, seconds since the epoch (inclusive).
        issued_before: i64,
    },
    /// Every token signed by a key.
    Key {
        /// The key id (`kid`).
        kid: String,
    },
    /// Every token of a client.
    Client {
        /// The `client_id` (or `azp`) claim.
        client_id: String,
    },
    /// Every request authenticated by an API key.
    ApiKey {
        /// The API key id.
        api_key_id: String,
    },
}

impl Target {
    /// The kind as a stable word: `jti`, `sub`, `kid`, `client`, `api_key`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Token { .. } => "jti",
            Target::Subject { .. } => "sub",
            Target::Key { .. } => "kid",
            Target::Client { .. } => "client",
            Target::ApiKey { .. } => "api_key",
        }
    }

    fn validate(&self) -> Result<(), RevocationError> {
        let ids: Vec<(&str, &str)> = match self {
            Target::Token { jti, issuer } => {
                let mut ids = vec![("jti", jti.as_str())];
                if let Some(issuer) = issuer {
                    ids.push(("issuer", issuer.as_str()));
                }
                ids
            }
            Target::Subject { sub, .. } => vec![("sub", sub.as_str())],
            Target::Key { kid } => vec![("kid", kid.as_str())],
            Target::Client { client_id } => vec![("client_id", client_id.as_str())],
            Target::ApiKey { api_key_id } => vec![("api_key_id", api_key_id.as_str())],
        };
        for (name, value) in ids {
            if value.is_empty() {
                return Err(RevocationError::Invalid(format!(
                    "{name} must not be empty"
                )));
            }
            if value.len() > MAX_ID_BYTES {
                return Err(RevocationError::Invalid(format!(
                    "{name} is longer than {MAX_ID_BYTES} bytes"
                )));
            }
        }
        Ok(())
    }
}

/// One revocation entry, as journaled, stored in Redis and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// What it matches.
    pub target: Target,
    /// When it was made, seconds since the epoch.
    pub created_at: i64,
    /// When it is dropped (seconds since the epoch): no token it matches can
    /// still be valid then.
    pub expires_at: i64,
    /// Free text for operators.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Revocation {
    /// The entry's one-line JSON form (journal line, Redis member, pub/sub message).
    pub fn to_line(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

pub use crate::config::Lifetimes;

// The data comes from the configuration (`Config::token_lifetimes`); what it
// means for revocation entries is worked out here.
impl Lifetimes {
    /// Longest time a token can still be accepted after it was seen: its whole
    /// lifetime, plus the leeway on `iat` and on `exp`.
    pub fn max_ttl(&self) -> i64 {
        (self.max_lifetime + 2 * self.leeway).as_secs() as i64
    }

    /// When an entry for `target`, made at `now`, may be dropped. `token_exp` is
    /// the token's `exp` when known (a `jti` revocation).
    pub fn expiry(&self, target: &Target, now: i64, token_exp: Option<i64>) -> i64 {
        let leeway = self.leeway.as_secs() as i64;
        match target {
            Target::Subject { issued_before, .. } => {
                issued_before.saturating_add(self.max_ttl() - leeway)
            }
            Target::Token { .. } => match token_exp {
                Some(exp) => exp.saturating_add(leeway).min(now + self.max_ttl()),
                None => now + self.max_ttl(),
            },
            Target::ApiKey { .. } => {
                let api_key = (self.api_key_lifetime + self.leeway).as_secs() as i64;
                now + api_key.max(self.max_ttl())
            }
            _ => now + self.max_ttl(),
        }
    }
}

/// A revoked credential, with the kind of entry that matched (never the
/// credential itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("credential revoked (by {kind})")]
pub struct Revoked {
    /// `jti`, `sub`, `kid`, `client` or `api_key`.
    pub kind: &'static str,
}

/// The immutable lookup structure the request path reads.
#[derive(Debug, Default)]
struct Index {
    /// jti → (issuer or any, expiry).
    jti: HashMap<String, Vec<(Option<String>, i64)>>,
    /// sub → (cut-off, expiry).
    sub: HashMap<String, Vec<(i64, i64)>>,
    /// kid → expiry.
    kid: HashMap<String, i64>,
    /// client id → expiry.
    client: HashMap<String, i64>,
    /// API key id → expiry.
    api_key: HashMap<String, i64>,
    /// Earliest expiry, for the sweeper.
    next_expiry: Option<i64>,
}

impl Index {
    fn build<'a>(entries: impl Iterator<Item = &'a Revocation>) -> Index {
        let mut index = Index::default();
        let keep_latest = |map: &mut HashMap<String, i64>, key: &str, exp: i64| {
            let slot = map.entry(key.to_owned()).or_insert(exp);
            *slot = (*slot).max(exp);
        };
        for entry in entries {
            let exp = entry.expires_at;
            index.next_expiry = Some(index.next_expiry.map_or(exp, |n| n.min(exp)));
            match &entry.target {
                Target::Token { jti, issuer } => index
                    .jti
                    .entry(jti.clone())
                    .or_default()
                    .push((issuer.clone(), exp)),
                Target::Subject { sub, issued_before } => index
                    .sub
                    .entry(sub.clone())
                    .or_default()
                    .push((*issued_before, exp)),
                Target::Key { kid } => keep_latest(&mut index.kid, kid, exp),
                Target::Client { client_id } => keep_latest(&mut index.client, client_id, exp),
                Target::ApiKey { api_key_id } => keep_latest(&mut index.api_key, api_key_id, exp),
            }
        }
        index
    }

    fn check(&self, token: &VerifiedToken, now: i64) -> Result<(), Revoked> {
        let live = |exp: &i64| *exp > now;
        if let Some(jti) = &token.jti
            && let Some(rules) = self.jti.get(jti)
            && rules.iter().any(|(issuer, exp)| {
                live(exp) && issuer.as_deref().is_none_or(|iss| iss == token.issuer)
            })
        {
            return Err(Revoked { kind: "jti" });
        }
        if let Some(rules) = self.sub.get(&token.subject)
            && rules
                .iter()
                .any(|(cutoff, exp)| live(exp) && token.issued_at <= *cutoff)
        {
            return Err(Revoked { kind: "sub" });
        }
        if !token.key_id.is_empty() && self.kid.get(&token.key_id).is_some_and(live) {
            return Err(Revoked { kind: "kid" });
        }
        if let Some(client) = &token.client_id
            && self.client.get(client).is_some_and(live)
        {
            return Err(Revoked { kind: "client" });
        }
        if let Some(id) = &token.api_key_id
            && self.api_key.get(id).is_some_and(live)
        {
            return Err(Revoked { kind: "api_key" });
        }
        Ok(())
    }
}

/// Where revocations are shared: `embedded` (journal only) or `redis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// This instance only, persisted to its journal.
    Embedded,
    /// Shared through Redis, with the journal as the local copy.
    Redis,
}

/// The Redis link as the admin API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisState {
    /// Embedded mode.
    Disabled,
    /// Not connected yet since start.
    Connecting,
    /// Subscribed and in sync.
    Connected,
    /// Lost; reconnecting with backoff.
    Disconnected,
}

impl RedisState {
    /// A stable word for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisState::Disabled => "disabled",
            RedisState::Connecting => "connecting",
            RedisState::Connected => "connected",
            RedisState::Disconnected => "disconnected",
        }
    }
}

/// What [`RevocationStore::revoke`] did.
#[derive(Debug, Clone)]
pub struct Revoke {
    /// The entry in force.
    pub revocation: Revocation,
    /// Written to Redis (false: queued, or no Redis configured).
    pub synced: bool,
}

/// A summary for the admin API.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    /// Entries in force.
    pub revocations: usize,
    /// Embedded or Redis.
    pub mode: Mode,
    /// The Redis link.
    pub redis: RedisState,
    /// Local revocations not yet written to Redis.
    pub pending_writes: usize,
}

/// What the store has applied, for the metrics endpoint.
#[derive(Debug)]
pub struct RevocationStats {
    /// Revocations made on this instance (admin API).
    pub applied_local: std::sync::atomic::AtomicU64,
    /// Revocations received from Redis (pub/sub or a full sync) and new here.
    pub applied_remote: std::sync::atomic::AtomicU64,
    /// Local revocations refused because `[revocation] max_entries` entries
    /// were in force.
    pub refused_full: std::sync::atomic::AtomicU64,
    /// Local revocations refused because `[revocation] max_pending_writes`
    /// waited for Redis.
    pub refused_queue_full: std::sync::atomic::AtomicU64,
    /// Entries from Redis (or the journal) accepted although
    /// `[revocation] max_entries` were in force: a revocation another
    /// instance enforces is never dropped here.
    pub accepted_over_cap: std::sync::atomic::AtomicU64,
    /// Seconds from a revocation's `created_at` (whole seconds, set by the
    /// revoking instance) to its arrival here through pub/sub.
    pub propagation_lag: prometheus_client::metrics::histogram::Histogram,
}

impl Default for RevocationStats {
    fn default() -> Self {
        RevocationStats {
            applied_local: Default::default(),
            applied_remote: Default::default(),
            refused_full: Default::default(),
            refused_queue_full: Default::default(),
            accepted_over_cap: Default::default(),
            propagation_lag: prometheus_client::metrics::histogram::Histogram::new([
                0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        }
    }
}

/// The mutable side: every entry by its line, behind a lock writers take.
#[derive(Debug, Default)]
struct Entries {
    by_line: HashMap<String, Revocation>,
}

/// The revocation set of one instance: checked on every request, written by the
/// admin API and (in shared mode) by Redis.
#[derive(Debug)]
pub struct RevocationStore {
    snapshot: ArcSwap<Index>,
    entries: Mutex<Entries>,
    journal: Arc<Mutex<Journal>>,
    /// Entries received from Redis, journaled in the background so that an
    /// fsync never delays the next message. Bounded ([`REMOTE_JOURNAL_BATCHES`]):
    /// when the journal falls behind, the Redis session waits for it (the
    /// entries are enforced meanwhile) instead of queueing without limit.
    remote_journal: mpsc::Sender<Vec<String>>,
    lifetimes: Lifetimes,
    /// `[revocation] max_entries`.
    max_entries: usize,
    sync: Option<redis::SyncHandle>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
    /// Counters for the metrics endpoint.
    pub stats: RevocationStats,
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Locks `mutex`, taking the guard back if a panic elsewhere poisoned it.
///
/// The data behind these locks (the entries, the task list, the Redis queue)
/// is consistent between statements, and skipping the work instead would drop
/// a revocation that the caller is told was applied: never acceptable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RevocationStore {
    /// Opens the store: replays the journal under `config.data_dir`, then, in
    /// shared mode, starts the Redis sync (waiting for the first full sync when
    /// `startup = "wait"`). Starts the sweeper that drops expired entries.
    pub async fn open(
        config: &RevocationConfig,
        lifetimes: Lifetimes,
    ) -> Result<Arc<RevocationStore>, RevocationError> {
        let dir = config.data_dir.clone();
        let now = unix_now();
        let (journal, replay) = tokio::task::spawn_blocking(move || Journal::open(&dir, now))
            .await
            .map_err(|e| RevocationError::Task(e.to_string()))??;
        tracing::info!(
            journal = %journal.path().display(),
            entries = replay.entries.len(),
            expired_dropped = replay.expired,
            unreadable_skipped = replay.unreadable,
            "revocation journal replayed"
        );
        if replay.unreadable > 0 {
            tracing::warn!(
                lines = replay.unreadable,
                "revocation journal: unreadable lines skipped (a torn last write is expected after a crash)"
            );
        }
        let sync = match &config.redis_url {
            Some(url) => Some(
                redis::SyncHandle::new(url.expose(), &config.redis_prefix)?
                    .with_max_pending(config.max_pending_writes),
            ),
            None => None,
        };
        if replay.entries.len() > config.max_entries {
            tracing::warn!(
                entries = replay.entries.len(),
                max_entries = config.max_entries,
                "the journal holds more revocations than [revocation] max_entries: all are enforced, new local revocations are refused until entries expire"
            );
        }
        let entries = Entries {
            by_line: replay.entries.into_iter().collect(),
        };
        let (stop, _) = watch::channel(false);
        let journal = Arc::new(Mutex::new(journal));
        let (remote_journal, remote_lines) = mpsc::channel(REMOTE_JOURNAL_BATCHES);
        let journal_writer = tokio::spawn(journal_loop(
            journal.clone(),
            remote_lines,
            stop.subscribe(),
        ));
        let store = Arc::new(RevocationStore {
            snapshot: ArcSwap::from_pointee(Index::build(entries.by_line.values())),
            entries: Mutex::new(entries),
            journal,
            remote_journal,
            lifetimes,
            max_entries: config.max_entries,
            sync,
            tasks: Mutex::new(Vec::new()),
            stop,
            stats: RevocationStats::default(),
        });
        if let Some(over) = store.status_count().checked_sub(config.max_entries) {
            store
                .stats
                .accepted_over_cap
                .store(over as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let sweeper = tokio::spawn(sweep_loop(Arc::downgrade(&store), store.stop.subscribe()));
        store.push_task(sweeper);
        store.push_task(journal_writer);
        if let Some(sync) = &store.sync {
            let task = tokio::spawn(redis::run(Arc::downgrade(&store), store.stop.subscribe()));
            store.push_task(task);
            if config.startup == crate::config::StartupMode::Wait {
                tracing::info!("waiting for the first sync with Redis (startup = \"wait\")");
                sync.wait_connected().await;
            }
        }
        Ok(store)
    }

    fn push_task(&self, task: JoinHandle<()>) {
        lock(&self.tasks).push(task);
    }

    /// Is `token` revoked at `now` (seconds since the epoch)? Lock-free: reads
    /// the current snapshot.
    pub fn check(&self, token: &VerifiedToken, now: i64) -> Result<(), Revoked> {
        self.snapshot.load().check(token, now)
    }

    /// Revokes `target`: the entry is in force on this instance at once, and on
    /// disk in the journal when this returns. In shared mode it is also written
    /// to Redis and published (in parallel with the journal write); if Redis is
    /// unreachable (or does not answer within a second) it is queued and written
    /// once Redis is back. A journal failure is returned as an error, but the
    /// entry stays in force and queued for Redis.
    ///
    /// Refused, with nothing applied, when `[revocation] max_entries` entries
    /// are in force (expired ones are swept first and do not count):
    /// [`RevocationError::Full`]; or, in shared mode, when
    /// `[revocation] max_pending_writes` revocations already wait for Redis:
    /// [`RevocationError::QueueFull`].
    pub async fn revoke(
        self: &Arc<Self>,
        target: Target,
        token_exp: Option<i64>,
        reason: String,
    ) -> Result<Revoke, RevocationError> {
        target.validate()?;
        if reason.len() > MAX_REASON_BYTES {
            return Err(RevocationError::Invalid(format!(
                "reason is longer than {MAX_REASON_BYTES} bytes"
            )));
        }
        let now = unix_now();
        let revocation = Revocation {
            expires_at: self.lifetimes.expiry(&target, now, token_exp),
            target,
            created_at: now,
            reason,
        };
        if revocation.expires_at <= now {
            return Err(RevocationError::Invalid(
                "no token it matches can still be valid".into(),
            ));
        }
        let line = revocation.to_line();
        // A place in the Redis queue first, then the cap: a refusal leaves
        // nothing applied, queued or journaled.
        let slot = match &self.sync {
            Some(sync) => Some(sync.reserve(now).inspect_err(|_| {
                self.stats
                    .refused_queue_full
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })?),
            None => None,
        };
        // Enforce first, then persist, then share.
        let fresh = self.insert_local(line.clone(), revocation.clone(), now)?;
        self.stats
            .applied_local
            .fetch_add(u64::from(fresh), std::sync::atomic::Ordering::Relaxed);
        // The journal (local durability) and Redis (every instance) in parallel:
        // propagation does not wait on the local fsync.
        let journal = self.append_journal(vec![line.clone()]);
        let share = async {
            match (&self.sync, slot) {
                (Some(sync), Some(slot)) => sync.write(slot, line, revocation.expires_at).await,
                _ => false,
            }
        };
        let (journaled, synced) = tokio::join!(journal, share);
        journaled?;
        Ok(Revoke { revocation, synced })
    }

    /// Adds a local entry unless `[revocation] max_entries` are in force
    /// (after dropping the expired ones); true if it was new.
    fn insert_local(
        &self,
        line: String,
        entry: Revocation,
        now: i64,
    ) -> Result<bool, RevocationError> {
        let mut entries = lock(&self.entries);
        if entries.by_line.contains_key(&line) {
            return Ok(false);
        }
        if entries.by_line.len() >= self.max_entries {
            // Expired entries do not count: sweep them now, not at the next tick.
            entries.by_line.retain(|_, e| e.expires_at > now);
            self.snapshot
                .store(Arc::new(Index::build(entries.by_line.values())));
            if entries.by_line.len() >= self.max_entries {
                drop(entries);
                self.stats
                    .refused_full
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    max_entries = self.max_entries,
                    "revocation refused: [revocation] max_entries revocations are in force"
                );
                return Err(RevocationError::Full {
                    max_entries: self.max_entries,
                });
            }
        }
        entries.by_line.insert(line, entry);
        self.snapshot
            .store(Arc::new(Index::build(entries.by_line.values())));
        Ok(true)
    }

    /// Adds entries not known yet (from Redis); returns the lines that were
    /// new. Never refuses: past `[revocation] max_entries` they are still
    /// enforced (dropping a revocation another instance enforces is worse
    /// than the memory), counted and reported.
    fn insert(&self, batch: Vec<(String, Revocation)>) -> Vec<String> {
        let mut entries = lock(&self.entries);
        let mut fresh = Vec::new();
        let mut over_cap = 0u64;
        for (line, entry) in batch {
            if !entries.by_line.contains_key(&line) {
                if entries.by_line.len() >= self.max_entries {
                    over_cap += 1;
                }
                entries.by_line.insert(line.clone(), entry);
                fresh.push(line);
            }
        }
        if !fresh.is_empty() {
            self.snapshot
                .store(Arc::new(Index::build(entries.by_line.values())));
        }
        let in_force = entries.by_line.len();
        drop(entries);
        if over_cap > 0 {
            let before = self
                .stats
                .accepted_over_cap
                .fetch_add(over_cap, std::sync::atomic::Ordering::Relaxed);
            if before == 0 || before / 1000 != (before + over_cap) / 1000 {
                tracing::warn!(
                    accepted_over_cap_total = before + over_cap,
                    in_force,
                    max_entries = self.max_entries,
                    "revocations from other instances accepted beyond [revocation] max_entries (enforced, never dropped); raise the limit"
                );
            }
        }
        fresh
    }

    /// Applies entries received from Redis (lines as stored there): unknown,
    /// unexpired ones are enforced at once, and handed to the background
    /// journal writer (waiting for room when it is behind).
    async fn apply_remote(&self, lines: Vec<String>) -> usize {
        self.apply_remote_lines(lines, false).await
    }

    /// [`Self::apply_remote`] for entries just published by another instance:
    /// their propagation lag is measured.
    async fn apply_published(&self, lines: Vec<String>) -> usize {
        self.apply_remote_lines(lines, true).await
    }

    async fn apply_remote_lines(&self, lines: Vec<String>, published: bool) -> usize {
        let now = unix_now();
        let mut batch = Vec::with_capacity(lines.len());
        let mut unreadable = 0usize;
        for line in lines {
            match serde_json::from_str::<Revocation>(&line) {
                Ok(entry) if entry.expires_at > now => batch.push((line, entry)),
                Ok(_) => {}
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                entries = unreadable,
                "ignored unreadable revocation entries from Redis"
            );
        }
        let created: HashMap<String, i64> = if published {
            batch
                .iter()
                .map(|(line, entry)| (line.clone(), entry.created_at))
                .collect()
        } else {
            HashMap::new()
        };
        let fresh = self.insert(batch);
        let count = fresh.len();
        self.stats
            .applied_remote
            .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
        if published {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default();
            for line in &fresh {
                if let Some(created_at) = created.get(line) {
                    self.stats
                        .propagation_lag
                        .observe((now - *created_at as f64).max(0.0));
                }
            }
        }
        // Enforced already; the journal copy waits for room (bounded channel).
        if count > 0 && self.remote_journal.send(fresh).await.is_err() {
            tracing::error!(
                "revocation journal writer stopped; entries from Redis are enforced but not journaled"
            );
        }
        count
    }

    async fn append_journal(&self, lines: Vec<String>) -> Result<(), RevocationError> {
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            let mut journal = journal
                .lock()
                .map_err(|_| RevocationError::Task("journal lock poisoned".into()))?;
            journal.append(lines.iter().map(String::as_str))
        })
        .await
        .map_err(|e| RevocationError::Task(e.to_string()))?
    }

    /// Every entry's line and expiry (for the Redis resync).
    fn lines(&self) -> Vec<(String, i64)> {
        lock(&self.entries)
            .by_line
            .iter()
            .map(|(line, entry)| (line.clone(), entry.expires_at))
            .collect()
    }

    /// Drops entries expired at `now`; returns how many.
    pub fn sweep(&self, now: i64) -> usize {
        if self
            .snapshot
            .load()
            .next_expiry
            .is_none_or(|next| next > now)
        {
            return 0;
        }
        let mut entries = lock(&self.entries);
        let before = entries.by_line.len();
        entries.by_line.retain(|_, entry| entry.expires_at > now);
        let removed = before - entries.by_line.len();
        self.snapshot
            .store(Arc::new(Index::build(entries.by_line.values())));
        removed
    }

    /// The entries in force, oldest first.
    pub fn list(&self) -> Vec<Revocation> {
        let now = unix_now();
        let mut list: Vec<Revocation> = lock(&self.entries)
            .by_line
            .values()
            .filter(|r| r.expires_at > now)
            .cloned()
            .collect();
        list.sort_by(|a, b| {
            (a.created_at, a.expires_at, a.to_line()).cmp(&(
                b.created_at,
                b.expires_at,
                b.to_line(),
            ))
        });
        list
    }

    fn status_count(&self) -> usize {
        lock(&self.entries).by_line.len()
    }

    /// Counts and the Redis link, for the admin API.
    pub fn status(&self) -> StoreStatus {
        let now = unix_now();
        let revocations = lock(&self.entries)
            .by_line
            .values()
            .filter(|r| r.expires_at > now)
            .count();
        StoreStatus {
            revocations,
            mode: if self.sync.is_some() {
                Mode::Redis
            } else {
                Mode::Embedded
            },
            redis: self
                .sync
                .as_ref()
                .map_or(RedisState::Disabled, |s| s.state()),
            pending_writes: self.sync.as_ref().map_or(0, |s| s.pending()),
        }
    }

    /// `[revocation] max_entries`: the most entries a local revoke may bring
    /// in force.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// The token lifetimes entries' expiries are computed from.
    pub fn lifetimes(&self) -> Lifetimes {
        self.lifetimes
    }

    /// Stops the sweeper and the Redis sync. Entries not yet written to Redis
    /// stay in the journal and are written at the next start.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// Journals entries received from Redis, in batches; on stop, writes what is
/// left first.
async fn journal_loop(
    journal: Arc<Mutex<Journal>>,
    mut lines: mpsc::Receiver<Vec<String>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let mut batch = tokio::select! {
            batch = lines.recv() => match batch {
                Some(batch) => batch,
                None => return,
            },
            _ = stop.changed() => Vec::new(),
        };
        let stopping = *stop.borrow();
        while let Ok(more) = lines.try_recv() {
            batch.extend(more);
        }
        if !batch.is_empty() {
            let journal = journal.clone();
            let written = tokio::task::spawn_blocking(move || {
                let mut journal = journal
                    .lock()
                    .map_err(|_| RevocationError::Task("journal lock poisoned".into()))?;
                journal.append(batch.iter().map(String::as_str))
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "could not journal revocations received from Redis (they are enforced)")
                }
                Err(e) => tracing::error!(error = %e, "revocation journal task failed"),
            }
        }
        if stopping {
            return;
        }
    }
}

/// Drops expired entries once a second (cheap when nothing expired). The Redis
/// sync drops them from Redis on its own tick.
async fn sweep_loop(store: std::sync::Weak<RevocationStore>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(store) = store.upgrade() else { return };
        let removed = store.sweep(unix_now());
        if removed > 0 {
            tracing::debug!(removed, "expired revocations dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> VerifiedToken {
        VerifiedToken {
            issuer: "https://iss".into(),
            subject: "alice".into(),
            principal_type: "User".into(),
            principal_id: "alice".into(),
            jti: Some("j1".into()),
            issued_at: 1000,
            expires_at: 1600,
            scopes: vec![],
            roles: vec![],
            client_id: Some("web".into()),
            key_id: "k1".into(),
            api_key_id: None,
            credential: crate::authn::CredentialKind::Jwt,
        }
    }

    fn entry(target: Target) -> Revocation {
        Revocation {
            target,
            created_at: 1000,
            expires_at: 5000,
            reason: String::new(),
        }
    }

    fn check(targets: Vec<Target>, token: &VerifiedToken, now: i64) -> Result<(), Revoked> {
        let entries: Vec<Revocation> = targets.into_iter().map(entry).collect();
        Index::build(entries.iter()).check(token, now)
    }

    #[test]
    fn each_kind_matches_only_its_credential() {
        let t = token();
        assert_eq!(check(vec![], &t, 1100), Ok(()));
        let jti = |issuer: Option<&str>| Target::Token {
            jti: "j1".into(),
            issuer: issuer.map(Into::into),
        };
        assert_eq!(check(vec![jti(None)], &t, 1100).unwrap_err().kind, "jti");
        assert!(check(vec![jti(Some("https://iss"))], &t, 1100).is_err());
        assert!(check(vec![jti(Some("https://other"))], &t, 1100).is_ok());
        let sub = |cutoff| Target::Subject {
            sub: "alice".into(),
            issued_before: cutoff,
        };
        assert_eq!(check(vec![sub(1000)], &t, 1100).unwrap_err().kind, "sub");
        assert!(
            check(vec![sub(999)], &t, 1100).is_ok(),
            "issued after the cut-off"
        );
        let kid = Target::Key { kid: "k1".into() };
        assert_eq!(check(vec![kid], &t, 1100).unwrap_err().kind, "kid");
        let client = Target::Client {
            client_id: "web".into(),
        };
        assert_eq!(check(vec![client], &t, 1100).unwrap_err().kind, "client");
        let api = Target::ApiKey {
            api_key_id: "ak1".into(),
        };
        assert!(check(vec![api.clone()], &t, 1100).is_ok());
        let mut keyed = t.clone();
        keyed.api_key_id = Some("ak1".into());
        assert_eq!(check(vec![api], &keyed, 1100).unwrap_err().kind, "api_key");
        // Expired entries no longer match.
        assert!(check(vec![jti(None)], &t, 5000).is_ok());
    }

    #[test]
    fn expiry_covers_every_token_the_entry_can_match() {
        let l = Lifetimes {
            max_lifetime: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            api_key_lifetime: Duration::from_secs(86_400),
        };
        let now = 10_000;
        let sub = Target::Subject {
            sub: "a".into(),
            issued_before: now,
        };
        // A token issued at the cut-off lives until iat + lifetime + leeway.
        assert_eq!(l.expiry(&sub, now, None), now + 3600 + 30);
        let jti = Target::Token {
            jti: "j".into(),
            issuer: None,
        };
        assert_eq!(l.expiry(&jti, now, None), now + 3660);
        assert_eq!(l.expiry(&jti, now, Some(now + 60)), now + 90);
        assert_eq!(
            l.expiry(&Target::Key { kid: "k".into() }, now, None),
            now + 3660
        );
    }

    #[test]
    fn lines_round_trip() {
        let r = entry(Target::Token {
            jti: "j".into(),
            issuer: Some("i".into()),
        });
        let line = r.to_line();
        assert_eq!(serde_json::from_str::<Revocation>(&line).unwrap(), r);
        assert!(!line.contains('\n'));
    }

    /// Holds `mutex` while panicking, as a bug elsewhere would, so that it is
    /// poisoned.
    pub(crate) fn poison<T: Send>(mutex: &std::sync::Mutex<T>) {
        std::thread::scope(|scope| {
            let _ = scope
                .spawn(|| {
                    let _guard = mutex.lock();
                    panic!("poisoning the lock for the test");
                })
                .join();
        });
        assert!(mutex.is_poisoned());
    }

    /// A poisoned entries lock used to make `revoke` acknowledge a revocation
    /// it had silently skipped: the revoked token still passed.
    #[tokio::test]
    async fn a_poisoned_lock_never_drops_an_acknowledged_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let config = RevocationConfig {
            data_dir: dir.path().to_owned(),
            ..RevocationConfig::default()
        };
        let lifetimes = Lifetimes {
            max_lifetime: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            api_key_lifetime: Duration::ZERO,
        };
        let store = RevocationStore::open(&config, lifetimes).await.unwrap();
        poison(&store.entries);
        let mut t = token();
        t.issued_at = unix_now();
        t.expires_at = unix_now() + 600;
        store
            .revoke(
                Target::Token {
                    jti: "j1".into(),
                    issuer: None,
                },
                Some(t.expires_at),
                String::new(),
            )
            .await
            .unwrap();
        assert!(
            store.check(&t, unix_now()).is_err(),
            "acknowledged but not enforced"
        );
        assert_eq!(store.list().len(), 1);
        store.shutdown().await;
    }

    fn lifetimes() -> Lifetimes {
        Lifetimes {
            max_lifetime: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            api_key_lifetime: Duration::ZERO,
        }
    }

    async fn store_with(
        dir: &tempfile::TempDir,
        edit: impl FnOnce(&mut RevocationConfig),
    ) -> Arc<RevocationStore> {
        let mut config = RevocationConfig {
            data_dir: dir.path().to_owned(),
            ..RevocationConfig::default()
        };
        edit(&mut config);
        RevocationStore::open(&config, lifetimes()).await.unwrap()
    }

    fn kid(k: &str) -> Target {
        Target::Key { kid: k.into() }
    }

    /// The count of revocations had no cap. Now a local revoke beyond
    /// `max_entries` is refused with nothing applied (not enforced, not
    /// listed, not journaled), and expired entries do not count.
    #[tokio::test]
    async fn a_revoke_beyond_max_entries_is_refused_with_nothing_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, |c| c.max_entries = 2).await;
        for k in ["k1", "k2"] {
            store.revoke(kid(k), None, String::new()).await.unwrap();
        }
        let err = store
            .revoke(kid("k3"), None, String::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, RevocationError::Full { max_entries: 2 }),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains("[revocation] max_entries"), "{message}");
        assert!(message.contains('2'), "{message}");
        assert_eq!(store.list().len(), 2);
        let mut t = token();
        t.key_id = "k3".into();
        assert!(
            store.check(&t, unix_now()).is_ok(),
            "refused, so not enforced"
        );
        assert_eq!(
            store
                .stats
                .refused_full
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        store.shutdown().await;
        drop(store);
        let reopened = store_with(&dir, |c| c.max_entries = 2).await;
        assert_eq!(
            reopened.list().len(),
            2,
            "nothing journaled for the refusal"
        );

        // An entry that expired since the last sweep does not count.
        {
            let mut entries = lock(&reopened.entries);
            let line = entries.by_line.keys().next().unwrap().clone();
            entries.by_line.get_mut(&line).unwrap().expires_at = unix_now() - 1;
        }
        reopened
            .revoke(kid("k3"), None, String::new())
            .await
            .unwrap();
        assert_eq!(reopened.list().len(), 2);
        reopened.shutdown().await;
    }

    /// Entries from other instances are never dropped for the cap: enforced
    /// and counted.
    #[tokio::test]
    async fn remote_entries_beyond_max_entries_are_enforced_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, |c| c.max_entries = 1).await;
        let now = unix_now();
        let lines: Vec<String> = ["r1", "r2", "r3"]
            .iter()
            .map(|k| {
                Revocation {
                    target: kid(k),
                    created_at: now,
                    expires_at: now + 600,
                    reason: String::new(),
                }
                .to_line()
            })
            .collect();
        assert_eq!(store.apply_published(lines).await, 3);
        assert_eq!(store.list().len(), 3);
        let mut t = token();
        t.key_id = "r3".into();
        assert!(store.check(&t, unix_now()).is_err());
        assert_eq!(
            store
                .stats
                .accepted_over_cap
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        // ...while a local revoke is refused.
        assert!(matches!(
            store.revoke(kid("l1"), None, String::new()).await,
            Err(RevocationError::Full { max_entries: 1 })
        ));
        store.shutdown().await;
    }

    /// The Redis queue grew without bound while Redis was down. Now a revoke
    /// that cannot be queued is refused, with nothing applied; the queued ones
    /// stay reported `synced: false` and pending.
    #[tokio::test]
    async fn with_redis_down_a_revoke_beyond_max_pending_writes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, |c| {
            c.redis_url = Some(crate::config::Secret::new("redis://127.0.0.1:1"));
            c.startup = crate::config::StartupMode::Local;
            c.max_pending_writes = 2;
        })
        .await;
        for k in ["k1", "k2"] {
            let done = store.revoke(kid(k), None, String::new()).await.unwrap();
            assert!(!done.synced);
        }
        assert_eq!(store.status().pending_writes, 2);
        let err = store
            .revoke(kid("k3"), None, String::new())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                RevocationError::QueueFull {
                    max_pending_writes: 2
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("[revocation] max_pending_writes"));
        assert_eq!(store.status().pending_writes, 2);
        assert_eq!(store.list().len(), 2, "the refused one is not applied");
        store.shutdown().await;
    }

    /// Entries from Redis were handed to the journal writer through an
    /// unbounded channel: a stuck journal let it grow without limit. Now the
    /// Redis side waits for room (the entries are enforced meanwhile), and
    /// every entry is journaled once the writer goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_from_redis_wait_for_a_stuck_journal_instead_of_queueing_without_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, |_| {}).await;
        // The journal is stuck (a slow disk): its lock is held elsewhere.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held, is_held) = std::sync::mpsc::channel::<()>();
        let journal = store.journal.clone();
        let holder = std::thread::spawn(move || {
            let _guard = lock(&journal);
            held.send(()).unwrap();
            let _ = released.recv();
        });
        is_held.recv().unwrap();
        let now = unix_now();
        let line = |i: usize| {
            Revocation {
                target: kid(&format!("remote-{i}")),
                created_at: now,
                expires_at: now + 600,
                reason: String::new(),
            }
            .to_line()
        };
        // The writer holds what it took (stuck on the lock), the channel its
        // bound: an apply must wait before the 2 × bound + 2nd.
        let total = 3 * REMOTE_JOURNAL_BATCHES;
        let mut waited = false;
        for i in 0..total {
            let apply = store.apply_remote(vec![line(i)]);
            tokio::pin!(apply);
            if futures_util::FutureExt::now_or_never(apply.as_mut()).is_none() {
                waited = true;
                // Enforced already, journaled later.
                let mut t = token();
                t.key_id = format!("remote-{i}");
                assert!(store.check(&t, unix_now()).is_err());
                release.send(()).unwrap();
                apply.await;
                for j in i + 1..total {
                    store.apply_remote(vec![line(j)]).await;
                }
                break;
            }
        }
        holder.join().unwrap();
        assert!(waited, "the channel to the journal is bounded");
        store.shutdown().await;
        drop(store);
        let reopened = store_with(&dir, |_| {}).await;
        assert_eq!(reopened.list().len(), total, "every entry journaled");
        reopened.shutdown().await;
    }

    /// A poisoned Redis queue used to drop the revocation it was handed.
    #[tokio::test]
    async fn a_poisoned_redis_queue_still_queues_the_revocation() {
        let sync = redis::SyncHandle::new("redis://127.0.0.1:1", "test").unwrap();
        let slot = sync.reserve(unix_now()).unwrap();
        sync.poison_pending_for_test();
        assert!(!sync.write(slot, "line".into(), unix_now() + 60).await);
        assert_eq!(sync.pending(), 1);
    }
}
