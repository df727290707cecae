//! Shared mode: revocations shared by every instance through Redis.
//!
//! State in Redis is one sorted set, `<prefix>:revocations`, whose members are
//! the entries' JSON lines, scored by their expiry (seconds since the epoch).
//! Expired members are removed with `ZREMRANGEBYSCORE`. A new entry is written
//! with `ZADD` and announced with `PUBLISH` on the channel
//! `<prefix>:revocations:events`, in one `MULTI`/`EXEC` transaction.
//!
//! One task per instance keeps the link. Each session:
//! 1. connects (a multiplexed connection for commands, one for pub/sub) and
//!    `SUBSCRIBE`s;
//! 2. writes every entry this instance knows back with `ZADD` (idempotent), so
//!    entries queued while Redis was unreachable, or lost by a Redis that
//!    restarted without persistence or failed over, are restored;
//! 3. writes and publishes the queued local revocations;
//! 4. reads the full set (everything missed while disconnected) and applies it;
//! 5. applies published entries as they arrive, writes new local revocations,
//!    and pings both connections and drops expired members every 2 seconds.
//!
//! Any error ends the session; the task reconnects forever with exponential
//! backoff capped at 1 second, so that every instance is back soon after Redis
//! is, and revocations made during an outage spread without waiting. Meanwhile
//! the known entries stay enforced and new local revocations are enforced,
//! journaled and queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use futures_util::FutureExt as _;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, watch};
use tokio_stream::StreamExt as _;

use super::{RedisState, RevocationError, RevocationStore, unix_now};

/// First retry delay after a lost connection.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay: short, because a revocation made during an outage
/// reaches the other instances only once both ends have reconnected; an
/// attempt a second per instance costs Redis nothing.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Connect and command timeout.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Liveness pings and expiry of old members.
const TICK: Duration = Duration::from_secs(2);
/// How long `Revoke` waits for Redis to confirm a write before answering
/// "queued".
const WRITE_WAIT: Duration = Duration::from_secs(1);
/// Members per `ZADD` pipeline during a resync.
const CHUNK: usize = 1000;

/// A local revocation waiting to be written to Redis.
#[derive(Debug, Clone)]
struct Pending {
    seq: u64,
    line: String,
    expires_at: i64,
}

/// The queue of local revocations waiting for Redis, bounded by
/// `[revocation] max_pending_writes` (entries queued plus places reserved).
#[derive(Debug, Default)]
struct Queue {
    items: Vec<Pending>,
    /// Places taken by revocations being applied ([`SyncHandle::reserve`]).
    reserved: usize,
}

/// A place in the Redis queue, taken before a revocation is applied so that
/// a full queue refuses it with nothing applied. Given back if unused.
#[derive(Debug)]
pub struct Slot<'a> {
    sync: &'a SyncHandle,
    used: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.used {
            let mut queue = super::lock(&self.sync.pending);
            queue.reserved = queue.reserved.saturating_sub(1);
        }
    }
}

/// The shared-mode link of one store: Redis client, queue and state.
#[derive(Debug)]
pub struct SyncHandle {
    client: redis::Client,
    key: String,
    channel: String,
    pending: Mutex<Queue>,
    /// `[revocation] max_pending_writes`.
    max_pending: usize,
    next_seq: AtomicU64,
    synced: watch::Sender<u64>,
    state: watch::Sender<RedisState>,
    wake: Notify,
}

impl SyncHandle {
    /// Checks the URL (`redis://`, `rediss://`, `unix://`) and names the key and
    /// channel after `prefix`. Does not connect.
    pub fn new(url: &str, prefix: &str) -> Result<SyncHandle, RevocationError> {
        // rediss:// uses rustls; make its crypto provider explicit (an error
        // only means one is installed already).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // The error is described by kind only: the URL may hold a password.
        let client = redis::Client::open(url).map_err(|e| {
            RevocationError::RedisUrl(format!(
                "expected redis://[user:password@]host[:port][/db] or rediss://...; {:?}: {}",
                e.kind(),
                e.detail().unwrap_or("cannot be used")
            ))
        })?;
        Ok(SyncHandle {
            client,
            key: format!("{prefix}:revocations"),
            channel: format!("{prefix}:revocations:events"),
            pending: Mutex::new(Queue::default()),
            max_pending: crate::config::DEFAULT_MAX_PENDING_WRITES,
            next_seq: AtomicU64::new(0),
            synced: watch::channel(0).0,
            state: watch::channel(RedisState::Connecting).0,
            wake: Notify::new(),
        })
    }

    /// Bounds the queue of local revocations waiting for Redis
    /// (`[revocation] max_pending_writes`, at least 1).
    pub fn with_max_pending(mut self, max_pending: usize) -> SyncHandle {
        self.max_pending = max_pending.max(1);
        self
    }

    /// Takes a place in the queue for a revocation about to be applied, or
    /// refuses it when `[revocation] max_pending_writes` are waiting (queued
    /// entries expired at `now` are dropped first: they enforce nothing).
    pub fn reserve(&self, now: i64) -> Result<Slot<'_>, RevocationError> {
        let mut queue = super::lock(&self.pending);
        if queue.items.len() + queue.reserved >= self.max_pending {
            queue.items.retain(|p| p.expires_at > now);
            if queue.items.len() + queue.reserved >= self.max_pending {
                return Err(RevocationError::QueueFull {
                    max_pending_writes: self.max_pending,
                });
            }
        }
        queue.reserved += 1;
        Ok(Slot {
            sync: self,
            used: false,
        })
    }

    /// The link's state.
    pub fn state(&self) -> RedisState {
        *self.state.borrow()
    }

    /// Poisons the pending queue, as a panic while holding it would.
    #[cfg(test)]
    pub(crate) fn poison_pending_for_test(&self) {
        super::test_support::poison(&self.pending);
    }

    /// Local revocations not yet written to Redis.
    pub fn pending(&self) -> usize {
        super::lock(&self.pending).items.len()
    }

    /// Resolves once the first full sync has completed.
    pub async fn wait_connected(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| *s == RedisState::Connected).await;
    }

    /// Queues `line` for Redis in the place `slot` reserved and waits briefly
    /// for the write; true if Redis confirmed it.
    pub async fn write(&self, slot: Slot<'_>, line: String, expires_at: i64) -> bool {
        self.write_many(vec![slot], vec![(line, expires_at)]).await
    }

    /// Queues every `(line, expiry)` of a batch at once, each in the place a
    /// slot reserved, and waits briefly for Redis to confirm them; true if it
    /// confirmed the whole batch. Queued together, they are written by one
    /// flush: one `MULTI`/`EXEC` transaction, not one round trip each. As
    /// with [`Self::write`], entries Redis does not confirm stay queued and
    /// are written once it is back.
    pub async fn write_many(&self, mut slots: Vec<Slot<'_>>, entries: Vec<(String, i64)>) -> bool {
        // Callers pass one slot per entry. Unneeded places are given back
        // before the queue is locked (giving one back locks it); an entry
        // without one is queued all the same (never dropped).
        slots.truncate(entries.len());
        let Some(last) = ({
            let mut queue = super::lock(&self.pending);
            let mut last = None;
            for (i, (line, expires_at)) in entries.into_iter().enumerate() {
                // Numbered under the lock: the queue stays in `seq` order, which
                // `flush` relies on to drop exactly what it wrote.
                let seq = self.next_seq.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some(slot) = slots.get_mut(i) {
                    queue.reserved = queue.reserved.saturating_sub(1);
                    slot.used = true;
                }
                queue.items.push(Pending {
                    seq,
                    line,
                    expires_at,
                });
                last = Some(seq);
            }
            last
        }) else {
            return false;
        };
        drop(slots);
        self.wake.notify_one();
        if self.state() != RedisState::Connected {
            return false;
        }
        let mut synced = self.synced.subscribe();
        matches!(
            tokio::time::timeout(WRITE_WAIT, synced.wait_for(|s| *s >= last)).await,
            Ok(Ok(_))
        )
    }

    fn set_state(&self, state: RedisState) {
        self.state.send_replace(state);
    }
}

/// Why a session ended.
enum End {
    /// Stop requested, or the store is gone.
    Stop,
    /// The link failed; `synced` says whether the session got as far as a full sync.
    Lost { error: String, synced: bool },
}

/// The sync task: sessions, reconnecting forever with capped backoff.
pub(super) async fn run(store: Weak<RevocationStore>, mut stop: watch::Receiver<bool>) {
    let retries = || {
        backon::BackoffBuilder::build(
            backon::ExponentialBuilder::new()
                .with_min_delay(MIN_BACKOFF)
                .with_max_delay(MAX_BACKOFF)
                .with_jitter()
                .without_max_times(),
        )
    };
    let mut backoff = retries();
    let mut failures: u64 = 0;
    loop {
        let end = session(&store, &mut stop).await;
        let Some(live) = store.upgrade() else { return };
        let Some(sync) = live.sync.as_ref() else {
            return;
        };
        // A session that got as far as a full sync starts the schedule again.
        if let End::Lost { synced: true, .. } = &end {
            backoff = retries();
        }
        // With jitter (up to the delay again, never past the cap), so that
        // instances do not reconnect in lock step.
        let delay = backoff.next().unwrap_or(MAX_BACKOFF).min(MAX_BACKOFF);
        match end {
            End::Stop => return,
            End::Lost { error, synced } => {
                if synced {
                    failures = 0;
                    sync.set_state(RedisState::Disconnected);
                    tracing::warn!(%error, "lost Redis; revocations known stay enforced, new ones are queued; reconnecting");
                } else {
                    failures += 1;
                    // Say it at once, then every tenth attempt, not every second.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(%error, attempts = failures, retry_in = ?delay, "cannot reach Redis; retrying");
                    }
                }
            }
        }
        drop(live);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn timed<T>(
    what: &str,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {TIMEOUT:?}")),
    }
}

async fn session(store: &Weak<RevocationStore>, stop: &mut watch::Receiver<bool>) -> End {
    let lost = |error: String, synced: bool| End::Lost { error, synced };
    let Some(live) = store.upgrade() else {
        return End::Stop;
    };
    let Some(sync) = live.sync.as_ref() else {
        return End::Stop;
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    let mut conn = match timed(
        "connect",
        sync.client
            .get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return lost(e, false),
    };
    let pubsub = match timed("connect (pub/sub)", sync.client.get_async_pubsub()).await {
        Ok(p) => p,
        Err(e) => return lost(e, false),
    };
    let (mut sink, mut messages) = pubsub.split();
    if let Err(e) = timed("SUBSCRIBE", sink.subscribe(&sync.channel)).await {
        return lost(e, false);
    }

    // Everything we know goes back to Redis (idempotent), then the queue.
    let known = live.lines();
    for chunk in known.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for (line, expires_at) in chunk {
            pipe.zadd(&sync.key, line, *expires_at).ignore();
        }
        if let Err(e) = timed("ZADD (resync)", pipe.query_async::<()>(&mut conn)).await {
            return lost(e, false);
        }
    }
    if let Err(e) = flush(sync, &mut conn).await {
        return lost(e, false);
    }
    // Then the full state, which holds everything published while we were away.
    match read_all(sync, &mut conn).await {
        Ok(lines) => {
            let fresh = live.apply_remote(lines).await;
            tracing::info!(
                applied = fresh,
                known = known.len(),
                "Redis connected: subscribed and in sync"
            );
        }
        Err(e) => return lost(e, false),
    }
    sync.set_state(RedisState::Connected);
    drop(live);

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        let Some(live) = store.upgrade() else {
            return End::Stop;
        };
        let Some(sync) = live.sync.as_ref() else {
            return End::Stop;
        };
        tokio::select! {
            msg = messages.next() => {
                let Some(msg) = msg else {
                    return lost("pub/sub connection closed".into(), true);
                };
                let mut lines = Vec::new();
                lines.extend(msg.get_payload::<String>().ok());
                // Apply whatever else has already arrived in the same batch.
                while let Some(Some(msg)) = messages.next().now_or_never() {
                    lines.extend(msg.get_payload::<String>().ok());
                }
                live.apply_published(lines).await;
            }
            _ = sync.wake.notified() => {
                if let Err(e) = flush(sync, &mut conn).await {
                    return lost(e, true);
                }
            }
            _ = tick.tick() => {
                if let Err(e) = timed("PING", redis::cmd("PING").query_async::<redis::Value>(&mut conn)).await {
                    return lost(e, true);
                }
                if let Err(e) = timed("PING (pub/sub)", sink.ping::<redis::Value>()).await {
                    return lost(e, true);
                }
                let mut expire = redis::cmd("ZREMRANGEBYSCORE");
                expire.arg(&sync.key).arg("-inf").arg(unix_now());
                if let Err(e) = timed("ZREMRANGEBYSCORE", expire.query_async::<()>(&mut conn)).await {
                    return lost(e, true);
                }
            }
            _ = stop.changed() => return End::Stop,
        }
    }
}

/// Writes and publishes every queued local revocation, in one transaction.
async fn flush(sync: &SyncHandle, conn: &mut MultiplexedConnection) -> Result<(), String> {
    let batch: Vec<Pending> = super::lock(&sync.pending).items.clone();
    let Some(last) = batch.last().map(|p| p.seq) else {
        return Ok(());
    };
    let mut pipe = redis::pipe();
    pipe.atomic();
    for p in &batch {
        pipe.zadd(&sync.key, &p.line, p.expires_at).ignore();
        pipe.publish(&sync.channel, &p.line).ignore();
    }
    timed("ZADD/PUBLISH", pipe.query_async::<()>(conn)).await?;
    super::lock(&sync.pending).items.retain(|p| p.seq > last);
    sync.synced.send_replace(last);
    Ok(())
}

async fn read_all(
    sync: &SyncHandle,
    conn: &mut MultiplexedConnection,
) -> Result<Vec<String>, String> {
    let now = unix_now();
    let mut expire = redis::cmd("ZREMRANGEBYSCORE");
    expire.arg(&sync.key).arg("-inf").arg(now);
    timed("ZREMRANGEBYSCORE", expire.query_async::<()>(conn)).await?;
    let mut read = redis::cmd("ZRANGEBYSCORE");
    read.arg(&sync.key).arg(format!("({now}")).arg("+inf");
    timed("ZRANGEBYSCORE", read.query_async::<Vec<String>>(conn)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_echoing_them() {
        assert!(SyncHandle::new("redis://127.0.0.1:6379/0", "p").is_ok());
        let tls = SyncHandle::new("rediss://:secret@redis.example.test:6380", "p").unwrap();
        assert!(!format!("{tls:?}").contains("secret"), "{tls:?}");
        let err = SyncHandle::new("http://:hunter2@redis.example.test", "p")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let handle = SyncHandle::new("redis://localhost", "acme").unwrap();
        assert_eq!(handle.key, "acme:revocations");
        assert_eq!(handle.channel, "acme:revocations:events");
        assert_eq!(handle.state(), RedisState::Connecting);
    }
}
