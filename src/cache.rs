//! The verified-token cache and the decision cache (moka).
//!
//! The rule: **a cache never changes a decision.**
//! - Tokens are keyed by a SHA-256 digest of the token (never the token). A hit is
//!   used only inside the token's own validity window at the request's clock, and
//!   only while the issuer's key set is the one that verified it (a rotation or an
//!   expired key set sends the token through full verification again).
//! - Decisions are keyed by a digest of every input the Cedar request is built
//!   from (see [`crate::authz::mapping::CedarMapping::decision_key`]). Both caches
//!   belong to one engine, so a policy change (a new engine) starts empty ones.
//! - Revocation is checked on every request, after the token cache and before the
//!   decision cache, so neither can let a revoked credential through.

use std::sync::Arc;

use crate::authn::VerifiedToken;
use crate::authz::PolicyOutcome;
use crate::config::CacheConfig;

/// A verified token as cached.
#[derive(Debug)]
pub struct CachedToken {
    /// The identity, shared with every request that presents the token.
    pub token: Arc<VerifiedToken>,
    /// The issuer key-set generation that verified it.
    pub key_generation: u64,
    /// First second (inclusive) at which verification succeeds (`nbf`/`iat` − leeway).
    pub valid_from: i64,
    /// First second at which it fails as expired (`exp` + leeway).
    pub valid_until: i64,
}

/// Hit and miss counters, per cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Token cache hits.
    pub token_hits: std::sync::atomic::AtomicU64,
    /// Token cache misses.
    pub token_misses: std::sync::atomic::AtomicU64,
    /// Decision cache hits.
    pub decision_hits: std::sync::atomic::AtomicU64,
    /// Decision cache misses.
    pub decision_misses: std::sync::atomic::AtomicU64,
}

/// The caches of one engine.
pub struct Caches {
    tokens: Option<moka::sync::Cache<[u8; 32], Arc<CachedToken>>>,
    decisions: Option<moka::sync::Cache<[u8; 32], Arc<PolicyOutcome>>>,
    /// Counters.
    pub stats: CacheStats,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("tokens", &self.tokens.as_ref().map(|c| c.entry_count()))
            .field(
                "decisions",
                &self.decisions.as_ref().map(|c| c.entry_count()),
            )
            .finish()
    }
}

fn outcome_weight(outcome: &PolicyOutcome) -> u32 {
    let strings: usize = outcome
        .policies
        .iter()
        .chain(&outcome.errors)
        .map(|s| s.len() + 24)
        .sum();
    (96 + strings).min(u32::MAX as usize) as u32
}

impl Caches {
    /// Caches as configured (either may be off).
    pub fn new(config: &CacheConfig) -> Caches {
        let tokens = config.tokens.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.token_capacity)
                .time_to_live(config.token_ttl_max)
                .build()
        });
        let decisions = config.decisions.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.decision_max_bytes)
                .weigher(|_key: &[u8; 32], value: &Arc<PolicyOutcome>| outcome_weight(value))
                .time_to_live(config.decision_ttl_max)
                .build()
        });
        Caches {
            tokens,
            decisions,
            stats: CacheStats::default(),
        }
    }

    /// No caching at all (the reference the differential test compares with).
    pub fn disabled() -> Caches {
        Caches {
            tokens: None,
            decisions: None,
            stats: CacheStats::default(),
        }
    }

    /// A cached token usable at `now` with the current key generation.
    pub fn token(
        &self,
        digest: &[u8; 32],
        now: i64,
        key_generation: impl Fn(&str) -> Option<u64>,
    ) -> Option<Arc<VerifiedToken>> {
        let cache = self.tokens.as_ref()?;
        let hit = cache.get(digest).filter(|hit| {
            now >= hit.valid_from
                && now < hit.valid_until
                && key_generation(&hit.token.issuer) == Some(hit.key_generation)
        });
        let counter = if hit.is_some() {
            &self.stats.token_hits
        } else {
            &self.stats.token_misses
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        hit.map(|hit| hit.token.clone())
    }

    /// Remembers a verified token.
    pub fn remember_token(&self, digest: [u8; 32], entry: CachedToken) {
        if let Some(cache) = &self.tokens {
            cache.insert(digest, Arc::new(entry));
        }
    }

    /// A cached decision.
    pub fn decision(&self, key: &[u8; 32]) -> Option<Arc<PolicyOutcome>> {
        let cache = self.decisions.as_ref()?;
        let hit = cache.get(key);
        let counter = if hit.is_some() {
            &self.stats.decision_hits
        } else {
            &self.stats.decision_misses
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        hit
    }

    /// Remembers a decision.
    pub fn remember_decision(&self, key: [u8; 32], outcome: Arc<PolicyOutcome>) {
        if let Some(cache) = &self.decisions {
            cache.insert(key, outcome);
        }
    }

    /// True when decisions are cached (so their key is worth computing).
    pub fn caches_decisions(&self) -> bool {
        self.decisions.is_some()
    }

    /// Drops every cached token and decision (after a revocation, to be safe).
    pub fn clear(&self) {
        if let Some(cache) = &self.tokens {
            cache.invalidate_all();
        }
        if let Some(cache) = &self.decisions {
            cache.invalidate_all();
        }
    }

    /// Entry counts (tokens, decisions), after pending maintenance.
    pub fn sizes(&self) -> (u64, u64) {
        let count = |c: Option<u64>| c.unwrap_or_default();
        (
            count(self.tokens.as_ref().map(|c| {
                c.run_pending_tasks();
                c.entry_count()
            })),
            count(self.decisions.as_ref().map(|c| {
                c.run_pending_tasks();
                c.entry_count()
            })),
        )
    }
}
