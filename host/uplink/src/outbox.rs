//! The durable outbox: every message for the cloud is committed to SQLite before anyone
//! is told "accepted", and deleted only after the broker's QoS 1 acknowledgement.
//!
//! * **Group commit.** Writers hand their messages to one writer task, which commits
//!   everything that queued up while the previous commit ran in a single transaction, so
//!   the fsync per commit does not cap throughput.
//! * **Bounded.** By message count and payload bytes. Telemetry is refused at the limit
//!   with [`OutboxError::Full`] and counted; control and state messages (registrations,
//!   claims, results) may use a reserve of a tenth beyond it, so a telemetry flood never
//!   crowds out a deployment result.
//! * **Time to live.** Each message expires (default 7200 s, as Azure IoT Edge); expired
//!   messages are deleted and counted, never sent.
//! * **Priorities.** [`Priority::Control`] before [`Priority::State`] before
//!   [`Priority::Telemetry`]; in order of writing within a class.
//! * **Lanes.** A device with a cloud identity of its own (see [`Outbox::open_with_lanes`])
//!   has its telemetry and state in a lane of its own, which only its connection reads
//!   ([`Outbox::fetch_lane`]); everything else is the gateway's lane ([`Outbox::fetch`]).
//!   A lane that cannot deliver holds back nothing of the others'.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outpost_store::rusqlite::params;
use outpost_store::{Store, StoreError};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::now_millis;

/// How much of the limits control and state messages may use beyond them.
const RESERVE_DIVISOR: u64 = 10;
/// The most messages one commit takes.
const BATCH: usize = 4096;
/// How often expired messages are swept (also while the uplink is down).
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Payload bytes the in-memory tail of fresh commits may hold (see [`Mirror`]).
const MIRROR_BYTES: usize = 16 * 1024 * 1024;

/// Delivery class; lower goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Registrations, claims, command results.
    Control = 0,
    /// Lobby events, reported state, deployment results.
    State = 1,
    /// Device telemetry.
    Telemetry = 2,
}

impl Priority {
    /// All classes, in delivery order.
    pub const ALL: [Priority; 3] = [Priority::Control, Priority::State, Priority::Telemetry];

    /// The class's name in stats and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Control => "control",
            Self::State => "state",
            Self::Telemetry => "telemetry",
        }
    }
}

/// The outbox's bounds.
#[derive(Clone, Copy, Debug)]
pub struct OutboxLimits {
    /// Messages held at most (telemetry; control and state get a tenth more).
    pub max_messages: u64,
    /// Payload bytes held at most (likewise).
    pub max_bytes: u64,
    /// Time to live of a message that names none.
    pub default_ttl: Duration,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            max_messages: 1_000_000,
            max_bytes: 512 * 1024 * 1024,
            default_ttl: Duration::from_secs(7200),
        }
    }
}

/// A message to queue.
#[derive(Clone, Debug)]
pub struct Message {
    /// Unique id (also inside the payload) so the cloud can de-duplicate.
    pub message_id: String,
    /// The MQTT topic.
    pub topic: String,
    /// The payload (JSON per the contract).
    pub payload: Vec<u8>,
    /// Its class.
    pub priority: Priority,
    /// Publish retained.
    pub retain: bool,
    /// Time to live; `None` takes the default.
    pub ttl: Option<Duration>,
}

/// A queued message, as the publisher takes it.
#[derive(Clone, Debug)]
pub struct Queued {
    /// Position in the outbox (the acknowledgement names it).
    pub seq: i64,
    /// The message's unique id (a dialect may carry it beside the payload).
    pub message_id: String,
    /// The MQTT topic.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// Publish retained.
    pub retain: bool,
    /// Its class.
    pub priority: Priority,
    /// When it expires (unix milliseconds): MQTT 5 tells the broker.
    pub expires_at: i64,
}

/// What the outbox holds and has done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    /// Messages waiting.
    pub queued: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Messages refused because the outbox was full (since the database was created).
    pub refused: u64,
    /// Messages dropped because their time to live ran out.
    pub expired: u64,
    /// Messages acknowledged by the broker.
    pub delivered: u64,
    /// The message limit.
    pub max_messages: u64,
    /// The byte limit.
    pub max_bytes: u64,
}

/// Why a message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The outbox is at its limit; nothing was queued.
    #[error(
        "the outbox is full ({queued} messages, {bytes} bytes queued; limits {max_messages} \
         messages, {max_bytes} bytes): the message was refused and counted. It drains when \
         the uplink delivers; raise the [outbox] limits (max_messages, max_size_mib) if this is \
         normal for the site"
    )]
    Full {
        /// Messages queued.
        queued: u64,
        /// Bytes queued.
        bytes: u64,
        /// The message limit.
        max_messages: u64,
        /// The byte limit.
        max_bytes: u64,
    },
    /// One payload is larger than the contract allows.
    #[error("a {size}-byte payload is larger than the {max} bytes the cloud contract allows")]
    TooLarge {
        /// The payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The database failed; nothing was queued.
    #[error("the outbox could not write to the state database: {0}")]
    Store(#[from] StoreError),
    /// The outbox was shut down.
    #[error("the outbox is shut down")]
    Closed,
}

struct Write {
    messages: Vec<Message>,
    bytes: u64,
    done: oneshot::Sender<Result<(), OutboxError>>,
}

/// What the writer task commits: new messages, and deletions of acknowledged ones. Both
/// kinds that queued up while the previous commit ran share one transaction (one fsync).
enum Work {
    Write(Write),
    Ack {
        seqs: Vec<i64>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
}

#[derive(Default)]
struct Usage {
    messages: u64,
    bytes: u64,
}

/// The freshest committed messages of the gateway's lane, kept in memory so the
/// publisher need not read back what was just written: per class, **every** committed
/// row of that lane with `seq > floor` is here, in order. Serving a message pops it and raises the floor to it; when the bytes
/// exceed [`MIRROR_BYTES`] the oldest are dropped the same way. A publisher whose cursor
/// is below the floor (after a reconnect, a restart, or an overflow) reads SQLite
/// instead until it catches up. SQLite stays the only record: nothing is deleted or
/// acknowledged here.
#[derive(Default)]
struct Mirror {
    classes: [VecDeque<Live>; 3],
    floor: [i64; 3],
    bytes: usize,
}

struct Live {
    queued: Queued,
    expires_at: i64,
}

impl Mirror {
    fn push(&mut self, live: Live) {
        let class = live.queued.priority as usize;
        self.bytes += live.queued.payload.len();
        self.classes[class].push_back(live);
        while self.bytes > MIRROR_BYTES {
            // Drop the oldest of the largest class; its floor rises past it.
            let Some(fullest) = (0..3).max_by_key(|c| self.classes[*c].len()) else {
                break;
            };
            let Some(dropped) = self.classes[fullest].pop_front() else {
                break;
            };
            self.take(fullest, &dropped);
        }
    }

    fn take(&mut self, class: usize, live: &Live) {
        self.bytes -= live.queued.payload.len();
        self.floor[class] = self.floor[class].max(live.queued.seq);
    }
}

struct Inner {
    store: Store,
    limits: OutboxLimits,
    /// The devices with a lane of their own.
    lanes: std::collections::BTreeSet<String>,
    /// Counts commits that wrote to a device's lane (their connections wait on it).
    lane_commits: watch::Sender<u64>,
    usage: Mutex<Usage>,
    mirror: Mutex<Mirror>,
    writes: mpsc::Sender<Work>,
    ready: Notify,
    refused_unsaved: AtomicU64,
    refused: AtomicU64,
    expired: AtomicU64,
    delivered: AtomicU64,
}

/// The outbox handle; clones share one writer.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Outbox {
    /// Opens the outbox on `store` and starts its writer, which runs until `shutdown`
    /// (then commits what it was handed and ends). Await the returned handle before
    /// closing the store.
    pub async fn open(
        store: Store,
        limits: OutboxLimits,
        shutdown: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        Self::open_with_lanes(store, limits, std::collections::BTreeSet::new(), shutdown).await
    }

    /// As [`open`](Self::open), with a lane for each of `lanes` (device ids): their
    /// telemetry, lobby events and reported state ([`contract::lane_device`]) are
    /// fetched with [`fetch_lane`](Self::fetch_lane) only. Rows of a lane no longer
    /// configured go back to the gateway's lane, so nothing waits for a connection
    /// that will never come.
    ///
    /// [`contract::lane_device`]: crate::contract::lane_device
    pub async fn open_with_lanes(
        store: Store,
        limits: OutboxLimits,
        lanes: std::collections::BTreeSet<String>,
        shutdown: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let kept: Vec<String> = lanes.iter().cloned().collect();
        let (messages, bytes, high, refused, expired, delivered) = store
            .call(move |conn| {
                let returned = {
                    let mut lanes = conn.prepare("SELECT DISTINCT lane FROM outbox WHERE lane != ''")?;
                    let found = lanes
                        .query_map([], |row| row.get::<_, String>(0))?
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut returned = 0;
                    for lane in found.iter().filter(|lane| !kept.contains(lane)) {
                        returned += conn.execute("UPDATE outbox SET lane = '' WHERE lane = ?1", [lane])?;
                    }
                    returned
                };
                if returned > 0 {
                    tracing::info!(messages = returned, "messages of devices without an identity of their own any more go through the gateway");
                }
                let (messages, bytes, high): (i64, i64, i64) = conn.query_row(
                    "SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(max(seq), 0) \
                     FROM outbox",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )?;
                let counter = |name: &str| -> Result<i64, StoreError> {
                    Ok(conn.query_row(
                        "SELECT value FROM outbox_counters WHERE name = ?1",
                        [name],
                        |row| row.get(0),
                    )?)
                };
                Ok((
                    messages,
                    bytes,
                    high,
                    counter("refused")?,
                    counter("expired")?,
                    counter("delivered")?,
                ))
            })
            .await?;
        let (writes, inbox) = mpsc::channel(BATCH * 4);
        let inner = Arc::new(Inner {
            store,
            limits,
            lanes,
            lane_commits: watch::Sender::new(0),
            usage: Mutex::new(Usage {
                messages: to_u64(messages),
                bytes: to_u64(bytes),
            }),
            // What is queued already is in SQLite only.
            mirror: Mutex::new(Mirror {
                floor: [high; 3],
                ..Mirror::default()
            }),
            writes,
            ready: Notify::new(),
            refused_unsaved: AtomicU64::new(0),
            refused: AtomicU64::new(to_u64(refused)),
            expired: AtomicU64::new(to_u64(expired)),
            delivered: AtomicU64::new(to_u64(delivered)),
        });
        let writer = tokio::spawn(writer(Arc::clone(&inner), inbox, shutdown));
        Ok((Self { inner }, writer))
    }

    /// Queues one message durably: returns once it is committed.
    pub async fn enqueue(&self, message: Message) -> Result<(), OutboxError> {
        self.enqueue_all(vec![message]).await
    }

    /// Queues several messages durably, all or none.
    pub async fn enqueue_all(&self, messages: Vec<Message>) -> Result<(), OutboxError> {
        if messages.is_empty() {
            return Ok(());
        }
        for message in &messages {
            if message.payload.len() > crate::contract::MAX_PAYLOAD {
                return Err(OutboxError::TooLarge {
                    size: message.payload.len(),
                    max: crate::contract::MAX_PAYLOAD,
                });
            }
        }
        let count = messages.len() as u64;
        let bytes: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
        let reserve_allowed = messages.iter().all(|m| m.priority != Priority::Telemetry);
        if let Err(full) = self.reserve(count, bytes, reserve_allowed) {
            for message in &messages {
                metrics::counter!(crate::metrics::OUTBOX_REFUSED, "priority" => message.priority.name())
                    .increment(1);
            }
            return Err(full);
        }
        let (done, answer) = oneshot::channel();
        let sent = self
            .inner
            .writes
            .send(Work::Write(Write {
                messages,
                bytes,
                done,
            }))
            .await;
        if sent.is_err() {
            self.release(count, bytes);
            return Err(OutboxError::Closed);
        }
        answer.await.map_err(|_| OutboxError::Closed)?
    }

    fn reserve(&self, count: u64, bytes: u64, reserve_allowed: bool) -> Result<(), OutboxError> {
        let limits = &self.inner.limits;
        let (max_messages, max_bytes) = if reserve_allowed {
            (
                limits.max_messages + limits.max_messages / RESERVE_DIVISOR,
                limits.max_bytes + limits.max_bytes / RESERVE_DIVISOR,
            )
        } else {
            (limits.max_messages, limits.max_bytes)
        };
        let mut usage = self.inner.usage.lock().expect("outbox usage lock");
        if usage.messages + count > max_messages || usage.bytes + bytes > max_bytes {
            let full = OutboxError::Full {
                queued: usage.messages,
                bytes: usage.bytes,
                max_messages: limits.max_messages,
                max_bytes: limits.max_bytes,
            };
            drop(usage);
            self.inner.refused.fetch_add(count, Ordering::Relaxed);
            self.inner
                .refused_unsaved
                .fetch_add(count, Ordering::Relaxed);
            return Err(full);
        }
        usage.messages += count;
        usage.bytes += bytes;
        Ok(())
    }

    fn release(&self, count: u64, bytes: u64) {
        self.inner.release(count, bytes);
    }

    /// Waits until something new was committed since the last call (or returns at once
    /// if that happened already).
    pub async fn committed(&self) {
        self.inner.ready.notified().await;
    }

    /// Up to `limit` unexpired messages of the gateway's lane in delivery order, after
    /// `cursors[class]` in each class, and advances the cursors past what it returns (and past what it found
    /// nothing beyond). The publisher keeps the cursors; all zero after a reconnect
    /// starts over from the oldest unacknowledged message.
    pub async fn fetch(
        &self,
        cursors: &mut [i64; 3],
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        self.fetch_from("", cursors, limit).await
    }

    /// As [`fetch`](Self::fetch), for the lane of the device `lane` (read from SQLite:
    /// a device's own connection carries a device's traffic, not a flood).
    pub async fn fetch_lane(
        &self,
        lane: &str,
        cursors: &mut [i64; 3],
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        if lane.is_empty() {
            return Ok(Vec::new());
        }
        self.fetch_from(lane, cursors, limit).await
    }

    /// Up to `limit` messages of `lane` ('': the gateway's, served from the mirror when
    /// it can) in delivery order.
    async fn fetch_from(
        &self,
        lane: &str,
        cursors: &mut [i64; 3],
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        let mut out = Vec::new();
        for class in Priority::ALL {
            let c = class as usize;
            let want = limit - out.len();
            if want == 0 {
                break;
            }
            if lane.is_empty() && self.take_mirrored(c, &mut cursors[c], want, &mut out) {
                continue;
            }
            let (rows, high) = self.read_class(lane, class, cursors[c], want).await?;
            cursors[c] = cursors[c].max(high);
            out.extend(rows);
        }
        Ok(out)
    }

    /// A watch that changes when a commit wrote to some device's lane (the device
    /// connections wait on it, then fetch their own).
    pub fn lane_commits(&self) -> watch::Receiver<u64> {
        self.inner.lane_commits.subscribe()
    }

    /// Whether `device` has a lane of its own.
    pub fn has_lane(&self, device: &str) -> bool {
        self.inner.lanes.contains(device)
    }

    /// Up to `want` unexpired rows of `lane` and `class` after `after`, and the seq up to
    /// which the class is seen.
    async fn read_class(
        &self,
        lane: &str,
        class: Priority,
        after: i64,
        want: usize,
    ) -> Result<(Vec<Queued>, i64), StoreError> {
        let lane = lane.to_owned();
        self.inner
            .store
            .call(move |conn| {
                let now = now_millis();
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, topic, payload, retain, message_id, expires_at FROM outbox \
                     WHERE lane = ?5 AND priority = ?1 AND seq > ?2 AND expires_at > ?3 \
                     ORDER BY seq LIMIT ?4",
                )?;
                let mut rows = stmt.query(params![class as i64, after, now, want as i64, lane])?;
                let mut out = Vec::new();
                let mut last = after;
                while let Some(row) = rows.next()? {
                    last = row.get(0)?;
                    out.push(Queued {
                        seq: last,
                        message_id: row.get(4)?,
                        topic: row.get(1)?,
                        payload: Bytes::from(row.get::<_, Vec<u8>>(2)?),
                        retain: row.get::<_, i64>(3)? != 0,
                        priority: class,
                        expires_at: row.get(5)?,
                    });
                }
                drop(rows);
                // Nothing more in this class: everything up to the newest row is seen (a
                // later insert takes a larger seq).
                let high = if out.len() < want {
                    conn.query_row("SELECT coalesce(max(seq), 0) FROM outbox", [], |row| {
                        row.get(0)
                    })?
                } else {
                    last
                };
                Ok((out, high))
            })
            .await
    }

    /// Serves class `c` from the mirror when it holds everything after `cursor`.
    fn take_mirrored(
        &self,
        c: usize,
        cursor: &mut i64,
        want: usize,
        out: &mut Vec<Queued>,
    ) -> bool {
        let now = now_millis();
        let mut mirror = self.inner.mirror.lock().expect("outbox mirror lock");
        if *cursor < mirror.floor[c] {
            return false;
        }
        let mut taken = 0;
        while taken < want {
            let Some(live) = mirror.classes[c].pop_front() else {
                break;
            };
            mirror.take(c, &live);
            if live.queued.seq <= *cursor {
                continue;
            }
            *cursor = live.queued.seq;
            if live.expires_at > now {
                out.push(live.queued);
                taken += 1;
            }
        }
        true
    }

    /// Deletes acknowledged messages (unknown or already expired seqs are ignored);
    /// returns once the deletion is committed. Deletions ride along with the next group
    /// commit of new messages: a deletion lost to a crash only means a redelivery, which
    /// the message id lets the cloud recognise.
    pub async fn ack(&self, seqs: Vec<i64>) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (done, answer) = oneshot::channel();
        self.inner
            .writes
            .send(Work::Ack { seqs, done })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// The current figures.
    pub fn stats(&self) -> OutboxStats {
        let usage = self.inner.usage.lock().expect("outbox usage lock");
        OutboxStats {
            queued: usage.messages,
            bytes: usage.bytes,
            refused: self.inner.refused.load(Ordering::Relaxed),
            expired: self.inner.expired.load(Ordering::Relaxed),
            delivered: self.inner.delivered.load(Ordering::Relaxed),
            max_messages: self.inner.limits.max_messages,
            max_bytes: self.inner.limits.max_bytes,
        }
    }

    /// Messages and payload bytes queued per priority, read from the database (for
    /// `/metrics`; [`stats`](Self::stats) has the totals without a query).
    pub async fn depth(&self) -> Result<Vec<(Priority, u64, u64)>, StoreError> {
        let counted: Vec<(i64, i64, i64)> = self
            .inner
            .store
            .call(|conn| {
                let mut query = conn.prepare_cached(
                    "SELECT priority, count(*), coalesce(sum(length(payload)), 0) FROM outbox \
                     GROUP BY priority",
                )?;
                let rows = query
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        Ok(Priority::ALL
            .into_iter()
            .map(|priority| {
                let (_, messages, bytes) = counted
                    .iter()
                    .find(|(p, _, _)| *p == priority as i64)
                    .copied()
                    .unwrap_or_default();
                (priority, to_u64(messages), to_u64(bytes))
            })
            .collect())
    }

    /// The store the outbox writes to.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
}

impl Inner {
    fn release(&self, count: u64, bytes: u64) {
        let mut usage = self.usage.lock().expect("outbox usage lock");
        usage.messages = usage.messages.saturating_sub(count);
        usage.bytes = usage.bytes.saturating_sub(bytes);
    }
}

async fn writer(inner: Arc<Inner>, mut inbox: mpsc::Receiver<Work>, shutdown: CancellationToken) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            received = inbox.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    break;
                }
                commit(&inner, std::mem::take(&mut batch)).await;
            }
            _ = sweep.tick() => housekeeping(&inner).await,
            () = shutdown.cancelled() => {
                // Commit what was already handed over, then stop taking more.
                inbox.close();
                while inbox.recv_many(&mut batch, BATCH).await > 0 {
                    commit(&inner, std::mem::take(&mut batch)).await;
                }
                housekeeping(&inner).await;
                break;
            }
        }
    }
}

async fn commit(inner: &Arc<Inner>, work: Vec<Work>) {
    let refused = inner.refused_unsaved.swap(0, Ordering::Relaxed);
    let mut dones = Vec::with_capacity(work.len());
    let mut acked = Vec::new();
    let mut rows = Vec::new();
    let mut acks = Vec::new();
    for item in work {
        match item {
            Work::Write(write) => {
                dones.push((write.done, write.messages.len() as u64, write.bytes));
                rows.extend(write.messages);
            }
            Work::Ack { seqs, done } => {
                acked.extend(seqs);
                acks.push(done);
            }
        }
    }
    let default_ttl = inner.limits.default_ttl;
    // Each row's lane: looked up only where devices have lanes (ingest is the hot path).
    let lanes: Vec<Option<String>> = if inner.lanes.is_empty() {
        Vec::new()
    } else {
        rows.iter()
            .map(|message| {
                crate::contract::lane_device(&message.topic)
                    .filter(|device| inner.lanes.contains(*device))
                    .map(str::to_owned)
            })
            .collect()
    };
    let laned = lanes.iter().any(Option::is_some);
    let result = inner
        .store
        .call(move |conn| {
            let now = now_millis();
            let tx = conn.transaction()?;
            let mut duplicates = (0u64, 0u64);
            let mut live = Vec::with_capacity(rows.len());
            let mut deleted = (0u64, 0u64);
            if !acked.is_empty() {
                let mut stmt = tx.prepare_cached(
                    "DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2 RETURNING length(payload)",
                )?;
                for (first, last) in runs(acked) {
                    let (count, bytes) = count_deleted(stmt.query([first, last])?)?;
                    deleted.0 += count;
                    deleted.1 += bytes;
                }
                drop(stmt);
                bump(&tx, "delivered", deleted.0)?;
            }
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO outbox (message_id, topic, payload, qos, priority, created_at, \
                     expires_at, retain, lane) VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT (message_id) DO NOTHING",
                )?;
                for (index, message) in rows.into_iter().enumerate() {
                    let lane = lanes.get(index).and_then(Option::as_deref);
                    let ttl = message.ttl.unwrap_or(default_ttl);
                    let expires =
                        now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
                    let inserted = stmt.execute(params![
                        message.message_id,
                        message.topic,
                        message.payload,
                        message.priority as i64,
                        now,
                        expires,
                        i64::from(message.retain),
                        lane.unwrap_or(""),
                    ])?;
                    if inserted == 0 {
                        duplicates.0 += 1;
                        duplicates.1 += message.payload.len() as u64;
                        continue;
                    }
                    if lane.is_some() {
                        // Read from SQLite by its connection; the mirror is the gateway's.
                        continue;
                    }
                    live.push(Live {
                        queued: Queued {
                            seq: tx.last_insert_rowid(),
                            message_id: message.message_id,
                            topic: message.topic,
                            payload: Bytes::from(message.payload),
                            retain: message.retain,
                            priority: message.priority,
                            expires_at: expires,
                        },
                        expires_at: expires,
                    });
                }
                bump(&tx, "refused", refused)?;
            }
            tx.commit()?;
            Ok((duplicates, live, deleted))
        })
        .await;
    match result {
        Ok(((duplicate_count, duplicate_bytes), live, (deleted, deleted_bytes))) => {
            if duplicate_count > 0 {
                // A message id already queued: the earlier copy stands; give back the room.
                inner.release(duplicate_count, duplicate_bytes);
            }
            inner.release(deleted, deleted_bytes);
            inner.delivered.fetch_add(deleted, Ordering::Relaxed);
            for done in acks {
                let _ = done.send(Ok(()));
            }
            {
                let mut mirror = inner.mirror.lock().expect("outbox mirror lock");
                for message in live {
                    mirror.push(message);
                }
            }
            for (done, _, _) in dones {
                let _ = done.send(Ok(()));
            }
            inner.ready.notify_one();
            if laned {
                inner.lane_commits.send_modify(|commits| *commits += 1);
            }
        }
        Err(err) => {
            inner.refused_unsaved.fetch_add(refused, Ordering::Relaxed);
            tracing::error!(error = %err, "the outbox could not commit");
            // Every caller of this group commit gets the real cause.
            let cause = Arc::new(err);
            for (done, count, bytes) in dones {
                inner.release(count, bytes);
                let _ = done.send(Err(OutboxError::Store(StoreError::Shared(Arc::clone(
                    &cause,
                )))));
            }
            for done in acks {
                let _ = done.send(Err(StoreError::Shared(Arc::clone(&cause))));
            }
        }
    }
}

/// Deletes expired messages and saves the refused count.
async fn housekeeping(inner: &Arc<Inner>) {
    let refused = inner.refused_unsaved.swap(0, Ordering::Relaxed);
    let result = inner
        .store
        .call(move |conn| {
            let tx = conn.transaction()?;
            let mut by_priority = [0u64; Priority::ALL.len()];
            let (mut count, mut bytes) = (0u64, 0u64);
            {
                let mut delete = tx.prepare_cached(
                    "DELETE FROM outbox WHERE expires_at <= ?1 RETURNING priority, length(payload)",
                )?;
                let mut rows = delete.query([now_millis()])?;
                while let Some(row) = rows.next()? {
                    let (priority, length): (i64, i64) = (row.get(0)?, row.get(1)?);
                    if let Some(slot) = usize::try_from(priority)
                        .ok()
                        .and_then(|p| by_priority.get_mut(p))
                    {
                        *slot += 1;
                    }
                    count += 1;
                    bytes += u64::try_from(length).unwrap_or(0);
                }
            }
            bump(&tx, "expired", count)?;
            bump(&tx, "refused", refused)?;
            tx.commit()?;
            Ok((count, bytes, by_priority))
        })
        .await;
    match result {
        Ok((count, bytes, by_priority)) => {
            for (priority, expired) in Priority::ALL.into_iter().zip(by_priority) {
                if expired > 0 {
                    metrics::counter!(crate::metrics::OUTBOX_EXPIRED, "priority" => priority.name())
                        .increment(expired);
                }
            }
            if count > 0 {
                inner.release(count, bytes);
                inner.expired.fetch_add(count, Ordering::Relaxed);
                tracing::warn!(
                    count,
                    "outbox messages expired undelivered (time to live ran out)"
                );
            }
        }
        Err(err) => {
            inner.refused_unsaved.fetch_add(refused, Ordering::Relaxed);
            tracing::warn!(error = %err, "outbox housekeeping failed");
        }
    }
}

fn bump(conn: &outpost_store::rusqlite::Connection, name: &str, by: u64) -> Result<(), StoreError> {
    if by > 0 {
        conn.prepare_cached("UPDATE outbox_counters SET value = value + ?2 WHERE name = ?1")?
            .execute(params![name, i64::try_from(by).unwrap_or(i64::MAX)])?;
    }
    Ok(())
}

/// Messages and payload bytes a `DELETE … RETURNING length(payload)` removed.
fn count_deleted(mut rows: outpost_store::rusqlite::Rows<'_>) -> Result<(u64, u64), StoreError> {
    let (mut count, mut bytes) = (0, 0);
    while let Some(row) = rows.next()? {
        count += 1;
        bytes += to_u64(row.get::<_, i64>(0)?);
    }
    Ok((count, bytes))
}

/// `seqs` as sorted runs of consecutive numbers, `(first, last)` inclusive.
fn runs(mut seqs: Vec<i64>) -> Vec<(i64, i64)> {
    seqs.sort_unstable();
    seqs.dedup();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for seq in seqs {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => out.push((seq, seq)),
        }
    }
    out
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests;
