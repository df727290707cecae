//! [`RevocationStore`]: the revocation set of one instance, its writers
//! (admin calls, Redis, the sweeper) and its persistence through a
//! [`Backend`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::backend::Backend;
use super::index::{Entries, Index, Key};
use super::journal::JournalBackend;
use super::{
    Lifetimes, MAX_REASON_BYTES, Mode, REMOTE_JOURNAL_BATCHES, RedisState, Revocation,
    RevocationError, RevocationStats, Revoke, Revoked, StoreStatus, Target, lock, redis, unix_now,
};
use crate::authn::VerifiedToken;
use crate::config::RevocationConfig;

/// The revocation set of one instance: checked on every request, written by the
/// admin API and (in shared mode) by Redis.
#[derive(Debug)]
pub struct RevocationStore {
    snapshot: ArcSwap<Index>,
    entries: Mutex<Entries>,
    /// Where entries outlive the process: the journal, or memory.
    backend: Arc<dyn Backend>,
    /// Entries received from Redis, written to the backend in the background so that an
    /// fsync never delays the next message. Bounded ([`REMOTE_JOURNAL_BATCHES`]):
    /// when the journal falls behind, the Redis session waits for it (the
    /// entries are enforced meanwhile) instead of queueing without limit.
    remote_journal: mpsc::Sender<Vec<String>>,
    /// Raised (never lowered) by a reload that lets tokens live longer.
    lifetimes: Mutex<Lifetimes>,
    /// `[revocation] max_entries`.
    max_entries: usize,
    pub(super) sync: Option<redis::SyncHandle>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
    /// Counters for the metrics endpoint.
    pub stats: RevocationStats,
}

/// Can `target` be revoked at `now`: acceptable identifiers, and an entry
/// that would not be expired at once?
fn revocable(
    target: &Target,
    token_exp: Option<i64>,
    lifetimes: &Lifetimes,
    now: i64,
) -> Result<(), RevocationError> {
    target.validate()?;
    if lifetimes.expiry(target, now, token_exp) <= now {
        return Err(RevocationError::Invalid(
            "no token it matches can still be valid".into(),
        ));
    }
    Ok(())
}

impl RevocationStore {
    /// Opens the store on the journal in `config.data_dir`: what
    /// `portcullis serve` runs. See [`Self::open_with`].
    pub async fn open(
        config: &RevocationConfig,
        lifetimes: Lifetimes,
    ) -> Result<Arc<RevocationStore>, RevocationError> {
        let backend = Arc::new(JournalBackend::new(config.data_dir.clone()));
        Self::open_with(config, lifetimes, backend).await
    }

    /// Opens the store on `backend` (`config.data_dir` is not used): loads
    /// what the backend holds, then, in shared mode (`config.redis_url`),
    /// starts the Redis sync (waiting for the first full sync when
    /// `startup = "wait"`). Starts the sweeper that drops expired entries.
    pub async fn open_with(
        config: &RevocationConfig,
        lifetimes: Lifetimes,
        backend: Arc<dyn Backend>,
    ) -> Result<Arc<RevocationStore>, RevocationError> {
        let now = unix_now();
        let loading = backend.clone();
        let replay = tokio::task::spawn_blocking(move || loading.load(now))
            .await
            .map_err(|e| RevocationError::Task(e.to_string()))??;
        tracing::info!(
            backend = %backend.describe(),
            entries = replay.entries.len(),
            expired_dropped = replay.expired,
            unreadable_skipped = replay.unreadable,
            "revocations loaded"
        );
        if replay.unreadable > 0 {
            tracing::warn!(
                lines = replay.unreadable,
                "revocations: unreadable lines skipped (a torn last write is expected after a crash)"
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
        let mut entries = Entries::default();
        let mut index = Index::default();
        for (line, entry) in replay.entries {
            entries.add(&mut index, &line, entry);
        }
        let (stop, _) = watch::channel(false);
        let (remote_journal, remote_lines) = mpsc::channel(REMOTE_JOURNAL_BATCHES);
        let journal_writer = tokio::spawn(journal_loop(
            backend.clone(),
            remote_lines,
            stop.subscribe(),
        ));
        let store = Arc::new(RevocationStore {
            snapshot: ArcSwap::from_pointee(index),
            entries: Mutex::new(entries),
            backend,
            remote_journal,
            lifetimes: Mutex::new(lifetimes),
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
        let mut done = self.revoke_many(vec![(target, token_exp)], reason).await?;
        done.pop()
            .ok_or_else(|| RevocationError::Task("revoke: no entry applied".into()))
    }

    /// Revokes every target (each with its token's `exp` when known) as
    /// [`Self::revoke`] does one, all or nothing: the entries are put in force
    /// together (one snapshot published), journaled with one append and one
    /// fsync, and written to Redis in one transaction. Returns one [`Revoke`]
    /// per target, in order; `synced` is the same for all (the batch is
    /// confirmed by Redis, or queued, as a whole).
    ///
    /// Refused, with nothing applied, when one target is invalid, when the new
    /// entries would bring more than `[revocation] max_entries` in force
    /// ([`RevocationError::Full`]), or, in shared mode, when the Redis queue
    /// has no room for all of them ([`RevocationError::QueueFull`]).
    pub async fn revoke_many(
        self: &Arc<Self>,
        targets: Vec<(Target, Option<i64>)>,
        reason: String,
    ) -> Result<Vec<Revoke>, RevocationError> {
        let now = unix_now();
        let lifetimes = self.lifetimes();
        for (target, token_exp) in &targets {
            revocable(target, *token_exp, &lifetimes, now)?;
        }
        if reason.len() > MAX_REASON_BYTES {
            return Err(RevocationError::Invalid(format!(
                "reason is longer than {MAX_REASON_BYTES} bytes"
            )));
        }
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let revocations: Vec<Revocation> = targets
            .into_iter()
            .map(|(target, token_exp)| Revocation {
                expires_at: lifetimes.expiry(&target, now, token_exp),
                target,
                created_at: now,
                reason: reason.clone(),
            })
            .collect();
        let lines: Vec<String> = revocations.iter().map(Revocation::to_line).collect();
        // Places in the Redis queue first, then the cap: a refusal leaves
        // nothing applied, queued or journaled (unused places are given back).
        let slots = match &self.sync {
            Some(sync) => Some(
                revocations
                    .iter()
                    .map(|_| sync.reserve(now))
                    .collect::<Result<Vec<_>, _>>()
                    .inspect_err(|_| {
                        self.stats
                            .refused_queue_full
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    })?,
            ),
            None => None,
        };
        // Enforce first, then persist, then share.
        let fresh = self.insert_local(lines.iter().map(String::as_str).zip(&revocations), now)?;
        self.stats
            .applied_local
            .fetch_add(fresh as u64, std::sync::atomic::Ordering::Relaxed);
        // The journal (local durability) and Redis (every instance) in parallel:
        // propagation does not wait on the local fsync.
        let journal = self.append_journal(lines.clone());
        // The whole batch is queued at once and written to Redis in one
        // MULTI/EXEC transaction (with whatever else is queued), not one
        // round trip per entry.
        let share = async {
            match (&self.sync, slots) {
                (Some(sync), Some(slots)) => {
                    sync.write_many(
                        slots,
                        lines
                            .into_iter()
                            .zip(&revocations)
                            .map(|(line, revocation)| (line, revocation.expires_at))
                            .collect(),
                    )
                    .await
                }
                _ => false,
            }
        };
        let (journaled, synced) = tokio::join!(journal, share);
        journaled?;
        Ok(revocations
            .into_iter()
            .map(|revocation| Revoke { revocation, synced })
            .collect())
    }

    /// Checks that `target` (with its token's `exp` when known) could be
    /// revoked now, as [`Self::revoke_many`] checks each target before applying
    /// any: its identifiers are acceptable and some token it matches can still
    /// be valid. The error names the field, never its value.
    pub fn check_target(
        &self,
        target: &Target,
        token_exp: Option<i64>,
    ) -> Result<(), RevocationError> {
        revocable(target, token_exp, &self.lifetimes(), unix_now())
    }

    /// Raises the lifetimes entries' expiries are computed from to `to`
    /// (field by field; never lowered, since tokens accepted under the old
    /// rules may still be valid), as a reload that lets tokens live longer
    /// must. The entries in force are made again with their expiry moved by
    /// as much as their horizon grew, in force at once, journaled and written
    /// to Redis like any revocation, so that none is dropped while a token the
    /// new rules accept could still match it. Returns how many were extended.
    ///
    /// Refused with nothing changed, in shared mode, when the Redis queue has
    /// no room for them ([`RevocationError::QueueFull`]). A journal failure is
    /// returned as an error with the longer entries in force.
    pub async fn raise_lifetimes(
        self: &Arc<Self>,
        to: Lifetimes,
    ) -> Result<usize, RevocationError> {
        let before = self.lifetimes();
        let after = before.raised_to(&to);
        if after == before {
            return Ok(0);
        }
        let now = unix_now();
        let (lines, slots) = self.extend_in_force(before, after, now)?;
        tracing::info!(
            extended = lines.len(),
            max_token_lifetime_secs = after.max_lifetime.as_secs(),
            leeway_secs = after.leeway.as_secs(),
            "token lifetimes raised: revocations in force extended to match"
        );
        let extended = lines.len();
        let journal = self.append_journal(lines.iter().map(|(line, _)| line.clone()).collect());
        let share = async {
            if let (Some(sync), Some(slots)) = (&self.sync, slots) {
                sync.write_many(slots, lines).await;
            }
        };
        let (journaled, ()) = tokio::join!(journal, share);
        journaled?;
        Ok(extended)
    }

    /// The synchronous part of [`Self::raise_lifetimes`]: replaces the entries
    /// in force whose horizon grows from `before` to `after` by longer ones,
    /// publishes the index and records `after`. Returns the new lines with
    /// their expiries, and their places in the Redis queue in shared mode.
    #[allow(clippy::type_complexity)]
    fn extend_in_force(
        &self,
        before: Lifetimes,
        after: Lifetimes,
        now: i64,
    ) -> Result<(Vec<(String, i64)>, Option<Vec<redis::Slot<'_>>>), RevocationError> {
        let mut entries = lock(&self.entries);
        let longer: Vec<(Key, Revocation)> = entries
            .by_line
            .iter()
            .filter(|(_, entry)| entry.expires_at > now)
            .filter_map(|(line, entry)| {
                let grows = after.horizon(&entry.target) - before.horizon(&entry.target);
                (grows > 0).then(|| {
                    let mut longer = entry.clone();
                    longer.expires_at = entry.expires_at.saturating_add(grows);
                    (line.clone(), longer)
                })
            })
            .collect();
        let slots = match &self.sync {
            Some(sync) => Some(
                longer
                    .iter()
                    .map(|_| sync.reserve(now))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        // Replaced in place: the number in force does not change, so the cap
        // does not apply.
        let mut index = self.current_index();
        let replaced: HashSet<Key> = longer.iter().map(|(line, _)| line.clone()).collect();
        entries.by_expiry.retain(|_, line| !replaced.contains(line));
        let mut lines = Vec::with_capacity(longer.len());
        for (old_line, entry) in longer {
            if let Some(old) = entries.by_line.remove(&old_line) {
                index.remove(&old);
            }
            let line = entry.to_line();
            let expires_at = entry.expires_at;
            entries.add(&mut index, &line, entry);
            lines.push((line, expires_at));
        }
        index.next_expiry = entries.next_expiry();
        self.publish(index);
        *lock(&self.lifetimes) = after;
        Ok((lines, slots))
    }

    /// The published index, to be changed and published again by a writer
    /// holding the entries lock. O(1): the copy shares every node.
    fn current_index(&self) -> Index {
        Index::clone(&self.snapshot.load())
    }

    /// Publishes `index`; the caller holds the entries lock it was made under.
    fn publish(&self, index: Index) {
        self.snapshot.store(Arc::new(index));
    }

    /// Adds local entries, all or none: refused when the new ones would bring
    /// more than `[revocation] max_entries` in force (after dropping the
    /// expired ones). Returns how many were new.
    fn insert_local<'a>(
        &self,
        batch: impl Iterator<Item = (&'a str, &'a Revocation)> + Clone,
        now: i64,
    ) -> Result<usize, RevocationError> {
        let mut entries = lock(&self.entries);
        let mut new_lines = std::collections::HashSet::new();
        for (line, _) in batch.clone() {
            if !entries.contains(line) {
                new_lines.insert(line);
            }
        }
        if new_lines.is_empty() {
            return Ok(0);
        }
        let mut index = self.current_index();
        if entries.len() + new_lines.len() > self.max_entries {
            // Expired entries do not count: sweep them now, not at the next tick.
            let swept = entries.sweep(&mut index, now);
            if entries.len() + new_lines.len() > self.max_entries {
                if swept > 0 {
                    self.publish(index);
                }
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
        let mut fresh = 0;
        for (line, entry) in batch {
            fresh += usize::from(entries.add(&mut index, line, entry.clone()));
        }
        self.publish(index);
        Ok(fresh)
    }

    /// Adds entries not known yet (from Redis); returns the lines that were
    /// new. Never refuses: past `[revocation] max_entries` they are still
    /// enforced (dropping a revocation another instance enforces is worse
    /// than the memory), counted and reported. One snapshot is published for
    /// the whole batch.
    fn insert(&self, batch: Vec<(String, Revocation)>) -> Vec<String> {
        let mut entries = lock(&self.entries);
        let mut fresh = Vec::new();
        let mut over_cap = 0u64;
        let mut index = self.current_index();
        for (line, entry) in batch {
            let full = entries.len() >= self.max_entries;
            if entries.add(&mut index, &line, entry) {
                over_cap += u64::from(full);
                fresh.push(line);
            }
        }
        if !fresh.is_empty() {
            self.publish(index);
        }
        let in_force = entries.len();
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

    /// Puts `entries` in force in memory only, as entries from Redis are
    /// (never refused for the cap), without journaling or sharing them; returns
    /// how many were new. For benchmarks that fill the store: not an API.
    #[doc(hidden)]
    pub fn insert_in_memory(&self, entries: Vec<Revocation>) -> usize {
        let batch = entries
            .into_iter()
            .map(|entry| (entry.to_line(), entry))
            .collect();
        self.insert(batch).len()
    }

    /// The in-memory part of [`Self::revoke`] for one entry (the cap, the
    /// index update and its publication), without the journal or Redis; true if
    /// it was new. For benchmarks: not an API.
    #[doc(hidden)]
    pub fn insert_local_in_memory(&self, entry: Revocation) -> Result<bool, RevocationError> {
        let line = entry.to_line();
        let now = unix_now();
        self.insert_local(std::iter::once((line.as_str(), &entry)), now)
            .map(|fresh| fresh > 0)
    }

    /// Applies entries received from Redis (lines as stored there): unknown,
    /// unexpired ones are enforced at once, and handed to the background
    /// journal writer (waiting for room when it is behind).
    pub(super) async fn apply_remote(&self, lines: Vec<String>) -> usize {
        self.apply_remote_lines(lines, false).await
    }

    /// [`Self::apply_remote`] for entries just published by another instance:
    /// their propagation lag is measured.
    pub(super) async fn apply_published(&self, lines: Vec<String>) -> usize {
        self.apply_remote_lines(lines, true).await
    }

    async fn apply_remote_lines(&self, lines: Vec<String>, published: bool) -> usize {
        let now = unix_now();
        let mut batch = Vec::with_capacity(lines.len());
        let mut unreadable = 0usize;
        for line in lines {
            // The log's marker entries carry an empty line.
            if line.is_empty() {
                continue;
            }
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
        if let Some(sync) = &self.sync {
            sync.remember(&fresh);
        }
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

    /// Stores `lines` in the backend (on a blocking thread); returns once
    /// they are durable.
    async fn append_journal(&self, lines: Vec<String>) -> Result<(), RevocationError> {
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || backend.append(&lines))
            .await
            .map_err(|e| RevocationError::Task(e.to_string()))?
    }

    /// Every entry's line and expiry (for the Redis resync).
    pub(super) fn lines(&self) -> Vec<(String, i64)> {
        lock(&self.entries)
            .by_line
            .iter()
            .map(|(line, entry)| (line.to_string(), entry.expires_at))
            .collect()
    }

    /// Drops entries expired at `now`; returns how many. Visits only those
    /// (in expiry order), each removed from a copy of the index that is then
    /// published: nothing is rebuilt.
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
        let mut index = self.current_index();
        let removed = entries.sweep(&mut index, now);
        if removed > 0 {
            self.publish(index);
        }
        removed
    }

    /// Changes the expiry of the entry stored as `line` (in the entries, the
    /// expiry order and the index), as if it had been made so.
    #[cfg(test)]
    fn set_expiry_for_test(&self, line: &str, expires_at: i64) {
        let mut entries = lock(&self.entries);
        let mut index = self.current_index();
        let mut entry = entries.by_line.remove(line).expect("a stored line");
        entries
            .by_expiry
            .retain(|(exp, _), l| *exp != entry.expires_at || &**l != line);
        index.remove(&entry);
        entry.expires_at = expires_at;
        entries.add(&mut index, line, entry);
        index.next_expiry = entries.next_expiry();
        self.publish(index);
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

    pub(super) fn status_count(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Shared mode: the last entry of the Redis log (`<prefix>:revocations:log`)
    /// this instance has read, as a stream ID; `None` in embedded mode or
    /// before the first sync.
    pub fn log_position(&self) -> Option<String> {
        self.sync.as_ref().and_then(|s| s.log_position())
    }

    /// Embedded or shared through Redis.
    pub fn mode(&self) -> Mode {
        if self.sync.is_some() {
            Mode::Redis
        } else {
            Mode::Embedded
        }
    }

    /// Counts and the Redis link, for the admin API.
    pub fn status(&self) -> StoreStatus {
        let revocations = lock(&self.entries).in_force(unix_now());
        StoreStatus {
            revocations,
            mode: self.mode(),
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
        *lock(&self.lifetimes)
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
    backend: Arc<dyn Backend>,
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
            let backend = backend.clone();
            let written = tokio::task::spawn_blocking(move || backend.append(&batch)).await;
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

/// Drops expired entries once a second (cheap when nothing expired), and lets
/// the backend compact its storage when enough has accumulated
/// ([`super::backend::Backend::compact`]). The Redis sync drops them from
/// Redis on its own tick.
async fn sweep_loop(store: std::sync::Weak<RevocationStore>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(store) = store.upgrade() else { return };
        let now = unix_now();
        let removed = store.sweep(now);
        if removed > 0 {
            tracing::debug!(removed, "expired revocations dropped");
        }
        let backend = store.backend.clone();
        let in_force = store.status_count();
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || backend.compact(now, in_force)).await {
            Ok(Ok(Some(done))) => {
                store
                    .stats
                    .journal_compactions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    kept = done.kept,
                    dropped = done.dropped,
                    took = ?started.elapsed(),
                    storage = %store.backend.describe(),
                    "revocation storage compacted"
                );
            }
            Ok(Ok(None)) => {}
            // Not compacted: the storage is as it was, nothing is lost.
            Ok(Err(error)) => {
                tracing::warn!(%error, "revocation storage compaction failed; retrying later")
            }
            Err(error) => {
                tracing::warn!(%error, "revocation storage compaction failed; retrying later")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

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
        let line = lock(&reopened.entries)
            .by_line
            .keys()
            .next()
            .unwrap()
            .clone();
        reopened.set_expiry_for_test(&line, unix_now() - 1);
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
        let gated = Arc::new(Gated {
            journal: JournalBackend::new(dir.path()),
            gate: Mutex::new(()),
        });
        let config = RevocationConfig::default();
        let store = RevocationStore::open_with(&config, lifetimes(), gated.clone())
            .await
            .unwrap();
        // The journal is stuck (a slow disk): its gate is held elsewhere.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held, is_held) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _guard = lock(&gated.gate);
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

    /// The journal behind a gate a test can hold, as a stuck disk would.
    #[derive(Debug)]
    struct Gated {
        journal: JournalBackend,
        gate: Mutex<()>,
    }

    impl Backend for Gated {
        fn load(&self, now: i64) -> Result<super::super::backend::Loaded, RevocationError> {
            self.journal.load(now)
        }

        fn append(&self, lines: &[String]) -> Result<(), RevocationError> {
            let _open = lock(&self.gate);
            self.journal.append(lines)
        }

        fn describe(&self) -> String {
            "gated journal".into()
        }
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

    /// A batch is queued whole when Redis does not confirm it; places not
    /// needed are given back.
    #[tokio::test]
    async fn a_batch_for_redis_is_queued_whole() {
        let sync = redis::SyncHandle::new("redis://127.0.0.1:1", "test")
            .unwrap()
            .with_max_pending(5);
        let now = unix_now();
        let slots: Vec<_> = (0..4).map(|_| sync.reserve(now).unwrap()).collect();
        let entries = (0..3).map(|i| (format!("line-{i}"), now + 60)).collect();
        assert!(!sync.write_many(slots, entries).await);
        assert_eq!(sync.pending(), 3);
        // 3 queued, the unused place given back: room for 2 more, not 3.
        let two: Vec<_> = (0..2).map(|_| sync.reserve(now).unwrap()).collect();
        assert!(matches!(
            sync.reserve(now),
            Err(RevocationError::QueueFull { .. })
        ));
        drop(two);
    }

    /// `revoke_many` applies every target with one journal append, or none
    /// when the cap would be passed.
    #[tokio::test]
    async fn revoke_many_applies_all_targets_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, |c| c.max_entries = 3).await;
        assert!(
            store
                .revoke_many(Vec::new(), String::new())
                .await
                .unwrap()
                .is_empty()
        );
        let done = store
            .revoke_many(
                vec![(kid("k1"), None), (kid("k2"), None)],
                "compromised".into(),
            )
            .await
            .unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].revocation.target, kid("k2"));
        assert!(
            done.iter()
                .all(|d| !d.synced && d.revocation.reason == "compromised")
        );
        let mut t = token();
        for k in ["k1", "k2"] {
            t.key_id = k.into();
            assert_eq!(store.check(&t, unix_now()).unwrap_err().kind, "kid");
        }
        // Two more would make four in force: neither is applied.
        let err = store
            .revoke_many(vec![(kid("k3"), None), (kid("k4"), None)], String::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, RevocationError::Full { max_entries: 3 }),
            "{err}"
        );
        t.key_id = "k3".into();
        assert!(store.check(&t, unix_now()).is_ok());
        // An invalid target refuses the whole batch.
        assert!(matches!(
            store
                .revoke_many(vec![(kid("k3"), None), (kid(""), None)], String::new())
                .await,
            Err(RevocationError::Invalid(_))
        ));
        assert_eq!(store.list().len(), 2);
        assert_eq!(
            store
                .stats
                .applied_local
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        store.shutdown().await;
        drop(store);
        let reopened = store_with(&dir, |c| c.max_entries = 3).await;
        assert_eq!(reopened.list().len(), 2, "both journaled");
        reopened.shutdown().await;
    }

    /// Through the store: the sweep drops only expired entries, the status
    /// counts only entries in force, and the snapshot follows.
    #[tokio::test]
    async fn the_store_sweeps_only_expired_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, |_| {}).await;
        let now = unix_now();
        let entries: Vec<Revocation> = (0..10)
            .map(|i| Revocation {
                target: kid(&format!("k{i}")),
                created_at: now,
                expires_at: now + 100 + i,
                reason: String::new(),
            })
            .collect();
        assert_eq!(store.insert_in_memory(entries.clone()), 10);
        assert_eq!(store.insert_in_memory(entries), 0, "known lines");
        assert_eq!(store.sweep(now + 99), 0);
        assert_eq!(store.sweep(now + 104), 5);
        assert_eq!(store.snapshot.load().next_expiry, Some(now + 105));
        assert_eq!(store.status_count(), 5);
        let mut t = token();
        t.key_id = "k4".into();
        assert!(store.check(&t, now + 50).is_ok(), "swept");
        t.key_id = "k5".into();
        assert!(store.check(&t, now + 50).is_err());
        assert_eq!(store.sweep(i64::MAX), 5);
        assert_eq!(store.snapshot.load().next_expiry, None);
        store.shutdown().await;
    }
}
