//! Shared mode: revocations shared by every instance through Redis.
//!
//! State in Redis, under `[revocation] redis_prefix`:
//! - `<prefix>:revocations`: the snapshot, a sorted set whose members are the
//!   entries' JSON lines, scored by their expiry (seconds since the epoch).
//!   Expired members are removed with `ZREMRANGEBYSCORE`.
//! - `<prefix>:revocations:events`: the pub/sub channel each new entry is
//!   announced on, for instances to enforce it at once.
//! - `<prefix>:revocations:log`: a stream of the same new entries (field `l`),
//!   the last [`LOG_CAP`] or so kept (`XADD … MAXLEN ~`): what an instance
//!   that was away reads to catch up, instead of the whole snapshot.
//! - `<prefix>:revocations:epoch`: a random value set once (`SET NX`); a Redis
//!   that lost its data (restarted without persistence, flushed) has a new one.
//!
//! A new entry is written with `ZADD`, `XADD` and `PUBLISH` in one
//! `MULTI`/`EXEC` transaction.
//!
//! One task per instance keeps the link. Each instance remembers its
//! *position*: the epoch and the last log entry it has read. Each session:
//! 1. connects (a multiplexed connection for commands, one for pub/sub) and
//!    `SUBSCRIBE`s;
//! 2. **resumes** when it can: same epoch, and the log still holds the entry
//!    at its position (nothing it has not read was trimmed or lost). It reads
//!    the log after its position and applies it, then writes back the
//!    entries it learned since the log last confirmed its position (a
//!    failover may have lost Redis' last writes) and writes and publishes the
//!    queued local revocations: a reconnect after a short outage transfers
//!    only what changed;
//! 3. otherwise makes a **full** sync: notes the log's last entry, writes
//!    every entry it knows back with `ZADD` (idempotent: entries queued while
//!    Redis was away, or lost by a Redis that restarted without persistence,
//!    rolled back or failed over, are restored; skipped when the log was only
//!    trimmed past the position, as nothing was lost), writes the queue, then
//!    reads the whole snapshot. A new instance does this once;
//! 4. applies published entries as they arrive, writes new local revocations,
//!    and every 2 seconds pings both connections, drops expired members and
//!    reads the log after its position (which confirms the position and
//!    catches anything pub/sub did not deliver).
//!
//! Any error ends the session; the task reconnects forever with exponential
//! backoff capped at 500 ms, so that every instance is back soon after Redis
//! is, and revocations made during an outage spread without waiting. Meanwhile
//! the known entries stay enforced and new local revocations are enforced,
//! journaled and queued.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, watch};
use tokio_stream::StreamExt as _;

use super::{RedisState, RevocationError, RevocationStore, unix_now};

/// First retry delay after a lost connection.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay: short, because a revocation made during an outage
/// reaches the other instances only once both ends have reconnected; two
/// attempts a second per instance cost Redis nothing.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Connect and command timeout.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Liveness pings and expiry of old members.
const TICK: Duration = Duration::from_secs(2);
/// How long `Revoke` waits for Redis to confirm a write before answering
/// "queued".
const WRITE_WAIT: Duration = Duration::from_secs(1);
/// Members per `ZADD` pipeline during a resync.
const CHUNK: usize = 1000;
/// Entries the log keeps, about (`XADD … MAXLEN ~`): an instance away for
/// fewer new entries than this catches up from the log; one away for more
/// reads the snapshot.
pub const LOG_CAP: usize = 200_000;
/// Log entries per `XRANGE` page.
const LOG_PAGE: usize = 10_000;
/// Log pages read per tick while connected (the rest on the next tick).
const LOG_PAGES_PER_TICK: usize = 20;
/// Entries learned remembered at most; past it, a resume writes back every
/// known entry instead.
const RECENT_CAP: usize = 100_000;

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

/// Where an instance is in the shared log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    /// The epoch of the Redis data the position belongs to.
    epoch: String,
    /// The last log entry read (a stream ID).
    last: StreamId,
}

/// A stream entry ID, `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct StreamId(u64, u64);

impl StreamId {
    fn parse(id: &str) -> Option<StreamId> {
        let (ms, seq) = id.split_once('-')?;
        Some(StreamId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Entries this instance learned since the log last confirmed its position
/// (its own writes and entries received), written back when it resumes: a
/// failover may lose Redis' last writes, after the position.
#[derive(Debug, Default)]
struct Recent {
    lines: VecDeque<(Instant, String)>,
    /// More than [`RECENT_CAP`] were learned since the log last confirmed
    /// the position: a resume writes back everything known instead.
    overflowed: bool,
}

/// How a session brought this instance in step with Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// Read the whole snapshot (a new instance, or the log could not be
    /// followed).
    Full,
    /// Read only the log entries after its position.
    Incremental,
}

/// The shared-mode link of one store: Redis client, queue and state.
#[derive(Debug)]
pub struct SyncHandle {
    client: redis::Client,
    key: String,
    channel: String,
    log: String,
    epoch_key: String,
    position: Mutex<Option<Position>>,
    recent: Mutex<Recent>,
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
            log: format!("{prefix}:revocations:log"),
            epoch_key: format!("{prefix}:revocations:epoch"),
            position: Mutex::new(None),
            recent: Mutex::new(Recent::default()),
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

    /// Remembers entries just learned (received or written), for the
    /// write-back of the next resume.
    pub(super) fn remember<'a>(&self, lines: impl IntoIterator<Item = &'a String>) {
        let now = Instant::now();
        let mut recent = super::lock(&self.recent);
        for line in lines {
            if recent.lines.len() >= RECENT_CAP {
                recent.lines.pop_front();
                recent.overflowed = true;
            }
            recent.lines.push_back((now, line.clone()));
        }
    }

    /// Forgets entries learned before `cutoff`, when a read of the log that
    /// began then reached its end: they are at or before the position (an
    /// entry is logged before it is published or confirmed), and Redis keeps
    /// the log up to the position.
    fn forget_before(&self, cutoff: Instant) {
        let mut recent = super::lock(&self.recent);
        while recent.lines.front().is_some_and(|(at, _)| *at < cutoff) {
            recent.lines.pop_front();
        }
        if recent.lines.is_empty() {
            recent.overflowed = false;
        }
    }

    /// The last entry of the shared log this instance has read (a stream ID),
    /// once it has synced.
    pub fn log_position(&self) -> Option<String> {
        self.position().map(|p| p.last.to_string())
    }

    fn position(&self) -> Option<Position> {
        super::lock(&self.position).clone()
    }

    fn set_position(&self, position: Position) {
        *super::lock(&self.position) = Some(position);
    }
}

/// Why a session ended.
enum End {
    /// Stop requested, or the store is gone.
    Stop,
    /// The link failed; `synced` says whether the session got as far as a sync (full or resumed).
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
        // A session that got in sync starts the schedule again.
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

    if let Err(e) = resync(&live, sync, &mut conn).await {
        return lost(e, false);
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
                // Follow the log: confirms the position, catches anything
                // pub/sub did not deliver, and notices a Redis that lost
                // its data (new epoch) or a log trimmed past the position.
                if let Err(e) = follow(&live, sync, &mut conn).await {
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
        pipe.add_command(log_append(sync, &p.line)).ignore();
        pipe.publish(&sync.channel, &p.line).ignore();
    }
    timed("ZADD/XADD/PUBLISH", pipe.query_async::<()>(conn)).await?;
    sync.remember(batch.iter().map(|p| &p.line));
    super::lock(&sync.pending).items.retain(|p| p.seq > last);
    sync.synced.send_replace(last);
    Ok(())
}

/// `XADD <log> MAXLEN ~ LOG_CAP * l <line>`.
fn log_append(sync: &SyncHandle, line: &str) -> redis::Cmd {
    let mut xadd = redis::cmd("XADD");
    xadd.arg(&sync.log)
        .arg("MAXLEN")
        .arg("~")
        .arg(LOG_CAP)
        .arg("*")
        .arg("l")
        .arg(line);
    xadd
}

/// Whether this instance can follow the log from where it was.
#[derive(Debug, PartialEq, Eq)]
enum Continuity {
    /// Same data, and every entry after the position is still in the log.
    Unbroken(Position),
    /// The log was trimmed past the position: nothing was lost, but what was
    /// trimmed must be read from the snapshot.
    Trimmed,
    /// Redis lost data this instance may hold (new epoch: restarted without
    /// persistence or flushed; or the position's entry is gone though the log
    /// does not start after it: rolled back), or there is no position yet.
    Lost,
}

/// The epoch of Redis' data, set now if there is none (`SET NX`).
async fn epoch(sync: &SyncHandle, conn: &mut MultiplexedConnection) -> Result<String, String> {
    let fresh = uuid::Uuid::now_v7().to_string();
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(&sync.epoch_key)
        .arg(&fresh)
        .arg("NX")
        .ignore();
    pipe.cmd("GET").arg(&sync.epoch_key);
    let (epoch,): (Option<String>,) = timed("SET NX/GET (epoch)", pipe.query_async(conn)).await?;
    epoch.ok_or_else(|| "GET (epoch): no epoch".to_owned())
}

/// Log entries as `XRANGE` returns them: (ID, [field, value, ...]).
type LogEntries = Vec<(String, Vec<String>)>;

async fn log_range(
    sync: &SyncHandle,
    conn: &mut MultiplexedConnection,
    command: &str,
    from: &str,
    to: &str,
    count: usize,
) -> Result<LogEntries, String> {
    let mut range = redis::cmd(command);
    range
        .arg(&sync.log)
        .arg(from)
        .arg(to)
        .arg("COUNT")
        .arg(count);
    timed(command, range.query_async::<LogEntries>(conn)).await
}

async fn continuity(
    sync: &SyncHandle,
    conn: &mut MultiplexedConnection,
) -> Result<Continuity, String> {
    let Some(position) = sync.position() else {
        return Ok(Continuity::Lost);
    };
    if epoch(sync, conn).await? != position.epoch {
        return Ok(Continuity::Lost);
    }
    let at = position.last.to_string();
    if !log_range(sync, conn, "XRANGE", &at, &at, 1)
        .await?
        .is_empty()
    {
        return Ok(Continuity::Unbroken(position));
    }
    let first = log_range(sync, conn, "XRANGE", "-", "+", 1).await?;
    let first = first.first().and_then(|(id, _)| StreamId::parse(id));
    Ok(match first {
        Some(first) if first > position.last => Continuity::Trimmed,
        _ => Continuity::Lost,
    })
}

/// Brings this instance in step at the start of a session: resumes from its
/// position when the log allows, else a full sync.
async fn resync(
    live: &RevocationStore,
    sync: &SyncHandle,
    conn: &mut MultiplexedConnection,
) -> Result<Resync, String> {
    let started = Instant::now();
    let known = live.status_count();
    let (kind, read) = match continuity(sync, conn).await? {
        Continuity::Unbroken(position) => {
            // What Redis may have lost in a failover: what we learned since
            // the log last confirmed our position (everything, if too much).
            // Taken after `began`, so whatever is forgotten below was in it.
            let began = Instant::now();
            let (overflowed, recent) = {
                let recent = super::lock(&sync.recent);
                let lines: Vec<String> = recent.lines.iter().map(|(_, l)| l.clone()).collect();
                (recent.overflowed, lines)
            };
            // Enforce what was missed first, then repair Redis.
            let (read, _) = read_log(live, sync, conn, position, usize::MAX).await?;
            let lines: Vec<(String, i64)> = if overflowed {
                live.lines()
            } else {
                recent
                    .into_iter()
                    .filter_map(|line| {
                        let entry = serde_json::from_str::<super::Revocation>(&line).ok()?;
                        Some((line, entry.expires_at))
                    })
                    .collect()
            };
            write_back(sync, conn, &lines).await?;
            flush(sync, conn).await?;
            sync.forget_before(began);
            (Resync::Incremental, read)
        }
        Continuity::Trimmed => (Resync::Full, full_sync(live, sync, conn, false).await?),
        Continuity::Lost => (Resync::Full, full_sync(live, sync, conn, true).await?),
    };
    live.stats.record_resync(kind, read);
    tracing::info!(
        resync = ?kind,
        read,
        known,
        took = ?started.elapsed(),
        "Redis connected: subscribed and in sync"
    );
    Ok(kind)
}

/// Writes `lines` back to the snapshot (`ZADD`, idempotent), in pipelines of
/// [`CHUNK`]. The members Redis did not have are also appended to the log and
/// published: instances that follow the log (they resume from their position,
/// never reading the snapshot) learn them too. That is how the journal of an
/// instance restarted while its revocations were queued reaches the others.
async fn write_back(
    sync: &SyncHandle,
    conn: &mut MultiplexedConnection,
    lines: &[(String, i64)],
) -> Result<(), String> {
    for chunk in lines.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for (line, expires_at) in chunk {
            pipe.zadd(&sync.key, line, *expires_at);
        }
        let added: Vec<i64> = timed("ZADD (resync)", pipe.query_async(conn)).await?;
        let mut announce = redis::pipe();
        announce.atomic();
        let mut missing = 0;
        for ((line, _), added) in chunk.iter().zip(added) {
            if added > 0 {
                announce.add_command(log_append(sync, line)).ignore();
                announce.publish(&sync.channel, line).ignore();
                missing += 1;
            }
        }
        if missing > 0 {
            timed("XADD/PUBLISH (resync)", announce.query_async::<()>(conn)).await?;
        }
    }
    Ok(())
}

/// A full sync: note the log's end (adding a marker if the log is empty, so
/// that there is an entry to resume from), write back what this instance
/// knows if Redis may have lost it, write the queue, read the snapshot.
/// Returns the entries read.
async fn full_sync(
    live: &RevocationStore,
    sync: &SyncHandle,
    conn: &mut MultiplexedConnection,
    write_everything_back: bool,
) -> Result<usize, String> {
    let began = Instant::now();
    let epoch = epoch(sync, conn).await?;
    let last = log_range(sync, conn, "XREVRANGE", "+", "-", 1).await?;
    let last = match last.first() {
        Some((id, _)) => id.clone(),
        None => {
            // The marker's `l` is empty; readers skip it.
            let marker = log_append(sync, "");
            timed("XADD (marker)", marker.query_async::<String>(conn)).await?
        }
    };
    let last = StreamId::parse(&last).ok_or_else(|| format!("XADD: unexpected ID {last:?}"))?;
    if write_everything_back {
        write_back(sync, conn, &live.lines()).await?;
    }
    flush(sync, conn).await?;
    let lines = read_all(sync, conn).await?;
    let read = lines.len();
    live.apply_remote(lines).await;
    // Entries added to the log after `last` were either in the snapshot just
    // read or are read from the log next: applied twice at worst, never missed.
    sync.set_position(Position { epoch, last });
    // What was learned before is at or before `last`.
    sync.forget_before(began);
    Ok(read)
}

/// Reads the log after `position` in pages of [`LOG_PAGE`] (at most
/// `max_pages`), applying each page and moving the position after it.
/// Returns the entries read and whether the read reached the log's end.
async fn read_log(
    live: &RevocationStore,
    sync: &SyncHandle,
    conn: &mut MultiplexedConnection,
    mut position: Position,
    max_pages: usize,
) -> Result<(usize, bool), String> {
    let mut read = 0;
    for _ in 0..max_pages {
        let after = format!("({}", position.last);
        let page = log_range(sync, conn, "XRANGE", &after, "+", LOG_PAGE).await?;
        let Some(last) = page.last().and_then(|(id, _)| StreamId::parse(id)) else {
            return Ok((read, true));
        };
        let full = page.len() == LOG_PAGE;
        read += page.len();
        let lines: Vec<String> = page
            .into_iter()
            .filter_map(|(_, fields)| {
                let mut fields = fields.into_iter();
                while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    if name == "l" {
                        return Some(value);
                    }
                }
                None
            })
            .collect();
        live.apply_remote(lines).await;
        position.last = last;
        sync.set_position(position.clone());
        if !full {
            return Ok((read, true));
        }
    }
    Ok((read, false))
}

/// The tick's look at the log while connected: reads what was added after
/// the position, or makes a full sync when the log cannot be followed.
async fn follow(
    live: &RevocationStore,
    sync: &SyncHandle,
    conn: &mut MultiplexedConnection,
) -> Result<(), String> {
    match continuity(sync, conn).await? {
        Continuity::Unbroken(position) => {
            let began = Instant::now();
            let (_, at_end) = read_log(live, sync, conn, position, LOG_PAGES_PER_TICK).await?;
            if at_end {
                sync.forget_before(began);
            }
        }
        // Trimmed past while connected: everything trimmed arrived through
        // pub/sub, but read the snapshot to be sure rather than trust that.
        Continuity::Trimmed => {
            let read = full_sync(live, sync, conn, false).await?;
            live.stats.record_resync(Resync::Full, read);
        }
        Continuity::Lost => {
            tracing::warn!(
                "Redis lost revocation data (new epoch or rolled back); writing back every entry known here"
            );
            let read = full_sync(live, sync, conn, true).await?;
            live.stats.record_resync(Resync::Full, read);
        }
    }
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
