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

//! - [`backend`] is where entries outlive the process: the [`backend::Backend`]
//!   trait, with the journal ([`journal`]) and memory backends.

pub mod backend;
mod index;
pub mod journal;
pub mod redis;
mod store;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use store::RevocationStore;

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
    /// Syncs with Redis that read the whole snapshot.
    pub resyncs_full: std::sync::atomic::AtomicU64,
    /// Syncs with Redis that read only the log after this instance's position.
    pub resyncs_incremental: std::sync::atomic::AtomicU64,
    /// Entries read from Redis by syncs (snapshot members or log entries).
    pub resync_entries_read: std::sync::atomic::AtomicU64,
    /// Compactions of the storage (the journal) while running.
    pub journal_compactions: std::sync::atomic::AtomicU64,
}

impl RevocationStats {
    fn record_resync(&self, kind: redis::Resync, read: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        match kind {
            redis::Resync::Full => self.resyncs_full.fetch_add(1, Relaxed),
            redis::Resync::Incremental => self.resyncs_incremental.fetch_add(1, Relaxed),
        };
        self.resync_entries_read.fetch_add(read as u64, Relaxed);
    }
}

impl Default for RevocationStats {
    fn default() -> Self {
        RevocationStats {
            applied_local: Default::default(),
            applied_remote: Default::default(),
            refused_full: Default::default(),
            refused_queue_full: Default::default(),
            accepted_over_cap: Default::default(),
            resyncs_full: Default::default(),
            resyncs_incremental: Default::default(),
            resync_entries_read: Default::default(),
            journal_compactions: Default::default(),
            propagation_lag: prometheus_client::metrics::histogram::Histogram::new([
                0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        }
    }
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

#[cfg(test)]
pub(crate) mod test_support {
    //! Shared by the tests of the revocation modules.

    use std::time::Duration;

    use super::*;
    use crate::authn::VerifiedToken;

    pub(crate) fn token() -> VerifiedToken {
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
            binding: None,
            status: None,
            claims: Vec::new(),
        }
    }

    pub(crate) fn entry(target: Target) -> Revocation {
        Revocation {
            target,
            created_at: 1000,
            expires_at: 5000,
            reason: String::new(),
        }
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

    pub(crate) fn lifetimes() -> Lifetimes {
        Lifetimes {
            max_lifetime: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            api_key_lifetime: Duration::ZERO,
        }
    }

    pub(crate) fn kid(k: &str) -> Target {
        Target::Key {
            kid: k.into(),
            issued_before: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::test_support::*;
    use super::*;

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
}
