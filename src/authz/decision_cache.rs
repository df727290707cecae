//! The decision cache (moka): a request whose every policy input was seen
//! before reuses that evaluation's outcome.
//!
//! **A cache never changes a decision.** Decisions are keyed by a digest of
//! every input the Cedar request is built from (see
//! [`super::mapping::CedarMapping::decision_key`]). The cache belongs to one
//! [`super::evaluator::Evaluator`], so a policy change (a new evaluator) starts
//! an empty one. Revocation is checked before this cache is consulted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::PolicyOutcome;
use crate::config::CacheConfig;

/// Policy outcomes by decision key, bounded by their weight in bytes.
pub struct DecisionCache {
    cache: Option<moka::sync::Cache<[u8; 32], Arc<PolicyOutcome>>>,
    /// Lookups answered from the cache.
    pub hits: AtomicU64,
    /// Lookups that went on to evaluation.
    pub misses: AtomicU64,
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("entries", &self.cache.as_ref().map(|c| c.entry_count()))
            .finish()
    }
}

/// About what a cached outcome costs in memory, in bytes.
fn outcome_weight(outcome: &PolicyOutcome) -> u32 {
    let strings: usize = outcome
        .policies
        .iter()
        .chain(&outcome.errors)
        .map(|s| s.len() + 24)
        .sum();
    (96 + strings).min(u32::MAX as usize) as u32
}

impl DecisionCache {
    /// The cache as `[cache]` configures it (`decisions = false` turns it off).
    pub fn new(config: &CacheConfig) -> DecisionCache {
        let cache = config.decisions.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.decision_max_bytes)
                .weigher(|_key: &[u8; 32], value: &Arc<PolicyOutcome>| outcome_weight(value))
                .time_to_live(config.decision_ttl_max)
                .build()
        });
        DecisionCache {
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// True when decisions are cached (so their key is worth computing).
    pub fn is_enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// A cached outcome.
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<PolicyOutcome>> {
        let cache = self.cache.as_ref()?;
        let hit = cache.get(key);
        let counter = if hit.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// Remembers an outcome.
    pub fn insert(&self, key: [u8; 32], outcome: Arc<PolicyOutcome>) {
        if let Some(cache) = &self.cache {
            cache.insert(key, outcome);
        }
    }

    /// Entries, after pending maintenance.
    pub fn len(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(allowed: bool) -> Arc<PolicyOutcome> {
        Arc::new(PolicyOutcome {
            allowed,
            policies: vec!["policy0".to_owned()].into(),
            errors: Vec::new(),
        })
    }

    #[test]
    fn hits_and_misses_are_counted() {
        let cache = DecisionCache::new(&CacheConfig::default());
        assert!(cache.is_enabled());
        assert!(cache.get(&[1; 32]).is_none());
        cache.insert([1; 32], outcome(true));
        assert_eq!(cache.get(&[1; 32]), Some(outcome(true)));
        assert_eq!(cache.hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.misses.load(Ordering::Relaxed), 1);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_disabled_cache_never_hits_nor_counts() {
        let cache = DecisionCache::new(&CacheConfig {
            decisions: false,
            ..CacheConfig::default()
        });
        assert!(!cache.is_enabled());
        cache.insert([1; 32], outcome(true));
        assert!(cache.get(&[1; 32]).is_none());
        assert_eq!(cache.misses.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_byte_budget_bounds_the_entries() {
        let cache = DecisionCache::new(&CacheConfig {
            decision_max_bytes: 10 * 1024,
            ..CacheConfig::default()
        });
        for i in 0..1000u32 {
            let mut key = [0; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            cache.insert(key, outcome(i % 2 == 0));
        }
        // About 130 bytes per outcome: far fewer than 1000 fit in 10 KiB.
        assert!(cache.len() < 200, "{}", cache.len());
    }
}
