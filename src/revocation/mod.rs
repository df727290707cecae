//! Revocation: the set of revoked credentials, checked on every request.
//!
//! - [`Target`] says what an entry matches: one token (`jti`, optionally scoped by
//!   issuer), a subject's tokens issued up to a cut-off, a key (`kid`), a client
//!   (`client_id`) or an API key id;
//! - every [`Revocation`] carries the time after which no token it matches can
//!   still be valid, and is dropped then, so the set does not grow forever;
//! - [`RevocationStore`] holds the set. Requests read an immutable snapshot
//!   (`arc-swap`), so the check never takes a lock or waits on I/O; writers copy
//!   the snapshot (persistent `imbl` maps: O(1), sharing every node), apply
//!   their change (O(log n) per entry, never a rebuild) and publish the copy
//!   atomically. Expired entries are found through an expiry order, so a sweep
//!   visits only them;
//! - [`journal`] persists every entry to an append-only file (fsync per write),
//!   replayed and compacted on start: the embedded mode, and the local copy in
//!   shared mode;
//! - [`redis`] shares entries between instances through Redis (shared mode).

pub mod journal;
pub mod redis;

use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// Every token signed by a key; with a cut-off, only those with
    /// `iat <= issued_before` ("distrust what it signed before the breach").
    Key {
        /// The key id (`kid`).
        kid: String,
        /// The cut-off, seconds since the epoch (inclusive); `None`: every
        /// token, whenever issued.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issued_before: Option<i64>,
    },
    /// Every token of a client; with a cut-off, only those with
    /// `iat <= issued_before`.
    Client {
        /// The `client_id` (or `azp`) claim.
        client_id: String,
        /// The cut-off, seconds since the epoch (inclusive); `None`: every
        /// token, whenever issued.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issued_before: Option<i64>,
    },
    /// Every token of an issuer with `iat <= issued_before` ("log everyone
    /// out"): one entry instead of one per token or user.
    Issuer {
        /// The `iss` claim (`api-key` for API keys, whose `iat` is their
        /// creation time).
        issuer: String,
        /// The cut-off, seconds since the epoch (inclusive).
        issued_before: i64,
    },
    /// Every request authenticated by an API key.
    ApiKey {
        /// The API key id.
        api_key_id: String,
    },
}

impl Target {
    /// The kind as a stable word: `jti`, `sub`, `kid`, `client`, `iss`,
    /// `api_key`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Token { .. } => "jti",
            Target::Subject { .. } => "sub",
            Target::Key { .. } => "kid",
            Target::Client { .. } => "client",
            Target::Issuer { .. } => "iss",
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
            Target::Key { kid, .. } => vec![("kid", kid.as_str())],
            Target::Client { client_id, .. } => vec![("client_id", client_id.as_str())],
            Target::Issuer { issuer, .. } => vec![("issuer", issuer.as_str())],
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

    /// The cut-off of a target that matches tokens issued up to a time.
    pub fn issued_before(&self) -> Option<i64> {
        match self {
            Target::Subject { issued_before, .. } | Target::Issuer { issued_before, .. } => {
                Some(*issued_before)
            }
            Target::Key { issued_before, .. } | Target::Client { issued_before, .. } => {
                *issued_before
            }
            Target::Token { .. } | Target::ApiKey { .. } => None,
        }
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

    /// How far past its reference time (the subject's cut-off, or the time
    /// it was made) an entry for `target` is kept when the token's `exp` is
    /// not known.
    fn horizon(&self, target: &Target) -> i64 {
        let leeway = self.leeway.as_secs() as i64;
        match target {
            _ if target.issued_before().is_some() => self.max_ttl() - leeway,
            Target::ApiKey { .. } => {
                let api_key = (self.api_key_lifetime + self.leeway).as_secs() as i64;
                api_key.max(self.max_ttl())
            }
            _ => self.max_ttl(),
        }
    }

    /// Each field the larger of the two.
    fn raised_to(&self, other: &Lifetimes) -> Lifetimes {
        Lifetimes {
            max_lifetime: self.max_lifetime.max(other.max_lifetime),
            leeway: self.leeway.max(other.leeway),
            api_key_lifetime: self.api_key_lifetime.max(other.api_key_lifetime),
        }
    }

    /// When an entry for `target`, made at `now`, may be dropped. `token_exp` is
    /// the token's `exp` when known (a `jti` revocation).
    pub fn expiry(&self, target: &Target, now: i64, token_exp: Option<i64>) -> i64 {
        let leeway = self.leeway.as_secs() as i64;
        if let Some(issued_before) = target.issued_before() {
            // A token issued at the cut-off lives until iat + lifetime + leeway.
            return issued_before.saturating_add(self.horizon(target));
        }
        match target {
            Target::Token { .. } => match token_exp {
                Some(exp) => exp.saturating_add(leeway).min(now + self.max_ttl()),
                None => now + self.max_ttl(),
            },
            _ => now.saturating_add(self.horizon(target)),
        }
    }
}

/// A revoked credential, with the kind of entry that matched (never the
/// credential itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("credential revoked (by {kind})")]
pub struct Revoked {
    /// `jti`, `sub`, `iss`, `kid`, `client` or `api_key`.
    pub kind: &'static str,
}

/// A key of the index: shared, so that copying an index node (persistent maps
/// copy the nodes on the path they change) costs a reference count, not an
/// allocation.
type Key = Arc<str>;

/// The values of one key: a multiset, since two entries may match the same
/// key. Almost every key has one value, kept inline so that copying an index
/// node touches no other memory for it; more are shared between snapshots
/// until a writer changes that key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Values<T> {
    One(T),
    Many(Arc<Vec<T>>),
}

impl<T: Clone> Values<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Values::One(value) => std::slice::from_ref(value),
            Values::Many(values) => values,
        }
    }

    /// Inserts `value` at `at` (0..=len).
    fn insert(&mut self, at: usize, value: T) {
        let mut values = match self {
            Values::One(one) => vec![one.clone()],
            Values::Many(many) => std::mem::take(Arc::make_mut(many)),
        };
        values.insert(at, value);
        *self = Values::Many(Arc::new(values));
    }

    /// Removes the value at `at` of two or more.
    fn remove(&mut self, at: usize) {
        if let Values::Many(many) = self {
            let values = Arc::make_mut(many);
            values.remove(at);
            if let [one] = values.as_slice() {
                *self = Values::One(one.clone());
            }
        }
    }
}

/// A persistent map: cloning it is O(1) and an insert or removal copies only
/// the O(log n) nodes on its path, sharing the rest with the older snapshots.
type Map<T> = imbl::HashMap<Key, Values<T>>;

/// The immutable lookup structure the request path reads.
///
/// Writers never rebuild it: they clone the published index (O(1)), apply their
/// changes to the clone ([`Index::add`], [`Index::remove`], O(log n) each) and
/// publish the clone.
#[derive(Debug, Default, Clone)]
struct Index {
    /// jti → (issuer or any, expiry).
    jti: Map<(Option<Key>, i64)>,
    /// sub → (cut-off, expiry).
    sub: Map<(i64, i64)>,
    /// kid → (cut-off or every token, expiry).
    kid: Map<(Option<i64>, i64)>,
    /// client id → (cut-off or every token, expiry).
    client: Map<(Option<i64>, i64)>,
    /// iss → (cut-off, expiry).
    iss: Map<(i64, i64)>,
    /// API key id → expiries, ascending.
    api_key: Map<i64>,
    /// Earliest expiry, for the sweeper. [`Index::add`] keeps it; after a
    /// removal the writer sets it from its expiry order.
    next_expiry: Option<i64>,
}

/// Adds `value` to the values of `key`.
fn push_value<T: Clone>(map: &mut Map<T>, key: &str, value: T) {
    match map.get_mut(key) {
        Some(values) => values.insert(values.as_slice().len(), value),
        None => {
            map.insert(Key::from(key), Values::One(value));
        }
    }
}

/// Adds `exp` to the ascending expiries of `key`.
fn push_expiry(map: &mut Map<i64>, key: &str, exp: i64) {
    match map.get_mut(key) {
        Some(values) => values.insert(values.as_slice().partition_point(|e| *e <= exp), exp),
        None => {
            map.insert(Key::from(key), Values::One(exp));
        }
    }
}

/// Removes one occurrence of a value of `key` matching `is`, and the key with
/// its last value. The order of the others is kept (the expiries stay sorted).
fn remove_value<T: Clone>(map: &mut Map<T>, key: &str, is: impl Fn(&T) -> bool) {
    let Some(values) = map.get(key) else { return };
    let values = values.as_slice();
    let Some(at) = values.iter().position(is) else {
        return;
    };
    if values.len() == 1 {
        map.remove(key);
    } else if let Some(values) = map.get_mut(key) {
        values.remove(at);
    }
}

impl Index {
    /// An index of `entries`, built by adding them one by one.
    #[cfg(test)]
    fn build<'a>(entries: impl Iterator<Item = &'a Revocation>) -> Index {
        let mut index = Index::default();
        for entry in entries {
            index.add(entry);
        }
        index
    }

    /// Adds `entry`: O(log n).
    fn add(&mut self, entry: &Revocation) {
        let exp = entry.expires_at;
        self.next_expiry = Some(self.next_expiry.map_or(exp, |n| n.min(exp)));
        match &entry.target {
            Target::Token { jti, issuer } => {
                push_value(&mut self.jti, jti, (issuer.as_deref().map(Key::from), exp))
            }
            Target::Subject { sub, issued_before } => {
                push_value(&mut self.sub, sub, (*issued_before, exp))
            }
            Target::Key { kid, issued_before } => {
                push_value(&mut self.kid, kid, (*issued_before, exp))
            }
            Target::Client {
                client_id,
                issued_before,
            } => push_value(&mut self.client, client_id, (*issued_before, exp)),
            Target::Issuer {
                issuer,
                issued_before,
            } => push_value(&mut self.iss, issuer, (*issued_before, exp)),
            Target::ApiKey { api_key_id } => push_expiry(&mut self.api_key, api_key_id, exp),
        }
    }

    /// Removes one occurrence of what [`Index::add`] added for `entry`:
    /// O(log n). Leaves `next_expiry` to the caller.
    fn remove(&mut self, entry: &Revocation) {
        let exp = entry.expires_at;
        match &entry.target {
            Target::Token { jti, issuer } => remove_value(&mut self.jti, jti, |(i, e)| {
                *e == exp && i.as_deref() == issuer.as_deref()
            }),
            Target::Subject { sub, issued_before } => {
                remove_value(&mut self.sub, sub, |(cutoff, e)| {
                    *e == exp && cutoff == issued_before
                })
            }
            Target::Key { kid, issued_before } => {
                remove_value(&mut self.kid, kid, |(cutoff, e)| {
                    *e == exp && cutoff == issued_before
                })
            }
            Target::Client {
                client_id,
                issued_before,
            } => remove_value(&mut self.client, client_id, |(cutoff, e)| {
                *e == exp && cutoff == issued_before
            }),
            Target::Issuer {
                issuer,
                issued_before,
            } => remove_value(&mut self.iss, issuer, |(cutoff, e)| {
                *e == exp && cutoff == issued_before
            }),
            Target::ApiKey { api_key_id } => {
                remove_value(&mut self.api_key, api_key_id, |e| *e == exp)
            }
        }
    }

    fn check(&self, token: &VerifiedToken, now: i64) -> Result<(), Revoked> {
        let live = |exp: &i64| *exp > now;
        let latest_live = |expiries: &Values<i64>| expiries.as_slice().last().is_some_and(live);
        if let Some(jti) = &token.jti
            && let Some(rules) = self.jti.get(jti.as_str())
            && rules.as_slice().iter().any(|(issuer, exp)| {
                live(exp) && issuer.as_deref().is_none_or(|iss| iss == token.issuer)
            })
        {
            return Err(Revoked { kind: "jti" });
        }
        if let Some(rules) = self.sub.get(token.subject.as_str())
            && rules
                .as_slice()
                .iter()
                .any(|(cutoff, exp)| live(exp) && token.issued_at <= *cutoff)
        {
            return Err(Revoked { kind: "sub" });
        }
        // A cut-off matches tokens issued at or before it; none, every token.
        let covers = |rules: &Values<(Option<i64>, i64)>| {
            rules.as_slice().iter().any(|(cutoff, exp)| {
                live(exp) && cutoff.is_none_or(|cutoff| token.issued_at <= cutoff)
            })
        };
        if let Some(rules) = self.iss.get(token.issuer.as_str())
            && rules
                .as_slice()
                .iter()
                .any(|(cutoff, exp)| live(exp) && token.issued_at <= *cutoff)
        {
            return Err(Revoked { kind: "iss" });
        }
        if !token.key_id.is_empty() && self.kid.get(token.key_id.as_str()).is_some_and(covers) {
            return Err(Revoked { kind: "kid" });
        }
        if let Some(client) = &token.client_id
            && self.client.get(client.as_str()).is_some_and(covers)
        {
            return Err(Revoked { kind: "client" });
        }
        if let Some(id) = &token.api_key_id
            && self.api_key.get(id.as_str()).is_some_and(latest_live)
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

/// The mutable side: every entry by its line, and the lines in expiry order,
/// behind a lock writers take.
#[derive(Debug, Default)]
struct Entries {
    by_line: HashMap<Key, Revocation>,
    /// Every entry's line by (expiry, order of arrival): the sweep takes the
    /// expired ones from the front, without visiting the others. Keys of two
    /// integers, so that ordering them never reads a line.
    by_expiry: BTreeMap<(i64, u64), Key>,
    /// The order of arrival of the next entry.
    next_seq: u64,
}

impl Entries {
    fn len(&self) -> usize {
        self.by_line.len()
    }

    fn contains(&self, line: &str) -> bool {
        self.by_line.contains_key(line)
    }

    /// Adds `entry` here and to `index` unless its line is known; true if it
    /// was new. O(log n).
    fn add(&mut self, index: &mut Index, line: &str, entry: Revocation) -> bool {
        if self.by_line.contains_key(line) {
            return false;
        }
        let line = Key::from(line);
        index.add(&entry);
        self.by_expiry
            .insert((entry.expires_at, self.next_seq), line.clone());
        self.next_seq += 1;
        self.by_line.insert(line, entry);
        true
    }

    /// Removes the entries expired at `now` here and from `index`; returns how
    /// many. O(log n) per entry removed; nothing else is visited.
    fn sweep(&mut self, index: &mut Index, now: i64) -> usize {
        let mut removed = 0;
        while let Some(((exp, _), _)) = self.by_expiry.first_key_value()
            && *exp <= now
        {
            let Some((_, line)) = self.by_expiry.pop_first() else {
                break;
            };
            if let Some(entry) = self.by_line.remove(&line) {
                index.remove(&entry);
                removed += 1;
            }
        }
        index.next_expiry = self.next_expiry();
        removed
    }

    /// Entries in force at `now`: all but those expired and not swept yet
    /// (visits only these).
    fn in_force(&self, now: i64) -> usize {
        let expired = self.by_expiry.range(..(now.saturating_add(1), 0)).count();
        self.len() - expired
    }

    fn next_expiry(&self) -> Option<i64> {
        self.by_expiry.first_key_value().map(|((exp, _), _)| *exp)
    }
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
    /// Raised (never lowered) by a reload that lets tokens live longer.
    lifetimes: Mutex<Lifetimes>,
    /// `[revocation] max_entries`.
    max_entries: usize,
    sync: Option<redis::SyncHandle>,
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
        let mut entries = Entries::default();
        let mut index = Index::default();
        for (line, entry) in replay.entries {
            entries.add(&mut index, &line, entry);
        }
        let (stop, _) = watch::channel(false);
        let journal = Arc::new(Mutex::new(journal));
        let (remote_journal, remote_lines) = mpsc::channel(REMOTE_JOURNAL_BATCHES);
        let journal_writer = tokio::spawn(journal_loop(
            journal.clone(),
            remote_lines,
            stop.subscribe(),
        ));
        let store = Arc::new(RevocationStore {
            snapshot: ArcSwap::from_pointee(index),
            entries: Mutex::new(entries),
            journal,
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

    fn status_count(&self) -> usize {
        lock(&self.entries).len()
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
        let kid = Target::Key {
            kid: "k1".into(),
            issued_before: None,
        };
        assert_eq!(check(vec![kid], &t, 1100).unwrap_err().kind, "kid");
        let client = Target::Client {
            client_id: "web".into(),
            issued_before: None,
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
            l.expiry(
                &Target::Key {
                    kid: "k".into(),
                    issued_before: None,
                },
                now,
                None
            ),
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
        Target::Key {
            kid: k.into(),
            issued_before: None,
        }
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

    /// The test oracle: every entry looked at in turn, in the order of the
    /// kinds the index checks.
    fn naive_check<'a>(
        entries: impl Iterator<Item = &'a Revocation> + Clone,
        token: &VerifiedToken,
        now: i64,
    ) -> Result<(), Revoked> {
        let hit = |kind: &str| {
            entries.clone().any(|e| {
                e.expires_at > now
                    && e.target.kind() == kind
                    && match &e.target {
                        Target::Token { jti, issuer } => {
                            token.jti.as_deref() == Some(jti.as_str())
                                && issuer.as_deref().is_none_or(|i| i == token.issuer)
                        }
                        Target::Subject { sub, issued_before } => {
                            *sub == token.subject && token.issued_at <= *issued_before
                        }
                        Target::Key { kid, issued_before } => {
                            !token.key_id.is_empty()
                                && *kid == token.key_id
                                && issued_before.is_none_or(|c| token.issued_at <= c)
                        }
                        Target::Client {
                            client_id,
                            issued_before,
                        } => {
                            token.client_id.as_deref() == Some(client_id.as_str())
                                && issued_before.is_none_or(|c| token.issued_at <= c)
                        }
                        Target::Issuer {
                            issuer,
                            issued_before,
                        } => *issuer == token.issuer && token.issued_at <= *issued_before,
                        Target::ApiKey { api_key_id } => {
                            token.api_key_id.as_deref() == Some(api_key_id.as_str())
                        }
                    }
            })
        };
        for kind in ["jti", "sub", "iss", "kid", "client", "api_key"] {
            if hit(kind) {
                return Err(Revoked {
                    kind: match kind {
                        "jti" => "jti",
                        "sub" => "sub",
                        "iss" => "iss",
                        "kid" => "kid",
                        "client" => "client",
                        _ => "api_key",
                    },
                });
            }
        }
        Ok(())
    }

    /// A small deterministic generator (xorshift64*), so that a failure
    /// reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len() as u64) as usize]
        }
    }

    const JTIS: [&str; 4] = ["j0", "j1", "j2", "j3"];
    const ISSUERS: [&str; 2] = ["https://a", "https://b"];
    const SUBS: [&str; 3] = ["s0", "s1", "s2"];
    const IDS: [&str; 3] = ["x0", "x1", "x2"];

    /// Few keys and close expiries, so that entries share keys and expiries.
    fn random_entry(rng: &mut Rng, now: i64) -> Revocation {
        let target = match rng.below(7) {
            0 | 1 => Target::Token {
                jti: rng.pick(&JTIS).into(),
                issuer: match rng.below(3) {
                    0 => None,
                    _ => Some(rng.pick(&ISSUERS).into()),
                },
            },
            2 => Target::Subject {
                sub: rng.pick(&SUBS).into(),
                issued_before: 1000 + rng.below(4) as i64 * 10,
            },
            3 => Target::Key {
                kid: rng.pick(&IDS).into(),
                issued_before: match rng.below(2) {
                    0 => None,
                    _ => Some(1000 + rng.below(4) as i64 * 10),
                },
            },
            4 => Target::Client {
                client_id: rng.pick(&IDS).into(),
                issued_before: match rng.below(2) {
                    0 => None,
                    _ => Some(1000 + rng.below(4) as i64 * 10),
                },
            },
            5 => Target::Issuer {
                issuer: rng.pick(&ISSUERS).into(),
                issued_before: 1000 + rng.below(4) as i64 * 10,
            },
            _ => Target::ApiKey {
                api_key_id: rng.pick(&IDS).into(),
            },
        };
        Revocation {
            target,
            created_at: now,
            expires_at: now + 1 + rng.below(20) as i64,
            reason: format!("r{}", rng.below(3)),
        }
    }

    /// Every combination of the keys above, for the probes.
    fn probe_tokens() -> Vec<VerifiedToken> {
        let mut tokens = Vec::new();
        for jti in [None, Some("j0"), Some("j1"), Some("j3")] {
            for issuer in ISSUERS {
                for (sub, iat) in [("s0", 1000), ("s1", 1015), ("s2", 1030), ("s0", 1031)] {
                    for id in ["x0", "x1", "x2", "none"] {
                        let mut t = token();
                        t.jti = jti.map(Into::into);
                        t.issuer = issuer.into();
                        t.subject = sub.into();
                        t.issued_at = iat;
                        t.key_id = if id == "x2" { String::new() } else { id.into() };
                        t.client_id = (id != "x0").then(|| id.into());
                        t.api_key_id = (id != "x1").then(|| id.into());
                        tokens.push(t);
                    }
                }
            }
        }
        tokens
    }

    fn assert_same_as_oracles(entries: &Entries, index: &Index, now: i64, step: usize) {
        let rebuilt = Index::build(entries.by_line.values());
        assert_eq!(
            index.next_expiry,
            entries.by_line.values().map(|e| e.expires_at).min(),
            "next_expiry, step {step}"
        );
        assert_eq!(entries.by_expiry.len(), entries.by_line.len());
        for token in probe_tokens() {
            for at in [now, now + 1, now + 5, now + 12, now + 25] {
                let expected = naive_check(entries.by_line.values(), &token, at);
                assert_eq!(
                    index.check(&token, at),
                    expected,
                    "incremental index vs linear check, step {step}, at {at}, {token:?}"
                );
                assert_eq!(
                    rebuilt.check(&token, at),
                    expected,
                    "rebuilt index vs linear check, step {step}"
                );
            }
        }
    }

    /// The incremental index answers every check as a linear scan of the
    /// entries (and a full rebuild) does, over random inserts and sweeps; an
    /// older snapshot keeps answering as it did when it was published.
    #[test]
    fn the_incremental_index_matches_a_full_rebuild_over_random_inserts_and_sweeps() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut entries = Entries::default();
        let mut index = Index::default();
        let mut now = 10_000;
        let mut kept: Option<(Index, Vec<Revocation>, i64)> = None;
        for step in 0..400 {
            match rng.below(10) {
                // A batch of inserts on one copy (as from Redis).
                0..=5 => {
                    let mut next = index.clone();
                    for _ in 0..1 + rng.below(4) {
                        let entry = random_entry(&mut rng, now);
                        entries.add(&mut next, &entry.to_line(), entry);
                    }
                    index = next;
                }
                // Time passes and the sweeper runs.
                6..=8 => {
                    now += rng.below(6) as i64;
                    let mut next = index.clone();
                    let before = entries.len();
                    let removed = entries.sweep(&mut next, now);
                    assert_eq!(before - removed, entries.len());
                    assert!(entries.by_line.values().all(|e| e.expires_at > now));
                    index = next;
                }
                // A line already known changes nothing.
                _ => {
                    if let Some(entry) = entries.by_line.values().next().cloned() {
                        let mut next = index.clone();
                        assert!(!entries.add(&mut next, &entry.to_line(), entry));
                        index = next;
                    }
                }
            }
            assert_same_as_oracles(&entries, &index, now, step);
            if step % 50 == 0 {
                if let Some((old, old_entries, at)) = &kept {
                    for token in probe_tokens() {
                        assert_eq!(
                            old.check(&token, *at),
                            naive_check(old_entries.iter(), &token, *at),
                            "an older snapshot changed"
                        );
                    }
                }
                kept = Some((
                    index.clone(),
                    entries.by_line.values().cloned().collect(),
                    now,
                ));
            }
        }
        // Everything expires: the index is empty again.
        entries.sweep(&mut index, i64::MAX);
        assert!(entries.by_line.is_empty() && entries.by_expiry.is_empty());
        assert!(index.jti.is_empty() && index.sub.is_empty());
        assert!(index.kid.is_empty() && index.client.is_empty() && index.api_key.is_empty());
        assert_eq!(index.next_expiry, None);
    }

    fn at(target: Target, expires_at: i64) -> Revocation {
        Revocation {
            target,
            created_at: 1000,
            expires_at,
            reason: String::new(),
        }
    }

    fn add_all(entries: &mut Entries, index: &mut Index, all: &[Revocation]) {
        for entry in all {
            assert!(entries.add(index, &entry.to_line(), entry.clone()));
        }
    }

    /// Sweeping one of two entries of the same `jti` (different issuers)
    /// removes just that one.
    #[test]
    fn sweeping_one_of_two_jti_entries_keeps_the_other_issuer() {
        let jti = |issuer: &str| Target::Token {
            jti: "j1".into(),
            issuer: Some(issuer.into()),
        };
        let (mut entries, mut index) = (Entries::default(), Index::default());
        add_all(
            &mut entries,
            &mut index,
            &[at(jti("https://a"), 2000), at(jti("https://b"), 3000)],
        );
        let before = index.clone();
        assert_eq!(entries.sweep(&mut index, 2000), 1);
        assert_eq!(
            index.jti.get("j1").map(|v| v.as_slice()),
            Some(&[(Some(Key::from("https://b")), 3000)][..])
        );
        assert_eq!(index.next_expiry, Some(3000));
        let mut t = token();
        t.issuer = "https://a".into();
        assert_eq!(index.check(&t, 1500), Ok(()), "removed");
        assert!(
            before.check(&t, 1500).is_err(),
            "the older snapshot kept it"
        );
        t.issuer = "https://b".into();
        assert_eq!(index.check(&t, 2500).unwrap_err().kind, "jti");
        assert_eq!(entries.sweep(&mut index, 3000), 1);
        assert!(index.jti.is_empty());
    }

    /// Two cut-offs for one subject, the later cut-off expiring first: after
    /// it is swept, the earlier one still applies.
    #[test]
    fn a_subject_keeps_its_earlier_cutoff_when_the_later_one_expires_first() {
        let sub = |cutoff| Target::Subject {
            sub: "alice".into(),
            issued_before: cutoff,
        };
        let (mut entries, mut index) = (Entries::default(), Index::default());
        add_all(
            &mut entries,
            &mut index,
            &[at(sub(1000), 5000), at(sub(2000), 3000)],
        );
        let mut t = token();
        t.issued_at = 1500;
        assert_eq!(index.check(&t, 2500).unwrap_err().kind, "sub");
        assert_eq!(entries.sweep(&mut index, 3000), 1);
        assert_eq!(
            index.sub.get("alice").map(|v| v.as_slice()),
            Some(&[(1000, 5000)][..])
        );
        assert_eq!(index.next_expiry, Some(5000));
        assert_eq!(index.check(&t, 2500), Ok(()), "the 2000 cut-off is gone");
        t.issued_at = 900;
        assert_eq!(index.check(&t, 3500).unwrap_err().kind, "sub");
        assert_eq!(entries.sweep(&mut index, 5000), 1);
        assert!(index.sub.is_empty());
        assert_eq!(index.next_expiry, None);
    }

    /// A key revoked again with a later expiry stays revoked when the first
    /// entry expires; and the same for clients and API keys.
    #[test]
    fn a_key_revoked_again_stays_revoked_when_the_earlier_entry_expires() {
        for target in [
            kid("k1"),
            Target::Client {
                client_id: "web".into(),
                issued_before: None,
            },
            Target::ApiKey {
                api_key_id: "ak1".into(),
            },
        ] {
            let (mut entries, mut index) = (Entries::default(), Index::default());
            add_all(
                &mut entries,
                &mut index,
                &[at(target.clone(), 5000), at(target.clone(), 3000)],
            );
            let mut t = token();
            t.api_key_id = Some("ak1".into());
            let kind = target.kind();
            // The expiries of the one key's entries.
            let map = |index: &Index| -> Map<i64> {
                let strip = |map: &Map<(Option<i64>, i64)>| {
                    map.iter()
                        .map(|(k, v)| {
                            let mut exps: Vec<i64> = v.as_slice().iter().map(|(_, e)| *e).collect();
                            exps.sort_unstable();
                            let values = match exps.as_slice() {
                                [one] => Values::One(*one),
                                _ => Values::Many(Arc::new(exps)),
                            };
                            (k.clone(), values)
                        })
                        .collect()
                };
                match kind {
                    "kid" => strip(&index.kid),
                    "client" => strip(&index.client),
                    _ => index.api_key.clone(),
                }
            };
            assert_eq!(
                map(&index).values().next().map(|v| v.as_slice().to_vec()),
                Some(vec![3000, 5000])
            );
            assert_eq!(entries.sweep(&mut index, 3000), 1);
            assert_eq!(
                map(&index).values().next().map(|v| v.as_slice().to_vec()),
                Some(vec![5000])
            );
            assert_eq!(index.check(&t, 3500).unwrap_err().kind, kind);
            assert_eq!(entries.sweep(&mut index, 5000), 1);
            assert!(map(&index).is_empty());
            assert_eq!(index.check(&t, 3500), Ok(()));
        }
    }

    /// The same line twice (a duplicate) and two lines with the same target
    /// and expiry (different reasons): a sweep removes each occurrence once.
    #[test]
    fn equal_entries_under_different_lines_are_counted_apart() {
        let (mut entries, mut index) = (Entries::default(), Index::default());
        let first = at(kid("k1"), 3000);
        let mut second = first.clone();
        second.reason = "again".into();
        assert!(entries.add(&mut index, &first.to_line(), first.clone()));
        assert!(!entries.add(&mut index, &first.to_line(), first.clone()));
        assert!(entries.add(&mut index, &second.to_line(), second));
        assert_eq!(
            index.kid.get("k1").map(|v| v.as_slice().to_vec()),
            Some(vec![(None, 3000), (None, 3000)])
        );
        assert_eq!(entries.in_force(2999), 2);
        assert_eq!(entries.in_force(3000), 0);
        assert_eq!(entries.sweep(&mut index, 3000), 2);
        assert!(index.kid.is_empty());
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
