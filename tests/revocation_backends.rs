//! One behaviour suite for the revocation store, run over every backend it
//! can stand on: memory (`MemoryBackend`), the journal file (what `portcullis
//! serve` uses in embedded mode) and Redis (shared mode, over a fresh memory
//! backend at each open, so that whatever a reopened store enforces came from
//! a real `redis-server` this test starts).
//!
//! Each behaviour is written once against [`Backing`] ("open a store on the
//! same durable state as before") and instantiated per backend by `suite!`,
//! as limitador runs one storage suite over each of its stores.

#[path = "common/redis.rs"]
mod redis_harness;

use std::sync::Arc;
use std::time::Duration;

use portcullis::authn::{CredentialKind, VerifiedToken};
use portcullis::config::{Lifetimes, RevocationConfig, Secret, StartupMode};
use portcullis::revocation::backend::MemoryBackend;
use portcullis::revocation::{
    Mode, Revocation, RevocationError, RevocationStore, Target, unix_now,
};
use redis_harness::RedisServer;

/// Token lifetimes the stores are opened with: no leeway, so that a `jti`
/// entry expires exactly at its token's `exp`.
fn lifetimes() -> Lifetimes {
    Lifetimes {
        max_lifetime: Duration::from_secs(3600),
        leeway: Duration::ZERO,
        api_key_lifetime: Duration::ZERO,
    }
}

/// A store's durable state: every [`Backing::open`] opens a store on what the
/// earlier ones stored.
trait Backing {
    /// Opens a store with `config` edited by `edit`.
    async fn open_with(&self, edit: impl FnOnce(&mut RevocationConfig)) -> Arc<RevocationStore>;

    /// Opens a store with the default configuration.
    async fn open(&self) -> Arc<RevocationStore> {
        self.open_with(|_| {}).await
    }

    /// The mode the store reports.
    fn mode(&self) -> Mode;
}

/// Memory: a store reopened on a clone of the same `MemoryBackend`.
struct Memory(MemoryBackend);

impl Memory {
    fn new() -> Memory {
        Memory(MemoryBackend::new())
    }
}

impl Backing for Memory {
    async fn open_with(&self, edit: impl FnOnce(&mut RevocationConfig)) -> Arc<RevocationStore> {
        let mut config = RevocationConfig::default();
        edit(&mut config);
        RevocationStore::open_with(&config, lifetimes(), Arc::new(self.0.clone()))
            .await
            .expect("open on memory")
    }

    fn mode(&self) -> Mode {
        Mode::Embedded
    }
}

/// The journal in one temporary folder.
struct Journal(tempfile::TempDir);

impl Journal {
    fn new() -> Journal {
        Journal(tempfile::tempdir().unwrap())
    }
}

impl Backing for Journal {
    async fn open_with(&self, edit: impl FnOnce(&mut RevocationConfig)) -> Arc<RevocationStore> {
        let mut config = RevocationConfig {
            data_dir: self.0.path().to_owned(),
            ..RevocationConfig::default()
        };
        edit(&mut config);
        RevocationStore::open(&config, lifetimes())
            .await
            .expect("open on the journal")
    }

    fn mode(&self) -> Mode {
        Mode::Embedded
    }
}

/// A real `redis-server`; each store starts on an empty memory backend and
/// waits for its first sync with Redis (`startup = "wait"`).
struct Redis(RedisServer);

impl Redis {
    fn new() -> Redis {
        Redis(RedisServer::start())
    }
}

impl Backing for Redis {
    async fn open_with(&self, edit: impl FnOnce(&mut RevocationConfig)) -> Arc<RevocationStore> {
        let mut config = RevocationConfig {
            redis_url: Some(Secret::new(self.0.url())),
            startup: StartupMode::Wait,
            ..RevocationConfig::default()
        };
        edit(&mut config);
        RevocationStore::open_with(&config, lifetimes(), Arc::new(MemoryBackend::new()))
            .await
            .expect("open on Redis")
    }

    fn mode(&self) -> Mode {
        Mode::Redis
    }
}

/// A token of `sub`, issued now, valid for ten minutes.
fn token(sub: &str) -> VerifiedToken {
    let now = unix_now();
    VerifiedToken {
        issuer: "https://issuer.example".into(),
        subject: sub.into(),
        principal_type: "User".into(),
        principal_id: sub.into(),
        jti: Some(format!("jti-of-{sub}")),
        issued_at: now,
        expires_at: now + 600,
        scopes: vec![],
        roles: vec![],
        client_id: Some(format!("client-of-{sub}")),
        key_id: format!("kid-of-{sub}"),
        api_key_id: None,
        credential: CredentialKind::Jwt,
        binding: None,
        status: None,
        claims: Vec::new(),
    }
}

fn jti(id: &str) -> Target {
    Target::Token {
        jti: id.into(),
        issuer: None,
    }
}

/// The kind of entry that refuses `token` now, if one does.
fn refused_by(store: &RevocationStore, token: &VerifiedToken) -> Option<&'static str> {
    store
        .check(token, unix_now())
        .err()
        .map(|revoked| revoked.kind)
}

/// The entries listed, as their lines, sorted.
fn lines(store: &RevocationStore) -> Vec<String> {
    let mut lines: Vec<String> = store.list().iter().map(Revocation::to_line).collect();
    lines.sort();
    lines
}

/// Every kind of entry refuses the tokens it matches, and only those.
async fn each_kind_refuses_its_tokens_and_no_other(backing: &impl Backing) {
    let store = backing.open().await;
    let now = unix_now();
    let targets = [
        (jti("jti-of-t1"), "t1", "jti"),
        (
            Target::Subject {
                sub: "t2".into(),
                issued_before: now,
            },
            "t2",
            "sub",
        ),
        (
            Target::Key {
                kid: "kid-of-t3".into(),
                issued_before: None,
            },
            "t3",
            "kid",
        ),
        (
            Target::Client {
                client_id: "client-of-t4".into(),
                issued_before: Some(now),
            },
            "t4",
            "client",
        ),
    ];
    for (target, _, _) in &targets {
        store
            .revoke(target.clone(), None, "suite".into())
            .await
            .expect("revoke");
    }
    for (_, sub, kind) in &targets {
        assert_eq!(refused_by(&store, &token(sub)), Some(*kind), "{sub}");
    }
    assert_eq!(refused_by(&store, &token("untouched")), None);
    // A cut-off spares tokens issued after it.
    let mut later = token("t2");
    later.issued_at = now + 1;
    assert_eq!(refused_by(&store, &later), None);
    // Cut-offs for a whole issuer and for what a key signed before a time.
    let other_issuer = |sub: &str| VerifiedToken {
        issuer: "https://other.example".into(),
        ..token(sub)
    };
    for target in [
        Target::Issuer {
            issuer: "https://other.example".into(),
            issued_before: now,
        },
        Target::Key {
            kid: "kid-of-t6".into(),
            issued_before: Some(now),
        },
    ] {
        store
            .revoke(target, None, "suite".into())
            .await
            .expect("revoke");
    }
    assert_eq!(refused_by(&store, &other_issuer("t5")), Some("iss"));
    assert_eq!(refused_by(&store, &token("t6")), Some("kid"));
    for spared in [other_issuer("t5"), token("t6")] {
        let mut later = spared.clone();
        later.issued_at = now + 1;
        assert_eq!(refused_by(&store, &later), None, "{}", later.subject);
    }
    assert_eq!(refused_by(&store, &token("untouched")), None);
    let status = store.status();
    assert_eq!(status.revocations, targets.len() + 2);
    assert_eq!(status.mode, backing.mode());
    store.shutdown().await;
}

/// What was acknowledged is enforced by the next store on the same state,
/// entry for entry.
async fn acknowledged_revocations_survive_a_restart(backing: &impl Backing) {
    let store = backing.open().await;
    for i in 0..5 {
        let done = store
            .revoke(jti(&format!("jti-of-r{i}")), None, format!("reason {i}"))
            .await
            .expect("revoke");
        if backing.mode() == Mode::Redis {
            assert!(done.synced, "written to Redis before the reply");
        }
    }
    let before = lines(&store);
    store.shutdown().await;
    drop(store);

    let reopened = backing.open().await;
    assert_eq!(lines(&reopened), before);
    for i in 0..5 {
        assert_eq!(refused_by(&reopened, &token(&format!("r{i}"))), Some("jti"));
    }
    reopened.shutdown().await;
}

/// A batch with one unacceptable target applies nothing, now or after a
/// restart; an acceptable one applies every target.
async fn a_batch_applies_whole_or_not_at_all(backing: &impl Backing) {
    let store = backing.open().await;
    let refused = store
        .revoke_many(
            vec![(jti("jti-of-b1"), None), (jti(""), None)],
            String::new(),
        )
        .await;
    assert!(matches!(refused, Err(RevocationError::Invalid(_))));
    assert_eq!(refused_by(&store, &token("b1")), None);
    assert!(store.list().is_empty());

    let batch: Vec<(Target, Option<i64>)> = (0..100)
        .map(|i| (jti(&format!("jti-of-b{i}")), None))
        .collect();
    let done = store.revoke_many(batch, "batch".into()).await.unwrap();
    assert_eq!(done.len(), 100);
    assert_eq!(store.list().len(), 100);
    store.shutdown().await;
    drop(store);

    let reopened = backing.open().await;
    assert_eq!(reopened.list().len(), 100);
    assert_eq!(refused_by(&reopened, &token("b0")), Some("jti"));
    assert_eq!(refused_by(&reopened, &token("b99")), Some("jti"));
    reopened.shutdown().await;
}

/// At `max_entries` in force, a revocation is refused with nothing applied,
/// and the refusal does not reach the backend either.
async fn the_cap_refuses_with_nothing_applied(backing: &impl Backing) {
    let store = backing.open_with(|c| c.max_entries = 2).await;
    store
        .revoke(jti("jti-of-c1"), None, String::new())
        .await
        .unwrap();
    store
        .revoke(jti("jti-of-c2"), None, String::new())
        .await
        .unwrap();
    let full = store.revoke(jti("jti-of-c3"), None, String::new()).await;
    assert!(matches!(
        full,
        Err(RevocationError::Full { max_entries: 2 })
    ));
    let batch = store
        .revoke_many(vec![(jti("jti-of-c4"), None)], String::new())
        .await;
    assert!(matches!(batch, Err(RevocationError::Full { .. })));
    assert_eq!(refused_by(&store, &token("c3")), None);
    store.shutdown().await;
    drop(store);

    let reopened = backing.open().await;
    assert_eq!(reopened.list().len(), 2);
    assert_eq!(refused_by(&reopened, &token("c3")), None);
    assert_eq!(refused_by(&reopened, &token("c4")), None);
    reopened.shutdown().await;
}

/// An entry stops refusing once no token it matches can be valid, is swept,
/// and is not loaded again.
async fn expired_entries_are_dropped_and_not_restored(backing: &impl Backing) {
    let store = backing.open().await;
    let now = unix_now();
    // No leeway: the entry expires with its token's `exp`.
    store
        .revoke(jti("jti-of-short"), Some(now + 1), String::new())
        .await
        .unwrap();
    store
        .revoke(jti("jti-of-long"), None, String::new())
        .await
        .unwrap();
    let mut short = token("short");
    short.expires_at = now + 1;
    assert!(store.check(&short, now).is_err());
    assert!(
        store.check(&short, now + 1).is_ok(),
        "expired with its token"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    store.sweep(unix_now());
    assert_eq!(store.list().len(), 1);
    assert_eq!(store.status().revocations, 1);
    store.shutdown().await;
    drop(store);

    let reopened = backing.open().await;
    assert_eq!(reopened.list().len(), 1);
    assert_eq!(refused_by(&reopened, &token("long")), Some("jti"));
    reopened.shutdown().await;
}

/// A reload that lets tokens live longer extends the entries in force, and
/// the extension is stored like any revocation.
async fn raised_lifetimes_extend_entries_across_a_restart(backing: &impl Backing) {
    let store = backing.open().await;
    let now = unix_now();
    let sub = Target::Subject {
        sub: "long-lived".into(),
        issued_before: now,
    };
    let first = store
        .revoke(sub.clone(), None, String::new())
        .await
        .unwrap();
    let longer = Lifetimes {
        max_lifetime: Duration::from_secs(7200),
        ..lifetimes()
    };
    assert_eq!(store.raise_lifetimes(longer).await.unwrap(), 1);
    let latest = |store: &RevocationStore| {
        store
            .list()
            .iter()
            .filter(|r| r.target == sub)
            .map(|r| r.expires_at)
            .max()
    };
    let extended = first.revocation.expires_at + 3600;
    assert_eq!(latest(&store), Some(extended));
    store.shutdown().await;
    drop(store);

    // Opened with the old lifetimes: the longer entry is kept all the same.
    let reopened = backing.open().await;
    assert_eq!(latest(&reopened), Some(extended));
    reopened.shutdown().await;
}

/// Revocations made concurrently are all acknowledged, enforced and stored.
async fn concurrent_revocations_are_all_kept(backing: &impl Backing) {
    let store = backing.open().await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .revoke(jti(&format!("jti-of-p{i}")), None, String::new())
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().expect("acknowledged");
    }
    for i in 0..64 {
        assert_eq!(refused_by(&store, &token(&format!("p{i}"))), Some("jti"));
    }
    store.shutdown().await;
    drop(store);

    let reopened = backing.open().await;
    assert_eq!(reopened.list().len(), 64);
    reopened.shutdown().await;
}

/// Instantiates every behaviour for one backend.
macro_rules! suite {
    ($backend:ident, $new:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn each_kind_refuses_its_tokens_and_no_other() {
                super::each_kind_refuses_its_tokens_and_no_other(&$new).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn acknowledged_revocations_survive_a_restart() {
                super::acknowledged_revocations_survive_a_restart(&$new).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_batch_applies_whole_or_not_at_all() {
                super::a_batch_applies_whole_or_not_at_all(&$new).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_cap_refuses_with_nothing_applied() {
                super::the_cap_refuses_with_nothing_applied(&$new).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expired_entries_are_dropped_and_not_restored() {
                super::expired_entries_are_dropped_and_not_restored(&$new).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn raised_lifetimes_extend_entries_across_a_restart() {
                super::raised_lifetimes_extend_entries_across_a_restart(&$new).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_revocations_are_all_kept() {
                super::concurrent_revocations_are_all_kept(&$new).await;
            }
        }
    };
}

suite!(memory, Memory::new());
suite!(journal, Journal::new());
suite!(redis, Redis::new());

/// Shared mode only: how an instance gets back in step with Redis. Redis
/// keeps the snapshot (a sorted set) and a log of recent entries (a stream);
/// each instance remembers the last log entry it read.
mod redis_resync {
    use super::*;
    use portcullis::revocation::RedisState;
    use redis_harness::TcpProxy;
    use std::sync::atomic::Ordering::Relaxed;

    const LOG: &str = "portcullis:revocations:log";
    const SNAPSHOT: &str = "portcullis:revocations";

    async fn open_on(url: String) -> Arc<RevocationStore> {
        let config = RevocationConfig {
            redis_url: Some(Secret::new(url)),
            startup: StartupMode::Wait,
            ..RevocationConfig::default()
        };
        RevocationStore::open_with(&config, lifetimes(), Arc::new(MemoryBackend::new()))
            .await
            .expect("open on Redis")
    }

    /// The ID of the log's last entry, as `redis-server` reports it.
    fn log_end(redis: &RedisServer) -> Option<String> {
        let reply = redis.command(&["XREVRANGE", LOG, "+", "-", "COUNT", "1"])?;
        reply
            .lines()
            .find(|line| {
                line.split_once('-').is_some_and(|(ms, seq)| {
                    !ms.is_empty()
                        && ms.bytes().all(|b| b.is_ascii_digit())
                        && !seq.is_empty()
                        && seq.bytes().all(|b| b.is_ascii_digit())
                })
            })
            .map(str::to_owned)
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn fill(prefix: &str, n: usize) -> Vec<(Target, Option<i64>)> {
        (0..n)
            .map(|i| (jti(&format!("jti-of-{prefix}{i}")), None))
            .collect()
    }

    /// An instance cut off for a moment reads only the log entries made
    /// meanwhile, not the snapshot, and writes nothing but what it learned
    /// lately back; a new instance reads the snapshot once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_outage_is_caught_up_from_the_log_alone() {
        let redis = RedisServer::start();
        let proxy = TcpProxy::start(redis.port).await;
        let a = open_on(redis.url()).await;
        let b = open_on(proxy.url()).await;
        assert_eq!(
            b.stats.resyncs_full.load(Relaxed),
            1,
            "a new instance syncs in full"
        );
        a.revoke_many(fill("f", 2000), "fill".into()).await.unwrap();
        until("B to enforce the fill", || b.list().len() == 2000).await;
        // B confirms the log up to its end on its next look at it.
        let end = log_end(&redis);
        assert!(end.is_some());
        until("B at the log's end", || b.log_position() == end).await;
        let read_before = b.stats.resync_entries_read.load(Relaxed);

        proxy.cut();
        until("B to see the outage", || {
            b.status().redis != RedisState::Connected
        })
        .await;
        a.revoke_many(fill("o", 10), "during the outage".into())
            .await
            .unwrap();
        assert_eq!(refused_by(&b, &token("o0")), None);
        proxy.restore();
        until("B to resume", || {
            b.stats.resyncs_incremental.load(Relaxed) == 1
        })
        .await;
        for i in 0..10 {
            assert_eq!(refused_by(&b, &token(&format!("o{i}"))), Some("jti"));
        }
        assert_eq!(b.stats.resyncs_full.load(Relaxed), 1, "no second full sync");
        assert_eq!(
            b.stats.resync_entries_read.load(Relaxed) - read_before,
            10,
            "only the entries made during the outage are read"
        );

        // A new instance loads the snapshot, once.
        let c = open_on(redis.url()).await;
        assert_eq!(c.list().len(), 2010);
        assert_eq!(c.stats.resyncs_full.load(Relaxed), 1);
        assert_eq!(c.stats.resyncs_incremental.load(Relaxed), 0);
        assert_eq!(c.stats.resync_entries_read.load(Relaxed), 2010);
        for store in [a, b, c] {
            store.shutdown().await;
        }
    }

    /// Redis loses its data while every instance stays connected (here
    /// `FLUSHALL`; a restart without persistence is the same to them, with a
    /// reconnect): the epoch changes, the instances notice on their next look
    /// at the log and write every entry they know back, so a new instance
    /// still gets them all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_that_lost_its_data_gets_every_entry_back() {
        let redis = RedisServer::start();
        let a = open_on(redis.url()).await;
        let b = open_on(redis.url()).await;
        a.revoke_many(fill("k", 100), "kept".into()).await.unwrap();
        until("B to enforce them", || b.list().len() == 100).await;
        assert_eq!(redis.zcard(SNAPSHOT), 100);

        assert!(
            redis
                .command(&["FLUSHALL"])
                .is_some_and(|r| r.starts_with("+OK"))
        );
        until("the entries to be written back", || {
            redis.zcard(SNAPSHOT) == 100
        })
        .await;
        until("both instances to resync in full", || {
            a.stats.resyncs_full.load(Relaxed) == 2 && b.stats.resyncs_full.load(Relaxed) == 2
        })
        .await;
        let c = open_on(redis.url()).await;
        assert_eq!(c.list().len(), 100);
        assert_eq!(refused_by(&c, &token("k99")), Some("jti"));
        for store in [a, b, c] {
            store.shutdown().await;
        }
    }

    /// A failover that lost Redis' last writes (here: the instance is cut
    /// off, then its last entry is removed from the snapshot and the log, as
    /// a replica promoted before it had them would lack them): on reconnect
    /// the instance writes back what it learned lately, so a new instance
    /// enforces the entry again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_lost_in_a_failover_are_written_back_on_reconnect() {
        let redis = RedisServer::start();
        let proxy = TcpProxy::start(redis.port).await;
        let b = open_on(proxy.url()).await;
        b.revoke_many(fill("before", 5), "older".into())
            .await
            .unwrap();
        let done = b
            .revoke(jti("jti-of-lost"), None, "lost in the failover".into())
            .await
            .unwrap();
        assert!(done.synced);
        proxy.cut();
        until("B to see the outage", || {
            b.status().redis != RedisState::Connected
        })
        .await;

        let lost = b
            .list()
            .into_iter()
            .find(
                |entry| matches!(&entry.target, Target::Token { jti, .. } if jti == "jti-of-lost"),
            )
            .expect("the entry")
            .to_line();
        let last = log_end(&redis).expect("the log's last entry");
        assert_eq!(
            redis.command(&["XDEL", LOG, &last]).as_deref(),
            Some(":1\r\n")
        );
        assert_eq!(
            redis.command(&["ZREM", SNAPSHOT, &lost]).as_deref(),
            Some(":1\r\n")
        );
        assert_eq!(redis.zcard(SNAPSHOT), 5);

        proxy.restore();
        until("the lost entry to be written back", || {
            redis.zcard(SNAPSHOT) == 6
        })
        .await;
        let c = open_on(redis.url()).await;
        assert_eq!(refused_by(&c, &token("lost")), Some("jti"));
        for store in [b, c] {
            store.shutdown().await;
        }
    }
}
