//! The verified-token cache (moka): a token verified once is not verified
//! again while it stays valid.
//!
//! **A cache never changes a decision.** Tokens are keyed by a SHA-256 digest
//! of the token (never the token). A hit is used only inside the token's own
//! validity window at the request's clock, and only while the issuer's key set
//! is the one that verified it (a rotation or an expired key set sends the
//! token through full verification again). Revocation is checked after this
//! cache on every request (see [`super::authenticator`]), so a hit never lets a
//! revoked credential through.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::VerifiedToken;
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

/// Verified tokens by digest, with hit and miss counters.
pub struct TokenCache {
    cache: Option<moka::sync::Cache<[u8; 32], Arc<CachedToken>>>,
    /// Lookups answered from the cache.
    pub hits: AtomicU64,
    /// Lookups that went on to full verification.
    pub misses: AtomicU64,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.cache.as_ref().map(|c| c.entry_count()))
            .finish()
    }
}

impl TokenCache {
    /// The cache as `[cache]` configures it (`tokens = false` turns it off).
    pub fn new(config: &CacheConfig) -> TokenCache {
        let cache = config.tokens.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.token_capacity)
                .time_to_live(config.token_ttl_max)
                .build()
        });
        TokenCache {
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// A cached token usable at `now` with the current key generation of its
    /// issuer (`key_generation` of an issuer name).
    pub fn get(
        &self,
        digest: &[u8; 32],
        now: i64,
        key_generation: impl Fn(&str) -> Option<u64>,
    ) -> Option<Arc<VerifiedToken>> {
        let cache = self.cache.as_ref()?;
        let hit = cache.get(digest).filter(|hit| {
            now >= hit.valid_from
                && now < hit.valid_until
                && key_generation(&hit.token.issuer) == Some(hit.key_generation)
        });
        let counter = if hit.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        hit.map(|hit| hit.token.clone())
    }

    /// Remembers a verified token.
    pub fn insert(&self, digest: [u8; 32], entry: CachedToken) {
        if let Some(cache) = &self.cache {
            cache.insert(digest, Arc::new(entry));
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
    use crate::authn::CredentialKind;

    fn token(issuer: &str) -> Arc<VerifiedToken> {
        Arc::new(VerifiedToken {
            issuer: issuer.into(),
            subject: "alice".into(),
            principal_type: "User".into(),
            principal_id: "alice".into(),
            jti: None,
            issued_at: 100,
            expires_at: 200,
            scopes: Vec::new(),
            roles: Vec::new(),
            client_id: None,
            key_id: "k1".into(),
            api_key_id: None,
            credential: CredentialKind::Jwt,
            binding: None,
            status: None,
            claims: Vec::new(),
        })
    }

    fn cached(generation: u64) -> CachedToken {
        CachedToken {
            token: token("https://idp"),
            key_generation: generation,
            valid_from: 100,
            valid_until: 200,
        }
    }

    #[test]
    fn a_hit_needs_the_validity_window_and_the_same_key_generation() {
        let cache = TokenCache::new(&CacheConfig::default());
        cache.insert([1; 32], cached(7));
        let generation = |g: u64| move |_: &str| Some(g);
        assert!(cache.get(&[1; 32], 150, generation(7)).is_some());
        // Before nbf/iat, at expiry, and after a key rotation: a miss.
        assert!(cache.get(&[1; 32], 99, generation(7)).is_none());
        assert!(cache.get(&[1; 32], 200, generation(7)).is_none());
        assert!(cache.get(&[1; 32], 150, generation(8)).is_none());
        // An issuer that is gone: a miss.
        assert!(cache.get(&[1; 32], 150, |_| None).is_none());
        assert!(cache.get(&[2; 32], 150, generation(7)).is_none());
        assert_eq!(cache.hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.misses.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_disabled_cache_never_hits() {
        let cache = TokenCache::new(&CacheConfig {
            tokens: false,
            ..CacheConfig::default()
        });
        cache.insert([1; 32], cached(1));
        assert!(cache.get(&[1; 32], 150, |_| Some(1)).is_none());
        assert!(cache.is_empty());
    }
}
